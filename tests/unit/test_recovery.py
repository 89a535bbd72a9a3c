"""Recovery jobs' pure logic: ranges, counts, the job's JSON, kept bodies, the disable mail."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import TopicPartition

from dispatcher import disabling
from dispatcher.recovery import (
    BadRange,
    Counts,
    Job,
    check_range,
    parse_partition_key,
    partition_key,
)
from dispatcher.recovery_runner import KeptNotification

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
JOB_FIELDS = {
    "id", "webhook_id", "mode", "since", "until", "state", "scanned", "matched", "sent",
    "delivered", "failed", "created_at", "finished_at",
}  # fmt: skip


def test_a_range_defaults_to_now_and_a_future_end_is_now() -> None:
    since = NOW - timedelta(hours=2)
    assert check_range(since, None, now=NOW, max_days=14) == (since, NOW)
    assert check_range(since, NOW + timedelta(days=3), now=NOW, max_days=14) == (since, NOW)


@pytest.mark.parametrize(
    ("since", "until", "words"),
    [
        (NOW, None, "before until"),
        (NOW - timedelta(hours=1), NOW - timedelta(hours=2), "before until"),
        (NOW - timedelta(days=15), None, "longer than 14 days"),
    ],
)
def test_an_empty_reversed_or_too_long_range_is_refused_naming_the_field(
    since: datetime, until: datetime | None, words: str
) -> None:
    with pytest.raises(BadRange) as refused:
        check_range(since, until, now=NOW, max_days=14, field="recover_since")
    assert refused.value.field == "recover_since" and refused.value.status == 422
    assert refused.value.message.startswith("recover_since: ") and words in refused.value.message


def test_counts_add_up_and_sent_is_delivered_plus_failed() -> None:
    counts = Counts().add(scanned=10, matched=3).add(delivered=2).add(failed=1)
    assert counts == Counts(scanned=10, matched=3, sent=3, delivered=2, failed=1)


def test_a_job_in_json_has_the_contract_names() -> None:
    job = Job(
        id=uuid.uuid4(), webhook_id=uuid.uuid4(), environment_id="shop", mode="replay",
        since=NOW - timedelta(hours=1), until=NOW, attempt_id=None, state="running",
        counts=Counts(5, 2, 1, 1, 0), progress=None, error=None, created_at=NOW,
        started_at=NOW, finished_at=None,
    )  # fmt: skip
    shown = job.to_json()
    assert set(shown) >= JOB_FIELDS and "attempt_id" not in shown
    assert (shown["since"], shown["until"]) == (
        "2026-12-01T11:00:00.000Z",
        "2026-12-01T12:00:00.000Z",
    )
    assert (shown["scanned"], shown["sent"], shown["finished_at"]) == (5, 1, None)
    assert job.active


def test_partition_keys_round_trip_even_with_colons_in_the_topic() -> None:
    tp = TopicPartition("events:eu", 7)
    assert parse_partition_key(partition_key(tp)) == tp


def test_a_kept_notification_is_sent_with_its_body_as_it_was() -> None:
    kept = KeptNotification(
        "6d9f3b8e-0f59-4b7f-9d2a-2f1c1f0a0b0c", uuid.uuid4(), "CLOSED", "sales", "shop",
        "app", None, ({"id": "1"},), kept_body=b'{"nRetry":2}',
    )  # fmt: skip
    assert kept.body(0, NOW) == b'{"nRetry":2}'


def test_the_disable_mail_says_how_to_enable_and_escapes_what_the_integrator_sent() -> None:
    webhook_id = uuid.uuid4()
    row = {
        "id": webhook_id, "entity_name": "sales", "event_type": "CLOSED",
        "url": "https://x.test/<script>", "email": "dev@shop.test", "disabled_at": NOW,
        "disabled_reason": "every attempt failed for 120 hours (14 attempts in a row)",
    }  # fmt: skip
    mail = disabling.render(row, "webhooks@localhost")
    assert mail["To"] == "dev@shop.test" and mail["Subject"].startswith("Webhook disabled")
    text = mail.get_body(("plain",))
    page = mail.get_body(("html",))
    assert text is not None and page is not None
    assert f"POST /webhooks/{webhook_id}/enable" in text.get_content()
    assert "<script>" not in page.get_content() and "&lt;script&gt;" in page.get_content()
