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

from collections import Counter
from collections.abc import Awaitable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.cache import SubscriptionCache
from dispatcher.catalog import Catalog
from dispatcher.deadletter import DeadLetters
from dispatcher.events import Event, InvalidEvent, decode
from dispatcher.imports import ImportBatcher
from dispatcher.notification import Notification
from dispatcher.sender import Sender
from dispatcher.settings import Settings
from dispatcher.store import Webhook
from dispatcher.worker import KafkaWorker, Record

log = structlog.get_logger(__name__)


class EventWorker(KafkaWorker):
    """Consumes ``DISPATCHER_EVENT_TOPICS``."""

    name = "dispatch"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters,
        sender: Sender,
        cache: SubscriptionCache,
        catalog: Catalog,
        batcher: ImportBatcher,
        settings: Settings,
    ) -> None:
        super().__init__(
            consumer,
            max_pending=settings.max_in_flight * 4,
            drain_timeout=settings.drain_timeout_seconds,
            dead_letters=dead_letters,
            gate=cache,
        )
        self._invalid = dead_letters  # events that break the contract go there too
        self._sender = sender
        self._cache = cache
        self._catalog = catalog
        self._batcher = batcher
        self.counts: Counter[str] = Counter()

    async def handle(self, tp: TopicPartition, record: Record) -> None:
        self.counts["consumed"] += 1
        try:
            event = decode(record.value)
        except InvalidEvent as exc:
            self.counts[f"dead_letter_{exc.kind}"] += 1
            await self.track(tp, record, self._invalid.send(record, exc.reason))
            return
        if not self._catalog.allows(event.entity_name, event.event_type):
            self.counts["outside_catalog"] += 1
            log.debug(
                "event_outside_catalog",
                entity_name=event.entity_name,
                event_type=event.event_type,
                offset=record.offset,
            )
            await self.track(tp, record, None)
            return
        policy = self._catalog.import_policy(event.entity_name)
        if event.import_id is not None and policy != "single":
            await self._route_import(tp, record, event, batch=policy == "batch")
            return
        webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
        if webhook is None:
            await self.track(tp, record, self._unmatched(event))
            return
        notification = Notification.for_event(event, webhook.id)
        await self.track(tp, record, self._deliver(webhook, notification))

    async def _route_import(
        self, tp: TopicPartition, record: Record, event: Event, *, batch: bool
    ) -> None:
        assert event.import_id is not None
        work: Awaitable[None] | None = None
        if not batch:
            self.counts["import_skipped"] += 1
        else:
            webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
            if webhook is None:
                work = self._unmatched(event)
            else:
                await self._batcher.room()
                work = self._batcher.add(event, webhook)
        if event.import_end:
            self._batcher.end(event.environment_id, event.import_id)
        await self.track(tp, record, work, bounded=False)  # bounded by the batcher

    async def _unmatched(self, event: Event) -> None:
        """No webhook matched: drop the event once the cache is known to be current."""
        await self._cache.barrier()
        webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
        if webhook is None:
            self.counts["unmatched"] += 1
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
        await self._sender.deliver(webhook, notification, 0)

    def hand_off(self) -> None:
        self._sender.hand_off()

    async def drain(self, within: float, partitions: Any = None) -> int:
        self._batcher.flush_all()  # open batches hold offsets: send them before waiting
        return await super().drain(within, partitions)
