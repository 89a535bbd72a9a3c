"""Import batches: the entities of one import go out per webhook in groups of at most N.

A batch of (shop, import, webhook) goes out when it is full, when the import's last event
(``import_end: true``) arrives, when it has had no new entity for the linger time, or,
when more batches are open than the cap allows, oldest first. Batches of one key go out
in the order they were filled, one after the other. Each entity's Kafka offset finishes
when its batch has been delivered or handed to retry, so a crash loses nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog

from dispatcher.attempts import Attempts
from dispatcher.events import Event
from dispatcher.metrics import Metrics
from dispatcher.notification import Notification
from dispatcher.store import Webhook

log = structlog.get_logger(__name__)

BatchKey = tuple[str, str, Any]  # environment_id, import_id, webhook id
MAX_SENDING = 64  # batches flushed and not yet delivered; past it, reading waits
MAX_OPEN_ENTITIES = 100_000  # entities in open batches; past it, the oldest goes out


@dataclass
class _OpenBatch:
    webhook: Webhook
    first: Event
    events: list[Event] = field(default_factory=list)  # one entity each
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    touched: float = 0.0


class ImportBatcher:
    """Groups import entities into batches and sends them through :class:`Attempts`."""

    def __init__(
        self,
        attempts: Attempts,
        *,
        batch_size: int,
        linger: float,
        max_open: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._attempts = attempts
        self._open_gauge = (metrics or Metrics()).import_batches_open
        self._size = batch_size
        self._linger = linger
        self._max_open = max_open
        self._open: OrderedDict[BatchKey, _OpenBatch] = OrderedDict()  # least recently fed first
        self._last_send: dict[BatchKey, asyncio.Task[None]] = {}
        self._sends: set[asyncio.Task[None]] = set()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._open_entities = 0
        self.batches_sent = 0

    def __len__(self) -> int:
        return len(self._open)

    @property
    def has_room(self) -> bool:
        """Whether :meth:`room` would return at once (checked first: awaiting it costs,
        once per entity)."""
        return self._has_room.is_set()

    async def room(self) -> None:
        """Wait while ``MAX_SENDING`` batches are already on their way (a slow endpoint
        must not let a large import be read into memory faster than it is sent)."""
        await self._has_room.wait()

    def add(self, event: Event, webhook: Webhook) -> asyncio.Future[None]:
        """Add the event's entity; the future resolves when its batch is delivered."""
        assert event.import_id is not None
        key: BatchKey = (event.environment_id, event.import_id, webhook.id)
        batch = self._open.get(key)
        # identity first: comparing two webhooks field by field costs once per entity
        if batch is None or (batch.webhook is not webhook and batch.webhook != webhook):
            if batch is not None:
                self._flush(key)
            batch = self._open[key] = _OpenBatch(webhook, event)
            self._open_gauge.set(len(self._open))
            if len(self._open) > self._max_open:
                self._flush(next(iter(self._open)))
        batch.events.append(event)
        self._open_entities += 1
        batch.touched = time.monotonic()
        self._open.move_to_end(key)
        done = batch.done
        if len(batch.events) >= self._size:
            self._flush(key)
        while self._open_entities > MAX_OPEN_ENTITIES:
            self._flush(next(iter(self._open)))
        return done

    def end(self, environment_id: str, import_id: str) -> None:
        """The import's last event arrived: send its open batches now."""
        for key in [k for k in self._open if k[0] == environment_id and k[1] == import_id]:
            self._flush(key)

    def flush_all(self) -> None:
        """Send every open batch (shutdown, rebalance)."""
        for key in list(self._open):
            self._flush(key)

    async def run(self) -> None:
        """Sends batches that lingered; run as a long-lived task."""
        tick = max(0.01, self._linger / 4)
        while True:
            await asyncio.sleep(tick)  # a timer: batches are checked every linger/4
            deadline = time.monotonic() - self._linger
            while self._open:
                key, batch = next(iter(self._open.items()))
                if batch.touched > deadline:
                    break
                self._flush(key)

    def _flush(self, key: BatchKey) -> None:
        batch = self._open.pop(key)
        self._open_gauge.set(len(self._open))
        self._open_entities -= len(batch.events)
        notification = Notification.for_event(batch.first, batch.webhook.id, batch.events)
        previous = self._last_send.get(key)
        task = asyncio.ensure_future(self._send(batch, notification, previous))
        self._last_send[key] = task
        self._sends.add(task)
        if len(self._sends) >= MAX_SENDING:
            self._has_room.clear()
        task.add_done_callback(lambda t: self._sent(key, t))

    async def _send(
        self, batch: _OpenBatch, notification: Notification, previous: asyncio.Task[None] | None
    ) -> None:
        try:
            if previous is not None:
                await asyncio.wait({previous})  # keep the batches of one import in order
            await self._attempts.make(batch.webhook, notification, 0)
        except BaseException as exc:
            if not batch.done.done():
                batch.done.set_exception(exc)
            raise
        self.batches_sent += 1
        if not batch.done.done():  # cancelled by the worker's shutdown meanwhile
            batch.done.set_result(None)

    def _sent(self, key: BatchKey, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if len(self._sends) < MAX_SENDING:
            self._has_room.set()
        if self._last_send.get(key) is task:
            del self._last_send[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("import_batch_failed", error=repr(task.exception()))

    async def close(self) -> None:
        """Cancel sends still running (their entities are not committed: re-read later)."""
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
