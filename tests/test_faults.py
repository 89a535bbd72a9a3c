"""The daemon keeps running through faults: the real Kafka and PostgreSQL stop and start.

These tests stop services of the local stack (``tools/stack.py down kafka``), so they
need the stack's own services, not ones given by DISPATCHER_TEST_* variables.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.conftest import WAIT, Receiver, Running, make_event, produce, subscribe

ROOT = Path(__file__).resolve().parent.parent
StartDaemon = Callable[..., Awaitable[Running]]

pytestmark = pytest.mark.skipif(
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


@pytest.fixture
async def restore_stack() -> AsyncIterator[None]:
    """Whatever happens in the test, the stack is whole again afterwards."""
    yield
    await stack("up", "kafka")
    await stack("up", "postgres")


async def readiness(base_url: str) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/readyz") as r:
        return r.status, orjson.loads(await r.read())["checks"]


async def wait_readiness(base_url: str, status: int, check: str, prefix: str) -> None:
    """Poll /readyz until it answers ``status`` with ``check`` starting with ``prefix``."""
    async with asyncio.timeout(WAIT * 2):
        while True:
            got, checks = await readiness(base_url)
            if got == status and checks.get(check, "").startswith(prefix):
                return
            await asyncio.sleep(0.2)  # polling readiness with a deadline


async def test_database_outage_pauses_consumption_and_loses_nothing(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
    restore_stack: None,
) -> None:
    """PostgreSQL stops: not ready (cache and database named), API 503, consumption
    paused; it starts: ready again, the event produced meanwhile is delivered."""
    _, token = await store.issue_token(shop.environment_id, shop.client_id)
    await subscribe(store, shop, receiver, "sales", "CLOSED")
    running = await start_daemon(isolated_settings)
    await wait_readiness(running.base_url, 200, "database", "ok")

    await stack("down", "postgres")
    await wait_readiness(running.base_url, 503, "cache", "subscription cache not current")
    await wait_readiness(running.base_url, 503, "database", "unreachable")
    worker = running.daemon.event_worker
    assert worker is not None
    async with asyncio.timeout(WAIT):
        while worker.paused_reason is None:
            await asyncio.sleep(0.05)  # polling the consumer's state with a deadline
    await produce(producer, isolated_settings.event_topics[0], make_event(shop))
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.base_url + "/webhooks", headers=headers) as answer,
    ):
        assert answer.status == 503
        error = orjson.loads(await answer.read())["error"]
    assert error["type"] == "service_unavailable"
    assert "database is unavailable" in error["message"]

    await stack("up", "postgres")
    await wait_readiness(running.base_url, 200, "cache", "ok")
    await receiver.wait_for(1)  # held while the cache could not be trusted, then sent
    assert worker.paused_reason is None
    # The cache listens again: a webhook created now reaches it without a restart.
    later = await subscribe(store, shop, receiver, "sales", "CREATED")
    async with asyncio.timeout(WAIT * 2):
        while running.daemon.cache.get(later.id) is None:
            await asyncio.sleep(0.1)  # polling the cache with a deadline


async def test_kafka_outage_flips_readiness_and_consumption_resumes_without_restart(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    restore_stack: None,
) -> None:
    """Kafka stops: not ready; it starts: ready again and new events are delivered."""
    await subscribe(store, shop, receiver, "sales", "CLOSED")
    running = await start_daemon(isolated_settings)
    await wait_readiness(running.base_url, 200, "kafka", "ok")

    await stack("down", "kafka")
    await wait_readiness(running.base_url, 503, "kafka", "unreachable")
    await stack("up", "kafka")
    await wait_readiness(running.base_url, 200, "kafka", "ok")

    producer = AIOKafkaProducer(bootstrap_servers=isolated_settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await produce(producer, isolated_settings.event_topics[0], make_event(shop))
    finally:
        await producer.stop()
    await receiver.wait_for(1, timeout=WAIT * 2)
    assert not running.task.done()
