"""The event consumer: decode, match, and hand each notification to the sender.

Per record: a malformed event goes to the dead-letter topic with the reason in its
headers; a pair outside the catalog and an import movement are counted and skipped; an
import entity of a batched entity joins its import batch; every other matched event
becomes one notification. An event no webhook matches is dropped only once the
subscription cache is known to hold every change committed before the event was consumed
(:meth:`~dispatcher.cache.SubscriptionCache.barrier`); matched then, it is delivered. The
record's offset finishes when all of that is durable.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.attempts import Attempts
from dispatcher.cache import SubscriptionCache
from dispatcher.catalog import Catalog
from dispatcher.consumer import Consumer, Record
from dispatcher.deadletter import DeadLetters
from dispatcher.events import Event, InvalidEvent, decode
from dispatcher.imports import ImportBatcher
from dispatcher.metrics import Metrics
from dispatcher.notification import Notification
from dispatcher.settings import Settings
from dispatcher.store import Webhook

log = structlog.get_logger(__name__)


class EventConsumer(Consumer):
    """Consumes ``DISPATCHER_EVENT_TOPICS``."""

    name = "dispatch"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        attempts: Attempts,
        cache: SubscriptionCache,
        catalog: Catalog,
        batcher: ImportBatcher,
        dead_letters: DeadLetters,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        super().__init__(
            consumer,
            settings=settings,
            metrics=metrics,
            max_pending=settings.max_in_flight * 4,
            dead_letters=dead_letters,
        )
        self._invalid = dead_letters  # events that break the contract go there too
        self._attempts = attempts
        self._cache = cache
        self._catalog = catalog
        self._batcher = batcher
        self._consumed = metrics.events_consumed
        self._unmatched = metrics.events_skipped.labels("unmatched")
        self._outside_catalog = metrics.events_skipped.labels("outside_catalog")
        self._import_skipped = metrics.events_skipped.labels("import_skipped")
        self._held = metrics.events_held

    async def process(self, tp: TopicPartition, records: list[Record]) -> None:
        self._consumed.inc(len(records))  # once per fetch: a counter's lock costs per call
        await super().process(tp, records)

    async def handle(self, tp: TopicPartition, record: Record) -> None:
        try:
            event = decode(record.value)
        except InvalidEvent as exc:
            self._metrics.dead_letters.labels(exc.kind).inc()
            await self.track(tp, record, self._invalid.send(record, exc.reason))
            return
        if not self._catalog.allows(event.entity_name, event.event_type):
            self._outside_catalog.inc()
            log.debug(
                "event_outside_catalog",
                entity_name=event.entity_name,
                event_type=event.event_type,
                offset=record.offset,
            )
            self.take(tp, record, None)
            return
        policy = self._catalog.import_policy(event.entity_name)
        if event.import_id is not None and policy != "single":
            await self._route_import(tp, record, event, batch=policy == "batch")
            return
        webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
        if webhook is None:
            await self.track(tp, record, self._recheck(event))
            return
        notification = Notification.for_event(event, webhook.id)
        await self.track(tp, record, self._deliver(webhook, notification))

    async def _route_import(
        self, tp: TopicPartition, record: Record, event: Event, *, batch: bool
    ) -> None:
        assert event.import_id is not None
        work: Awaitable[None] | None = None
        if not batch:
            self._import_skipped.inc()
        else:
            webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
            if webhook is None:
                work = self._recheck(event)
            else:
                if not self._batcher.has_room:
                    await self._batcher.room()
                work = self._batcher.add(event, webhook)
        if event.import_end:
            self._batcher.end(event.environment_id, event.import_id)
        self.take(tp, record, work)  # bounded by the batcher

    async def _recheck(self, event: Event) -> None:
        """No webhook matched: drop the event once the cache is known to be current."""
        self._held.inc()
        try:
            await self._cache.barrier()
        finally:
            self._held.dec()
        webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
        if webhook is None:
            self._unmatched.inc()
            return
        log.info(
            "event_matched_after_barrier",
            webhook_id=str(webhook.id),
            environment_id=event.environment_id,
        )
        if event.import_id is not None:
            await self._batcher.room()
            await self._batcher.add(event, webhook)
            return
        await self._deliver(webhook, Notification.for_event(event, webhook.id))

    async def _deliver(self, webhook: Webhook, notification: Notification) -> None:
        await self._attempts.make(webhook, notification, 0)

    async def before_commit(self) -> None:
        await self._attempts.durable()  # the attempt records of what finished

    def hand_off(self) -> None:
        self._attempts.hand_off()

    async def drain(self, within: float, partitions: Any = None) -> int:
        self._batcher.flush_all()  # open batches hold offsets: send them before waiting
        return await super().drain(within, partitions)
