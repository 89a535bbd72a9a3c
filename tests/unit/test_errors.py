"""The error hierarchy and how the command reports each family; nothing needs to run."""

from __future__ import annotations

import argparse

import pytest

from dispatcher import catalog, cli, db, errors
from dispatcher.events import InvalidEvent, decode
from dispatcher.settings import Settings, SettingsError


def test_settings_and_catalog_errors_are_configuration_errors_and_still_value_errors() -> None:
    """SettingsError and CatalogError sit under ConfigurationError yet remain ValueErrors."""
    with pytest.raises(SettingsError) as bad_setting:
        Settings.from_env({"DISPATCHER_MAX_RETRIES": "-1"})
    with pytest.raises(catalog.CatalogError) as bad_catalog:
        catalog.parse([])
    for caught in (bad_setting, bad_catalog):
        assert isinstance(caught.value, errors.ConfigurationError)
        assert isinstance(caught.value, errors.DispatcherError)
        assert isinstance(caught.value, ValueError)


def test_invalid_event_is_a_dispatcher_error_that_keeps_reason_kind_and_value_error() -> None:
    """InvalidEvent is a DispatcherError, still a ValueError, with its reason and kind."""
    with pytest.raises(InvalidEvent) as caught:
        decode(b"[1]")
    assert isinstance(caught.value, errors.DispatcherError)
    assert isinstance(caught.value, ValueError)
    assert caught.value.kind == "shape"
    assert caught.value.reason == str(caught.value) == "expected a JSON object, got list"


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            SettingsError("DISPATCHER_X: bad"),
            2,
            "dispatcher: configuration error: DISPATCHER_X: bad",
        ),
        (catalog.CatalogError("f.json: bad"), 2, "dispatcher: configuration error: f.json: bad"),
        (errors.DatabaseUnavailable("no db"), 3, "dispatcher: database unavailable: no db"),
        (errors.KafkaUnavailable("no topic"), 4, "dispatcher: Kafka unavailable: no topic"),
        (errors.DispatcherError("other"), 1, "dispatcher: error: other"),
    ],
)
def test_each_family_is_reported_as_one_line_with_its_exit_code(
    error: Exception, code: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each family prints 'dispatcher: <what failed>: <message>' and exits with its code."""
    assert cli._report(error) == code
    out, err = capsys.readouterr()
    assert (out, err) == ("", line + "\n")


def test_an_error_of_a_task_group_is_reported_by_its_first_leaf(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A DatabaseUnavailable wrapped in exception groups still exits 3 with its own line."""
    group = ExceptionGroup("loops", [ExceptionGroup("inner", [errors.DatabaseUnavailable("x")])])
    assert cli._report(group) == 3
    assert capsys.readouterr().err == "dispatcher: database unavailable: x\n"


def test_an_unexpected_error_is_one_line_naming_its_type_and_how_to_see_more(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception of no family exits 1 with one line; at debug level its traceback too."""
    monkeypatch.delenv("DISPATCHER_LOG_LEVEL", raising=False)
    assert cli._report(RuntimeError("boom\nsecond line")) == 1
    assert capsys.readouterr().err == (
        "dispatcher: unexpected error: RuntimeError: boom second line "
        "(run with DISPATCHER_LOG_LEVEL=debug for the traceback)\n"
    )
    monkeypatch.setenv("DISPATCHER_LOG_LEVEL", "debug")
    with pytest.raises(RuntimeError) as raised:
        raise RuntimeError("boom")  # raised, so that it has a traceback
    assert cli._report(raised.value) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith(
        "dispatcher: unexpected error: RuntimeError: boom (the traceback is above)\n"
    )


def test_ctrl_c_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """KeyboardInterrupt during a command exits 130 and prints nothing."""

    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_command", interrupted)
    assert cli.main(["migrate"]) == 130
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("failure", "kind", "message"),
    [
        (
            ConnectionRefusedError(111, "Connect call failed"),
            errors.DatabaseUnavailable,
            "cannot connect to PostgreSQL at db.example:5432/app: connection refused; "
            "is PostgreSQL running? check DISPATCHER_DATABASE_URL",
        ),
        (
            TimeoutError(),
            errors.DatabaseUnavailable,
            "cannot connect to PostgreSQL at db.example:5432/app: no answer within 10 s; "
            "is PostgreSQL running? check DISPATCHER_DATABASE_URL",
        ),
        (
            ValueError("invalid port"),
            errors.ConfigurationError,
            "DISPATCHER_DATABASE_URL: not a usable URL: invalid port",
        ),
    ],
)
def test_connection_failures_name_host_port_and_what_to_do_never_the_password(
    failure: Exception, kind: type[errors.DispatcherError], message: str
) -> None:
    """A failed connection names host:port/db and what to do, without the URL's password."""
    url = "postgresql://app:hunter2@db.example:5432/app?password=hunter2"
    error = db._connect_error(url, failure, 10.0)
    assert type(error) is kind
    assert str(error) == message
