"""The retry consumer: reads the delay tiers and makes each attempt when it is due.

Every tier topic holds records of one delay only (:mod:`dispatcher.policy`), so a
record not yet released is not taken and neither is any record after it: its partition
is paused, the consumer seeks back to it and a timer resumes the partition when the
record is released. Other partitions and tiers keep flowing. A released record that is
due is attempted; one that must wait longer than its tier (a long ``Retry-After``) is
queued again on the tier for what remains, so it never holds a partition. Records of a
topic that is not a tier (the single delay topic of versions before the tiers, a tier
of an older retry delay) are never held: attempted when due, else moved to a tier.
A restart re-reads pending records from the committed offset, so a retry is neither
lost nor fired early.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.attempts import Attempts, Clock
from dispatcher.cache import SubscriptionCache
from dispatcher.consumer import Consumer, Record
from dispatcher.deadletter import DeadLetters
from dispatcher.delays import DelayQueue, RetryRecord
from dispatcher.history import Trigger
from dispatcher.metrics import Metrics
from dispatcher.policy import Retry, RetryPolicy
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

MAX_HOLD = 60.0  # seconds: a held partition is looked at again at least this often


class RetryConsumer(Consumer):
    """Consumes the delay tiers (and the pre-tier delay topic)."""

    name = "retries"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        attempts: Attempts,
        delays: DelayQueue,
        policy: RetryPolicy,
        cache: SubscriptionCache,
        dead_letters: DeadLetters,
        settings: Settings,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        super().__init__(
            consumer,
            settings=settings,
            metrics=metrics,
            max_pending=settings.max_in_flight * 4,
            dead_letters=dead_letters,
        )
        self._attempts = attempts
        self._delays = delays
        self._policy = policy
        self._cache = cache
        self._clock = clock
        self._timers: dict[TopicPartition, asyncio.TimerHandle] = {}

    def accepting(self, tp: TopicPartition) -> bool:
        return super().accepting(tp) and tp not in self._timers

    async def handle(self, tp: TopicPartition, record: Record) -> None:
        try:
            retry = RetryRecord.decode(record.value)
        except ValueError as exc:
            self._metrics.retries_dropped.labels("malformed_record").inc()
            log.error("retry_record_malformed", error=str(exc), offset=record.offset)
            await self.track(tp, record, None)
            return
        now = self._clock()
        tier = self._policy.tiers.of_topic(tp.topic)
        if tier is not None and retry.hold_until_ms is not None:
            wait = retry.hold_until_ms / 1000 - now
            if wait > 0:
                self._hold(tp, record.offset, wait)
                return
        due = retry.due_ms / 1000
        onward = self._policy.released(due, now=now)
        if onward is not None:  # must wait longer than its tier: queued again
            requeue = self._requeue(retry, Retry(retry.n_retry, due, onward), now)
            await self.track(tp, record, requeue)
            return
        await self.track(tp, record, self._attempt(retry))

    async def _requeue(self, retry: RetryRecord, onward: Retry, now: float) -> None:
        await self._delays.put(
            retry.notification, onward, last_failure=retry.last_failure, now=now, kind="requeue"
        )

    async def _attempt(self, retry: RetryRecord) -> None:
        webhook = self._cache.get(retry.notification.webhook_id)
        if webhook is None:
            await self._cache.barrier()  # deleted, or created after the cache last heard?
            webhook = self._cache.get(retry.notification.webhook_id)
        if webhook is None:
            _dropped(retry, self._metrics)
            return
        # A deferred first try is still the scheduled one.
        trigger: Trigger = "retry" if retry.n_retry > 0 else "scheduled"
        await self._attempts.make(webhook, retry.notification, retry.n_retry, trigger)

    async def before_commit(self) -> None:
        await self._attempts.durable()  # the attempt records of what finished

    def hand_off(self) -> None:
        self._attempts.hand_off()

    def held(self, tp: TopicPartition) -> bool:
        return tp in self._timers

    def _hold(self, tp: TopicPartition, offset: int, wait: float) -> None:
        """Take nothing more from ``tp`` until the record at ``offset`` is released."""
        if tp not in self.consumer.assignment():
            return  # revoked meanwhile: its next owner reads it from the committed offset
        self.consumer.seek(tp, offset)
        self.consumer.pause(tp)
        old = self._timers.pop(tp, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[tp] = loop.call_later(min(wait, MAX_HOLD), self._release, tp)

    def _release(self, tp: TopicPartition) -> None:
        self._timers.pop(tp, None)
        self.resume(tp)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            timer = self._timers.pop(tp, None)
            if timer is not None:
                timer.cancel()
        await super().on_revoked(revoked)


def _dropped(retry: RetryRecord, metrics: Metrics) -> None:
    """Its webhook was deleted before the record came due: counted and logged, not sent.

    A deleted webhook is not attempted: its integrator asked for no more deliveries, and
    its URL and secret are gone with it (records never carry a secret). The event of a
    first attempt that was deferred (its endpoint saturated, a shutdown's hand-off) was
    never sent at all, which nobody was told of: that one is a warning."""
    fields = {
        "webhook_id": str(retry.notification.webhook_id),
        "notification_uuid": retry.notification.notification_uuid,
        "n_retry": retry.n_retry,
        "last_failure": retry.last_failure,
    }
    if retry.n_retry == 0:
        metrics.retries_dropped.labels("webhook_deleted_before_first_attempt").inc()
        log.warning(
            "retry_dropped",
            reason="webhook deleted before its deferred first attempt: the event was never sent",
            **fields,
        )
    else:
        metrics.retries_dropped.labels("webhook_deleted_before_retry").inc()
        log.info("retry_dropped", reason="webhook deleted before the retry was due", **fields)
