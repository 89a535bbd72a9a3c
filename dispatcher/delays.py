"""The delay topics' records, and queueing them: retries without sleeping per message.

A failed attempt's next attempt, a deferred attempt and a record its tier released
before it was due all become a :class:`RetryRecord` on a tier of the delay topics
(:mod:`dispatcher.policy`), keyed by webhook id and acked by all in-sync replicas before
the source offset commits. :mod:`dispatcher.retry_consumer` reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import orjson
from aiokafka import AIOKafkaProducer

from dispatcher import durable
from dispatcher.metrics import Metrics
from dispatcher.notification import Notification, WireNotification, iso_millis
from dispatcher.policy import Retry

Kind = Literal["retry", "deferral", "requeue"]


@dataclass(frozen=True, slots=True)
class RetryRecord:
    """A scheduled attempt: the record on a delay topic."""

    notification: Notification
    n_retry: int  # the nRetry of the attempt to make
    due_ms: int  # Unix milliseconds; not attempted before
    last_failure: str
    hold_until_ms: int | None = None  # when its tier releases it; None: pre-tier record
    tier: str = ""

    def encode(self) -> bytes:
        data: dict[str, object] = {
            "webhook_id": str(self.notification.webhook_id),
            "n_retry": self.n_retry,
            "due_ms": self.due_ms,
            "due_at": iso_millis(datetime.fromtimestamp(self.due_ms / 1000, UTC)),
            "last_failure": self.last_failure,
            "notification": self.notification.to_json(),
        }
        if self.hold_until_ms is not None:
            data["hold_until_ms"] = self.hold_until_ms
            data["tier"] = self.tier
        return orjson.dumps(data)

    @classmethod
    def decode(cls, raw: bytes | None) -> RetryRecord:
        """Raises ValueError on a record that is not of :meth:`encode`'s shape."""
        try:
            wire = _decoder.decode(raw or b"")
            notification = wire.notification.notification()
        except (msgspec.DecodeError, TypeError) as exc:
            raise ValueError(f"malformed retry record: {exc}") from None
        return cls(
            notification,
            wire.n_retry,
            wire.due_ms,
            str(wire.last_failure),
            wire.hold_until_ms,
            str(wire.tier),
        )


class _Wire(msgspec.Struct):
    """:meth:`RetryRecord.encode`'s shape, read back (the entities kept as their text)."""

    n_retry: Annotated[int, msgspec.Meta(ge=0)]
    due_ms: int
    notification: WireNotification
    last_failure: Any = ""
    hold_until_ms: int | None = None
    tier: Any = ""


_decoder = msgspec.json.Decoder(_Wire)


class DelayQueue:
    """Queues records on the delay tiers, durably."""

    def __init__(self, producer: AIOKafkaProducer, metrics: Metrics) -> None:
        self._producer = producer
        self._metrics = metrics

    async def put(
        self,
        notification: Notification,
        retry: Retry,
        *,
        last_failure: str,
        now: float,
        kind: Kind,
    ) -> RetryRecord:
        """Queue attempt ``retry.n_retry`` of ``notification`` on ``retry.tier``; returns
        once Kafka acked it (retried while Kafka is unreachable)."""
        tier = retry.tier
        record = RetryRecord(
            notification,
            retry.n_retry,
            int(retry.due * 1000),
            last_failure,
            int((now + tier.seconds) * 1000),
            tier.name,
        )
        key = str(notification.webhook_id).encode()
        await durable.send(self._producer, tier.topic, record.encode(), key=key)
        self._metrics.delay_records.labels(tier.name, kind).inc()
        return record
