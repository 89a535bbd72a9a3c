"""Fixtures giving each test real services, isolated from every other test.

- PostgreSQL: a fresh database per test, cloned from a migrated template.
- Kafka: fresh topics with unique names per test.
- SMTP: a real aiosmtpd server per test on a free port.
- HTTPS receivers: real aiohttp servers with trustme certificates.

The services come from the local stack (``make stack``); point the tests elsewhere with
``DISPATCHER_TEST_DATABASE_URL`` and ``DISPATCHER_TEST_KAFKA_BOOTSTRAP``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiosmtpd.smtp import SMTP, Envelope, Session

from dispatcher import db
from dispatcher.daemon import Daemon
from dispatcher.settings import Settings
from dispatcher.store import Principal, Store, Webhook

PG_URL = os.environ.get(
    "DISPATCHER_TEST_DATABASE_URL", "postgresql://dispatcher@127.0.0.1:55432/dispatcher"
)
KAFKA = os.environ.get("DISPATCHER_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
WAIT = 30.0  # seconds any test waits for something that should happen at once


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


# --- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"dispatcher_tpl_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await asyncpg.connect(PG_URL)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await db.migrate_url(_with_db(PG_URL, name))

    async def drop() -> None:
        admin = await asyncpg.connect(PG_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    name = f"dispatcher_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield _with_db(PG_URL, name)
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url, max_size=4)
    yield pool
    await pool.close()


# --- Kafka ------------------------------------------------------------------------------


@pytest.fixture
async def kafka_admin() -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    yield admin
    await admin.close()


@pytest.fixture
async def new_topic(
    kafka_admin: AIOKafkaAdminClient,
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Creates topics with unique names; deletes them after the test."""
    created: list[str] = []

    async def make(prefix: str = "t", partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        await kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        created.append(name)
        return name

    yield make
    if created:
        await kafka_admin.delete_topics(created)


# --- TLS and HTTPS receivers ------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Tls(str(ca_file), server_context)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # loop time of arrival

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


Responder = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """A real HTTPS endpoint recording what it receives."""

    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    responder: Responder | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        loop = asyncio.get_running_loop()
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


@pytest.fixture
async def receiver_factory(
    tls: Tls,
) -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def make(status: int = 200, responder: Responder | None = None) -> Receiver:
        receiver = Receiver("", status=status, responder=responder)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context)
        await site.start()
        receiver.url = f"https://localhost:{runner.addresses[0][1]}/hook"
        runners.append(runner)
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def receiver(receiver_factory: Callable[..., Awaitable[Receiver]]) -> Receiver:
    return await receiver_factory()


# --- SMTP -------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """A real SMTP server (aiosmtpd) on loopback that keeps what it receives."""

    host: str
    port: int
    messages: list[Message] = field(default_factory=list)
    accept: bool = True
    no_such_user: set[str] = field(default_factory=set)  # refused at RCPT with a 550
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.no_such_user:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self.accept:
            return "451 Try again later"
        content = envelope.original_content or b""
        self.messages.append(message_from_bytes(content))
        async with self._changed:
            self._changed.notify_all()
        return "250 OK"

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Message]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.messages) >= count)
        return self.messages


@pytest.fixture
async def mailbox() -> AsyncIterator[Mailbox]:
    loop = asyncio.get_running_loop()
    box = Mailbox("127.0.0.1", 0)
    server = await loop.create_server(lambda: SMTP(box, hostname="mailbox.test"), "127.0.0.1", 0)
    box.port = server.sockets[0].getsockname()[1]
    yield box
    server.close()
    await server.wait_closed()


# --- Settings ---------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, tls: Tls, tmp_path: Path) -> Settings:
    """Settings pointing at this test's database, the test CA and loopback receivers."""
    base = Settings.from_env({})
    return replace(
        base,
        kafka_bootstrap=KAFKA,
        database_url=database_url,
        http_port=free_port(),
        tls_ca_file=tls.ca_file,
        allow_private_targets=Settings.from_env(
            {"DISPATCHER_ALLOW_PRIVATE_TARGETS": "127.0.0.0/8,::1/128"}
        ).allow_private_targets,
        delivery_timeout_seconds=5.0,
        log_format="json",
    )


# --- The daemon -------------------------------------------------------------------------


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


@pytest.fixture
async def isolated_settings(
    settings: Settings, new_topic: Callable[..., Awaitable[str]]
) -> Settings:
    """Settings with this test's own event topic, internal topics and consumer group."""
    tag = uuid.uuid4().hex[:10]
    return replace(
        settings,
        event_topics=(await new_topic("events"),),
        consumer_group=f"group-{tag}",
        retry_topic=await new_topic("retries"),
        notice_topic=await new_topic("notices"),
        dead_letter_topic=await new_topic("dead"),
        drain_timeout_seconds=10.0,
    )


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Starts daemons in-process; stops those still running after the test."""
    running: list[Running] = []

    async def start(settings: Settings, **kwargs: Any) -> Running:
        daemon = Daemon(settings, **kwargs)
        task = asyncio.create_task(daemon.run())
        started = asyncio.ensure_future(daemon.started.wait())
        async with asyncio.timeout(WAIT):
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started.cancel()
            task.result()  # raises what stopped it
        handle = Running(daemon, settings, task)
        running.append(handle)
        # Ready means partitions assigned: only then is "the next event" really consumed.
        async with asyncio.timeout(WAIT):
            for worker in daemon.workers:
                await worker.assigned.wait()
        return handle

    yield start
    for handle in running:
        if not handle.task.done():
            await handle.stop()


@pytest.fixture
async def producer() -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    yield producer
    await producer.stop()


@pytest.fixture
async def store(pool: asyncpg.Pool) -> Store:
    return Store(pool)


async def new_shop(store: Store, name: str = "shop") -> Principal:
    """A shop (with a unique id starting with ``name``) and its token, as the API sees it."""
    info, _ = await store.issue_token(f"{name}-{uuid.uuid4().hex[:8]}", "test-app")
    return Principal(info.id, info.environment_id, info.client_id)


@pytest.fixture
async def shop(store: Store) -> Principal:
    return await new_shop(store)


def hanging_until(release: asyncio.Event) -> Responder:
    """A responder that answers 200 only once ``release`` is set."""

    async def respond(_request: web.Request, _n: int) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    return respond


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
    import orjson

    acks = [
        await producer.send(topic, orjson.dumps(e), key=str(e.get("environment_id", "")).encode())
        for e in events
    ]
    await asyncio.gather(*acks)
