"""``dispatcher run --processes N``: N consumer processes under one supervisor, one HTTP port.

With N > 1 (``DISPATCHER_PROCESSES``; ``auto`` is the CPUs the process may use), the
``dispatcher run`` process becomes a supervisor. It consumes nothing itself; it

- starts N children, each ``dispatcher run --role <role>`` in the same consumer groups,
  so Kafka spreads the partitions over them exactly as over separate instances (with more
  processes than partitions, some sit idle);
- serves the HTTP port: the API in-process (role ``all``; the API is cheap next to
  delivering), and ``/metrics``, ``/healthz`` and ``/readyz`` aggregated from the
  children, each of which serves them on a loopback socket the supervisor bound for it
  (passed as a file descriptor, so no port race; kept across its restarts). ``/metrics``
  labels every sample ``process="<index>"`` (its own ``process="supervisor"``) rather
  than summing: a child's restart resets its counters, which ``rate()`` sees per series
  but would misread in a sum, and gauges such as ``webhook_cache_current`` or
  ``webhook_cache_resync_age_seconds`` mean nothing added up. ``/readyz`` is 200 when
  every child runs and is ready; each check names the processes it fails on;
- forwards SIGTERM and SIGINT: each child drains as one process does and exits 0; past
  the drain timeout plus :data:`STOP_MARGIN`, or on a second signal, the rest are killed;
- restarts a child that exited unexpectedly, after a backoff (:class:`RestartPolicy`),
  and stops (then restarts) one whose ``/healthz`` failed for
  ``DISPATCHER_PROCESS_UNHEALTHY_SECONDS`` (:meth:`Supervisor._watch_health`),
  and gives up on a crash loop or a configuration error: it stops the others and exits
  with the code of the child's failure (2, 3, 4, else 1) and one line saying so.

Children tag every log line with ``process`` (their index, a string); the supervisor's
lines carry ``process="supervisor"`` and name a child with ``child``. All write to the
supervisor's stdout, one ``write`` per line (atomic on a pipe up to 4 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Metric,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from dispatcher.backoff import Backoff
from dispatcher.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DispatcherError,
    KafkaUnavailable,
)
from dispatcher.health import checks_response
from dispatcher.settings import Settings
from dispatcher.systemd import Notifier

if TYPE_CHECKING:
    from dispatcher.daemon import Role

log = structlog.get_logger(__name__)

SUPERVISOR = "supervisor"  # the ``process`` of the supervisor's own lines and series
CRASH_LOOP_EXITS = 5  # unexpected exits of one child within CRASH_LOOP_WINDOW: give up
CRASH_LOOP_WINDOW = 120.0  # seconds
STABLE_AFTER = 60.0  # a child that ran this long restarts after the first backoff again
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0  # seconds before a restart, doubling
STOP_MARGIN = 15.0  # seconds past the drain timeout: the hand-off (10 s) and the exit
CHILD_TIMEOUT = 5.0  # seconds a child has to answer one /metrics, /readyz or /healthz
READY_POLL = 0.5  # seconds between two looks at the children's readiness (systemd only)
HEALTH_POLL = 2.0  # seconds between two looks at the children's /healthz
# Exit codes of a child stopped on purpose: drained (0), or killed by the signal before
# it could install its handlers (-SIGTERM, -SIGINT; 130: KeyboardInterrupt at start).
CLEAN_EXITS = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 130})
# What a child's exit code means (the codes of `dispatcher --help`), as the supervisor's
# own failure when it gives up on that child.
FAILURES: Mapping[int, type[DispatcherError]] = {
    2: ConfigurationError,
    3: DatabaseUnavailable,
    4: KafkaUnavailable,
}
_PR_SET_PDEATHSIG = 1


# --- pure logic: restarts, exits, merging what the children answer ----------------------


class RestartPolicy:
    """When to restart one child: after a backoff that doubles (from :data:`FIRST_BACKOFF`
    to :data:`MAX_BACKOFF`) and starts over once a child ran :data:`STABLE_AFTER`
    seconds; never again after :data:`CRASH_LOOP_EXITS` exits within
    :data:`CRASH_LOOP_WINDOW` seconds.

    >>> policy = RestartPolicy()
    >>> [policy.after_exit(at=t, uptime=1.0) for t in (0.0, 2.0, 4.0, 6.0, 8.0)]
    [0.5, 1.0, 2.0, 4.0, None]
    """

    __slots__ = ("_backoff", "_exits", "_limit", "_window")

    def __init__(self, *, limit: int = CRASH_LOOP_EXITS, window: float = CRASH_LOOP_WINDOW):
        self._backoff = Backoff(first=FIRST_BACKOFF, cap=MAX_BACKOFF)
        self._exits: deque[float] = deque()
        self._limit = limit
        self._window = window

    def after_exit(self, *, at: float, uptime: float) -> float | None:
        """Seconds to wait before restarting a child that exited at ``at`` after running
        ``uptime`` seconds; None: it is crash-looping, give up."""
        if uptime >= STABLE_AFTER:
            self._backoff.reset()
        self._exits.append(at)
        while at - self._exits[0] > self._window:
            self._exits.popleft()
        if len(self._exits) >= self._limit:
            return None
        return self._backoff.next()


def describe_exit(code: int) -> str:
    """How a child ended, in words.

    >>> describe_exit(3), describe_exit(-9)
    ('exit code 3', 'killed by SIGKILL')
    """
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def failure(index: int, code: int, why: str) -> DispatcherError:
    """The supervisor's error when it gives up on child ``index``: of the family its exit
    code means, so that the command exits with that code."""
    family = FAILURES.get(code, DispatcherError)
    return family(
        f"process {index} of dispatcher run --processes {why} (last: {describe_exit(code)}); "
        f"its process={index} log lines above say why"
    )


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_metrics(pages: Sequence[tuple[str, str]]) -> bytes:
    """One Prometheus text page from the pages of several processes, each ``(process,
    text)``: a family once (HELP and TYPE), with every sample of every process labelled
    ``process="<process>"``. A family with no samples (a labelled metric before its first
    child) keeps its TYPE.

    >>> text = "# HELP x_total Things.\\n# TYPE x_total counter\\nx_total {}\\n"
    >>> print(merge_metrics([("0", text.format(1)), ("1", text.format(2))]).decode().strip())
    # HELP x_total Things.
    # TYPE x_total counter
    x_total{process="0"} 1.0
    x_total{process="1"} 2.0
    """
    families: dict[str, Metric] = {}
    for process, text in pages:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                s._replace(labels={**s.labels, "process": process}) for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def merge_checks(
    answers: Mapping[str, Mapping[str, str] | None], *, stopping: bool
) -> dict[str, str]:
    """The checks of the children as one answer: ``processes`` names those that do not
    run or did not answer (None), and each check is "ok" when it is on every child that
    answered, else its reasons, each after the process it fails on.

    >>> merge_checks({"0": {"kafka": "ok"}, "1": {"kafka": "not assigned: dispatch"},
    ...               "2": None}, stopping=False)
    {'processes': 'not running or not answering: 2', 'kafka': 'process 1: not assigned: dispatch'}
    """
    checks: dict[str, str] = {}
    if stopping:
        checks["shutdown"] = "stopping"
    down = [name for name, answer in answers.items() if answer is None]
    checks["processes"] = f"not running or not answering: {', '.join(down)}" if down else "ok"
    reasons: dict[str, list[str]] = {}
    for name, answer in answers.items():
        for check, value in (answer or {}).items():
            failing = reasons.setdefault(check, [])
            if value != "ok" and check != "shutdown":
                failing.append(f"process {name}: {value}")
    for check, failing in reasons.items():
        checks.setdefault(check, "; ".join(failing) if failing else "ok")
    return checks


# --- the children -----------------------------------------------------------------------


def child(settings: Settings, role: Role, args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    """What a child of the supervisor runs (``--process-index``, ``--http-fd``): the daemon
    of its role without the API, on the socket it inherited, every log line tagged
    ``process``; it gets SIGTERM (and drains) if the supervisor dies."""
    from dispatcher import daemon

    structlog.contextvars.bind_contextvars(process=str(args.process_index))
    _die_with_parent()
    listen = socket.socket(fileno=args.http_fd)
    return daemon.run(settings, role=role, listen=listen, api=False)


def _die_with_parent() -> None:
    """SIGTERM when the supervisor dies, even by SIGKILL (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before prctl: nobody would stop us
        os.kill(os.getpid(), signal.SIGTERM)


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@dataclass
class Child:
    """One slot of the supervisor: its listening socket, its restart policy, and the
    process running in it now."""

    index: int
    listen: socket.socket
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    up: bool = False
    exit_code: int | None = None  # once it exited on the supervisor's stop
    # its /healthz since it started: answered 200 once (watched from then on), failing
    # since when, and stopped for it (not looked at again until it runs anew)
    healthy_once: bool = False
    failing_since: float | None = None
    stopped_unhealthy: bool = False

    @property
    def name(self) -> str:
        return str(self.index)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen.getsockname()[1]}"

    def signal(self, sig: signal.Signals) -> None:
        if self.up and self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


# --- the supervisor ---------------------------------------------------------------------


class Supervisor:
    """N children of ``role`` and the HTTP port; :meth:`run` until a signal or a failure."""

    def __init__(
        self,
        settings: Settings,
        role: Role,
        processes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from dispatcher.daemon import Daemon

        self.settings = settings
        self.role = role
        self.children = [Child(i, _listener()) for i in range(processes)]
        self.stop = asyncio.Event()
        self.kill_now = asyncio.Event()  # a second signal
        self.notifier = Notifier()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._registry = CollectorRegistry()
        ProcessCollector(registry=self._registry)
        PlatformCollector(registry=self._registry)
        # The HTTP port: role all's API here, and the aggregated health routes.
        self.daemon = Daemon(
            settings,
            role="api",
            api=role == "all",
            notifier=Notifier({}),  # READY=1 is the supervisor's to send, once all are
            health_routes=self.routes,
        )
        environ = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}
        self._environ = environ
        self._kills: set[asyncio.Future[None]] = set()  # SIGKILLs due to unhealthy children
        self._watch: asyncio.Task[None] | None = None
        self._looked_at = clock()  # the watch's last look at every child

    # --- HTTP ---------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    async def metrics_page(self, _request: web.Request) -> web.Response:
        up = [c for c in self.children if c.up]
        pages = await asyncio.gather(*(self._get(c, "/metrics") for c in up))
        merged = merge_metrics(
            [
                (SUPERVISOR, generate_latest(self._registry).decode()),
                *((c.name, page[1]) for c, page in zip(up, pages, strict=True) if page),
            ]
        )
        return web.Response(body=merged, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(self, _request: web.Request) -> web.Response:
        return checks_response(await self.readiness())

    async def healthz(self, _request: web.Request) -> web.Response:
        """Liveness: the children that run answer 200; one restarting is the supervisor's
        to handle, not a reason to restart the whole service. While the supervisor
        watches its children (:meth:`_watch_health`), a failing child is its to restart
        too: the answer is then the watch's, given at once (a hung child would make a
        probe wait), failing only if the watch stopped or a child failed for longer than
        the watch needs to restart it."""
        limit = self.settings.process_unhealthy_seconds
        if limit:
            return checks_response(self._watched_health(limit))
        up = [c for c in self.children if c.up]
        answers = await asyncio.gather(*(self._checks(c, "/healthz") for c in up))
        checks = merge_checks({c.name: a for c, a in zip(up, answers, strict=True)}, stopping=False)
        return checks_response(checks)

    def _watched_health(self, limit: float) -> dict[str, str]:
        now = self._clock()
        # watching: the watch runs and has looked at the children lately (one failing at
        # every look is no watch); once stopping it has ended, which is no failure
        looked_lately = now - self._looked_at <= 3 * (HEALTH_POLL + CHILD_TIMEOUT)
        watching = self.stop.is_set() or (
            self._watch is not None and not self._watch.done() and looked_lately
        )
        overdue = limit + HEALTH_POLL + CHILD_TIMEOUT
        overdue += self.settings.drain_timeout_seconds + STOP_MARGIN  # a SIGTERM's drain
        stuck = [
            f"process {c.index}: /healthz failing for {now - c.failing_since:.0f}s"
            for c in self.children
            if c.up and c.failing_since is not None and now - c.failing_since > overdue
        ]
        return {
            "loops": "ok" if watching else "stopped: health-watch",
            "processes": "; ".join(stuck) or "ok",
        }

    async def readiness(self) -> dict[str, str]:
        """The children's /readyz checks merged (a child not running is not ready)."""
        answers = await asyncio.gather(*(self._checks(c, "/readyz") for c in self.children))
        return merge_checks(
            {c.name: a for c, a in zip(self.children, answers, strict=True)},
            stopping=self.stop.is_set(),
        )

    async def _checks(self, child: Child, path: str) -> dict[str, str] | None:
        if not child.up:
            return None
        got = await self._get(child, path)
        if got is None:
            return None
        try:
            checks: dict[str, str] = orjson.loads(got[1])["checks"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        return checks

    async def _get(self, child: Child, path: str) -> tuple[int, str] | None:
        assert self._session is not None
        try:
            async with asyncio.timeout(CHILD_TIMEOUT):
                async with self._session.get(child.url + path) as response:
                    return response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (0 once every child drained) or a failure (raised)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info(
            "supervisor_starting",
            processes=len(self.children),
            role=self.role,
            http_port=self.settings.http_port,
        )
        async with aiohttp.ClientSession() as self._session:
            http = asyncio.create_task(self.daemon.run(), name="supervisor-http")
            keepers = [
                asyncio.create_task(self._keep(c), name=f"process-{c.index}") for c in self.children
            ]
            systemd = asyncio.create_task(self._systemd(), name="systemd")
            watch = self._watch = asyncio.create_task(self._watch_health(), name="health-watch")
            stopping = asyncio.create_task(self.stop.wait())
            await asyncio.wait({http, stopping, *keepers}, return_when=asyncio.FIRST_COMPLETED)
            self.stop.set()
            stopping.cancel()
            failed = [t for t in (http, *keepers) if t.done() and t.exception() is not None]
            self.notifier.stopping()
            watch.cancel()
            for kill in list(self._kills):
                kill.cancel()
            clean = await self._stop_children(keepers)
            systemd.cancel()
            self.daemon.stop.set()
            with contextlib.suppress(BaseException):  # its failure, if any, is raised below
                await http
        for sock in (c.listen for c in self.children):
            sock.close()
        if failed:
            error = failed[0].exception()
            assert error is not None
            raise error
        log.info("supervisor_stopped", clean=clean)
        return 0 if clean else 1

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("signal_received", signal=sig.name)
            self.stop.set()
        else:
            log.warning("signal_received_again", signal=sig.name, then="killing the processes")
            self.kill_now.set()

    async def _keep(self, child: Child) -> None:
        """Run ``child``'s slot: start it, and again after each unexpected exit."""
        while not self.stop.is_set():
            process = await self._spawn(child)
            code = await process.wait()
            child.up = False
            uptime = self._clock() - child.started_at
            fields = {"child": child.index, "pid": process.pid, "uptime_s": round(uptime, 1)}
            if self.stop.is_set():
                child.exit_code = code
                log.info("process_exited", exit=describe_exit(code), **fields)
                return
            log.error("process_exited_unexpectedly", exit=describe_exit(code), **fields)
            if code == 2:  # a bad setting or catalog: every restart would fail the same way
                raise failure(child.index, code, "cannot start")
            delay = child.policy.after_exit(at=self._clock(), uptime=uptime)
            if delay is None:
                log.error(
                    "process_crash_loop",
                    child=child.index,
                    exits=CRASH_LOOP_EXITS,
                    within_s=CRASH_LOOP_WINDOW,
                )
                raise failure(
                    child.index,
                    code,
                    f"exited {CRASH_LOOP_EXITS} times within {CRASH_LOOP_WINDOW:g} s",
                )
            log.warning("process_restarting", child=child.index, in_s=delay)
            await self._wait_or_stop(asyncio.sleep(delay))  # the backoff, a timer

    async def _spawn(self, child: Child) -> asyncio.subprocess.Process:
        fd = child.listen.fileno()
        argv = [sys.executable, "-m", "dispatcher", "run", "--role", self.role]
        argv += ["--process-index", child.name, "--http-fd", str(fd)]
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(fd,), env=self._environ, stdin=subprocess.DEVNULL
        )
        child.process, child.started_at, child.up = process, self._clock(), True
        child.healthy_once, child.failing_since, child.stopped_unhealthy = False, None, False
        log.info(
            "process_started",
            child=child.index,
            pid=process.pid,
            port=child.listen.getsockname()[1],
        )
        if self.stop.is_set():  # the stop came while it was being started
            child.signal(signal.SIGTERM)
        return process

    async def _stop_children(self, keepers: Sequence[asyncio.Task[None]]) -> bool:
        """SIGTERM to every child, then wait for them to drain; kill those still running
        past the deadline or on a second signal. True when every child stopped cleanly."""
        deadline = self.settings.drain_timeout_seconds + STOP_MARGIN
        log.info("processes_stopping", processes=len(self.children), deadline_s=deadline)
        for c in self.children:
            c.signal(signal.SIGTERM)
        waiting: asyncio.Future[Any] = asyncio.gather(*keepers, return_exceptions=True)
        kill: asyncio.Future[Any] = asyncio.ensure_future(self.kill_now.wait())
        await asyncio.wait({waiting, kill}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        kill.cancel()
        if not waiting.done():
            running = [c.index for c in self.children if c.up]
            why = "second signal" if self.kill_now.is_set() else "drain deadline"
            log.warning("processes_killed", children=running, reason=why)
            for c in self.children:
                c.signal(signal.SIGKILL)
            await waiting
        return all(c.exit_code is None or c.exit_code in CLEAN_EXITS for c in self.children)

    async def _watch_health(self) -> None:
        """Restart a child whose ``/healthz`` failed for ``DISPATCHER_PROCESS_UNHEALTHY_SECONDS``
        (the exit is then handled as any other, with its backoff and crash-loop limit).

        A child is watched once it answered 200: one still starting (migrations, loading
        the subscriptions, PostgreSQL not there yet) is left alone. One that does not
        answer at all (its event loop blocked, the process stopped) is killed (SIGKILL):
        it could not drain. One that answers that a loop of it stopped gets SIGTERM and
        drains as on a stop, killed only if still running past the drain timeout plus
        :data:`STOP_MARGIN`. With one process, systemd's watchdog or the orchestrator's
        liveness probe does this; with several, the supervisor feeds the watchdog and
        serves the probe, so it must."""
        limit = self.settings.process_unhealthy_seconds
        if not limit:
            return
        while not self.stop.is_set():
            await asyncio.sleep(HEALTH_POLL)  # a timer: the children are asked this often
            try:
                await self._look_at_children(limit)
            except Exception:  # a bug here must not end the watch unseen
                log.exception("health_watch_failed")
            else:
                self._looked_at = self._clock()

    async def _look_at_children(self, limit: float) -> None:
        watched = [(c, c.process) for c in self.children if c.up and not c.stopped_unhealthy]
        answers = await asyncio.gather(*(self._get(c, "/healthz") for c, _ in watched))
        now = self._clock()
        for (child, process), answer in zip(watched, answers, strict=True):
            if self.stop.is_set() or not child.up or child.process is not process:
                continue  # stopping, or it exited (and maybe runs anew) meanwhile
            if answer is not None and answer[0] == 200:
                if not child.healthy_once:
                    log.info("process_healthy", child=child.index, pid=_pid(child))
                child.healthy_once, child.failing_since = True, None
            elif child.healthy_once:
                if child.failing_since is None:
                    child.failing_since = now
                if now - child.failing_since >= limit:
                    self._stop_unhealthy(child, answer, now - child.failing_since)

    def _stop_unhealthy(self, child: Child, answer: tuple[int, str] | None, failing: float) -> None:
        child.stopped_unhealthy = True
        sig = signal.SIGKILL if answer is None else signal.SIGTERM
        log.error(
            "process_unhealthy",
            child=child.index,
            pid=_pid(child),
            failing_s=round(failing, 1),
            healthz="no answer" if answer is None else answer[1][:300],
            then=sig.name,
        )
        child.signal(sig)
        process = child.process
        if sig == signal.SIGTERM and process is not None:

            async def kill_if_still_running() -> None:
                await asyncio.sleep(self.settings.drain_timeout_seconds + STOP_MARGIN)
                if child.process is process and process.returncode is None:
                    log.error("process_killed", child=child.index, pid=process.pid)
                    child.signal(signal.SIGKILL)

            task = asyncio.ensure_future(kill_if_still_running())
            self._kills.add(task)
            task.add_done_callback(self._kills.discard)

    async def _systemd(self) -> None:
        """Under systemd: READY=1 once every child is ready, then WATCHDOG=1 while the
        supervisor's loop turns (it restarts its children itself)."""
        if not self.notifier.enabled:
            return
        while True:
            checks = await self.readiness()
            if all(v == "ok" for v in checks.values()):
                break
            await asyncio.sleep(READY_POLL)  # a timer: readiness is asked of the children
        self.notifier.ready()
        interval = self.notifier.watchdog_interval
        while interval:
            self.notifier.watchdog()
            await asyncio.sleep(interval)  # a timer: systemd asks for a beat this often

    async def _wait_or_stop(self, awaitable: Coroutine[Any, Any, None]) -> None:
        waiter = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopping.cancel()


def _pid(child: Child) -> int | None:
    return child.process.pid if child.process is not None else None


_SYSTEMD_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


async def run(settings: Settings, *, role: Role, processes: int) -> int:
    """Entry point of ``dispatcher run`` with more than one process."""
    structlog.contextvars.bind_contextvars(process=SUPERVISOR)
    if role == "api":  # nothing to spread: the API scales by instances behind a balancer
        from dispatcher import daemon

        log.warning("processes_ignored", role=role, processes=processes, reason="role api")
        return await daemon.run(settings, role=role)
    return await Supervisor(settings, role, processes).run()
