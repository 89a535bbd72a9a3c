"""The per-delivery shortcuts (issue 16) compute exactly what the plain versions did."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import random
import uuid
from datetime import UTC, datetime

import pytest

from dispatcher import loops, signing
from dispatcher.notification import NAMESPACE, iso_millis, iso_millis_at, notification_uuid
from dispatcher.settings import Settings
from dispatcher.store import _WEBHOOK_COLUMNS, Webhook


def test_notification_uuid_is_the_uuid5_of_event_and_webhook() -> None:
    """The hand-made uuid5 equals uuid.uuid5 of "<event id, lower case>/<webhook id>"."""
    for _ in range(500):
        event_id, webhook_id = str(uuid.uuid4()).upper(), uuid.uuid4()
        expected = str(uuid.uuid5(NAMESPACE, f"{event_id.lower()}/{webhook_id}"))
        assert notification_uuid(event_id, webhook_id) == expected


def test_iso_millis_at_matches_iso_millis_of_the_same_moment() -> None:
    """The per-second cached timestamp text equals the datetime-based one, ms included."""
    rng = random.Random(16)
    moments = [rng.uniform(0, 4e9) for _ in range(2000)]
    moments += [1700000000.0, 1700000000.9995, 1700000000.999999, 1699999999.0000004]
    for unix in moments:
        assert iso_millis_at(unix) == iso_millis(datetime.fromtimestamp(unix, UTC)), unix


def test_one_key_and_a_list_of_one_key_sign_alike() -> None:
    """A single key takes a shortcut; the signature is the HMAC-SHA256 either way."""
    key, body = b"0123456789abcdef", b'{"a":1}'
    mac = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    assert signing.sign(key, "msg_1", 1700000000, body) == expected
    assert signing.sign([key], "msg_1", 1700000000, body) == expected
    assert signing.sign([key, b"old"], "msg_1", 1700000000, body).startswith(expected + " v1,")


def test_the_full_load_reads_the_columns_in_the_webhook_fields_order() -> None:
    """The cache's load builds webhooks from rows positionally: the orders must agree."""
    columns = [c.strip() for c in _WEBHOOK_COLUMNS.split(",")]
    assert columns == [f.name for f in dataclasses.fields(Webhook)]


@pytest.mark.parametrize(("setting", "expected"), [("on", "uvloop"), ("off", "asyncio")])
def test_the_daemon_loop_follows_the_setting(setting: str, expected: str) -> None:
    """DISPATCHER_UVLOOP picks the loop that loops.run starts."""

    async def kind() -> str:
        await asyncio.sleep(0)
        return loops.running()

    settings = Settings.from_env({"DISPATCHER_UVLOOP": setting})
    assert loops.run(kind(), settings) == expected
