"""Pure logic: settings, offsets, the event contract, the catalog, ids and signatures."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError

from dispatcher import catalog, signing
from dispatcher.events import InvalidEvent, decode
from dispatcher.netguard import is_blocked
from dispatcher.notification import notification_uuid
from dispatcher.offsets import PartitionOffsets
from dispatcher.settings import Settings, SettingsError, documentation
from dispatcher.store import Webhook, new_secret

ROOT = Path(__file__).resolve().parent.parent


# --- settings ---------------------------------------------------------------------------


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
        ("DISPATCHER_RETRY_DELAY_SECONDS", "soon", "expected a number of seconds, got 'soon'"),
        ("DISPATCHER_RETRY_DELAY_SECONDS", "0", "expected a number of seconds > 0, got '0'"),
        ("DISPATCHER_EVENT_TOPICS", " , ", "expected a comma-separated list of topic names"),
        ("DISPATCHER_EVENT_TOPICS", "ok,bad topic", "'bad topic' is not a valid Kafka topic"),
        ("DISPATCHER_ALLOW_PRIVATE_TARGETS", "10.0.0.0/33", "'10.0.0.0/33' is not a CIDR"),
        ("DISPATCHER_SMTP_TLS", "maybe", "expected one of none, starttls, tls, got 'maybe'"),
        ("DISPATCHER_DATABASE_URL", "mysql://x", "expected a postgresql:// URL"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    """Each bad value raises an error that starts with the variable's name."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(f"{name}: {message}")


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


def test_every_setting_is_documented_in_the_readme() -> None:
    """The README's configuration table lists every setting with its default."""
    readme = (ROOT / "README.md").read_text()
    for name, default, _doc in documentation():
        assert f"| `{name}` | `{default}` |" in readme, name


# --- offsets ----------------------------------------------------------------------------


def test_commit_offset_never_passes_unfinished_work() -> None:
    """Out-of-order completion commits only past the lowest unfinished offset."""
    t = PartitionOffsets()
    for offset in (10, 11, 12, 13):
        t.add(offset)
    t.done(12)
    assert t.committable() is None
    t.done(10)
    assert t.committable() == 11
    t.committed(11)
    assert t.committable() is None
    t.done(11)
    assert t.committable() == 13
    t.done(13)
    assert t.committable() == 14
    assert t.in_flight == 0


def test_offsets_must_grow() -> None:
    """Handing out an offset twice is a bug and is refused."""
    t = PartitionOffsets()
    t.add(3)
    with pytest.raises(ValueError, match="offset 3 after 3"):
        t.add(3)


# --- the event contract -----------------------------------------------------------------

VALID: dict[str, Any] = {
    "event_id": "6f1c3c57-2f0e-4a51-9a35-0c7a2b7d1e11",
    "entity_name": "sales",
    "event_type": "closed",
    "environment_id": "shop-1",
    "client_id": "app",
    "from_user": "user@example.com",
    "time": "2026-01-01T10:00:00.000Z",
    "entity": {"id": 1},
    "import_id": None,
    "import_end": False,
}

INVALID: list[tuple[dict[str, Any], str]] = [
    ({k: v for k, v in VALID.items() if k != "event_id"}, "'event_id' is missing"),
    ({**VALID, "event_id": "x"}, "'event_id' must be a UUID"),
    ({**VALID, "entity_name": 3}, "'entity_name' must be a string"),
    ({**VALID, "environment_id": ""}, "'environment_id' must not be empty"),
    ({**VALID, "entity": [1]}, "'entity' must be a JSON object"),
    ({**VALID, "import_end": "yes"}, "'import_end' must be true or false"),
    ({**VALID, "import_id": [1]}, "'import_id' must be a string, a number or null"),
    ({k: v for k, v in VALID.items() if k != "time"}, "'time' is missing"),
]


def test_valid_event_decodes_and_upper_cases_the_event_type() -> None:
    """A valid event decodes; its event type is stored upper case."""
    event = decode(orjson.dumps(VALID))
    assert event.event_type == "CLOSED"
    assert event.entity == {"id": 1}


@pytest.mark.parametrize(("data", "reason"), INVALID)
def test_invalid_events_say_why(data: dict[str, Any], reason: str) -> None:
    """A broken event raises InvalidEvent whose reason names the field."""
    with pytest.raises(InvalidEvent) as caught:
        decode(orjson.dumps(data))
    assert caught.value.reason.startswith(reason)


def test_json_schema_and_decoder_agree() -> None:
    """The published JSON Schema accepts the valid event and rejects each invalid one."""
    schema = json.loads((ROOT / "schemas" / "event.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(VALID))
    for data, _ in INVALID:
        assert list(validator.iter_errors(data)), data


# --- catalog, ids, signatures, addresses ------------------------------------------------


def test_builtin_catalog_has_the_domain_pairs() -> None:
    """The built-in catalog allows the documented pairs and import policies."""
    c = catalog.load()
    assert c.allows("sales", "CLOSED")
    assert not c.allows("items", "CLOSED")
    assert c.import_policy("items") == "batch"
    assert c.import_policy("stock_movements") == "skip"
    assert c.import_policy("sales") == "single"


def test_operators_can_replace_the_catalog(tmp_path: Path) -> None:
    """A catalog file adds entities; a malformed one is refused with the file's name."""
    good = tmp_path / "catalog.json"
    good.write_text('{"vouchers": {"events": ["created", "USED"], "imports": "batch"}}')
    assert catalog.load(str(good)).allows("vouchers", "USED")
    bad = tmp_path / "bad.json"
    bad.write_text('{"vouchers": {"events": []}}')
    with pytest.raises(catalog.CatalogError, match=r"bad\.json: entity 'vouchers'"):
        catalog.load(str(bad))


def test_notification_uuid_is_stable_per_event_and_webhook() -> None:
    """The same (event, webhook) always gives the same id; another webhook another id."""
    event_id, a, b = str(uuid.uuid4()), uuid.uuid4(), uuid.uuid4()
    assert notification_uuid(event_id, a) == notification_uuid(event_id.upper(), a)
    assert notification_uuid(event_id, a) != notification_uuid(event_id, b)


def test_signature_verifies_with_the_standard_webhooks_library() -> None:
    """Our headers verify with an independent Standard Webhooks implementation."""
    import time

    secret = new_secret()
    body = b'{"hello":"world"}'
    now = int(time.time())
    headers = signing.headers(signing.secret_key(secret), "msg_1", now, body)
    assert StandardWebhook(secret).verify(body, headers) == {"hello": "world"}


def test_signing_with_two_keys_verifies_with_either_secret() -> None:
    """Two keys give two space-separated signatures, the first key's first; either verifies."""
    import time

    new, old, other = new_secret(), new_secret(), new_secret()
    body = b'{"hello":"world"}'
    now = int(time.time())
    keys = [signing.secret_key(new), signing.secret_key(old)]
    headers = signing.headers(keys, "msg_1", now, body)
    first, second = headers["webhook-signature"].split(" ")
    assert first == signing.sign(keys[0], "msg_1", now, body)
    assert second == signing.sign(keys[1], "msg_1", now, body)
    for secret in (new, old):
        assert StandardWebhook(secret).verify(body, headers) == {"hello": "world"}
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(other).verify(body, headers)


def test_previous_secret_signs_only_until_it_expires() -> None:
    """A rotated webhook signs with the new and the previous secret until the expiry only."""
    from datetime import UTC, datetime

    until = datetime(2026, 1, 1, tzinfo=UTC)
    rotated = Webhook(
        uuid.uuid4(), "shop", "app", "sales", "CLOSED", "https://example.com/h", "a@b.test",
        "whsec_new", until, previous_secret="whsec_old", previous_secret_until=until,
    )  # fmt: skip
    assert rotated.signing_secrets(until.timestamp() - 1) == ("whsec_new", "whsec_old")
    assert rotated.signing_secrets(until.timestamp()) == ("whsec_new",)
    never = Webhook(
        uuid.uuid4(), "shop", "app", "sales", "CLOSED", "https://example.com/h", "a@b.test",
        "whsec_new", until,
    )  # fmt: skip
    assert never.signing_secrets(0) == ("whsec_new",)
    assert never.secret_info(0) == {"secret": "whsec_new", "previous_secret_expires_at": None}
    assert rotated.secret_info(0)["previous_secret_expires_at"] == "2026-01-01T00:00:00Z"
    assert rotated.secret_info(until.timestamp())["previous_secret_expires_at"] is None


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("fe80::1", True),
        ("::ffff:10.0.0.1", True),
        ("64:ff9b::7f00:1", True),  # NAT64 of 127.0.0.1
        ("2002:a00:1::1", True),  # 6to4 of 10.0.0.1
        ("fec0::1", True),  # site-local
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
        ("8.8.8.8", False),
        ("2001:4860:4860::8888", False),
    ],
)
def test_private_loopback_and_link_local_addresses_are_blocked(address: str, blocked: bool) -> None:
    """Webhooks may only reach globally routable addresses."""
    assert is_blocked(address, ()) is blocked


def test_allowed_networks_lift_the_block() -> None:
    """DISPATCHER_ALLOW_PRIVATE_TARGETS exempts the listed networks only."""
    allowed = Settings.from_env(
        {"DISPATCHER_ALLOW_PRIVATE_TARGETS": "127.0.0.0/8"}
    ).allow_private_targets
    assert not is_blocked("127.0.0.1", allowed)
    assert is_blocked("10.0.0.1", allowed)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("9" * 400, 86_400.0),  # absurdly long: clamped to a day
        ("300000000000", 86_400.0),
        ("\u00b2", None),  # a digit to str.isdigit, not to float: ignored
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("Fri, 31 Dec 9999 23:59:59 GMT", 86_400.0),
        ("soon", None),
        ("", None),
    ],
)
def test_hostile_retry_after_values_are_ignored_or_clamped(
    header: str, seconds: float | None
) -> None:
    """No Retry-After value can crash the scheduler or park a retry for years."""
    from dispatcher.delivery import parse_retry_after

    assert parse_retry_after(header, 1_800_000_000.0) == seconds


def test_retry_and_notice_records_match_their_published_schemas() -> None:
    """What the scheduler writes on the delay and notice topics validates against schemas/."""
    from dispatcher.notices import Notice
    from dispatcher.notification import Notification
    from dispatcher.retry import RetryRecord

    notification = Notification(
        str(uuid.uuid4()), uuid.uuid4(), "CLOSED", "sales", "shop", "app", None, ({"id": 1},)
    )
    record = orjson.loads(RetryRecord(notification, 1, 1_800_000_000_000, "HTTP 500").encode())
    assert RetryRecord.decode(orjson.dumps(record)).notification == notification
    notice = Notice(
        "n1", "a@b.test", str(notification.webhook_id), "https://x.test/h", "sales", "CLOSED",
        notification.notification_uuid, 0, 3, False, "2026-01-01T00:00:00.000Z", "HTTP 500",
        500, "oops", "2026-01-01T00:15:00.000Z", "{}",
    )  # fmt: skip
    for name, data in (("retry-record", record), ("notice", orjson.loads(notice.encode()))):
        schema = json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
        assert not errors, (name, errors)
