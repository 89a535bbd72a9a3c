"""What the integration tests share besides fixtures: the services' addresses, the real
HTTPS receiver (which checks every body against the published notification schema) and
SMTP mailbox, events and how to produce them, the ``dispatcher`` process, the local stack,
and reading /readyz, /metrics and Kafka topics.

The fixtures that build these are in ``conftest.py`` next to this file; tests import
the classes and helpers from here (``from tests.integration.support import ...``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiosmtpd.smtp import SMTP, Envelope, Session
from jsonschema import Draft202012Validator

from dispatcher.daemon import Daemon
from dispatcher.policy import DelayTiers
from dispatcher.settings import Settings, env_name
from dispatcher.store import Principal, Store, Webhook

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "DISPATCHER_TEST_DATABASE_URL", "postgresql://dispatcher@127.0.0.1:55432/dispatcher"
)
KAFKA = os.environ.get("DISPATCHER_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
WAIT = 30.0  # seconds any test waits for something that should happen at once
DISPATCHER = [sys.executable, "-m", "dispatcher"]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_db(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


# --- TLS and HTTPS receivers ------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca_file: str
    server_context: ssl.SSLContext


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # loop time of arrival

    def json(self) -> Any:
        return orjson.loads(self.body)


Responder = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
NOTIFICATION_SCHEMA = ROOT / "schemas" / "notification.schema.json"


@functools.cache
def _published_validators() -> dict[str, Draft202012Validator]:
    """A validator per body the published notification schema allows (its ``oneOf``):
    ``subscribed`` and each ``<entity_name>.<type>``."""
    doc = orjson.loads(NOTIFICATION_SCHEMA.read_bytes())
    refs = [choice["$ref"] for choice in doc["oneOf"]]
    return {
        ref.rsplit("/", 1)[1]: Draft202012Validator(
            {"$schema": doc["$schema"], "$defs": doc["$defs"], "$ref": ref},
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        for ref in refs
    }


def schema_errors(body: bytes) -> list[str]:
    """Why ``body`` is not what schemas/notification.schema.json publishes for its
    (entity_name, type), or for SUBSCRIBED; empty when it is."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(data, dict):
        return ["not a JSON object"]
    kind = data.get("type")
    key = "subscribed" if kind == "SUBSCRIBED" else f"{data.get('entity_name')}.{kind}"
    validator = _published_validators().get(key)
    if validator is None:
        return [f"no published schema for {key!r}"]
    return [
        f"{'/'.join(map(str, e.absolute_path)) or 'body'}: {e.message}"
        for e in validator.iter_errors(data)
    ]


@dataclass
class Receiver:
    """A real HTTPS endpoint recording what it receives. Each body is checked against the
    published schema of its notification; a body that breaks it is answered as usual but
    kept in ``invalid``, and the ``receiver_factory`` fixture fails the test at teardown
    (``check_schema=False`` for a test that sends what no schema allows on purpose)."""

    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    responder: Responder | None = None
    check_schema: bool = True
    invalid: list[str] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        loop = asyncio.get_running_loop()
        errors = schema_errors(body) if self.check_schema else []
        if errors:
            self.invalid.append(f"{'; '.join(errors)} in {body[:2000]!r}")
        self.requests.append(Received(dict(request.headers), body, loop.time()))
        async with self._changed:
            self._changed.notify_all()
        if self.responder is not None:
            return await self.responder(request, len(self.requests))
        return web.Response(status=self.status, text="ok")

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Received]:
        """Wait until at least ``count`` requests arrived; fail after ``timeout``."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)
        return self.requests


MakeReceiver = Callable[..., Awaitable[Receiver]]  # the ``receiver_factory`` fixture


def hanging_until(release: asyncio.Event) -> Responder:
    """A responder that answers 200 only once ``release`` is set."""

    async def respond(_request: web.Request, _n: int) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    return respond


def entity_uuids(receiver: Receiver) -> list[str]:
    """The uuid of every entity of every notification received (SUBSCRIBED tests have none)."""
    return [e["uuid"] for r in receiver.requests for e in r.json().get("entities", [])]


# --- SMTP -------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """A real SMTP server (aiosmtpd) on loopback that keeps what it receives, counts its
    sessions (connections), and can misbehave: refuse, drop sessions, hold a mail."""

    host: str
    port: int
    messages: list[Message] = field(default_factory=list)
    accept: bool = True
    no_such_user: set[str] = field(default_factory=set)  # refused at RCPT with a 550
    greylisted: set[str] = field(default_factory=set)  # refused at RCPT with a 451 for now
    sessions: int = 0  # connections accepted so far
    open_sessions: int = 0  # connections open now
    peak_sessions: int = 0  # most connections open at once
    # a session's message number close_after + 1 is not accepted: the connection is
    # closed while its DATA is in (None: never)
    close_after: int | None = None
    dropped: int = 0  # sessions closed that way
    # notice ids (X-Webhook-Notice-Id) whose DATA is answered only once ``release`` is set
    hold: set[str] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def connected(self) -> None:
        self.sessions += 1
        self.open_sessions += 1
        self.peak_sessions = max(self.peak_sessions, self.open_sessions)

    def disconnected(self) -> None:
        self.open_sessions -= 1

    def notice_ids(self) -> list[str]:
        """The X-Webhook-Notice-Id of every mail received, in order."""
        return [str(m["X-Webhook-Notice-Id"]) for m in self.messages]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.no_such_user:
            return "550 5.1.1 No such user"
        if address in self.greylisted:
            return "451 4.7.1 Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.accept:
            return "451 Try again later"
        content = envelope.original_content or b""
        message = message_from_bytes(content)
        # Counted on the connection's own protocol object: an id() of a session that
        # ended may be reused by a new one, which would then be dropped at its first mail.
        assert isinstance(server, MailboxServer)
        server.mails += 1
        if self.close_after is not None and server.mails > self.close_after:
            assert server.transport is not None
            server.transport.close()  # dropped mid-way: this mail is not accepted
            self.dropped += 1
            return "421 4.3.2 Closing"
        if str(message["X-Webhook-Notice-Id"]) in self.hold:
            await self.release.wait()  # cancelled if the client goes away meanwhile
        self.messages.append(message)
        async with self._changed:
            self._changed.notify_all()
        return "250 OK"

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Message]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.messages) >= count)
        return self.messages


class MailboxServer(SMTP):
    """aiosmtpd's SMTP protocol, telling the :class:`Mailbox` of each connection."""

    def __init__(self, box: Mailbox, **kwargs: Any) -> None:
        super().__init__(box, **kwargs)
        self._box = box
        self.mails = 0  # DATA commands on this connection (one protocol per connection)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._box.connected()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._box.disconnected()
        super().connection_lost(error)


# --- shops, webhooks and events ---------------------------------------------------------


async def new_shop_with_token(store: Store, name: str = "shop") -> tuple[Principal, str]:
    """A shop (with a unique id starting with ``name``) and the plain token its integrator
    sends to the API."""
    info, token = await store.issue_token(f"{name}-{uuid.uuid4().hex[:8]}", "test-app")
    return Principal(info.id, info.environment_id, info.client_id), token


async def new_shop(store: Store, name: str = "shop") -> Principal:
    """A shop (with a unique id starting with ``name``) and its token, as the API sees it."""
    shop, _ = await new_shop_with_token(store, name)
    return shop


async def subscribe(
    store: Store,
    shop: Principal,
    receiver: Receiver,
    entity: str = "sales",
    event: str = "CLOSED",
    email: str = "dev@shop.test",
) -> Webhook:
    """A webhook of ``shop`` for (entity, event) pointing at ``receiver``."""
    return await store.create_webhook(
        shop, url=receiver.url, entity_name=entity, event_type=event, email=email
    )


def make_event(shop: Principal, **overrides: Any) -> dict[str, Any]:
    """A valid event of the contract for this shop (a closed sale by default)."""
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "entity_name": "sales",
        "event_type": "CLOSED",
        "environment_id": shop.environment_id,
        "client_id": "pos-app",
        "from_user": "cashier@example.com",
        "time": "2026-01-01T10:00:00.000Z",
        "entity": {"id": 1, "uuid": str(uuid.uuid4()), "final_amount": 12.5},
        "import_id": None,
        "import_end": False,
    }
    event.update(overrides)
    return event


async def produce(producer: AIOKafkaProducer, topic: str, *events: dict[str, Any]) -> None:
    """Produce events keyed by environment_id and wait for the broker's acks."""
    acks = [
        await producer.send(topic, orjson.dumps(e), key=str(e.get("environment_id", "")).encode())
        for e in events
    ]
    await asyncio.gather(*acks)


async def produce_raw(
    producer: AIOKafkaProducer, topic: str, records: list[tuple[bytes, bytes]]
) -> None:
    """Produce (key, value) records as they are and wait for the broker's acks."""
    acks = [await producer.send(topic, value, key=key) for key, value in records]
    await asyncio.gather(*acks)


# --- the daemon in the test's event loop ------------------------------------------------


@dataclass
class Running:
    """A daemon running in this test's event loop, with its own topics and groups."""

    daemon: Daemon
    settings: Settings
    task: asyncio.Task[None]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.http_port}"

    async def stop(self) -> None:
        self.daemon.stop.set()
        async with asyncio.timeout(WAIT):
            await self.task


StartDaemon = Callable[..., Awaitable[Running]]  # the ``start_daemon`` fixture


@dataclass(frozen=True)
class World:
    """What most tests of the pipeline take: settings with this test's own topics and
    consumer group, its database (``store``), a shop, an HTTPS receiver, a producer, and
    daemons started on them in-process (stopped after the test). The ``world`` fixture."""

    settings: Settings
    store: Store
    shop: Principal
    receiver: Receiver
    producer: AIOKafkaProducer
    receivers: MakeReceiver  # more receivers: ``await world.receivers(status=500)``
    start_daemon: StartDaemon

    @property
    def topic(self) -> str:
        """The event topic of ``settings`` (one partition)."""
        return self.settings.event_topics[0]

    async def start(self, settings: Settings | None = None, **kwargs: Any) -> Running:
        """Start a daemon on ``settings`` (this world's by default); ready when it returns."""
        return await self.start_daemon(self.settings if settings is None else settings, **kwargs)

    async def produce(self, *events: dict[str, Any], topic: str | None = None) -> None:
        """Produce ``events`` to ``topic`` (this world's event topic by default)."""
        await produce(self.producer, self.topic if topic is None else topic, *events)

    async def subscribe(
        self,
        receiver: Receiver | None = None,
        entity: str = "sales",
        event: str = "CLOSED",
        *,
        shop: Principal | None = None,
    ) -> Webhook:
        """A webhook of ``shop`` (this world's by default) pointing at ``receiver`` (this
        world's by default)."""
        return await subscribe(
            self.store,
            self.shop if shop is None else shop,
            self.receiver if receiver is None else receiver,
            entity,
            event,
        )

    async def new_shop(self, name: str = "shop") -> Principal:
        """Another shop of this world's database."""
        return await new_shop(self.store, name)


# --- the `dispatcher` process -----------------------------------------------------------


def environment(settings: Settings) -> dict[str, str]:
    """The DISPATCHER_* variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    values: dict[str, Any] = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "database_url": settings.database_url,
        "http_port": free_port(),
        "event_topics": ",".join(settings.event_topics),
        "consumer_group": settings.consumer_group,
        "retry_topic": settings.retry_topic,
        "notice_topic": settings.notice_topic,
        "dead_letter_topic": settings.dead_letter_topic,
        "attempt_topic": settings.attempt_topic,
        "allow_private_targets": "127.0.0.0/8,::1/128",
        "tls_ca_file": settings.tls_ca_file,
        "drain_timeout_seconds": settings.drain_timeout_seconds,
        "log_format": "json",
    }
    env.update({env_name(k): str(v) for k, v in values.items()})
    return env


@dataclass
class Process:
    """A `dispatcher run` child process, its HTTP port and the file of its output."""

    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_bytes().splitlines():
            out.append(orjson.loads(raw))  # every stdout line is one JSON object
        return out

    def complete_lines(self) -> list[dict[str, Any]]:
        """The lines written so far, but a last one still being written."""
        raw = self.log_path.read_bytes()
        return [orjson.loads(line) for line in raw[: raw.rfind(b"\n") + 1].splitlines()]

    async def wait_logged(
        self, event: str, where: Callable[[dict[str, Any]], bool] = lambda _line: True
    ) -> dict[str, Any]:
        """The first line of ``event`` (that ``where`` accepts) the process logged, once
        it did; fail after WAIT seconds."""
        async with asyncio.timeout(WAIT):
            while True:
                for line in self.complete_lines():
                    if line["event"] == event and where(line):
                        return line
                assert self.popen.poll() is None, self.log_path.read_text()
                await asyncio.sleep(0.02)  # polling the child's log with a deadline

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
            while True:
                assert self.popen.poll() is None, self.log_path.read_text()
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)  # polling readiness with a deadline

    async def wait_exit(self) -> int:
        async with asyncio.timeout(WAIT):
            while self.popen.poll() is None:
                await asyncio.sleep(0.05)  # polling the child's exit with a deadline
        return self.popen.returncode


Spawn = Callable[..., Awaitable[Process]]  # the ``spawn`` fixture: (env, *args)


# --- the local stack --------------------------------------------------------------------

# For tests that stop services of the local stack: they need the stack's own services.
needs_own_stack = pytest.mark.skipif(
    bool(
        os.environ.get("DISPATCHER_TEST_DATABASE_URL")
        or os.environ.get("DISPATCHER_TEST_KAFKA_BOOTSTRAP")
    ),
    reason="stops services of the local stack; external services were given",
)


async def stack(command: str, service: str) -> None:
    """Run tools/stack.py up|down SERVICE and fail the test if it fails."""
    env = {**os.environ, "DISPATCHER_STACK_PG_FAST": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tools" / "stack.py"), command, service,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()


# --- HTTP: /readyz and /metrics ---------------------------------------------------------


async def get(url: str) -> tuple[int, str]:
    """GET ``url``: the status and the body as text."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def get_json(url: str) -> tuple[int, Any]:
    """GET ``url``: the status and the body decoded as JSON."""
    status, body = await get(url)
    return status, orjson.loads(body)


async def readiness(base_url: str) -> tuple[int, dict[str, str]]:
    """GET /readyz: the status and the checks."""
    status, body = await get_json(base_url + "/readyz")
    checks: dict[str, str] = body["checks"]
    return status, checks


async def wait_status(process: Process, status: int, within: float) -> dict[str, str]:
    """Poll /readyz until it answers ``status``; the checks it gave then."""
    base = f"http://127.0.0.1:{process.port}"
    async with asyncio.timeout(within):
        while True:
            got, checks = await readiness(base)
            if got == status:
                return checks
            await asyncio.sleep(0.2)  # polling readiness with a deadline


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def metric(base_url: str, name: str, labels: str = "") -> float:
    """One sample of the daemon's /metrics now (0 when absent)."""
    _, text = await get(base_url + "/metrics")
    return sample(text, name, labels)


async def wait_metric(base_url: str, name: str, labels: str, value: float) -> None:
    """Poll /metrics until the sample is ``value``; fail after WAIT seconds."""
    async with asyncio.timeout(WAIT):
        while await metric(base_url, name, labels) != value:
            await asyncio.sleep(0.05)  # polling /metrics with a deadline


# --- reading Kafka ----------------------------------------------------------------------


async def end_offset(tp: TopicPartition) -> int:
    """The end offset of ``tp`` now (the records a one-partition topic holds)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def end_offsets(topic: str, partitions: int) -> dict[TopicPartition, int]:
    """The end offset of each of the ``partitions`` partitions of ``topic`` now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp: int(o) for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def read_partition(tp: TopicPartition) -> list[dict[str, Any]]:
    """Every record of ``tp`` from the beginning to its end now, decoded as JSON."""
    end = await end_offset(tp)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    records: list[dict[str, Any]] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(WAIT):
            while await consumer.position(tp) < end:
                for batch in (await consumer.getmany(tp, timeout_ms=500)).values():
                    records.extend(orjson.loads(r.value) for r in batch)
    finally:
        await consumer.stop()
    return records


async def read_records(topic: str, count: int) -> list[Any]:
    """The first ``count`` records of ``topic`` (raw, with headers), read by a new group."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        auto_offset_reset="earliest",
        group_id=f"check-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    got: list[Any] = []
    try:
        async with asyncio.timeout(WAIT):
            while len(got) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return got


def deferral_topic(settings: Settings) -> str:
    """The shortest delay tier of ``settings``: where deferred attempts go."""
    return DelayTiers.for_settings(
        settings.retry_topic, retry_delay=settings.retry_delay_seconds
    ).shortest.topic
