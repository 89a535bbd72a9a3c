"""Retries without a broker: Retry-After values, and the records written on the delay and
notice topics against their published schemas."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jsonschema
import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    from dispatcher.client import parse_retry_after

    assert parse_retry_after(header, 1_800_000_000.0) == seconds


def test_retry_and_notice_records_match_their_published_schemas() -> None:
    """What the scheduler writes on the delay and notice topics validates against schemas/."""
    from dispatcher.delays import RetryRecord
    from dispatcher.notices import Notice
    from dispatcher.notification import Notification

    notification = Notification(
        str(uuid.uuid4()), uuid.uuid4(), "CLOSED", "sales", "shop", "app", None, ({"id": 1},)
    )
    record = orjson.loads(RetryRecord(notification, 1, 1_800_000_000_000, "HTTP 500").encode())
    again = RetryRecord.decode(orjson.dumps(record)).notification
    assert again.body(1, 0.0) == notification.body(1, 0.0)
    assert again.entity_ids == notification.entity_ids == ("1",)
    notice = Notice(
        "n1", "a@b.test", str(notification.webhook_id), "https://x.test/h", "sales", "CLOSED",
        notification.notification_uuid, 0, 3, False, "2026-01-01T00:00:00.000Z", "HTTP 500",
        500, "oops", "2026-01-01T00:15:00.000Z", "{}",
    )  # fmt: skip
    for name, data in (("retry-record", record), ("notice", orjson.loads(notice.encode()))):
        schema = json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
        assert not errors, (name, errors)
