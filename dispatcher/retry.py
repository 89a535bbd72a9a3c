"""Retries on a Kafka delay topic, never by sleeping per message.

A failed attempt becomes a :class:`RetryRecord` on ``DISPATCHER_RETRY_TOPIC`` (keyed by
webhook id, produced with ``acks=all`` before the source offset commits), together with
its failure :class:`~dispatcher.notices.Notice`. The :class:`RetryWorker` consumes the
delay topic: a record not yet due is not taken; its partition is paused, the consumer
seeks back to it and a timer resumes the partition when it is due. Other partitions keep
flowing, a restart re-reads pending records from the committed offset (so a retry is
neither lost nor fired early), and records are in due order within a partition because
the delay is the same for all (a longer ``Retry-After`` can only make later records late,
never early).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from dispatcher import durable
from dispatcher.cache import SubscriptionCache
from dispatcher.deadletter import DeadLetters
from dispatcher.delivery import Outcome
from dispatcher.notices import Notice
from dispatcher.notification import Notification, iso_millis
from dispatcher.sender import Clock, Sender
from dispatcher.settings import Settings
from dispatcher.store import Webhook
from dispatcher.worker import KafkaWorker, Record

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RetryRecord:
    """A scheduled attempt: the record on the delay topic."""

    notification: Notification
    n_retry: int  # the nRetry of the attempt to make
    due_ms: int  # Unix milliseconds; not attempted before
    last_failure: str

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "webhook_id": str(self.notification.webhook_id),
                "n_retry": self.n_retry,
                "due_ms": self.due_ms,
                "due_at": iso_millis(datetime.fromtimestamp(self.due_ms / 1000, UTC)),
                "last_failure": self.last_failure,
                "notification": self.notification.to_json(),
            }
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> RetryRecord:
        """Raises ValueError on a record that is not of :meth:`encode`'s shape."""
        try:
            data = orjson.loads(raw or b"")
            n_retry, due_ms = data["n_retry"], data["due_ms"]
            if not isinstance(n_retry, int) or not isinstance(due_ms, int) or n_retry < 0:
                raise ValueError("n_retry and due_ms must be integers, n_retry >= 0")
            return cls(
                Notification.from_json(data["notification"]),
                n_retry,
                due_ms,
                str(data.get("last_failure", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed retry record: {exc!r}") from None


class RetryScheduler:
    """The failure handler: schedules the next attempt and queues the notice, durably."""

    def __init__(self, producer: AIOKafkaProducer, settings: Settings, clock: Clock) -> None:
        self._producer = producer
        self._settings = settings
        self._clock = clock
        self.scheduled = 0
        self.exhausted = 0
        self.deferred_count = 0

    async def failed(
        self,
        webhook: Webhook,
        notification: Notification,
        n_retry: int,
        body: bytes,
        outcome: Outcome,
    ) -> None:
        s = self._settings
        now = self._clock()
        final = n_retry >= s.max_retries
        key = str(webhook.id).encode()
        next_at: str | None = None
        if not final:
            delay = max(s.retry_delay_seconds, outcome.retry_after or 0.0)
            due_ms = int((now + delay) * 1000)
            record = RetryRecord(notification, n_retry + 1, due_ms, outcome.detail)
            try:
                await durable.send(self._producer, s.retry_topic, record.encode(), key=key)
            except KafkaError as exc:  # not an outage: the record can never be produced
                log.error(
                    "retry_not_scheduled",
                    webhook_id=str(webhook.id),
                    notification_uuid=notification.notification_uuid,
                    error=repr(exc),
                )
                final = True
            else:
                next_at = iso_millis(datetime.fromtimestamp(due_ms / 1000, UTC))
        notice = Notice(
            notice_id=Notice.make_id(notification.notification_uuid, n_retry),
            to=webhook.email,
            webhook_id=str(webhook.id),
            url=webhook.url,
            entity_name=webhook.entity_name,
            event_type=webhook.event_type,
            notification_uuid=notification.notification_uuid,
            n_retry=n_retry,
            max_retries=s.max_retries,
            final=final,
            failed_at=iso_millis(datetime.fromtimestamp(now, UTC)),
            error=outcome.detail,
            status=outcome.status,
            response_head=outcome.body_head,
            next_attempt_at=next_at,
            request_body=_excerpt(body),
        )
        # Acked by all in-sync replicas (like the retry record) before the source offset
        # may commit.
        await durable.send(self._producer, s.notice_topic, notice.encode(), key=key)
        if final:
            self.exhausted += 1
            log.warning(
                "retries_exhausted",
                webhook_id=str(webhook.id),
                notification_uuid=notification.notification_uuid,
                n_retry=n_retry,
            )
        else:
            self.scheduled += 1

    async def deferred(self, webhook: Webhook, notification: Notification, n_retry: int) -> None:
        """The endpoint is saturated: the same attempt goes on the delay topic, unmailed."""
        delay = min(self._settings.retry_delay_seconds, MAX_DEFER_SECONDS)
        due_ms = int((self._clock() + delay) * 1000)
        record = RetryRecord(notification, n_retry, due_ms, "deferred: endpoint saturated")
        key = str(webhook.id).encode()
        await durable.send(self._producer, self._settings.retry_topic, record.encode(), key=key)
        self.deferred_count += 1


MAX_DEFER_SECONDS = 30.0  # a deferred attempt is tried again this soon (or sooner)
MAX_NOTICE_BODY = 64 * 1024  # bytes of a request body quoted in a notice


def _excerpt(body: bytes) -> str:
    """The request body for a notice: whole, or its start when it is very large."""
    if len(body) <= MAX_NOTICE_BODY:
        return body.decode("utf-8", "replace")
    head = body[:MAX_NOTICE_BODY].decode("utf-8", "ignore")
    return f"{head}\n[... truncated: the request body has {len(body)} bytes]"


class RetryWorker(KafkaWorker):
    """Consumes the delay topic and makes each attempt when it is due."""

    name = "retries"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters,
        sender: Sender,
        cache: SubscriptionCache,
        settings: Settings,
        clock: Clock,
    ) -> None:
        super().__init__(
            consumer,
            max_pending=settings.max_in_flight * 4,
            drain_timeout=settings.drain_timeout_seconds,
            dead_letters=dead_letters,
            gate=cache,
        )
        self._sender = sender
        self._cache = cache
        self._clock = clock
        self._timers: dict[TopicPartition, asyncio.TimerHandle] = {}
        self.dropped = 0

    def accepting(self, tp: TopicPartition) -> bool:
        return super().accepting(tp) and tp not in self._timers

    async def handle(self, tp: TopicPartition, record: Record) -> None:
        try:
            retry = RetryRecord.decode(record.value)
        except ValueError as exc:
            log.error("retry_record_malformed", error=str(exc), offset=record.offset)
            await self.track(tp, record, None)
            return
        wait = retry.due_ms / 1000 - self._clock()
        if wait > 0:
            self._hold(tp, record.offset, wait)
            return
        await self.track(tp, record, self._attempt(retry))

    async def _attempt(self, retry: RetryRecord) -> None:
        webhook = self._cache.get(retry.notification.webhook_id)
        if webhook is None:
            await self._cache.barrier()  # deleted, or created after the cache last heard?
            webhook = self._cache.get(retry.notification.webhook_id)
        if webhook is None:
            self.dropped += 1
            log.info(
                "retry_dropped",
                reason="webhook deleted",
                webhook_id=str(retry.notification.webhook_id),
                notification_uuid=retry.notification.notification_uuid,
            )
            return
        await self._sender.deliver(webhook, retry.notification, retry.n_retry)

    def hand_off(self) -> None:
        self._sender.hand_off()

    def held(self, tp: TopicPartition) -> bool:
        return tp in self._timers

    def _hold(self, tp: TopicPartition, offset: int, wait: float) -> None:
        """Take nothing more from ``tp`` until the record at ``offset`` is due."""
        if tp not in self.consumer.assignment():
            return  # revoked meanwhile: its next owner reads it from the committed offset
        self.consumer.seek(tp, offset)
        self.consumer.pause(tp)
        old = self._timers.pop(tp, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[tp] = loop.call_later(wait, self._release, tp)

    def _release(self, tp: TopicPartition) -> None:
        self._timers.pop(tp, None)
        self.resume(tp)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            timer = self._timers.pop(tp, None)
            if timer is not None:
                timer.cancel()
        await super().on_revoked(revoked)
