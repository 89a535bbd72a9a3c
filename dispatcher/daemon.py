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
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import structlog
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from dispatcher import __version__, catalog, db, kafka, loops
from dispatcher.attempts import Attempts, Clock
from dispatcher.backoff import Backoff
from dispatcher.cache import CacheSync, SubscriptionCache
from dispatcher.client import HttpClient
from dispatcher.consumer import Consumer
from dispatcher.deadletter import DeadLetters
from dispatcher.delays import DelayQueue
from dispatcher.disabling import Disabler
from dispatcher.errors import ConfigurationError, DispatcherError
from dispatcher.event_consumer import EventConsumer
from dispatcher.health import Health
from dispatcher.history import AttemptLog, History
from dispatcher.imports import ImportBatcher
from dispatcher.metrics import Metrics
from dispatcher.notice_consumer import NoticeConsumer
from dispatcher.policy import DelayTiers, RetryPolicy
from dispatcher.recorder import FETCH_MIN_BYTES, Recorder
from dispatcher.recovery import Jobs
from dispatcher.recovery_runner import RecoveryRunner
from dispatcher.retry_consumer import RetryConsumer
from dispatcher.settings import Settings
from dispatcher.store import Store
from dispatcher.systemd import Notifier
from dispatcher.topics import ensure_topics, internal_topics

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
    metrics: Metrics = field(default_factory=Metrics)
    cache: SubscriptionCache = field(init=False)
    workers: list[Consumer] = field(default_factory=list)
    notifier: Notifier = field(default_factory=Notifier)
    attempts: Attempts | None = None
    event_worker: EventConsumer | None = None
    retry_worker: RetryConsumer | None = None
    notice_worker: NoticeConsumer | None = None
    recoveries: RecoveryRunner | None = None
    http_port: int | None = None  # the bound port, once started
    # Under a supervisor (dispatcher/supervisor.py): the listening socket it made for
    # this process (instead of DISPATCHER_HTTP_HOST/PORT), whether the API is served here
    # (the supervisor serves it), and the health routes that replace this process's own
    # (the supervisor's aggregate its children's).
    listen: socket.socket | None = None
    api: bool = True
    health_routes: Callable[[web.Application], None] | None = None
    kafka_health: kafka.KafkaHealth | None = None  # once the producer started
    _pool: asyncpg.Pool | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)  # loops with no end
    _worker_tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache = SubscriptionCache(self.metrics)

    @property
    def consumes(self) -> bool:
        return self.role in ("all", "dispatch", "retry")

    async def run(self) -> None:
        s = self.settings
        log.info(
            "daemon_starting",
            version=__version__,
            role=self.role,
            loop=loops.running(),
            settings=s.redacted(),
        )
        try:
            await self._run()
        except BaseException as exc:
            # A DispatcherError, even inside the TaskGroup's group, is printed by the
            # command as one line; anything else is a bug, logged with its traceback.
            group = exc if isinstance(exc, BaseExceptionGroup) else BaseExceptionGroup("", [exc])
            expected = (DispatcherError, asyncio.CancelledError, KeyboardInterrupt)
            if group.split(expected)[1] is not None:
                log.exception("daemon_failed")
            raise

    async def _run(self) -> None:
        s = self.settings
        the_catalog = catalog.load(s.catalog_file)
        await db.migrate_url(s.database_url)
        async with AsyncExitStack() as stack:
            self._pool = await db.create_pool(
                s.database_url, command_timeout=s.database_timeout_seconds
            )
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
        if self.role in ("all", "api") and self.api:
            from dispatcher.api import create_app

            assert self._pool is not None
            history = History(self._pool) if self.settings.attempt_log else None
            app = create_app(
                store=store,
                catalog=the_catalog,
                http=http,
                settings=self.settings,
                history=history,
                jobs=Jobs(self._pool),
            )
            from dispatcher import portal

            portal.attach(
                app,
                pool=self._pool,
                store=store,
                catalog=the_catalog,
                http=http,
                settings=self.settings,
                history=history,
            )
        else:
            app = web.Application()
        if self.health_routes is not None:
            self.health_routes(app)
            return app
        Health(
            metrics=self.metrics,
            cache=self.cache,
            consumers=self.workers,
            kafka_bootstrap=self.settings.kafka_bootstrap,
            kafka_problems=lambda: self.kafka_health.problems if self.kafka_health else [],
            consumes=self.consumes,
            stopping=self.stop,
            dead_loops=self._dead_loops,
            pool=lambda: self._pool,
        ).routes(app)
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
        producer = kafka.producer(s)
        if not await self._retry_kafka("start the producer", producer.start):
            return
        stack.push_async_callback(producer.stop)
        self.kafka_health = kafka.KafkaHealth(
            s, self.workers, producer, internal_topics(s), stopping=self.stop
        )
        self._background(group, self.kafka_health.run(), "kafka-health")
        m = self.metrics
        dead_letters = DeadLetters(producer, s.dead_letter_topic)
        tiers = DelayTiers.for_settings(s.retry_topic, retry_delay=s.retry_delay_seconds)
        policy = RetryPolicy(
            max_retries=s.max_retries, retry_delay=s.retry_delay_seconds, tiers=tiers
        )
        delays = DelayQueue(producer, m)
        attempt_log = AttemptLog(producer, s.attempt_topic) if s.attempt_log else None
        if attempt_log is not None:  # closed before the producer: what is queued is sent
            stack.push_async_callback(attempt_log.close)
        attempts = self.attempts = Attempts(
            http,
            policy,
            delays,
            producer,
            notice_topic=s.notice_topic,
            max_in_flight=s.max_in_flight,
            max_in_flight_per_endpoint=s.max_in_flight_per_endpoint,
            min_in_flight_per_endpoint=s.min_in_flight_per_endpoint,
            webhook_share=s.webhook_share_of_endpoint,
            clock=self.clock,
            metrics=m,
            attempt_log=attempt_log,
        )
        assert self._pool is not None
        self.recoveries = RecoveryRunner(
            Jobs(self._pool),
            Store(self._pool),
            attempts,
            history=History(self._pool) if s.attempt_log else None,
            catalog=the_catalog,
            settings=s,
        )
        # Awaited by the shutdown like a consumer: a job saves its progress and lets go.
        self._worker_tasks.append(
            group.create_task(self.recoveries.run(self.stop), name="recovery-jobs")
        )
        if self.role in ("all", "dispatch"):
            batcher = ImportBatcher(
                attempts,
                batch_size=s.import_batch_size,
                linger=s.import_linger_seconds,
                max_open=s.import_max_open_batches,
                metrics=m,
            )
            stack.push_async_callback(batcher.close)
            self._background(group, batcher.run(), "import-linger")
            consumer = _consumer(s, s.consumer_group)
            events = self.event_worker = EventConsumer(
                consumer,
                attempts=attempts,
                cache=self.cache,
                catalog=the_catalog,
                batcher=batcher,
                dead_letters=dead_letters,
                settings=s,
                metrics=m,
            )
            consumer.subscribe(list(s.event_topics), listener=events.listener())
            await self._start_worker(group, events)
        if self.role in ("all", "retry"):
            consumer = _consumer(s, f"{s.consumer_group}-retries")
            retries = self.retry_worker = RetryConsumer(
                consumer,
                attempts=attempts,
                delays=delays,
                policy=policy,
                cache=self.cache,
                dead_letters=dead_letters,
                settings=s,
                clock=self.clock,
                metrics=m,
            )
            # The tiers, the pre-tier single delay topic and the tiers of another retry
            # delay (after a change of DISPATCHER_RETRY_DELAY_SECONDS), all drained.
            consumer.subscribe(
                pattern=delay_topics_pattern(s.retry_topic), listener=retries.listener()
            )
            await self._start_worker(group, retries)
            consumer = _consumer(s, f"{s.consumer_group}-notices", max_poll_interval_ms=86_400_000)
            notices = self.notice_worker = NoticeConsumer(
                consumer, s, metrics=m, dead_letters=dead_letters
            )
            consumer.subscribe([s.notice_topic], listener=notices.listener())
            await self._start_worker(group, notices)
            if s.attempt_log:
                assert self._pool is not None
                disabler = Disabler(self._pool, s)
                if disabler.enabled:
                    self._background(group, disabler.run(), "webhook-disabler")
                consumer = _consumer(
                    s, f"{s.consumer_group}-attempts", fetch_min_bytes=FETCH_MIN_BYTES
                )
                recorder = Recorder(
                    consumer,
                    History(self._pool),
                    dead_letters=dead_letters,
                    settings=s,
                    metrics=m,
                    failing=disabler.note,
                )
                consumer.subscribe([s.attempt_topic], listener=recorder.listener())
                self._background(group, recorder.maintain(), "history-maintenance")
                await self._start_worker(group, recorder)

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

    async def _start_worker(self, group: asyncio.TaskGroup, worker: Consumer) -> None:
        if not await self._retry_kafka(f"start the {worker.name} consumer", worker.consumer.start):
            return
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


def _consumer(s: Settings, group_id: str, **extra: Any) -> AIOKafkaConsumer:
    return kafka.consumer(s, group_id, **extra)


def delay_topics_pattern(retry_topic: str) -> str:
    """The topics the retry consumer reads: ``retry_topic`` and its tiers.

    >>> import re
    >>> p = re.compile(delay_topics_pattern("webhook-retries"))
    >>> [bool(p.match(t)) for t in ("webhook-retries", "webhook-retries-15m", "webhook-retries-x")]
    [True, True, False]
    """
    return rf"^{re.escape(retry_topic)}(-[0-9]+(ms|s|m|h))?$"


@contextlib.asynccontextmanager
async def _serve(app: web.Application, host: str, port: int, daemon: Daemon) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site: web.BaseSite
        if daemon.listen is not None:  # made and bound by the supervisor
            site = web.SockSite(runner, daemon.listen)
        else:
            site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigurationError(
                f"DISPATCHER_HTTP_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        daemon.http_port = runner.addresses[0][1]
        yield
    finally:
        await runner.cleanup()


async def run(
    settings: Settings,
    *,
    role: Role = "all",
    clock: Clock = time.time,
    listen: socket.socket | None = None,
    api: bool = True,
) -> int:
    """Entry point of ``dispatcher run``: run until SIGTERM/SIGINT; 0 on a clean stop.
    ``listen`` and ``api``: see :class:`Daemon` (a supervisor's child)."""
    daemon = Daemon(settings, role=role, clock=clock, listen=listen, api=api)
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
