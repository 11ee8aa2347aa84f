"""Settings come from the mapping given (or the process environment) and fail in one clear line."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import ImageListenerError, OperatorError
from listener.settings import (
    Settings,
    SettingsError,
    load_settings,
    retired_variables,
    settings_table,
    unknown_variables,
)

SECRET_KEY = "sk-test-Zq8vN3kP0wLx7Rt2"


def _error(environ: dict[str, str]) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    return caught.value


def test_empty_environment_gives_documented_defaults() -> None:
    settings = load_settings({})
    assert settings.database_url is None
    assert settings.openai_api_key is None
    assert settings.openai_base_url is None
    assert settings.model == "gpt-image-2.6-flare"
    assert settings.concurrency == 4
    assert settings.max_attempts == 5
    assert settings.lease_seconds == 90
    assert settings.poll_seconds == 5
    assert settings.image_dir == Path(".image-listener/images")
    assert settings.image_base_url is None
    assert settings.log_prompts is False
    assert settings.log_format == "auto"
    assert settings.log_level == "info"
    assert settings.shutdown_grace_seconds == 30
    assert settings.openai_timeout_seconds == 240
    assert settings.default_size == "1024x1024"
    assert settings.tries_per_attempt == 3
    assert settings.listen_probe_seconds == 10
    assert settings.worker_id is None


def test_values_are_parsed_from_their_variables() -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://app:pw@db/app",
            "OPENAI_API_KEY": SECRET_KEY,
            "OPENAI_BASE_URL": "http://127.0.0.1:9999/v1",
            "IMAGE_LISTENER_MODEL": "gpt-image-1",
            "IMAGE_LISTENER_CONCURRENCY": "8",
            "IMAGE_LISTENER_MAX_ATTEMPTS": "2",
            "IMAGE_LISTENER_LEASE_SECONDS": "12.5",
            "IMAGE_LISTENER_POLL_SECONDS": "0.25",
            "IMAGE_LISTENER_IMAGE_DIR": "/srv/images",
            "IMAGE_LISTENER_IMAGE_BASE_URL": "https://cdn.example/images/",
            "IMAGE_LISTENER_LOG_PROMPTS": "yes",
            "IMAGE_LISTENER_LOG_FORMAT": "JSON",
            "IMAGE_LISTENER_LOG_LEVEL": "Debug",
            "IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS": "0",
            "IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS": "60",
            "IMAGE_LISTENER_DEFAULT_SIZE": "auto",
            "IMAGE_LISTENER_TRIES_PER_ATTEMPT": "1",
            "IMAGE_LISTENER_LISTEN_PROBE_SECONDS": "2",
            "IMAGE_LISTENER_WORKER_ID": "worker-a",
        }
    )
    assert settings.database_url == "postgresql://app:pw@db/app"
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == SECRET_KEY
    assert settings.openai_base_url == "http://127.0.0.1:9999/v1"
    assert settings.model == "gpt-image-1"
    assert (settings.concurrency, settings.max_attempts, settings.tries_per_attempt) == (8, 2, 1)
    assert (settings.lease_seconds, settings.poll_seconds) == (12.5, 0.25)
    assert settings.image_dir == Path("/srv/images")
    assert settings.image_base_url == "https://cdn.example/images/"
    assert settings.log_prompts is True
    assert (settings.log_format, settings.log_level) == ("json", "debug")
    assert settings.shutdown_grace_seconds == 0
    assert settings.openai_timeout_seconds == 60
    assert settings.default_size == "auto"
    assert settings.listen_probe_seconds == 2
    assert settings.worker_id == "worker-a"


def test_passed_mapping_ignores_process_environment_and_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Tests can hand in a dict: neither os.environ nor a .env file in the cwd leaks in."""
    monkeypatch.setenv("IMAGE_LISTENER_CONCURRENCY", "not-a-number")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("IMAGE_LISTENER_MAX_ATTEMPTS=99\n")
    settings = load_settings({})
    assert settings.concurrency == 4
    assert settings.max_attempts == 5


def test_without_mapping_the_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_LISTENER_CONCURRENCY", "7")
    assert load_settings().concurrency == 7


def test_empty_string_counts_as_unset() -> None:
    """`VAR=` (as compose files forward optional variables) falls back to the default."""
    settings = load_settings(
        {"IMAGE_LISTENER_CONCURRENCY": "", "DATABASE_URL": "", "OPENAI_API_KEY": ""}
    )
    assert settings.concurrency == 4
    assert settings.database_url is None
    assert settings.openai_api_key is None


def test_malformed_integer_names_the_variable_in_one_line() -> None:
    error = _error({"IMAGE_LISTENER_CONCURRENCY": "abc"})
    assert str(error) == "IMAGE_LISTENER_CONCURRENCY: must be an integer >= 1 (got 'abc')"
    assert error.variables == ("IMAGE_LISTENER_CONCURRENCY",)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("IMAGE_LISTENER_CONCURRENCY", "0", "must be an integer >= 1 (got '0')"),
        ("IMAGE_LISTENER_MAX_ATTEMPTS", "-1", "must be an integer >= 1 (got '-1')"),
        ("IMAGE_LISTENER_TRIES_PER_ATTEMPT", "1.5", "must be an integer >= 1 (got '1.5')"),
        ("IMAGE_LISTENER_LEASE_SECONDS", "0", "must be a finite number > 0 (got '0')"),
        ("IMAGE_LISTENER_POLL_SECONDS", "nan", "must be a finite number > 0 (got 'nan')"),
        ("IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS", "inf", "must be a finite number > 0"),
        ("IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS", "-5", "must be a finite number >= 0"),
        ("IMAGE_LISTENER_LOG_PROMPTS", "maybe", "must be a boolean"),
        ("IMAGE_LISTENER_LOG_FORMAT", "xml", "must be one of auto, json, console (got 'xml')"),
        ("IMAGE_LISTENER_LOG_LEVEL", "loud", "must be one of debug, info, warning"),
        ("IMAGE_LISTENER_DEFAULT_SIZE", "big", "must be WIDTHxHEIGHT (e.g. 1024x1024) or auto"),
        ("IMAGE_LISTENER_IMAGE_BASE_URL", "cdn.example", "must be an http:// or https:// URL"),
        ("OPENAI_BASE_URL", "ftp://x", "must be an http:// or https:// URL (got 'ftp://x')"),
    ],
)
def test_each_malformed_value_is_reported_against_its_variable(
    variable: str, value: str, expected: str
) -> None:
    error = _error({variable: value})
    assert str(error).startswith(f"{variable}: {expected}")
    assert "\n" not in str(error)
    assert error.variables == (variable,)


def test_several_problems_are_reported_together() -> None:
    """An operator fixes everything in one round instead of one variable per restart."""
    error = _error({"IMAGE_LISTENER_CONCURRENCY": "x", "IMAGE_LISTENER_LOG_FORMAT": "xml"})
    assert set(error.variables) == {"IMAGE_LISTENER_CONCURRENCY", "IMAGE_LISTENER_LOG_FORMAT"}
    assert "; " in str(error)
    assert "\n" not in str(error)


def test_long_bad_values_are_shortened_in_the_message() -> None:
    error = _error({"IMAGE_LISTENER_CONCURRENCY": "9" * 500 + "x"})
    assert len(str(error)) < 150


def test_settings_error_belongs_to_the_error_tree() -> None:
    error = _error({"IMAGE_LISTENER_CONCURRENCY": "x"})
    assert isinstance(error, OperatorError)
    assert isinstance(error, ImageListenerError)
    assert error.code == "invalid_settings"


def test_malformed_api_key_is_never_echoed() -> None:
    """Neither the message, the repr, nor a printed traceback shows the bad key."""
    bad_key = "sk-live secret\nwith-newline"
    error = _error({"OPENAI_API_KEY": bad_key})
    assert str(error) == "OPENAI_API_KEY: must be printable ASCII without spaces"
    printed = "".join(traceback.format_exception(error))
    for shown in (str(error), repr(error), error.public_message, printed):
        assert "secret" not in shown
        assert "sk-live" not in shown


def test_secrets_stay_out_of_repr_str_and_log_fields() -> None:
    settings = load_settings(
        {"OPENAI_API_KEY": SECRET_KEY, "DATABASE_URL": "postgresql://app:hunter2@db/app"}
    )
    for shown in (repr(settings), str(settings), repr(settings.log_fields())):
        assert SECRET_KEY not in shown
        assert "hunter2" not in shown
    assert settings.log_fields()["openai_api_key"] == "set"
    assert settings.log_fields()["concurrency"] == 4


def test_secret_values_feed_the_log_redactor() -> None:
    """The key and the database password (raw and percent-decoded) are what must be blanked."""
    settings = load_settings(
        {"OPENAI_API_KEY": SECRET_KEY, "DATABASE_URL": "postgresql://app:p%40ss@db/app"}
    )
    assert set(settings.secret_values()) == {SECRET_KEY, "p%40ss", "p@ss"}
    keyword_dsn = load_settings({"DATABASE_URL": "host=db user=app password=s3cr3t dbname=app"})
    assert keyword_dsn.secret_values() == ("s3cr3t",)
    assert load_settings({}).secret_values() == ()


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(ValidationError):
        settings.concurrency = 10


def test_require_helpers_name_the_missing_variable() -> None:
    settings = load_settings({})
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: must be set"):
        settings.require_database_url()
    with pytest.raises(SettingsError, match=r"^OPENAI_API_KEY: must be set"):
        settings.require_openai_api_key()
    given = load_settings({"OPENAI_API_KEY": SECRET_KEY, "DATABASE_URL": "postgresql:///x"})
    assert given.require_openai_api_key() == SECRET_KEY
    assert given.require_database_url() == "postgresql:///x"


def test_unknown_prefixed_variables_are_listed_as_likely_typos() -> None:
    environ = {
        "IMAGE_LISTENER_CONCURENCY": "8",
        "IMAGE_LISTENER_CONCURRENCY": "8",
        "HOME": "/root",
    }
    assert unknown_variables(environ) == ["IMAGE_LISTENER_CONCURENCY"]


def test_a_retired_variable_is_named_with_where_its_job_went_not_as_a_typo() -> None:
    environ = {"IMAGE_LISTENER_PRICES": '{"m": {"input_text": 1}}'}
    assert unknown_variables(environ) == []
    assert "image-listener prices set" in retired_variables(environ)["IMAGE_LISTENER_PRICES"]
    assert retired_variables({"IMAGE_LISTENER_PRICES": ""}) == {}  # empty counts as unset


def test_settings_table_lists_every_setting_once_with_a_one_line_description() -> None:
    table = settings_table()
    variables = [variable for variable, _, _ in table]
    assert len(variables) == len(set(variables)) == len(Settings.model_fields)
    unprefixed = ["DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"]
    unprefixed += ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"]
    assert variables[:5] == unprefixed
    assert all(v.startswith("IMAGE_LISTENER_") for v in variables[5:])
    for _, default, description in table:
        assert default
        assert description
        assert "\n" not in description
    assert ("IMAGE_LISTENER_CONCURRENCY", "4") in [(v, d) for v, d, _ in table]


def test_settings_table_defaults_load_back_to_the_defaults() -> None:
    """The table shows defaults in a form the variables accept: setting them changes nothing."""
    environ = {variable: default for variable, default, _ in settings_table() if default != "unset"}
    assert load_settings(environ) == load_settings({})
