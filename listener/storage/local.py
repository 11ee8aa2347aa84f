"""Image storage in a local directory, optionally served under a public base URL.

Writes are atomic (temp file, fsync, rename), so a reader or a crash never sees half an image and
a retried attempt simply replaces the earlier file. Paths come from ids (``object_path``), but the
directory is still guarded: nothing may be written or deleted outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
from pathlib import Path
from urllib.parse import quote

from core.errors import (
    OperatorError,
    StorageMisconfigured,
    StorageUnavailable,
    StoredObjectMissing,
    TransientError,
    UnsafeStoragePath,
)
from core.models import GeneratedImage, StoredImage

#: the operator must act (permissions, read-only mount); another try would fail the same way
_OPERATOR_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class LocalDirectoryStorage:
    """:class:`core.ports.ImageStorage` over a directory; ``url`` is public or a ``file://`` URI."""

    def __init__(self, root: Path, base_url: str | None) -> None:
        # resolved once, so the escape check compares real paths on both sides
        self._root = root.resolve()
        self._base_url = None if base_url is None else base_url.rstrip("/")

    @property
    def root(self) -> Path:
        """The absolute, symlink-free image directory."""
        return self._root

    async def store(self, path: str, image: GeneratedImage) -> StoredImage:
        """Write ``image`` at ``path`` under the root, replacing any earlier file atomically."""
        target = await asyncio.to_thread(self._write, path, image.data)
        return StoredImage(
            url=self.url_for(path) if self._base_url is not None else target.as_uri(),
            location=path,
            content_type=image.content_type,
            size_bytes=len(image.data),
        )

    async def remove(self, location: str) -> None:
        """Delete the file at ``location``; a file that is already gone is fine."""
        await asyncio.to_thread(self._remove, location)

    async def read(self, location: str) -> bytes:
        """The file at ``location`` (never outside the root); missing: StoredObjectMissing."""
        return await asyncio.to_thread(self._read, location)

    def url_for(self, path: str) -> str:
        """The public URL of ``path``: each segment percent-encoded under the base URL."""
        if self._base_url is None:
            return self._target(path).as_uri()
        return self._base_url + "/" + "/".join(quote(part, safe="") for part in path.split("/"))

    def _target(self, path: str) -> Path:
        """The real file path for ``path``, refusing anything that is not a plain relative path
        or that resolves (through a symlink) outside the root."""
        parts = path.split("/")
        if (
            not path
            or path.startswith("/")
            or "\\" in path
            or "\x00" in path
            or any(part in ("", ".", "..") for part in parts)
        ):
            raise UnsafeStoragePath(f"refusing storage path {path!r}: not a plain relative path")
        resolved = self._root.joinpath(*parts).resolve()
        if resolved == self._root or not resolved.is_relative_to(self._root):
            raise UnsafeStoragePath(f"refusing storage path {path!r}: it leaves the image root")
        return resolved

    def _write(self, path: str, data: bytes) -> Path:
        target = self._target(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
            )
            try:
                with os.fdopen(fd, "wb") as temp:
                    temp.write(data)
                    temp.flush()
                    os.fsync(temp.fileno())
                # mkstemp makes 0600; images are meant to be served, so make them world-readable
                os.chmod(temp_name, 0o644)
                os.replace(temp_name, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_name)
                raise
            _fsync_directory(target.parent)
        except OSError as exc:
            raise _translate(exc, f"writing {path!r}") from exc
        return target

    def _read(self, location: str) -> bytes:
        target = self._target(location)
        try:
            return target.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise StoredObjectMissing(f"no file at {location!r}") from exc
        except OSError as exc:
            raise _translate(exc, f"reading {location!r}") from exc

    def _remove(self, location: str) -> None:
        target = self._target(location)
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            raise _translate(exc, f"removing {location!r}") from exc


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself: without it a crash can bring the old file back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some filesystems cannot fsync a directory; the file itself is already safe
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _translate(exc: OSError, action: str) -> TransientError | OperatorError:
    detail = f"image storage failed {action}: {exc}"
    if exc.errno in _OPERATOR_ERRNOS:
        return StorageMisconfigured(detail)
    return StorageUnavailable(detail)
