"""Local stack of real services for the webhook dispatcher (no Docker needed).

Runs, from the repository root::

    .venv/bin/python tools/stack.py up       # start what is not running, wait until ready
    .venv/bin/python tools/stack.py status   # print each service as up/down
    .venv/bin/python tools/stack.py down     # stop everything (harmless when stopped)

Services (ports are overridable through environment variables):

* Apache Kafka 3.9.1, KRaft single node, PLAINTEXT on 127.0.0.1:9092
  (``DISPATCHER_STACK_KAFKA_PORT``), controller on 127.0.0.1:9093
  (``DISPATCHER_STACK_KAFKA_CONTROLLER_PORT``).  Jars come from Maven Central
  through ``tools/kafka/pom.xml`` into ``${XDG_CACHE_HOME:-~/.cache}/
  webhook-dispatcher/kafka-<version>/``, outside the clone.
* PostgreSQL (Debian's packages), private cluster on 127.0.0.1:55432
  (``DISPATCHER_STACK_PG_PORT``), role and database ``dispatcher``, trust
  auth.  ``DISPATCHER_STACK_PG_FAST=1`` turns fsync, synchronous_commit and
  full_page_writes off (tests/CI only, never ``make run``).
* SMTP sink (``tools/smtp_sink.py``) on 127.0.0.1:2525
  (``DISPATCHER_STACK_SMTP_PORT``) storing mails under ``<state>/mail/``.

State lives in ``<repo>/.stack/`` (``DISPATCHER_STACK_DIR``); readiness
deadline is ``DISPATCHER_STACK_TIMEOUT`` seconds (default 90).  Exit code 0
means success (for ``status``: every service is up), 1 failure.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import aiosmtplib
import asyncpg
from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaConsumer,
    AIOKafkaProducer,
)
from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaAdminClient,
    NewTopic,
)

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
KAFKA_POM = TOOLS / "kafka" / "pom.xml"
KAFKA_LOG4J = TOOLS / "kafka" / "log4j.properties"
SMTP_SINK = TOOLS / "smtp_sink.py"

HOST = "127.0.0.1"
POLL_INTERVAL = 0.25  # seconds between two readiness probes
PROBE_TIMEOUT = 10.0  # seconds one probe may take
LOG_TAIL_LINES = 40
PG_ROLE = "dispatcher"
PG_DATABASE = "dispatcher"
PG_OS_USER = "postgres"
WARMUP_TOPIC = "stack-warmup"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin

LOG = logging.getLogger("stack")


class StackError(Exception):
    """A service could not be prepared, started, checked or stopped."""


# --------------------------------------------------------------------------
# configuration


def env_int(name: str, default: int) -> int:
    """Return the integer environment variable ``name`` or ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        msg = f"{name}={raw!r} is not an integer"
        raise StackError(msg) from None


def env_flag(name: str) -> bool:
    """Return True when the environment variable ``name`` is set to a true value."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def kafka_version() -> str:
    """Return the Kafka version declared in ``tools/kafka/pom.xml``."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", KAFKA_POM.read_text())
    if match is None:
        msg = f"no <kafka.version> property in {KAFKA_POM}"
        raise StackError(msg)
    return match.group(1).strip()


def default_cache_root() -> Path:
    """Return ``${XDG_CACHE_HOME:-~/.cache}/webhook-dispatcher``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "webhook-dispatcher"


@dataclass(frozen=True)
class Config:
    """Everything the services need to know, read once from the environment."""

    state: Path
    kafka_jars: Path
    kafka_port: int
    kafka_controller_port: int
    pg_port: int
    pg_fast: bool
    smtp_port: int
    timeout: float

    @classmethod
    def from_env(cls) -> Config:
        """Build the configuration from ``DISPATCHER_STACK_*`` variables."""
        state = Path(os.environ.get("DISPATCHER_STACK_DIR", "") or REPO / ".stack")
        return cls(
            state=state.expanduser().resolve(),
            kafka_jars=default_cache_root() / f"kafka-{kafka_version()}",
            kafka_port=env_int("DISPATCHER_STACK_KAFKA_PORT", 9092),
            kafka_controller_port=env_int("DISPATCHER_STACK_KAFKA_CONTROLLER_PORT", 9093),
            pg_port=env_int("DISPATCHER_STACK_PG_PORT", 55432),
            pg_fast=env_flag("DISPATCHER_STACK_PG_FAST"),
            smtp_port=env_int("DISPATCHER_STACK_SMTP_PORT", 2525),
            timeout=float(env_int("DISPATCHER_STACK_TIMEOUT", 90)),
        )

    @property
    def logs(self) -> Path:
        """Directory of the service logs."""
        return self.state / "logs"

    @property
    def run(self) -> Path:
        """Directory of the pid files."""
        return self.state / "run"

    @property
    def mail(self) -> Path:
        """Directory where the SMTP sink stores mails."""
        return self.state / "mail"

    def create_dirs(self) -> None:
        """Create the state directory tree (it ignores itself in git)."""
        for path in (self.state, self.logs, self.run, self.mail):
            path.mkdir(parents=True, exist_ok=True)
        ignore = self.state / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# created by tools/stack.py\n*\n")


# --------------------------------------------------------------------------
# small helpers: output, processes, files


def say(service: str, message: str) -> None:
    """Print one progress line for ``service``."""
    print(f"{service:<9} {message}".rstrip(), flush=True)


def is_root() -> bool:
    """Return True when running as root."""
    return os.geteuid() == 0


def pid_alive(pid: int) -> bool:
    """Return True when process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def pid_cmdline(pid: int) -> str | None:
    """Return the command line of ``pid`` (None when /proc cannot tell).

    Right after ``Popen`` returns, the kernel may not have set up the new
    program's arguments yet: an empty command line means "unknown", not
    "some other program".
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace") or None


def process_matches(pid: int, marker: str) -> bool:
    """Return True when ``pid`` is alive and its command line contains ``marker``."""
    if not pid_alive(pid):
        return False
    cmdline = pid_cmdline(pid)
    return cmdline is None or marker in cmdline


def read_pid(path: Path) -> int | None:
    """Return the pid stored in the first line of ``path``, if any."""
    try:
        first = path.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() else None


async def wait_dead(pid: int, within: float) -> bool:
    """Poll until ``pid`` is gone; return False when ``within`` seconds pass first."""
    deadline = time.monotonic() + within
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL)
    return True


async def terminate(pid: int, grace: float) -> None:
    """Send SIGTERM to ``pid``, then SIGKILL when it outlives ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if await wait_dead(pid, grace):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not await wait_dead(pid, 10):
        msg = f"process {pid} survived SIGKILL"
        raise StackError(msg)


def port_in_use(port: int) -> bool:
    """Return True when something accepts TCP connections on HOST:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of ``path`` (or a note that it is missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def rotate_log(path: Path) -> None:
    """Keep the previous run's log as ``<name>.1`` so each start gets a fresh file."""
    if path.is_symlink() or not path.exists():
        return
    path.replace(path.with_name(path.name + ".1"))


def chown_to(path: Path, user: str) -> None:
    """Give ``path`` to ``user`` (and its primary group)."""
    shutil.chown(path, user, user)


async def run(
    cmd: Sequence[str | Path],
    *,
    what: str,
    limit: float,
    cwd: Path | None = None,
    new_session: bool = False,
) -> str:
    """Run ``cmd`` to completion and return its output; raise StackError on failure."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        start_new_session=new_session,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        msg = f"{what} did not finish within {limit:.0f}s"
        raise StackError(msg) from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
        msg = f"{what} failed (exit {proc.returncode}):\n{tail}"
        raise StackError(msg)
    return text


@contextlib.contextmanager
def stack_lock(cfg: Config) -> Iterator[None]:
    """Serialise concurrent ``up``/``down`` runs on the same state directory."""
    cfg.state.mkdir(parents=True, exist_ok=True)
    with (cfg.state / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("stack", "waiting for another tools/stack.py run to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------
# system packages


def pg_bin_dir() -> Path | None:
    """Return the newest ``/usr/lib/postgresql/<major>/bin`` holding initdb."""
    found: list[tuple[int, Path]] = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        major = initdb.parent.parent.name
        if major.isdigit():
            found.append((int(major), initdb.parent))
    return max(found)[1] if found else None


def missing_packages(*, need_maven: bool) -> list[str]:
    """Return the Debian packages the stack needs and this machine lacks."""
    missing = []
    if shutil.which("java") is None:
        missing.append("default-jre-headless")
    if need_maven and shutil.which("mvn") is None:
        missing.append("maven")
    if pg_bin_dir() is None:
        missing.append("postgresql")
    return missing


async def ensure_packages(cfg: Config) -> None:
    """Install missing Java/Maven/PostgreSQL packages with apt-get (root only)."""
    packages = missing_packages(need_maven=not jars_complete(cfg.kafka_jars))
    if not packages:
        return
    if not is_root() or shutil.which("apt-get") is None:
        msg = (
            f"missing system packages: {' '.join(packages)}; install them first, e.g. "
            f"`sudo apt-get install -y {' '.join(packages)}`"
        )
        raise StackError(msg)
    say("stack", f"installing {' '.join(packages)} with apt-get")
    os.environ["DEBIAN_FRONTEND"] = "noninteractive"
    await run(["apt-get", "update"], what="apt-get update", limit=600)
    await run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
        what="apt-get install",
        limit=1200,
    )


# --------------------------------------------------------------------------
# services


class Service(abc.ABC):
    """One service of the stack: how to start, probe and stop it."""

    name: ClassVar[str]

    def __init__(self, cfg: Config) -> None:
        """Remember the configuration."""
        self.cfg = cfg

    @property
    @abc.abstractmethod
    def log(self) -> Path:
        """Log file of the service."""

    @property
    @abc.abstractmethod
    def ports(self) -> tuple[int, ...]:
        """TCP ports on HOST the service listens on."""

    @abc.abstractmethod
    def endpoint(self) -> str:
        """Human readable address clients connect to."""

    @abc.abstractmethod
    def pid(self) -> int | None:
        """Pid of the running service process, None when it is not running."""

    @abc.abstractmethod
    async def probe(self) -> bool:
        """Return True when clients can use the service."""

    async def probe_started(self) -> bool:
        """Readiness probe used right after a start (defaults to ``probe``)."""
        return await self.probe()

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Make the service startable: download, initialise, write config."""

    @abc.abstractmethod
    async def launch(self) -> None:
        """Start the service process, detached from this one."""

    async def after_ready(self) -> None:  # noqa: B027 - optional hook
        """Finish setup once the service answers (default: nothing)."""

    @abc.abstractmethod
    async def stop(self, pid: int) -> None:
        """Stop the running service whose process is ``pid``."""

    async def refresh(self) -> None:  # noqa: B027 - optional hook
        """Apply reloadable settings to an already running service (default: none)."""

    async def note(self) -> str:
        """Extra information shown next to the endpoint (default: none)."""
        return ""


class DaemonService(Service):
    """A service run as one detached process with a pid file in ``<state>/run``."""

    marker: ClassVar[str]  # substring of the process command line
    stop_timeout: ClassVar[float]

    def __init__(self, cfg: Config) -> None:
        """Set up the pid file location."""
        super().__init__(cfg)
        self.pid_file = cfg.run / f"{self.name}.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """``<state>/logs/<name>.log``."""
        return self.cfg.logs / f"{self.name}.log"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """Command line of the service process."""

    @property
    def cwd(self) -> Path:
        """Working directory of the process."""
        return self.cfg.state

    def pid(self) -> int | None:
        """Read the pid file; remove it when stale."""
        if self._proc is not None:  # started by this run: no need to guess
            return self._proc.pid if self._proc.poll() is None else None
        pid = read_pid(self.pid_file)
        if pid is not None and process_matches(pid, self.marker):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    async def launch(self) -> None:
        """Start the process (Popen returns at once; the process is detached)."""
        self.spawn()

    def spawn(self) -> None:
        """Start ``command()`` in its own session, output to a fresh log file."""
        rotate_log(self.log)
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")

    async def stop(self, pid: int) -> None:
        """SIGTERM, wait up to ``stop_timeout``, then SIGKILL; drop the pid file."""
        await terminate(pid, self.stop_timeout)
        self.pid_file.unlink(missing_ok=True)


# ---- Kafka


def jars_complete(jars: Path) -> bool:
    """Return True when ``jars`` holds a finished copy for the current pom."""
    marker = jars / ".complete"
    return marker.is_file() and marker.read_text().strip() == pom_digest()


def pom_digest() -> str:
    """Return the sha256 of ``tools/kafka/pom.xml`` (a changed pom refetches)."""
    return hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()


def kafka_cluster_id() -> str:
    """Return a random Kafka cluster id (base64url UUID, as StorageTool makes)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # would look like an option on the CLI
            return cid


class Kafka(DaemonService):
    """Apache Kafka broker+controller in KRaft mode, started from Maven jars."""

    name = "kafka"
    marker = "kafka.Kafka"
    stop_timeout = 60.0

    @property
    def home(self) -> Path:
        """``<state>/kafka``: properties file and data."""
        return self.cfg.state / "kafka"

    @property
    def data(self) -> Path:
        """Log (data) directory of the broker, also holding the metadata log."""
        return self.home / "data"

    @property
    def properties(self) -> Path:
        """Generated server.properties."""
        return self.home / "server.properties"

    @property
    def cwd(self) -> Path:
        """Run the JVM inside its home so crash files land there."""
        return self.home

    @property
    def ports(self) -> tuple[int, ...]:
        """Broker and controller ports."""
        return (self.cfg.kafka_port, self.cfg.kafka_controller_port)

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers string for clients."""
        return f"{HOST}:{self.cfg.kafka_port}"

    def endpoint(self) -> str:
        """Kafka bootstrap address."""
        return f"bootstrap {self.bootstrap}"

    def java(self, main_class: str, *args: str) -> list[str]:
        """Command line running ``main_class`` with the cached jars."""
        return [
            "java",
            "-Xms256m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{KAFKA_LOG4J}",
            "-cp",
            f"{self.cfg.kafka_jars}/*",
            main_class,
            *args,
        ]

    def command(self) -> list[str]:
        """``java ... kafka.Kafka server.properties``."""
        return self.java("kafka.Kafka", str(self.properties))

    def render_properties(self) -> str:
        """Return server.properties for a fast single-node test broker."""
        port, ctl = self.cfg.kafka_port, self.cfg.kafka_controller_port
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{ctl}",
            "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{ctl}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # let tests use short consumer session timeouts
            "group.min.session.timeout.ms": "1000",
            # a test broker needs few threads and a small cleaner buffer
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.dedupe.buffer.size": "33554432",
            "log.retention.hours": "168",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        return "# generated by tools/stack.py on every `up`\n" + "\n".join(lines) + "\n"

    async def prepare(self) -> None:
        """Fetch the jars, write server.properties, format a fresh log dir."""
        await self.fetch_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(self.render_properties())
        if not (self.data / "meta.properties").is_file():
            await self.format_storage()

    async def fetch_jars(self) -> None:
        """Copy the broker's runtime jars from Maven into the cache (once)."""
        jars = self.cfg.kafka_jars
        if jars_complete(jars):
            return
        say(self.name, f"downloading jars with maven into {jars}")
        started = time.monotonic()
        jars.parent.mkdir(parents=True, exist_ok=True)
        partial = jars.with_name(f"{jars.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        await run(
            [
                "mvn", "-B", "-q", "-Dstyle.color=never", "-f", KAFKA_POM,
                "dependency:copy-dependencies", "-DincludeScope=runtime",
                f"-DoutputDirectory={partial}",
            ],
            what="maven download of the Kafka jars",
            limit=1200,
        )  # fmt: skip
        (partial / ".complete").write_text(pom_digest() + "\n")
        self.install_jars(partial, jars)
        say(self.name, f"jars downloaded in {time.monotonic() - started:.1f}s")

    @staticmethod
    def install_jars(partial: Path, jars: Path) -> None:
        """Move a finished download into place (another run may have won)."""
        if jars_complete(jars):
            shutil.rmtree(partial)
            return
        shutil.rmtree(jars, ignore_errors=True)
        partial.rename(jars)

    async def format_storage(self) -> None:
        """Format an empty KRaft log dir with a new cluster id."""
        shutil.rmtree(self.data, ignore_errors=True)  # no meta.properties: not ours
        cluster_id = kafka_cluster_id()
        say(self.name, f"formatting storage in {self.data} (cluster id {cluster_id})")
        await run(
            self.java(
                "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.properties)
            ),
            what="kafka StorageTool format",
            limit=120,
            cwd=self.home,
        )

    def admin(self) -> AIOKafkaAdminClient:
        """Return an (unstarted) admin client with short timeouts."""
        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)

    async def list_topics(self) -> list[str]:
        """Return the broker's topic names."""
        admin = self.admin()
        try:
            await admin.start()
            return list(await admin.list_topics())
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    async def probe(self) -> bool:
        """The broker is ready when an admin client can list topics."""
        await self.list_topics()
        return True

    async def after_ready(self) -> None:
        """Create the internal topics now, so the first test does not wait for them."""
        if {"__consumer_offsets", "__transaction_state"} <= set(await self.list_topics()):
            return
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.warm_up(), self.cfg.timeout)
        except Exception as exc:  # warm-up is best effort
            say(self.name, f"warning: warm-up (group join, transaction) failed: {exc!r}")
            return
        say(
            self.name,
            f"warm-up (consumer group + transaction) took {time.monotonic() - started:.1f}s",
        )

    async def warm_up(self) -> None:
        """Produce transactionally, consume with a group and commit, then clean up."""
        admin = self.admin()
        await admin.start()
        try:
            with contextlib.suppress(Exception):  # already exists
                await admin.create_topics([NewTopic(WARMUP_TOPIC, 1, 1)])
            await self.warm_up_producer()
            await self.warm_up_consumer()
            await admin.delete_topics([WARMUP_TOPIC])
        finally:
            await admin.close()

    async def warm_up_producer(self) -> None:
        """Create ``__transaction_state`` by running one transaction."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=WARMUP_TOPIC)
        await producer.start()
        try:
            async with producer.transaction():
                await producer.send_and_wait(WARMUP_TOPIC, b"warm-up")
        finally:
            await producer.stop()

    async def warm_up_consumer(self) -> None:
        """Create ``__consumer_offsets`` by joining a group and committing."""
        consumer = AIOKafkaConsumer(
            WARMUP_TOPIC,
            bootstrap_servers=self.bootstrap,
            group_id=WARMUP_TOPIC,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            await consumer.getone()
            await consumer.commit()
        finally:
            await consumer.stop()


# ---- SMTP sink


class Smtp(DaemonService):
    """The aiosmtpd mail sink of ``tools/smtp_sink.py``."""

    name = "smtp"
    marker = "smtp_sink.py"
    stop_timeout = 10.0

    @property
    def ports(self) -> tuple[int, ...]:
        """The SMTP port."""
        return (self.cfg.smtp_port,)

    def endpoint(self) -> str:
        """SMTP address and mail directory."""
        return f"smtp://{HOST}:{self.cfg.smtp_port}  mails in {self.cfg.mail}/"

    def command(self) -> list[str]:
        """Run the sink with this interpreter (it has aiosmtpd)."""
        return [
            sys.executable, "-u", str(SMTP_SINK),
            "--host", HOST, "--port", str(self.cfg.smtp_port),
            "--mail-dir", str(self.cfg.mail),
        ]  # fmt: skip

    async def prepare(self) -> None:
        """Create the mail directory."""
        self.cfg.mail.mkdir(parents=True, exist_ok=True)

    async def probe(self) -> bool:
        """Ready when the server greets with 220 and answers EHLO."""
        client = aiosmtplib.SMTP(hostname=HOST, port=self.cfg.smtp_port, timeout=5, start_tls=False)
        banner = await client.connect()
        try:
            await client.ehlo()
        finally:
            await client.quit()
        return banner.code == 220  # SMTP greeting


# ---- PostgreSQL


@dataclass(frozen=True)
class PgLayout:
    """Where the private PostgreSQL cluster lives."""

    home: Path
    log: Path
    fallback: bool

    @property
    def data(self) -> Path:
        """The data directory (PGDATA)."""
        return self.home / "data"

    @property
    def sockets(self) -> Path:
        """Directory of the Unix socket."""
        return self.home / "run"


def postgres_can_traverse(path: Path) -> bool:
    """Return True when the ``postgres`` OS user can reach into ``path``."""
    result = subprocess.run(  # noqa: S603 - fixed argv
        ["runuser", "-u", PG_OS_USER, "--", "test", "-x", str(path)],  # noqa: S607
        check=False,
        capture_output=True,
    )
    return result.returncode == 0


def pg_layout(cfg: Config) -> PgLayout:
    """Choose the cluster directory: ``<state>/pg`` or, when root and the
    ``postgres`` user cannot traverse the state dir, a directory in /var/tmp."""
    home = cfg.state / "pg"
    log = cfg.logs / "postgres.log"
    if not is_root() or (home / "data").is_dir() or postgres_can_traverse(cfg.state):
        return PgLayout(home=home, log=log, fallback=False)
    digest = hashlib.sha256(str(cfg.state).encode()).hexdigest()[:12]
    home = Path(f"/var/tmp/webhook-dispatcher-{digest}/pg")  # noqa: S108 - private dir
    return PgLayout(home=home, log=home / "postgres.log", fallback=True)


class Postgres(Service):
    """A private PostgreSQL cluster run with Debian's binaries."""

    name = "postgres"

    def __init__(self, cfg: Config) -> None:
        """Locate the cluster (the binaries are looked up lazily)."""
        super().__init__(cfg)
        self.layout = pg_layout(cfg)

    @property
    def log(self) -> Path:
        """Server log written by pg_ctl."""
        return self.layout.log

    @property
    def ports(self) -> tuple[int, ...]:
        """The PostgreSQL port."""
        return (self.cfg.pg_port,)

    @property
    def url(self) -> str:
        """Connection URL of the dispatcher database."""
        return f"postgresql://{PG_ROLE}@{HOST}:{self.cfg.pg_port}/{PG_DATABASE}"

    def endpoint(self) -> str:
        """The dispatcher database URL."""
        return self.url

    def bin(self, tool: str) -> str:
        """Path of a PostgreSQL server tool."""
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            msg = "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin"
            raise StackError(msg)
        return str(bin_dir / tool)

    def as_owner(self, *cmd: str) -> list[str]:
        """Prefix ``cmd`` so it runs as the cluster owner (postgres when root)."""
        return ["runuser", "-u", PG_OS_USER, "--", *cmd] if is_root() else list(cmd)

    def pid(self) -> int | None:
        """The postmaster pid from ``postmaster.pid`` when that process lives."""
        pid = read_pid(self.layout.data / "postmaster.pid")
        if pid is not None and process_matches(pid, "postgres"):
            return pid
        return None

    async def prepare(self) -> None:
        """Create the directories and the cluster, write the settings file."""
        self.make_dirs()
        if not (self.layout.data / "PG_VERSION").is_file():
            await self.initdb()
        self.check_version()
        self.write_settings()
        self.reset_log()

    def make_dirs(self) -> None:
        """Create the cluster home and socket dir, owned by the cluster owner."""
        if self.layout.fallback:
            say(
                self.name,
                f"postgres user cannot reach {self.cfg.state}; cluster lives in {self.layout.home}",
            )
        for path in (self.layout.home, self.layout.sockets):
            path.mkdir(parents=True, exist_ok=True)
            if is_root():
                chown_to(path, PG_OS_USER)

    async def initdb(self) -> None:
        """Run initdb for a fresh cluster with trust auth on 127.0.0.1 only."""
        shutil.rmtree(self.layout.data, ignore_errors=True)  # half-made by a failed run
        say(self.name, f"initdb {self.layout.data}")
        cmd = [
            self.bin("initdb"), "-D", str(self.layout.data), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions",
        ]  # fmt: skip
        if self.cfg.pg_fast:
            cmd.append("--no-sync")
        await run(self.as_owner(*cmd), what="initdb", limit=300, cwd=self.layout.home)
        (self.layout.data / "pg_hba.conf").write_text(
            "# generated by tools/stack.py: dev stack, trust on loopback only\n"
            "local all all trust\n"
            f"host  all all {HOST}/32 trust\n"
        )
        with (self.layout.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tools/stack.py rewrites stack.conf on every start\n")
            conf.write("include_if_exists = 'stack.conf'\n")

    def check_version(self) -> None:
        """Refuse a cluster made by another PostgreSQL major version."""
        made_by = (self.layout.data / "PG_VERSION").read_text().strip()
        have = Path(self.bin("initdb")).parent.parent.name
        if made_by != have:
            msg = (
                f"cluster {self.layout.data} was made by PostgreSQL {made_by} but the "
                f"binaries are {have}; run `tools/stack.py down` and delete {self.layout.home}"
            )
            raise StackError(msg)

    def write_settings(self) -> None:
        """Write ``stack.conf``: port, addresses, socket dir, durability switches."""
        sockets = str(self.layout.sockets)
        if len(f"{sockets}/.s.PGSQL.{self.cfg.pg_port}") > SOCKET_PATH_MAX:
            say(self.name, f"socket path under {sockets} too long; Unix socket disabled")
            sockets = ""
        durable = "off" if self.cfg.pg_fast else "on"
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.cfg.pg_port),
            "unix_socket_directories": f"'{sockets}'",
            "max_connections": "200",
            "fsync": durable,
            "synchronous_commit": durable,
            "full_page_writes": durable,
        }
        path = self.layout.data / "stack.conf"
        body = "".join(f"{key} = {value}\n" for key, value in settings.items())
        path.write_text("# generated by tools/stack.py on every `up`\n" + body)
        if is_root():
            chown_to(path, PG_OS_USER)

    def reset_log(self) -> None:
        """Start a fresh log file the cluster owner can write."""
        rotate_log(self.layout.log)
        self.layout.log.touch()
        if is_root():
            chown_to(self.layout.log, PG_OS_USER)
        if self.layout.fallback:
            link = self.cfg.logs / "postgres.log"
            link.unlink(missing_ok=True)
            link.symlink_to(self.layout.log)

    async def launch(self) -> None:
        """``pg_ctl start`` (waits until the postmaster accepts connections)."""
        cmd = self.as_owner(
            self.bin("pg_ctl"), "start", "-D", str(self.layout.data), "-l", str(self.layout.log),
            "-w", "-t", str(int(self.cfg.timeout)), "-s",
        )  # fmt: skip
        try:
            await run(
                cmd,
                what="pg_ctl start",
                limit=self.cfg.timeout + 10,
                cwd=self.layout.home,
                new_session=True,
            )
        except StackError as exc:
            msg = f"{exc}\nlog {self.log}:\n{log_tail(self.log)}"
            raise StackError(msg) from None

    async def fetch(
        self, query: str, *, user: str = PG_ROLE, database: str = PG_DATABASE
    ) -> object:
        """Run ``query`` on a fresh connection and return the first value."""
        conn = await asyncpg.connect(
            host=HOST, port=self.cfg.pg_port, user=user, database=database, timeout=5
        )
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    async def probe(self) -> bool:
        """Ready when the dispatcher role can ``SELECT 1`` in its database."""
        return await self.fetch("SELECT 1") == 1

    async def probe_started(self) -> bool:
        """Right after a start the dispatcher role may not exist yet: use postgres."""
        return await self.fetch("SELECT 1", user="postgres", database="postgres") == 1

    async def after_ready(self) -> None:
        """Create the dispatcher role and database when absent, then check them."""
        conn = await asyncpg.connect(
            host=HOST, port=self.cfg.pg_port, user="postgres", database="postgres"
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PG_ROLE):
                await conn.execute(f'CREATE ROLE "{PG_ROLE}" SUPERUSER LOGIN')
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_DATABASE):
                await conn.execute(f'CREATE DATABASE "{PG_DATABASE}" OWNER "{PG_ROLE}"')
        finally:
            await conn.close()
        if not await self.probe():
            msg = f"cannot SELECT 1 as {self.url}"
            raise StackError(msg)

    async def refresh(self) -> None:
        """Switch a running server to the requested durability (a reload suffices).

        ``make test`` starts the stack with DISPATCHER_STACK_PG_FAST=1; a later
        ``make run`` must not keep running without fsync, and vice versa.
        """
        wanted = "off" if self.cfg.pg_fast else "on"
        if await self.fetch("SHOW fsync") == wanted:
            return
        self.write_settings()
        await self.fetch("SELECT pg_reload_conf()")
        deadline = time.monotonic() + self.cfg.timeout
        while await self.fetch("SHOW fsync") != wanted:
            if time.monotonic() >= deadline:
                msg = f"reload did not switch fsync to {wanted}; log {self.log}"
                raise StackError(msg)
            await asyncio.sleep(POLL_INTERVAL)
        if wanted == "on":
            await asyncio.to_thread(os.sync)  # flush what was written without fsync
        say(self.name, f"switched running server to fsync={wanted} (configuration reloaded)")

    async def note(self) -> str:
        """Show whether the running server is in fast (fsync=off) mode."""
        fsync = await self.fetch("SHOW fsync")
        return f"(fsync={fsync})"

    async def stop(self, pid: int) -> None:
        """``pg_ctl stop -m fast``; escalate to immediate, then SIGKILL."""
        for mode in ("fast", "immediate"):
            cmd = self.as_owner(
                self.bin("pg_ctl"),
                "stop",
                "-D",
                str(self.layout.data),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "-s",
            )
            with contextlib.suppress(StackError):
                await run(cmd, what=f"pg_ctl stop -m {mode}", limit=70, cwd=self.layout.home)
            if await wait_dead(pid, 5):
                return
        await terminate(pid, 5)


# --------------------------------------------------------------------------
# commands


async def safe_probe(service: Service, *, started: bool = False) -> bool:
    """Run one probe with a timeout; any error counts as 'not ready'."""
    probe = service.probe_started() if started else service.probe()
    try:
        return await asyncio.wait_for(probe, PROBE_TIMEOUT)
    except Exception:  # every failure just means "not ready"
        return False


async def safe_note(service: Service) -> str:
    """Return ``service.note()``, or '' when it fails."""
    try:
        return await asyncio.wait_for(service.note(), PROBE_TIMEOUT)
    except Exception:  # the note is cosmetic
        return ""


async def wait_ready(service: Service) -> None:
    """Probe until ready; fail fast when the process dies, or at the deadline."""
    deadline = time.monotonic() + service.cfg.timeout
    while True:
        if service.pid() is None:
            tail = log_tail(service.log)
            msg = f"exited during start-up; log {service.log}:\n{tail}"
            raise StackError(msg)
        if await safe_probe(service, started=True):
            return
        if time.monotonic() >= deadline:
            msg = (
                f"not ready after {service.cfg.timeout:.0f}s; "
                f"log {service.log}:\n{log_tail(service.log)}"
            )
            raise StackError(msg)
        await asyncio.sleep(POLL_INTERVAL)


def check_ports_free(service: Service) -> None:
    """Refuse to start when another program already holds one of our ports."""
    for port in service.ports:
        if port_in_use(port):
            msg = (
                f"{HOST}:{port} is in use by a process this stack did not start "
                "(find it with `ss -ltnp`)"
            )
            raise StackError(msg)


async def start(service: Service) -> None:
    """Prepare, launch and wait for ``service``; stop it again on failure."""
    check_ports_free(service)
    await service.prepare()
    await service.launch()
    try:
        await wait_ready(service)
        await service.after_ready()
    except BaseException:
        pid = service.pid()
        if pid is not None:
            with contextlib.suppress(StackError):
                await service.stop(pid)
        raise


async def ensure_up(service: Service) -> None:
    """Leave a healthy service alone; otherwise start it and wait until ready."""
    started = time.monotonic()
    pid = service.pid()
    if pid is not None and await safe_probe(service):
        await service.refresh()
        say(
            service.name,
            f"already running (pid {pid})  {service.endpoint()} {await safe_note(service)}",
        )
        return
    if pid is not None:
        say(service.name, f"process {pid} runs but does not answer yet; waiting")
        try:
            await wait_ready(service)
        except StackError as exc:
            msg = f"{exc}\n(it ran before this `up`: `tools/stack.py down`, then `up` restarts it)"
            raise StackError(msg) from None
        await service.after_ready()
    else:
        await start(service)
    elapsed = time.monotonic() - started
    note = await safe_note(service)
    say(service.name, f"up in {elapsed:.1f}s (pid {service.pid()})  {service.endpoint()} {note}")


SERVICE_NAMES = ("kafka", "postgres", "smtp")


def services(cfg: Config, only: Sequence[str] = ()) -> list[Service]:
    """The stack (or the services named in ``only``), in display order."""
    stack: list[Service] = [Kafka(cfg), Postgres(cfg), Smtp(cfg)]
    return [s for s in stack if not only or s.name in only]


def report_failures(names: list[str], results: list[BaseException | None]) -> int:
    """Print every failure; return the exit code."""
    failed = 0
    for name, result in zip(names, results, strict=True):
        if result is not None:
            failed += 1
            text = str(result) if isinstance(result, StackError) else repr(result)
            print(f"\nERROR {name}: {text}", file=sys.stderr, flush=True)
    return 1 if failed else 0


async def gather_errors(*coros: Awaitable[None]) -> list[BaseException | None]:
    """Await all ``coros`` concurrently; return each one's exception or None."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


async def cmd_up(cfg: Config, only: Sequence[str] = ()) -> int:
    """Start every service that is not running and wait until all are ready."""
    started = time.monotonic()
    cfg.create_dirs()
    try:
        await ensure_packages(cfg)
    except StackError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    stack = services(cfg, only)
    results = await gather_errors(*(ensure_up(s) for s in stack))
    code = report_failures([s.name for s in stack], results)
    print(f"\nlogs:  {cfg.logs}/{{kafka,postgres,smtp}}.log\nmails: {cfg.mail}/")
    if code:
        print("stack: NOT ready (services that did come up were left running;")
        print("       `tools/stack.py down` stops them)")
    else:
        print(f"stack: ready in {time.monotonic() - started:.1f}s")
    return code


async def stop_one(service: Service) -> None:
    """Stop ``service`` when it runs, printing what happened."""
    pid = service.pid()
    if pid is None:
        say(service.name, "not running")
        return
    started = time.monotonic()
    await service.stop(pid)
    say(service.name, f"stopped (pid {pid}) in {time.monotonic() - started:.1f}s")


async def cmd_down(cfg: Config, only: Sequence[str] = ()) -> int:
    """Stop every service (a no-op for those not running)."""
    if not cfg.state.is_dir():
        print(f"stack: nothing to stop ({cfg.state} does not exist)")
        return 0
    stack = services(cfg, only)
    results = await gather_errors(*(stop_one(s) for s in stack))
    return report_failures([s.name for s in stack], results)


async def describe(service: Service) -> bool:
    """Print the state of ``service``; return True when it is up."""
    pid = service.pid()
    if pid is None:
        busy = [p for p in service.ports if port_in_use(p)]
        extra = f"  (port {busy[0]} is used by a process this stack did not start)" if busy else ""
        say(service.name, f"down{extra}")
        return False
    if not await safe_probe(service):
        say(service.name, f"unhealthy (pid {pid} runs but does not answer)  log {service.log}")
        return False
    say(service.name, f"up    (pid {pid})  {service.endpoint()} {await safe_note(service)}")
    return True


async def cmd_status(cfg: Config) -> int:
    """Print every service as up/down; exit 0 only when all are up."""
    stack = services(cfg)
    states = await asyncio.gather(*(describe(s) for s in stack))
    print(f"logs:  {cfg.logs}/\nmails: {cfg.mail}/")
    return 0 if all(states) else 1


async def dispatch(command: str, cfg: Config, only: Sequence[str] = ()) -> int:
    """Run one sub-command (up and down on the services in ``only``, or all)."""
    if command == "status":
        return await cmd_status(cfg)
    with stack_lock(cfg):
        return await (cmd_up(cfg, only) if command == "up" else cmd_down(cfg, only))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(
        description="Local Kafka + PostgreSQL + SMTP sink for the webhook dispatcher.",
        epilog="See the module docstring of tools/stack.py for the environment variables.",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "services",
        nargs="*",
        choices=[[], *SERVICE_NAMES],
        metavar="SERVICE",
        help=f"with up or down: only these ({', '.join(SERVICE_NAMES)}); default all",
    )
    args = parser.parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # probes fail while starting
    try:
        return asyncio.run(dispatch(args.command, Config.from_env(), tuple(args.services)))
    except StackError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
