"""The event consumer: decode, match, and hand each notification to the sender.

Per record: a malformed event goes to the dead-letter topic with the reason in its
headers; a pair outside the catalog and an import movement are counted and skipped; an
import entity of a batched entity joins its import batch; every other matched event
becomes one notification. The record's offset finishes when all of that is durable.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from dispatcher import durable
from dispatcher.cache import SubscriptionCache
from dispatcher.catalog import Catalog
from dispatcher.events import Event, InvalidEvent, decode
from dispatcher.imports import ImportBatcher
from dispatcher.notification import Notification
from dispatcher.sender import Sender
from dispatcher.settings import Settings
from dispatcher.store import Webhook
from dispatcher.worker import KafkaWorker

log = structlog.get_logger(__name__)

REASON_HEADER = "dispatcher-dead-letter-reason"
SOURCE_HEADER = "dispatcher-dead-letter-source"


class EventWorker(KafkaWorker):
    """Consumes ``DISPATCHER_EVENT_TOPICS``."""

    name = "dispatch"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
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
        )
        self._producer = producer
        self._sender = sender
        self._cache = cache
        self._catalog = catalog
        self._batcher = batcher
        self._dead_letter_topic = settings.dead_letter_topic
        self.counts: Counter[str] = Counter()

    async def process(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        for record in records:
            if not self.accepting(tp):
                return
            self.counts["consumed"] += 1
            try:
                event = decode(record.value)
            except InvalidEvent as exc:
                self.counts[f"dead_letter_{exc.kind}"] += 1
                await self.track(tp, record.offset, self._dead_letter(record, exc.reason))
                continue
            await self._route(tp, record.offset, event)

    async def _route(self, tp: TopicPartition, offset: int, event: Event) -> None:
        if not self._catalog.allows(event.entity_name, event.event_type):
            self.counts["outside_catalog"] += 1
            log.debug("event_outside_catalog", entity=event.entity_name, event=event.event_type)
            await self.track(tp, offset, None)
            return
        policy = self._catalog.import_policy(event.entity_name)
        webhook = self._cache.match(event.environment_id, event.entity_name, event.event_type)
        if event.import_id is not None and policy != "single":
            await self._route_import(tp, offset, event, webhook, batch=policy == "batch")
            return
        if webhook is None:
            self.counts["unmatched"] += 1
            await self.track(tp, offset, None)
            return
        notification = Notification.for_event(event, webhook.id)
        await self.track(tp, offset, self._deliver(webhook, notification))

    async def _route_import(
        self, tp: TopicPartition, offset: int, event: Event, webhook: Webhook | None, *, batch: bool
    ) -> None:
        assert event.import_id is not None
        if not batch:
            self.counts["import_skipped"] += 1
            work = None
        elif webhook is None:
            self.counts["unmatched"] += 1
            work = None
        else:
            await self._batcher.room()
            work = self._batcher.add(event, webhook)
        if event.import_end:
            self._batcher.end(event.environment_id, event.import_id)
        await self.track(tp, offset, work, bounded=False)

    async def _deliver(self, webhook: Webhook, notification: Notification) -> None:
        await self._sender.deliver(webhook, notification, 0)

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], reason: str) -> None:
        log.warning(
            "event_dead_lettered",
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        headers = [
            *(record.headers or ()),
            (REASON_HEADER, reason.encode("utf-8")),
            (SOURCE_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        await durable.send(
            self._producer, self._dead_letter_topic, record.value, key=record.key, headers=headers
        )

    async def drain(self, within: float, partitions: Any = None) -> None:
        self._batcher.flush_all()  # open batches hold offsets: send them before waiting
        await super().drain(within, partitions)
