"""The daemon keeps running through faults: the real Kafka and PostgreSQL stop and start.

These tests stop services of the local stack (``tools/stack.py down kafka``), so they
need the stack's own services, not ones given by DISPATCHER_TEST_* variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import replace

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.integration.support import (
    WAIT,
    Receiver,
    StartDaemon,
    World,
    make_event,
    metric,
    needs_own_stack,
    produce,
    readiness,
    stack,
    subscribe,
    wait_metric,
)

pytestmark = needs_own_stack


async def wait_readiness(base_url: str, status: int, check: str, prefix: str) -> None:
    """Poll /readyz until it answers ``status`` with ``check`` starting with ``prefix``."""
    async with asyncio.timeout(WAIT * 2):
        while True:
            got, checks = await readiness(base_url)
            if got == status and checks.get(check, "").startswith(prefix):
                return
            await asyncio.sleep(0.2)  # polling readiness with a deadline


async def test_database_outage_delivers_known_webhooks_and_drops_nothing(
    world: World, restore_stack: None
) -> None:
    """PostgreSQL stops: not ready (cache and database named), API 503; events for known
    webhooks are still delivered, an unmatched one is held, not dropped; it starts: ready
    again, and the held event is decided against the reloaded cache."""
    store, shop, receiver = world.store, world.shop, world.receiver
    _, token = await store.issue_token(shop.environment_id, shop.client_id)
    await world.subscribe(entity="sales", event="CLOSED")
    running = await world.start()
    await wait_readiness(running.base_url, 200, "database", "ok")

    await stack("down", "postgres")
    await wait_readiness(running.base_url, 503, "cache", "subscription cache not current")
    await wait_readiness(running.base_url, 503, "database", "unreachable")
    await world.produce(make_event(shop, event_type="UPDATED"))  # no webhook for it
    await world.produce(make_event(shop))
    await receiver.wait_for(1)  # matched from the cache while the database is down
    await wait_metric(running.base_url, "webhook_events_held", "", 1)
    unmatched = 'reason="unmatched"'
    assert await metric(running.base_url, "webhook_events_skipped_total", unmatched) == 0
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
    await wait_metric(running.base_url, "webhook_events_skipped_total", unmatched, 1)
    assert await metric(running.base_url, "webhook_events_held") == 0
    # The cache listens again: a webhook created now reaches it without a restart.
    later = await world.subscribe(entity="sales", event="CREATED")
    async with asyncio.timeout(WAIT * 2):
        while running.daemon.cache.get(later.id) is None:
            await asyncio.sleep(0.1)  # polling the cache with a deadline


async def test_a_database_that_stops_answering_fails_requests_instead_of_hanging(
    world: World,
) -> None:
    """PostgreSQL stops answering on the connections it has (every backend of the
    database stopped, as behind a partition that drops packets): the API answers 503
    within seconds and /readyz answers, instead of hanging forever; once it answers
    again, both are 200 again."""
    store, shop = world.store, world.shop
    _, token = await store.issue_token(shop.environment_id, shop.client_id)
    running = await world.start(replace(world.settings, database_timeout_seconds=2.0))
    headers = {"Authorization": f"Bearer {token}"}

    async def list_webhooks() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(running.base_url + "/webhooks", headers=headers) as answer,
        ):
            return answer.status

    await wait_readiness(running.base_url, 200, "database", "ok")
    assert await list_webhooks() == 200
    control = await asyncpg.connect(world.settings.database_url)
    frozen: list[int] = []
    try:
        frozen = [
            row["pid"]
            for row in await control.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND state = 'idle' "
                "AND pid <> pg_backend_pid()"
            )
        ]
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        async with asyncio.timeout(15):  # 2 s for the statement; hanging fails the test
            assert await list_webhooks() == 503
        assert time.monotonic() - started < 10
        # /readyz answers too: its check times out as well (or a new connection, which
        # this server still accepts, answers).
        async with asyncio.timeout(10):
            status, checks = await readiness(running.base_url)
        assert checks["database"] in ("ok", "unreachable: TimeoutError"), (status, checks)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await control.close()
    await wait_readiness(running.base_url, 200, "database", "ok")
    assert await list_webhooks() == 200


async def test_kafka_outage_flips_readiness_and_consumption_resumes_without_restart(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    restore_stack: None,
) -> None:
    """Kafka stops: not ready; it starts: ready again and new events are delivered."""
    # Not the ``world`` fixture: no producer lives through the outage; one is made after.
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
