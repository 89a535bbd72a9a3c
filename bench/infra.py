"""What the benchmark sets up and tears down: database, topics, TLS, child processes.

Everything is fresh and uniquely named per run, and removed at the end (databases are
dropped ``WITH (FORCE)``, topics deleted). Child processes get ``PR_SET_PDEATHSIG`` so
they die with the benchmark even if it is killed, and are stopped with SIGTERM, then
SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg
import orjson
import trustme
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.protocol.admin import DeleteGroupsRequest

from bench import procstat

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen; the message says what."""


# --- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """A throwaway CA (``ca_file``) and a server cert for 127.0.0.1 (``server_file``)."""

    ca_file: str
    server_file: str  # private key + certificate chain, PEM


def make_tls(directory: Path) -> Tls:
    """Write a trustme CA and a server certificate for 127.0.0.1/localhost."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, server_file = directory / "ca.pem", directory / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(server_file))
    return Tls(str(ca_file), str(server_file))


# --- PostgreSQL ---------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str, name: str) -> AsyncIterator[str]:
    """CREATE DATABASE ``name`` on the server of ``admin_url``; drop it on exit."""
    admin = await asyncpg.connect(admin_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(admin_url, name)
    finally:
        admin = await asyncpg.connect(admin_url, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def server_version(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# --- Kafka --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """The run's own topics and consumer group."""

    events: str
    retries: str
    notices: str
    dead_letters: str
    attempts: str  # the attempt topic of every scenario but the history one
    history: str  # the attempt topic of the history scenario's 'on' runs alone
    group: str

    @property
    def all(self) -> list[str]:
        return [
            self.events, self.retries, self.notices, self.dead_letters, self.attempts,
            self.history,
        ]  # fmt: skip

    @property
    def groups(self) -> list[str]:
        """The groups the daemon derives from ``group`` (see dispatcher/daemon.py)."""
        return [
            self.group, f"{self.group}-retries", f"{self.group}-notices",
            f"{self.group}-attempts",
        ]  # fmt: skip


@contextlib.asynccontextmanager
async def fresh_topics(bootstrap: str, tag: str, partitions: int) -> AsyncIterator[Topics]:
    """Create uniquely named topics; delete them (and the groups) on exit."""
    topics = Topics(
        events=f"{tag}-events",
        retries=f"{tag}-retries",
        notices=f"{tag}-notices",
        dead_letters=f"{tag}-dead-letters",
        attempts=f"{tag}-attempts",
        history=f"{tag}-attempts-history",
        group=f"{tag}-group",
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics.all]
        )
        yield topics
    finally:
        try:
            await _delete_groups(admin, topics.groups)
            await admin.delete_topics(topics.all)
        finally:
            await admin.close()


async def _delete_groups(admin: AIOKafkaAdminClient, groups: Sequence[str]) -> None:
    """Best effort: aiokafka's admin has no public call for it; groups expire anyway."""
    for group in groups:
        with contextlib.suppress(Exception):
            node = await admin.find_coordinator(group)
            await admin._send_request_to_node(node, DeleteGroupsRequest([group]))


# --- child processes ----------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the benchmark dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A child process with its output in a log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.returncode is None

    def tail(self, lines: int = 30) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL; the exit code (None if unknown)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), 10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    stdout_pipe: bool = False,
) -> Child:
    """Start ``argv`` from the repository root; stderr (and stdout) go to ``log_path``."""
    log = log_path.open("wb")
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout_pipe else log,
        stderr=log,
        preexec_fn=_die_with_parent,  # only a prctl() call between fork and exec
    )
    return Child(name, process, log_path, log)


async def read_json_line(child: Child, within: float) -> Any:
    """The first stdout line of ``child`` as JSON, within ``within`` seconds."""
    assert child.process.stdout is not None
    try:
        line = await asyncio.wait_for(child.process.stdout.readline(), within)
    except TimeoutError:
        raise BenchError(f"{child.name} said nothing within {within:g} s\n{child.tail()}") from None
    if not line:
        await child.process.wait()
        raise BenchError(f"{child.name} exited ({child.process.returncode})\n{child.tail()}")
    return orjson.loads(line)


@dataclass
class Receiver:
    """The receiver process and how to ask it for its counts."""

    child: Child
    port: int
    session: aiohttp.ClientSession
    ports: tuple[int, ...] = ()  # every port it listens on (``port`` is the first)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def url(self, path: str, *, port: int | None = None) -> str:
        """The webhook URL of ``path`` on ``port`` (the first port by default)."""
        return f"https://127.0.0.1:{port or self.port}/hook/{path}"

    async def counts(self) -> dict[str, tuple[int, int]]:
        """{phase: (requests, entities)} so far."""
        async with self.session.get(f"{self.base}/count") as response:
            data = await response.json(loads=orjson.loads)
        return {name: (v[0], v[1]) for name, v in data.items()}

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/stats") as response:
            data: dict[str, Any] = await response.json(loads=orjson.loads)
        return data

    async def samples(self, phase: str) -> list[tuple[float, float]]:
        """(arrival, latency in s) of every request of ``phase`` that carried produced_at."""
        url = f"{self.base}/samples"
        async with self.session.get(url, params={"phase": phase}) as response:
            data = await response.json(loads=orjson.loads)
        return [(a, b) for a, b in data]

    async def wait_for(
        self, phase: str, *, requests: int = 0, entities: int = 0, within: float, watch: Child
    ) -> bool:
        """Poll until ``phase`` has that many requests and entities; False after ``within`` s.

        Raises :class:`BenchError` at once if ``watch`` (the dispatcher) exits meanwhile.
        """
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            got = (await self.counts()).get(phase, (0, 0))
            if got[0] >= requests and got[1] >= entities:
                return True
            if not watch.alive():
                raise BenchError(f"{watch.name} exited during {phase}\n{watch.tail()}")
            await asyncio.sleep(0.2)  # polling interval
        return False


@contextlib.asynccontextmanager
async def run_receiver(tls: Tls, log_dir: Path, *, ports: int = 1) -> AsyncIterator[Receiver]:
    """Start ``bench/receiver.py`` (listening on ``ports`` ports) and a client session for
    its stats; stop both after."""
    argv = [sys.executable, "-m", "bench.receiver", "--cert", tls.server_file]
    argv += ["--ports", str(ports)]
    child = await spawn("receiver", argv, log_path=log_dir / "receiver.log", stdout_pipe=True)
    try:
        listening = await read_json_line(child, within=30)
        port = int(listening["port"])
        bound = tuple(int(p) for p in listening.get("ports", [port]))
        context = _client_context(tls.ca_file)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as session:
            yield Receiver(child, port, session, bound)
    finally:
        await child.stop(grace=10)


def _client_context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


# --- the dispatcher -----------------------------------------------------------------------


def dispatcher_argv(
    command: str = "run", *, profile_to: Path | None = None, trace_to: Path | None = None
) -> list[str]:
    """``.venv/bin/dispatcher <command>``; under cProfile when ``profile_to`` is set, or
    with GC pauses and loop lag recorded (``bench/gctrace.py``) when ``trace_to`` is."""
    if trace_to is not None:
        return [sys.executable, "-m", "bench.gctrace", str(trace_to), command]
    if profile_to is not None:
        return [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(profile_to),
            "-m",
            "dispatcher",
            command,
        ]
    script = Path(sys.executable).parent / "dispatcher"
    if script.exists():
        return [str(script), command]
    return [sys.executable, "-m", "dispatcher", command]


def dispatcher_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment of a dispatcher: ours minus any DISPATCHER_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(settings)
    return env


@dataclass
class Dispatcher:
    """A running ``dispatcher run`` process."""

    child: Child
    http_port: int
    started_at: float  # time.time() when spawned
    ready_at: float = 0.0
    label: str = "dispatcher"

    @property
    def pid(self) -> int:
        return self.child.pid

    def memory_mib(self) -> dict[str, float]:
        """VmRSS and VmHWM in MiB (empty once it exited)."""
        return {k: round(v / 1024, 1) for k, v in procstat.memory_kib(self.pid).items()}

    async def wait_ready(self, session: aiohttp.ClientSession, within: float) -> float:
        """Poll GET /readyz until 200 (for at most ``within`` s); seconds since spawn."""
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise BenchError(f"the dispatcher exited at start\n{self.child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        self.ready_at = time.time()
                        return self.ready_at - self.started_at
            await asyncio.sleep(0.1)  # polling interval
        raise BenchError(f"the dispatcher was not ready within {within:g} s\n{self.child.tail()}")


@contextlib.asynccontextmanager
async def run_dispatcher(
    settings: Mapping[str, str],
    *,
    http_port: int,
    log_path: Path,
    session: aiohttp.ClientSession,
    ready_timeout: float,
    sampler: procstat.Sampler | None = None,
    profile_to: Path | None = None,
    trace_to: Path | None = None,
    label: str = "dispatcher",
) -> AsyncIterator[Dispatcher]:
    """Start a dispatcher, wait for /readyz; SIGTERM it (SIGKILL if stuck) on exit.

    The ``sampler`` follows its CPU as group ``dispatcher`` from the moment it is spawned
    (pre-produced events may be delivered before /readyz is first seen answering 200).
    """
    child = await spawn(
        "dispatcher",
        dispatcher_argv(profile_to=profile_to, trace_to=trace_to),
        log_path=log_path,
        env=dispatcher_env(settings),
    )
    if sampler is not None:
        sampler.track("dispatcher", lambda: [child.pid])
    dispatcher = Dispatcher(child, http_port, time.time(), label=label)
    try:
        await dispatcher.wait_ready(session, ready_timeout)
        yield dispatcher
    finally:
        if sampler is not None:
            sampler.untrack("dispatcher")
        code = await child.stop(grace=30)
        if code not in (0, None, -signal.SIGTERM):
            print(f"warning: the dispatcher exited with {code}; log: {log_path}", file=sys.stderr)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
