"""Fixtures giving each test real services, isolated from every other test.

- PostgreSQL: a fresh database per test, cloned from a migrated template.
- Kafka: fresh topics with unique names per test.
- SMTP: a real aiosmtpd server per test on a free port.
- HTTPS receivers: real aiohttp servers with trustme certificates.
- ``world``: what most pipeline tests take at once (``support.World``).

The services come from the local stack (``make stack``); point the tests elsewhere with
``DISPATCHER_TEST_DATABASE_URL`` and ``DISPATCHER_TEST_KAFKA_BOOTSTRAP``. This file holds
fixtures only: the classes and helpers they build on, which tests import too, are in
``support.py``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dispatcher import db
from dispatcher.daemon import Daemon
from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.integration.kafka_cluster import BROKER_IDS, KafkaCluster, remove
from tests.integration.support import (
    DISPATCHER,
    KAFKA,
    PG_URL,
    WAIT,
    Mailbox,
    MailboxServer,
    MakeReceiver,
    Process,
    Receiver,
    Responder,
    Running,
    Spawn,
    StartDaemon,
    Tls,
    World,
    free_port,
    new_shop,
    stack,
    with_db,
)

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
        await db.migrate_url(with_db(PG_URL, name))

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
    yield with_db(PG_URL, name)
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


@pytest.fixture
async def store(pool: asyncpg.Pool) -> Store:
    return Store(pool)


@pytest.fixture
async def shop(store: Store) -> Principal:
    return await new_shop(store)


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
    """Creates topics with unique names; deletes them after the test, and the delay tiers
    a daemon derived from them."""
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
        tier = re.compile(rf"({'|'.join(map(re.escape, created))})-[0-9]+(ms|s|m|h)")
        tiers = [t for t in await kafka_admin.list_topics() if tier.fullmatch(t)]
        await kafka_admin.delete_topics(created + tiers)


@pytest.fixture
async def producer() -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    yield producer
    await producer.stop()


# --- TLS and HTTPS receivers ------------------------------------------------------------


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


@pytest.fixture
async def receiver_factory(tls: Tls) -> AsyncIterator[MakeReceiver]:
    runners: list[web.AppRunner] = []
    receivers: list[Receiver] = []

    async def make(status: int = 200, responder: Responder | None = None) -> Receiver:
        receiver = Receiver("", status=status, responder=responder)
        receivers.append(receiver)
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
    invalid = [f"{r.url}: {error}" for r in receivers for error in r.invalid]
    if invalid:
        pytest.fail(
            "bodies that break schemas/notification.schema.json:\n" + "\n".join(invalid),
            pytrace=False,
        )


@pytest.fixture
async def receiver(receiver_factory: MakeReceiver) -> Receiver:
    return await receiver_factory()


# --- SMTP -------------------------------------------------------------------------------


@pytest.fixture
async def mailbox() -> AsyncIterator[Mailbox]:
    loop = asyncio.get_running_loop()
    box = Mailbox("127.0.0.1", 0)
    server = await loop.create_server(
        lambda: MailboxServer(box, hostname="mailbox.test"), "127.0.0.1", 0
    )
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
        attempt_topic=await new_topic("attempts"),
        drain_timeout_seconds=10.0,
    )


# --- The daemon -------------------------------------------------------------------------


@pytest.fixture
async def start_daemon() -> AsyncIterator[StartDaemon]:
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
async def world(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
) -> World:
    """This test's settings, database, shop, receiver and producer, and its daemons."""
    return World(isolated_settings, store, shop, receiver, producer, receiver_factory, start_daemon)


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts `dispatcher run` processes (ready when it returns); kills those still
    running after the test."""
    started: list[Process] = []

    async def start(env: dict[str, str], *args: str) -> Process:
        """``args``: of the command, ``run`` when none (e.g. ``"run", "--role", "api"``)."""
        log_path = tmp_path / f"daemon-{len(started)}.log"
        argv = [*DISPATCHER, *(args or ("run",))]
        with log_path.open("wb") as out:
            popen = subprocess.Popen(argv, env=env, stdout=out, stderr=out)  # noqa: S603 - our own command
        process = Process(popen, int(env["DISPATCHER_HTTP_PORT"]), log_path)
        started.append(process)
        await process.wait_ready()
        return process

    yield start
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


# --- The local stack --------------------------------------------------------------------


@pytest.fixture
async def restore_stack() -> AsyncIterator[None]:
    """Whatever happens in the test, the stack is whole again afterwards."""
    yield
    await stack("up", "kafka")
    await stack("up", "postgres")


# --- A Kafka cluster of three brokers ---------------------------------------------------


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """Three brokers and a controller of their own (ports, directory), started once for
    the module that asks for it and killed after it (``kafka_cluster.py``)."""
    root = tmp_path_factory.mktemp("kafka-cluster")

    async def start() -> KafkaCluster:
        cluster = await KafkaCluster.create(root)
        await cluster.start()
        return cluster

    cluster = asyncio.run(start())
    try:
        yield cluster
    finally:
        cluster.stop()
        remove(root)


@pytest.fixture
async def cluster(kafka_cluster: KafkaCluster) -> AsyncIterator[KafkaCluster]:
    """The cluster, whole when the test starts and again after it (the brokers the test
    killed are restarted and caught up)."""
    await kafka_cluster.wait_healed()
    yield kafka_cluster
    killed = set(BROKER_IDS) - kafka_cluster.running_brokers()
    if killed:
        await kafka_cluster.restart(*sorted(killed))
    await kafka_cluster.wait_healed()


@pytest.fixture
async def cluster_settings(settings: Settings, cluster: KafkaCluster) -> Settings:
    """Settings on the cluster: this test's own event topic (3 partitions, RF 3), its own
    internal topics (the daemon creates them, RF 3) and consumer group."""
    tag = uuid.uuid4().hex[:10]
    events = f"events-{tag}"
    async with cluster.admin() as admin:
        await admin.create_topics([NewTopic(events, num_partitions=3, replication_factor=3)])
    return replace(
        settings,
        kafka_bootstrap=cluster.bootstrap,
        event_topics=(events,),
        consumer_group=f"group-{tag}",
        retry_topic=f"retries-{tag}",
        notice_topic=f"notices-{tag}",
        dead_letter_topic=f"dead-{tag}",
        attempt_topic=f"attempts-{tag}",
        drain_timeout_seconds=5.0,
    )
