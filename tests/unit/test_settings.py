"""Settings: the defaults, a bad value naming its variable, secrets kept out of logs."""

from __future__ import annotations

import json

import pytest

from dispatcher.settings import Settings, SettingsError


def test_defaults_point_at_the_local_stack() -> None:
    """With no environment the settings are the documented local-stack defaults."""
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.http_port == 8080
    assert s.event_topics == ("entity-events",)
    assert s.retry_delay_seconds == 900
    assert s.max_retries == 3
    assert s.consumer_group == "webhook-dispatcher"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DISPATCHER_HTTP_PORT", "abc", "expected an integer from 1 to 65535, got 'abc'"),
        ("DISPATCHER_HTTP_PORT", "70000", "expected an integer from 1 to 65535, got '70000'"),
        ("DISPATCHER_MAX_RETRIES", "-1", "expected an integer >= 0, got '-1'"),
        ("DISPATCHER_KAFKA_METADATA_MAX_AGE_MS", "10", "expected an integer >= 1000, got '10'"),
        ("DISPATCHER_KAFKA_REQUEST_TIMEOUT_MS", "5000", "expected an integer >= 10001"),
        ("DISPATCHER_RETRY_DELAY_SECONDS", "soon", "expected a number of seconds, got 'soon'"),
        ("DISPATCHER_RETRY_DELAY_SECONDS", "0", "expected a number of seconds > 0, got '0'"),
        ("DISPATCHER_EVENT_TOPICS", " , ", "expected a comma-separated list of topic names"),
        ("DISPATCHER_EVENT_TOPICS", "ok,bad topic", "'bad topic' is not a valid Kafka topic"),
        ("DISPATCHER_ALLOW_PRIVATE_TARGETS", "10.0.0.0/33", "'10.0.0.0/33' is not a CIDR"),
        ("DISPATCHER_SMTP_TLS", "maybe", "expected one of none, starttls, tls, got 'maybe'"),
        ("DISPATCHER_DATABASE_URL", "mysql://x", "expected a postgresql:// URL"),
        ("DISPATCHER_WEBHOOK_SHARE_OF_ENDPOINT", "0", "expected a fraction above 0 and at most 1"),
        ("DISPATCHER_WEBHOOK_SHARE_OF_ENDPOINT", "1.5", "expected a fraction above 0"),
        ("DISPATCHER_WEBHOOK_SHARE_OF_ENDPOINT", "nan", "expected a fraction above 0"),
        ("DISPATCHER_MIN_IN_FLIGHT_PER_ENDPOINT", "0", "expected an integer >= 1, got '0'"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    """Each bad value raises an error that starts with the variable's name."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(f"{name}: {message}")


@pytest.mark.parametrize(
    ("raw", "skip"), [("true", True), ("1", True), ("On", True), ("false", False), ("0", False)]
)
def test_skip_setting_reads_the_usual_spellings(raw: str, skip: bool) -> None:
    """DISPATCHER_SKIP_UNDECODABLE_BATCHES takes true/false, 1/0, yes/no, on/off."""
    env = {"DISPATCHER_SKIP_UNDECODABLE_BATCHES": raw}
    assert Settings.from_env(env).skip_undecodable_batches is skip
    assert Settings.from_env({}).skip_undecodable_batches is False


def test_a_bad_skip_setting_names_the_variable() -> None:
    """A value that is not a boolean stops the start with the variable's name."""
    with pytest.raises(SettingsError, match=r"^DISPATCHER_SKIP_UNDECODABLE_BATCHES: expected true"):
        Settings.from_env({"DISPATCHER_SKIP_UNDECODABLE_BATCHES": "maybe"})


def test_secrets_are_redacted_for_logs() -> None:
    """The settings logged at start never include the SMTP password or the DB password."""
    s = Settings.from_env(
        {
            "DISPATCHER_SMTP_PASSWORD": "hunter2",
            "DISPATCHER_DATABASE_URL": "postgresql://u:sekret@db/x",
        }
    )
    shown = json.dumps(s.redacted())
    assert "hunter2" not in shown and "sekret" not in shown
    assert "postgresql://u:***@db/x" in shown
    assert "hunter2" not in repr(s)
