"""Configuration: one frozen object built from the environment, once, by the CLI.

Nothing else in the project reads ``os.environ``; everything that needs a setting receives this
object (or one value from it). Every setting has a default, so a bad value is the only way to fail,
and the failure is one line naming the variable — never echoing a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import unquote, urlsplit

import annotated_types
import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from core.errors import OperatorError

ENV_PREFIX = "IMAGE_LISTENER_"

#: variables whose value must never appear in an error message, a repr or a log line
SECRET_VARIABLES = frozenset({"OPENAI_API_KEY", "DATABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"})

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
#: where the queue calls go and where images are stored
Mode = Literal["postgres", "supabase", "hybrid"]
#: how the worker learns of new requests: the mode's push channel, or polling only
Wakeup = Literal["notify", "poll"]

_SIZE = re.compile(r"(auto|[1-9][0-9]*x[1-9][0-9]*)")
# A key with a space or control character would end up in an HTTP header, where httpx rejects it
# with an error that may quote the header; refuse it here instead, without echoing it.
_API_KEY = re.compile(r"[\x21-\x7e]+")
_MAX_ECHO = 60


class SettingsError(OperatorError):
    """The environment holds a malformed value, or lacks one the chosen command needs.

    An :class:`OperatorError` because only the operator can fix it and retrying cannot; being in
    the one error tree lets the CLI turn every configuration problem into the same exit path.
    """

    code = "invalid_settings"

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.variables = tuple(variable for variable, _ in problems)
        super().__init__("; ".join(f"{variable}: {problem}" for variable, problem in problems))


def _env(name: str) -> str:
    return ENV_PREFIX + name


class Settings(BaseSettings):
    """Every knob of the daemon; build it with :func:`load_settings`, never from ``os.environ``."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        validate_default=True,
    )

    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        repr=False,  # carries the database password
        description="PostgreSQL connection URL of the database holding the messages table",
    )
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias="OPENAI_API_KEY",
        description="OpenAI API key; without it only the offline placeholder generator can run",
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias="OPENAI_BASE_URL",
        description="Override of the OpenAI API base URL (proxies, test servers)",
    )
    supabase_url: str | None = Field(
        default=None,
        validation_alias="SUPABASE_URL",
        description="Supabase project URL; with the service-role key it selects Supabase mode",
    )
    supabase_service_role_key: SecretStr | None = Field(
        default=None,
        validation_alias="SUPABASE_SERVICE_ROLE_KEY",
        description="Supabase service-role key (server-side only: it bypasses row-level security)",
    )
    model: str = Field(
        default="gpt-image-2.6-flare",
        validation_alias=_env("MODEL"),
        min_length=1,
        description="GPT Image model used for every request",
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        validation_alias=_env("CONCURRENCY"),
        description="Image requests processed at the same time by this worker",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        validation_alias=_env("MAX_ATTEMPTS"),
        description="Claims of one request (counted in the database) before it fails for good",
    )
    lease_seconds: float = Field(
        default=90.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias=_env("LEASE_SECONDS"),
        description="How long a claim stays ours before another worker may take the request over",
    )
    poll_seconds: float = Field(
        default=5.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias=_env("POLL_SECONDS"),
        description="Fallback claim interval that catches whatever a notification missed",
    )
    image_dir: Path = Field(
        default=Path("./.image-listener/images"),
        validation_alias=_env("IMAGE_DIR"),
        description="Directory where generated images are written",
    )
    input_dir: Path | None = Field(
        default=None,
        validation_alias=_env("INPUT_DIR"),
        description="Directory of users' input images for edits (postgres mode); unset is "
        "inputs/ beside IMAGE_DIR",
    )
    image_base_url: str | None = Field(
        default=None,
        validation_alias=_env("IMAGE_BASE_URL"),
        description="Public base URL that serves IMAGE_DIR; unset gives file:// URLs",
    )
    storage_bucket: str = Field(
        default="generated-images",
        min_length=1,
        validation_alias=_env("STORAGE_BUCKET"),
        description="Supabase Storage bucket for images (created by the migrations)",
    )
    signed_url_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        validation_alias=_env("SIGNED_URL_SECONDS"),
        description="Lifetime of the signed image URL written to a reply (Supabase Storage)",
    )
    log_prompts: bool = Field(
        default=False,
        validation_alias=_env("LOG_PROMPTS"),
        description="Log prompt text; by default only its length and a hash are logged",
    )
    log_format: LogFormat = Field(
        default="auto",
        validation_alias=_env("LOG_FORMAT"),
        description="Log output: json, console, or auto (JSON when stdout is not a terminal)",
    )
    log_level: LogLevel = Field(
        default="info",
        validation_alias=_env("LOG_LEVEL"),
        description="Lowest level logged: debug, info, warning, error or critical",
    )
    shutdown_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        allow_inf_nan=False,
        validation_alias=_env("SHUTDOWN_GRACE_SECONDS"),
        description="Time given to in-flight requests after SIGTERM/SIGINT before cancelling them",
    )
    openai_timeout_seconds: float = Field(
        default=240.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias=_env("OPENAI_TIMEOUT_SECONDS"),
        description="Timeout of one OpenAI call (image generation can take minutes)",
    )
    default_size: str = Field(
        default="1024x1024",
        validation_alias=_env("DEFAULT_SIZE"),
        description="Image size (WIDTHxHEIGHT or auto) used when a request does not give one",
    )
    partial_images: int = Field(
        default=0,
        ge=0,
        le=3,
        validation_alias=_env("PARTIAL_IMAGES"),
        description="Previews streamed while generating, for requests without partial_images (0-3)",
    )
    provider_images_per_minute: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        validation_alias=_env("PROVIDER_IMAGES_PER_MINUTE"),
        description=(
            "Provider calls the whole fleet may start per minute (set it to your organisation's "
            "images-per-minute limit; unset: none, the fleet learns a rate from 429s)"
        ),
    )
    tries_per_attempt: int = Field(
        default=3,
        ge=1,
        validation_alias=_env("TRIES_PER_ATTEMPT"),
        description="Calls to the provider within one claim before the attempt is given up",
    )
    listen_probe_seconds: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias=_env("LISTEN_PROBE_SECONDS"),
        description="Liveness probe interval of the wake-up connection (LISTEN or Realtime)",
    )
    worker_id: str | None = Field(
        default=None,
        validation_alias=_env("WORKER_ID"),
        description="Name of this worker in leases and logs; unset means <hostname>-<pid>",
    )
    wakeup: Wakeup = Field(
        default="notify",
        validation_alias=_env("WAKEUP"),
        description="notify (LISTEN or Realtime, plus the timer) or poll (timer only, for poolers)",
    )
    poll_only_seconds: float = Field(
        default=0.5,
        gt=0,
        allow_inf_nan=False,
        validation_alias=_env("POLL_ONLY_SECONDS"),
        description="Claim interval when WAKEUP=poll (one cheap indexed query per tick)",
    )
    http_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        validation_alias=_env("HTTP_PORT"),
        description=(
            "Port of /healthz, /readyz and /metrics; 0 turns the server off. Unset and 8080 "
            "taken (another listener on the host): a warning, and no endpoints"
        ),
    )
    http_host: str = Field(
        default="0.0.0.0",
        min_length=1,
        validation_alias=_env("HTTP_HOST"),
        description="Address the health and metrics server binds to",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only explicit values: the environment is read by :func:`load_settings`, no .env file."""
        return (init_settings,)

    @field_validator("log_format", "log_level", "wakeup", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("openai_api_key", "supabase_service_role_key", mode="before")
    @classmethod
    def _check_api_key(cls, value: object) -> object:
        if isinstance(value, str) and not _API_KEY.fullmatch(value):
            raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        # Parsed here, once, by libpq's own parser: its errors quote the URL or the token it
        # cannot read (the password, say), so a malformed value must never reach a connect().
        if value is not None:
            try:
                conninfo_to_dict(value)
            except (psycopg.Error, UnicodeError):
                raise ValueError(
                    "must be a PostgreSQL connection URL (postgresql://...) or key=value string"
                ) from None
        return value

    @field_validator("openai_base_url", "image_base_url", "supabase_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("default_size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        if not _SIZE.fullmatch(value):
            raise ValueError("must be WIDTHxHEIGHT (e.g. 1024x1024) or auto")
        return value

    @field_validator("worker_id")
    @classmethod
    def _check_worker_id(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("must be printable text")
        return value

    @property
    def http_port_explicit(self) -> bool:
        """Whether IMAGE_LISTENER_HTTP_PORT was set, rather than defaulted: only an explicit
        port that is taken stops start-up."""
        return "http_port" in self.model_fields_set

    @property
    def input_directory(self) -> Path:
        """Where users' uploads for edits are read in the postgres mode."""
        return self.input_dir if self.input_dir is not None else self.image_dir.parent / "inputs"

    def require_database_url(self) -> str:
        """The database URL, for commands that cannot run without one."""
        if self.database_url is None:
            raise SettingsError([("DATABASE_URL", "must be set (a PostgreSQL connection URL)")])
        return self.database_url

    def mode(self) -> Mode:
        """``postgres`` (DATABASE_URL only), ``supabase`` (URL + key only), or ``hybrid``
        (queue over DATABASE_URL, images in Supabase Storage); anything half-set is an error."""
        has_url = self.supabase_url is not None
        has_key = self.supabase_service_role_key is not None
        if has_url != has_key:
            missing = "SUPABASE_SERVICE_ROLE_KEY" if has_url else "SUPABASE_URL"
            present = "SUPABASE_URL" if has_url else "SUPABASE_SERVICE_ROLE_KEY"
            raise SettingsError([(missing, f"must be set together with {present}")])
        if has_url and self.database_url is not None:
            return "hybrid"
        if has_url:
            return "supabase"
        if self.database_url is not None:
            return "postgres"
        raise SettingsError(
            [("DATABASE_URL", "set it, or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")]
        )

    def require_supabase(self) -> tuple[str, str]:
        """(project URL, service-role key) for the modes that talk to Supabase."""
        if self.supabase_url is None or self.supabase_service_role_key is None:
            raise SettingsError(
                [("SUPABASE_URL", "must be set with SUPABASE_SERVICE_ROLE_KEY for Supabase")]
            )
        return self.supabase_url.rstrip("/"), self.supabase_service_role_key.get_secret_value()

    def require_openai_api_key(self) -> str:
        """The API key in clear text, for the one place that hands it to the OpenAI client."""
        if self.openai_api_key is None:
            raise SettingsError([("OPENAI_API_KEY", "must be set to generate images with OpenAI")])
        return self.openai_api_key.get_secret_value()

    def secret_values(self) -> tuple[str, ...]:
        """Strings the log redactor must blank out: the API key and the database password."""
        found: list[str] = []
        if self.openai_api_key is not None:
            found.append(self.openai_api_key.get_secret_value())
        if self.supabase_service_role_key is not None:
            found.append(self.supabase_service_role_key.get_secret_value())
        if self.database_url is not None:
            found.extend(_database_passwords(self.database_url))
        return tuple(value for value in found if value)

    def log_fields(self) -> dict[str, object]:
        """The settings as safe key/values for a startup log line: secrets shown as set/unset."""
        fields: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in ("database_url", "openai_api_key", "supabase_service_role_key"):
                fields[name] = "set" if value is not None else "unset"
            else:
                fields[name] = str(value) if isinstance(value, Path) else value
        return fields


def _database_passwords(url: str) -> list[str]:
    """Passwords in a URL (``postgresql://user:pw@host``) or key=value (``password=pw``) DSN."""
    found: list[str] = []
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found.extend({password, unquote(password)})
    for match in re.finditer(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url):
        value = match.group(1)
        found.append(value[1:-1] if value.startswith("'") else value)
    return found


def _field_variable(field: FieldInfo) -> str:
    alias = field.validation_alias
    if not isinstance(alias, str):
        raise TypeError("every setting names its environment variable in validation_alias")
    return alias


_FIELDS_BY_VARIABLE: dict[str, tuple[str, FieldInfo]] = {
    _field_variable(field): (name, field) for name, field in Settings.model_fields.items()
}


def _expectation(field: FieldInfo) -> str:
    """What a field accepts, in words, from its type and bounds (e.g. 'an integer >= 1')."""
    annotation = field.annotation
    bounds = []
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Ge):
            bounds.append(f">= {constraint.ge}")
        elif isinstance(constraint, annotated_types.Gt):
            bounds.append(f"> {constraint.gt}")
    if annotation is bool:
        kind = "a boolean (true/false, 1/0, yes/no, on/off)"
    elif annotation is int:
        kind = "an integer"
    elif annotation is float:
        kind = "a finite number"
    elif get_origin(annotation) is Literal:
        kind = "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    else:
        kind = "a non-empty value"
    return " ".join(["must be", kind, *bounds])


def _echo(variable: str, value: object) -> str:
    if variable in SECRET_VARIABLES:
        return ""
    text = repr(value)
    if len(text) > _MAX_ECHO:
        text = text[: _MAX_ECHO - 4] + "...'"
    return f" (got {text})"


def _problems(error: ValidationError, given: Mapping[str, str]) -> list[tuple[str, str]]:
    problems: dict[str, str] = {}
    for detail in error.errors(include_input=False, include_url=False):
        variable = str(detail["loc"][0]) if detail["loc"] else "settings"
        if variable in problems or variable not in _FIELDS_BY_VARIABLE:
            continue
        _, field = _FIELDS_BY_VARIABLE[variable]
        if detail["type"] == "value_error":
            # our validators word their ValueError as "must be ..."
            problem = str(detail.get("ctx", {}).get("error", "is not valid"))
        else:
            problem = _expectation(field)
        problems[variable] = problem + _echo(variable, given.get(variable))
    return list(problems.items())


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``environ`` (the process environment when None) and nothing else.

    A variable set to the empty string counts as unset, as with ``VAR= command`` or compose files
    that forward an optional variable. Raises :class:`SettingsError` naming every bad variable.
    """
    source = os.environ if environ is None else environ
    given = {
        variable: source[variable]
        for variable in _FIELDS_BY_VARIABLE
        if variable in source and source[variable] != ""
    }
    values: dict[str, Any] = dict(given)
    try:
        return Settings(**values)
    except ValidationError as exc:
        # from None: the pydantic error quotes the raw input, which may be a secret
        raise SettingsError(_problems(exc, given)) from None


#: settings that are no longer read, and where their job went
RETIRED_VARIABLES = {
    "IMAGE_LISTENER_PRICES": "prices live in the database since December 2026 (seeded with the "
    "old defaults): `image-listener prices show`, `image-listener prices set`",
}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``IMAGE_LISTENER_*`` variables that match no setting: most likely typos worth a warning."""
    source = os.environ if environ is None else environ
    return sorted(
        name
        for name in source
        if name.startswith(ENV_PREFIX)
        and name not in _FIELDS_BY_VARIABLE
        and name not in RETIRED_VARIABLES
    )


def retired_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Retired settings still set, each with where its job went."""
    source = os.environ if environ is None else environ
    return {name: why for name, why in RETIRED_VARIABLES.items() if source.get(name)}


def _default_label(field: FieldInfo) -> str:
    if field.default_factory is not None:
        import json

        return json.dumps(field.default_factory(), separators=(",", ":"))  # type: ignore[call-arg]
    default = field.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default) if not isinstance(default, Path) else f"./{default}"


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the one source for README and --help."""
    return [
        (variable, _default_label(field), field.description or "")
        for variable, (_, field) in _FIELDS_BY_VARIABLE.items()
    ]
