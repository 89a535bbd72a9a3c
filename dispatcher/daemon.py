"""The daemon: wires the store, the cache, the consumers and the HTTP server, and runs them.

Start-up: migrate, load the subscription cache (LISTEN first), create missing internal
topics, start the HTTP server, then the consumers once the cache is warm. A TaskGroup
supervises the long-lived loops: one that meets the unexpected fails the process loudly
so that systemd or Kubernetes restarts it. SIGTERM or SIGINT only sets an event: the
consumers stop fetching, finish (or leave uncommitted) what is in flight within the drain
timeout, commit, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import orjson
import structlog
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher import __version__, catalog, db
from dispatcher.backoff import Backoff
from dispatcher.cache import CacheSync, SubscriptionCache
from dispatcher.deadletter import DeadLetters
from dispatcher.delivery import HttpClient
from dispatcher.dispatch import EventWorker
from dispatcher.imports import ImportBatcher
from dispatcher.metrics import Metrics
from dispatcher.notices import NoticeWorker
from dispatcher.retry import RetryScheduler, RetryWorker
from dispatcher.sender import Clock, Sender
from dispatcher.settings import Settings
from dispatcher.store import Store
from dispatcher.systemd import Notifier
from dispatcher.worker import KafkaWorker

log = structlog.get_logger(__name__)

Role = Literal["all", "api", "dispatch", "retry"]


@dataclass
class Daemon:
    """One process of the dispatcher; :meth:`run` until :attr:`stop` is set."""

    settings: Settings
    role: Role = "all"
    clock: Clock = time.time
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cache: SubscriptionCache = field(default_factory=SubscriptionCache)
    workers: list[KafkaWorker] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    notifier: Notifier = field(default_factory=Notifier)
    sender: Sender | None = None
    scheduler: RetryScheduler | None = None
    batcher: ImportBatcher | None = None
    event_worker: EventWorker | None = None
    retry_worker: RetryWorker | None = None
    notice_worker: NoticeWorker | None = None
    http_port: int | None = None  # the bound port, once started
    _pool: asyncpg.Pool | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)  # loops with no end
    _worker_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def consumes(self) -> bool:
        return self.role in ("all", "dispatch", "retry")

    async def run(self) -> None:
        s = self.settings
        log.info("daemon_starting", version=__version__, role=self.role, settings=s.redacted())
        try:
            await self._run()
        except (db.DatabaseError, catalog.CatalogError):
            raise  # a configuration problem: the command prints it as one line
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                log.exception("daemon_failed")
            raise

    async def _run(self) -> None:
        s = self.settings
        the_catalog = catalog.load(s.catalog_file)
        await db.migrate_url(s.database_url)
        async with AsyncExitStack() as stack:
            self._pool = await db.create_pool(s.database_url)
            stack.push_async_callback(self._pool.close)
            store = Store(self._pool)
            http = await stack.enter_async_context(HttpClient.from_settings(s))
            app = self._app(store, the_catalog, http)
            await stack.enter_async_context(_serve(app, s.http_host, s.http_port, self))
            async with asyncio.TaskGroup() as group:
                if self.consumes:
                    sync = CacheSync(
                        self.cache, store, s.database_url, resync_seconds=s.cache_resync_seconds
                    )
                    self._background(group, sync.run(), "cache-sync")
                    await self._wait_or_stop(self.cache.warm.wait())
                    if not self.stop.is_set():
                        await self._start_consumers(group, stack, the_catalog, http)
                self.started.set()
                log.info("daemon_started", role=self.role, http_port=self.http_port)
                self.notifier.ready()
                if self.notifier.watchdog_interval:
                    self._background(group, self._watchdog(), "systemd-watchdog")
                group.create_task(self._shutdown_when_stopped())
        log.info("daemon_stopped")

    # --- wiring -------------------------------------------------------------------------

    def _app(self, store: Store, the_catalog: catalog.Catalog, http: HttpClient) -> web.Application:
        if self.role in ("all", "api"):
            from dispatcher.api import create_app

            app = create_app(store=store, catalog=the_catalog, http=http, settings=self.settings)
        else:
            app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self.metrics.watch(self)
        return app

    async def _start_consumers(
        self,
        group: asyncio.TaskGroup,
        stack: AsyncExitStack,
        the_catalog: catalog.Catalog,
        http: HttpClient,
    ) -> None:
        s = self.settings
        if not await self._retry_kafka("create missing topics", lambda: ensure_topics(s)):
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            # Retry records carry whole notifications (up to 80 entities of an import):
            # compressed, they fit the broker's default 1 MB message limit far more often.
            compression_type="gzip",
            max_request_size=16 * 1024 * 1024,
            client_id="webhook-dispatcher",
        )
        if not await self._retry_kafka("start the producer", producer.start):
            return
        stack.push_async_callback(producer.stop)
        dead_letters = DeadLetters(producer, s.dead_letter_topic)
        scheduler = self.scheduler = RetryScheduler(producer, s, self.clock)
        sender = self.sender = Sender(
            http,
            scheduler,
            max_in_flight=s.max_in_flight,
            max_in_flight_per_endpoint=s.max_in_flight_per_endpoint,
            clock=self.clock,
            metrics=self.metrics,
        )
        if self.role in ("all", "dispatch"):
            batcher = self.batcher = ImportBatcher(
                sender,
                batch_size=s.import_batch_size,
                linger=s.import_linger_seconds,
                max_open=s.import_max_open_batches,
            )
            stack.push_async_callback(batcher.close)
            self._background(group, batcher.run(), "import-linger")
            consumer = _consumer(s, s.consumer_group)
            events = self.event_worker = EventWorker(
                consumer, dead_letters, sender, self.cache, the_catalog, batcher, s
            )
            consumer.subscribe(list(s.event_topics), listener=events.listener())
            await self._start_worker(group, events)
        if self.role in ("all", "retry"):
            consumer = _consumer(s, f"{s.consumer_group}-retries")
            retries = self.retry_worker = RetryWorker(
                consumer, dead_letters, sender, self.cache, s, self.clock
            )
            consumer.subscribe([s.retry_topic], listener=retries.listener())
            await self._start_worker(group, retries)
            consumer = _consumer(s, f"{s.consumer_group}-notices", max_poll_interval_ms=86_400_000)
            notices = self.notice_worker = NoticeWorker(consumer, s, dead_letters=dead_letters)
            consumer.subscribe([s.notice_topic], listener=notices.listener())
            await self._start_worker(group, notices)

    async def _retry_kafka(self, what: str, attempt: Callable[[], Awaitable[None]]) -> bool:
        """Retry ``attempt`` with backoff while Kafka is unreachable (not ready meanwhile).

        False when the daemon was told to stop before Kafka answered.
        """
        backoff = Backoff(cap=30.0)
        while True:
            try:
                await attempt()
                return True
            except KafkaError as exc:
                if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                    raise  # not an outage: a bug or a refusal that waiting will not cure
                if self.stop.is_set():
                    return False
                delay = backoff.next()
                log.warning("kafka_unreachable", doing=what, error=repr(exc), retry_in_s=delay)
                await self._wait_or_stop(asyncio.sleep(delay))  # backoff, not coordination

    async def _start_worker(self, group: asyncio.TaskGroup, worker: KafkaWorker) -> None:
        if not await self._retry_kafka(f"start the {worker.name} consumer", worker.consumer.start):
            return
        worker.undecodable.skip = self.settings.skip_undecodable_batches
        self.workers.append(worker)
        self._worker_tasks.append(group.create_task(worker.run(self.stop), name=worker.name))

    def _background(self, group: asyncio.TaskGroup, coro: Any, name: str) -> None:
        self._tasks.append(group.create_task(coro, name=name))

    async def _wait_or_stop(self, awaitable: Any) -> None:
        waiter = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopping.cancel()

    async def _watchdog(self) -> None:
        """Feeds systemd's watchdog while every loop runs; a dead loop starves it."""
        interval = self.notifier.watchdog_interval or 1.0
        while True:
            if not self._dead_loops():
                self.notifier.watchdog()
            await asyncio.sleep(interval)  # a timer: systemd asks for a beat this often

    def _dead_loops(self) -> list[str]:
        return [t.get_name() for t in (*self._tasks, *self._worker_tasks) if t.done()]

    async def _shutdown_when_stopped(self) -> None:
        await self.stop.wait()
        self.notifier.stopping()
        log.info("daemon_stopping", drain_timeout_s=self.settings.drain_timeout_seconds)
        # The workers see the same event and drain by themselves; the background loops
        # (cache sync, import linger) have no end of their own.
        if self._worker_tasks:
            await asyncio.wait(self._worker_tasks)
        for task in self._tasks:
            task.cancel()

    # --- health -------------------------------------------------------------------------

    def event_counts(self) -> dict[str, int]:
        return dict(self.event_worker.counts) if self.event_worker else {}

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        dead = self._dead_loops()
        checks = {"loops": "ok" if not dead else f"stopped: {', '.join(dead)}"}
        return _health(checks)

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        if self.stop.is_set():
            checks["shutdown"] = "stopping"
        if self.consumes:
            checks["cache"] = "ok" if self.cache.current.is_set() else self.cache.stale_reason
            unassigned = [w.name for w in self.workers if not w.assigned.is_set()]
            if not self.workers or unassigned:
                checks["kafka"] = f"not assigned: {', '.join(unassigned) or 'starting'}"
            else:
                checks["kafka"] = await _kafka_check(self.settings.kafka_bootstrap)
            stuck = [reason for w in self.workers for reason in w.undecodable.reasons()]
            checks["decoding"] = "ok" if not stuck else "undecodable batch: " + "; ".join(stuck)
        checks["database"] = await self._database_check()
        return _health(checks)

    async def _database_check(self) -> str:
        if self._pool is None:
            return "starting"
        try:
            async with asyncio.timeout(2):
                await self._pool.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"unreachable: {type(exc).__name__}"
        return "ok"


async def _kafka_check(bootstrap: str) -> str:
    """ "ok" if a bootstrap broker accepts a TCP connection within a second."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        return "ok"
    return "unreachable"


def _health(checks: dict[str, str]) -> web.Response:
    ok = all(v == "ok" for v in checks.values())
    return web.Response(
        body=orjson.dumps({"status": "ok" if ok else "fail", "checks": checks}),
        status=200 if ok else 503,
        content_type="application/json",
    )


def _consumer(s: Settings, group_id: str, **extra: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="webhook-dispatcher",
        **extra,
    )


async def ensure_topics(s: Settings) -> None:
    """Create the topics this daemon needs that are missing.

    Internal topics (retry, notice, dead-letter) get as many partitions as the first event
    topic, so retries scale out like events. An event topic that does not exist yet is
    created too (with a warning: producers usually own it), with
    ``MISSING_EVENT_TOPIC_PARTITIONS`` partitions, so a first ``make run`` just works.
    The replication factor is 3, or the number of brokers if fewer.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
        replicas = min(3, brokers)
        missing_events = [t for t in s.event_topics if t not in existing]
        if missing_events:
            log.warning("event_topics_missing", topics=missing_events, creating=True)
            await _create(admin, missing_events, MISSING_EVENT_TOPIC_PARTITIONS, replicas)
        described = await admin.describe_topics([s.event_topics[0]])
        partitions = max(1, len(described[0].get("partitions", [])))
        internal = (s.retry_topic, s.notice_topic, s.dead_letter_topic)
        await _create(admin, [t for t in internal if t not in existing], partitions, replicas)
    finally:
        await admin.close()


MISSING_EVENT_TOPIC_PARTITIONS = 6


async def _create(
    admin: AIOKafkaAdminClient, topics: list[str], partitions: int, replicas: int
) -> None:
    if not topics:
        return
    response = await admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=replicas) for t in topics]
    )
    for topic, code, *message in response.topic_errors:
        if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a concurrent daemon was first)
            raise RuntimeError(f"cannot create Kafka topic {topic}: error {code} {message}")
    log.info("topics_created", topics=topics, partitions=partitions, replicas=replicas)


@contextlib.asynccontextmanager
async def _serve(app: web.Application, host: str, port: int, daemon: Daemon) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        daemon.http_port = runner.addresses[0][1]
        yield
    finally:
        await runner.cleanup()


async def run(settings: Settings, *, role: Role = "all", clock: Clock = time.time) -> int:
    """Entry point of ``dispatcher run``: run until SIGTERM/SIGINT; 0 on a clean stop."""
    daemon = Daemon(settings, role=role, clock=clock)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal(daemon, sig))
    await daemon.run()
    return 0


def _on_signal(daemon: Daemon, sig: signal.Signals) -> Callable[[], None]:
    def handler() -> None:
        log.info("signal_received", signal=sig.name)
        daemon.stop.set()

    return handler
