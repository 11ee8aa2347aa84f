# image-listener: the daemon and its CLI, migrations included, on python:3.11-slim.
#
#   docker build -t image-listener .
#   docker run --rm --env-file image-listener.env image-listener migrate     # once per release
#   docker run -d --env-file image-listener.env -p 8080:8080 image-listener   # = run
#
# Two stages: the builder turns the project into a wheel and installs it with its dependencies
# into a venv; the final stage gets that venv and nothing else (no source tree, no compiler, no
# pip cache). The migrations travel inside the wheel (listener/migrations/), so `migrate` works
# from any installed copy. Every dependency ships binary wheels for CPython 3.11 on
# linux/amd64 and arm64, so the builder needs no build tools either.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Same path as in the final stage: a venv's scripts carry its absolute path in their shebang.
RUN python -m venv /opt/image-listener/.venv
COPY pyproject.toml README.md ./
COPY core/ core/
COPY listener/ listener/
COPY migrations/ migrations/
RUN python -m pip wheel --no-deps . -w /wheels \
    && /opt/image-listener/.venv/bin/pip install /wheels/*.whl \
    && /opt/image-listener/.venv/bin/image-listener --help >/dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/image-listener/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMAGE_LISTENER_IMAGE_DIR=/var/lib/image-listener/images
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it and a mounted image
# volume can be chown'ed to it beforehand.
RUN groupadd --system --gid 10001 image-listener \
    && useradd --system --uid 10001 --gid image-listener --no-create-home \
       --home-dir /var/lib/image-listener --shell /usr/sbin/nologin image-listener \
    && install -d -o image-listener -g image-listener \
       /var/lib/image-listener /var/lib/image-listener/images
COPY --from=builder /opt/image-listener/.venv /opt/image-listener/.venv
USER 10001:10001
WORKDIR /var/lib/image-listener
EXPOSE 8080
# SIGTERM: stop claiming, give in-flight work IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS (default 30),
# hand back the rest, exit 0. Let `docker stop -t` / terminationGracePeriodSeconds exceed it.
STOPSIGNAL SIGTERM
# No curl in slim images: python's urllib does the probe (any non-2xx answer raises, exit 1).
# It follows IMAGE_LISTENER_HTTP_PORT; with the server off (0) the check cannot pass.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + (os.environ.get('IMAGE_LISTENER_HTTP_PORT') or '8080') + '/healthz', timeout=4)"]
ENTRYPOINT ["image-listener"]
CMD ["run"]
