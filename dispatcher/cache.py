"""The in-memory subscription cache that every event is matched against.

Loaded from PostgreSQL at start, kept current by LISTEN/NOTIFY on ``webhooks_changed``
(a trigger announces every insert, update and delete), and re-synced in full every
``DISPATCHER_CACHE_RESYNC_SECONDS`` as a safety net against a missed notification.
Lookups are one dict probe.

"Unmatched" is decided only against a cache known to be current. Before an event is
dropped for want of a webhook, :meth:`SubscriptionCache.barrier` waits until the cache
holds every change committed before the call: the sync sends a NOTIFY of its own on a
channel only this process listens to, and PostgreSQL delivers notifications in commit
order, so once that one comes back every earlier change was applied. A webhook whose
``POST /webhooks`` returned 201 before an event was consumed is therefore matched, in
whichever process the API runs. While the LISTEN connection is down the cache is not
:attr:`~SubscriptionCache.current`: consumers pause, readiness says why, and barriers
wait for the full reload that follows the reconnect.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import orjson
import structlog

from dispatcher.backoff import Backoff
from dispatcher.metrics import Metrics
from dispatcher.store import Store, Webhook

log = structlog.get_logger(__name__)

CHANNEL = "webhooks_changed"
BARRIER_GAP = 0.005  # seconds: barriers asked for meanwhile share one round trip
Key = tuple[str, str, str]  # environment_id, entity_name, event_type


class SubscriptionCache:
    """Webhooks by (environment_id, entity_name, event_type) and by id."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._by_key: dict[Key, Webhook] = {}
        self._by_id: dict[uuid.UUID, Webhook] = {}
        self.warm = asyncio.Event()  # loaded once
        self.current = asyncio.Event()  # listening and loaded: changes arrive as made
        self.stale_reason = "subscription cache loading"
        self._waiting: list[asyncio.Future[None]] = []  # barriers not yet sent
        self.barrier_wanted = asyncio.Event()

    def __len__(self) -> int:
        return len(self._by_id)

    def match(self, environment_id: str, entity_name: str, event_type: str) -> Webhook | None:
        return self._by_key.get((environment_id, entity_name, event_type))

    def get(self, webhook_id: uuid.UUID) -> Webhook | None:
        return self._by_id.get(webhook_id)

    def barrier(self) -> asyncio.Future[None]:
        """Resolves once the cache holds every change committed before this call."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self.barrier_wanted.set()
        return future

    def take_waiting(self) -> list[asyncio.Future[None]]:
        """The barriers asked for so far (for the sync to resolve), forgotten here."""
        waiting, self._waiting = self._waiting, []
        self.barrier_wanted.clear()
        return waiting

    def replace_all(self, webhooks: Iterable[Webhook]) -> None:
        by_id = {w.id: w for w in webhooks}
        self._by_id = by_id
        self._by_key = {(w.environment_id, w.entity_name, w.event_type): w for w in by_id.values()}
        self._metrics.cache_resynced()
        self._metrics.subscriptions_cached.set(len(by_id))
        self.warm.set()

    def put(self, webhook: Webhook) -> None:
        self.remove(webhook.id)
        self._by_id[webhook.id] = webhook
        self._by_key[(webhook.environment_id, webhook.entity_name, webhook.event_type)] = webhook
        self._metrics.subscriptions_cached.set(len(self._by_id))

    def remove(self, webhook_id: uuid.UUID) -> None:
        old = self._by_id.pop(webhook_id, None)
        if old is not None:
            key = (old.environment_id, old.entity_name, old.event_type)
            if self._by_key.get(key) is old:
                del self._by_key[key]
            self._metrics.subscriptions_cached.set(len(self._by_id))

    def became_current(self) -> None:
        if not self.current.is_set():
            self.current.set()
            self._metrics.cache_current.set(1)
            log.info("cache_current", webhooks=len(self))

    def became_stale(self, reason: str) -> None:
        self.stale_reason = reason
        if self.current.is_set():
            self.current.clear()
            self._metrics.cache_current.set(0)
            log.warning("cache_stale", reason=reason)


@dataclass(frozen=True, slots=True)
class _Barrier:
    """A barrier's own notification came back: every earlier change was applied."""

    number: int


class CacheSync:
    """Keeps a :class:`SubscriptionCache` current; run :meth:`run` as a long-lived task."""

    def __init__(
        self,
        cache: SubscriptionCache,
        store: Store,
        database_url: str,
        *,
        resync_seconds: float,
    ) -> None:
        self._cache = cache
        self._store = store
        self._url = database_url
        self._resync = resync_seconds
        # Quick first retries (a restart of PostgreSQL takes seconds), and never more than
        # a few seconds between attempts: consumers wait for the cache meanwhile.
        self._backoff = Backoff(first=0.25, cap=5.0)
        self._changes: asyncio.Queue[str | _Barrier] = asyncio.Queue()
        self._barrier_channel = f"webhooks_barrier_{uuid.uuid4().hex[:16]}"
        self._sent: dict[int, list[asyncio.Future[None]]] = {}  # barrier number -> waiters
        self._next_barrier = 0

    async def run(self) -> None:
        """Listen, load, apply changes, re-sync; reconnect with backoff on database loss."""
        while True:
            try:
                await self._session()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                delay = self._backoff.next()
                self._cache.became_stale(f"subscription cache not current: {exc}"[:200])
                log.warning("cache_sync_disconnected", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)  # backoff between reconnects, not coordination

    async def _session(self) -> None:
        conn = await asyncpg.connect(self._url, timeout=10)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            # Listen before loading, so no change made during the load is missed.
            await conn.add_listener(CHANNEL, self._on_notify)
            await conn.add_listener(self._barrier_channel, self._on_barrier)
            # Changes and barriers queued by the previous connection are stale: the full
            # load below covers them, and every barrier asked for before it.
            self._changes = asyncio.Queue()
            covered = self._cache.take_waiting() + [f for w in self._sent.values() for f in w]
            self._sent.clear()
            await self.resync()
            _resolve(covered)
            self._backoff.reset()  # connected and loaded: the next outage starts afresh
            self._cache.became_current()
            await self._follow(conn, lost)
        finally:
            conn.terminate()

    async def _follow(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Apply changes and serve barriers until the connection is lost; re-sync on
        time whatever else happens."""
        next_resync = time.monotonic() + self._resync
        gone = asyncio.ensure_future(lost.wait())
        try:
            while True:
                get = asyncio.ensure_future(self._changes.get())
                wanted = asyncio.ensure_future(self._cache.barrier_wanted.wait())
                timeout = max(0.0, next_resync - time.monotonic())
                done, _ = await asyncio.wait(
                    {get, gone, wanted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for fut in (get, wanted):
                    if fut not in done:
                        fut.cancel()
                if gone in done:
                    raise ConnectionError("LISTEN connection to PostgreSQL lost")
                if get in done:
                    await self._apply(get.result())
                if wanted in done:
                    await self._send_barrier(conn)
                if time.monotonic() >= next_resync:
                    await self.resync()
                    next_resync = time.monotonic() + self._resync
        finally:
            gone.cancel()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._changes.put_nowait(str(payload))

    def _on_barrier(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            self._changes.put_nowait(_Barrier(int(str(payload))))
        except ValueError:
            log.warning("cache_bad_barrier", payload=str(payload)[:100])

    async def _send_barrier(self, conn: asyncpg.Connection) -> None:
        await asyncio.sleep(BARRIER_GAP)  # a rate limit: let more ask for this barrier
        waiting = self._cache.take_waiting()
        if not waiting:
            return
        number = self._next_barrier = self._next_barrier + 1
        self._sent[number] = waiting
        # A bounded wait: a silently dead connection is found out and replaced.
        await conn.execute(
            "SELECT pg_notify($1, $2)", self._barrier_channel, str(number), timeout=5
        )

    async def resync(self) -> None:
        webhooks = await self._store.all_webhooks()
        self._cache.replace_all(webhooks)
        # Hundreds of thousands of long-lived objects would otherwise be walked by every
        # full GC pass (pauses of 60-160 ms measured with 100k webhooks, the cause of
        # p99 latency misses). Frozen, they are skipped; being acyclic, the ones a later
        # re-sync drops are still freed by reference counting.
        gc.collect()  # cyclic garbage of the moment must not be frozen for ever
        gc.freeze()
        log.info("cache_resynced", webhooks=len(webhooks))

    async def _apply(self, item: str | _Barrier) -> None:
        if isinstance(item, _Barrier):
            _resolve(self._sent.pop(item.number, []))
            return
        try:
            change = orjson.loads(item)
            webhook_id = uuid.UUID(change["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("cache_bad_notification", payload=item[:200])
            await self.resync()
            return
        webhook = await self._store.webhook_by_id(webhook_id)
        if webhook is None:
            self._cache.remove(webhook_id)
        else:
            self._cache.put(webhook)
        log.info("cache_updated", webhook_id=str(webhook_id), op=change.get("op"))


def _resolve(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
