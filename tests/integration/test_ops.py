"""What operators watch: /metrics, /healthz, /readyz and systemd's notify protocol (that
each metric is documented is checked in tests/unit)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from dispatcher.settings import Settings
from dispatcher.topics import internal_topics
from tests.integration.support import (
    WAIT,
    StartDaemon,
    World,
    environment,
    free_port,
    get,
    make_event,
    sample,
)


async def test_metrics_count_the_deliveries_that_happened(world: World) -> None:
    """After 5 deliveries and 2 bad messages, /metrics says so."""
    shop, receiver, producer = world.shop, world.receiver, world.producer
    await world.subscribe(entity="sales", event="CLOSED")
    running = await world.start()
    metrics_url = running.base_url + "/metrics"
    _, before = await get(metrics_url)
    assert sample(before, "webhook_deliveries_total", 'outcome="200"') == 0
    assert sample(before, "webhook_subscriptions_cached") == 1

    topic = world.topic
    await (await producer.send(topic, b"{broken"))
    await (await producer.send(topic, b"[]"))
    await world.produce(*[make_event(shop) for _ in range(5)])
    await world.produce(make_event(shop, event_type="UPDATED"))  # unmatched
    await receiver.wait_for(5)
    async with asyncio.timeout(WAIT):
        while True:
            _, text = await get(metrics_url)
            consumed = sample(text, "webhook_events_consumed_total")
            # an unmatched event is counted once the cache is known to be current
            unmatched = sample(text, "webhook_events_skipped_total", 'reason="unmatched"')
            if consumed == 8 and unmatched == 1:
                break
            await asyncio.sleep(0.05)  # polling the endpoint with a deadline
    assert sample(text, "webhook_deliveries_total", 'outcome="200"') == 5
    assert sample(text, "webhook_delivery_duration_seconds_count") == 5
    assert sample(text, "webhook_dead_letters_total", 'reason="json"') == 1
    assert sample(text, "webhook_dead_letters_total", 'reason="shape"') == 1
    assert sample(text, "webhook_events_skipped_total", 'reason="unmatched"') == 1
    assert sample(text, "webhook_deliveries_in_flight") == 0
    assert shop.environment_id not in text and receiver.url not in text


async def test_health_and_readiness_report_each_check(
    isolated_settings: Settings, start_daemon: StartDaemon
) -> None:
    """/healthz and /readyz answer 200 with the checks that passed."""
    running = await start_daemon(isolated_settings)
    status, body = await get(running.base_url + "/healthz")
    assert status == 200 and '"loops":"ok"' in body
    status, body = await get(running.base_url + "/readyz")
    assert status == 200
    for check in ('"cache":"ok"', '"kafka":"ok"', '"database":"ok"'):
        assert check in body


async def test_readiness_fails_while_the_database_is_unreachable(
    isolated_settings: Settings, start_daemon: StartDaemon
) -> None:
    """A daemon whose database went away is not ready, and says which check failed."""
    running = await start_daemon(isolated_settings)
    assert running.daemon._pool is not None
    await running.daemon._pool.close()  # the pool is gone as if the server were
    status, body = await get(running.base_url + "/readyz")
    assert status == 503
    assert '"database":"unreachable' in body


async def test_daemon_tells_systemd_it_is_ready(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """Under systemd (NOTIFY_SOCKET set) the daemon sends READY=1 once it is ready."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(WAIT)
    env = {**environment(isolated_settings), "NOTIFY_SOCKET": path}
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "run"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        message = await asyncio.to_thread(sock.recv, 1024)
        assert b"READY=1" in message.split(b"\n")
        port = env["DISPATCHER_HTTP_PORT"]
        status, _ = await get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200
        process.terminate()
        message = await asyncio.to_thread(sock.recv, 1024)
        assert message == b"STOPPING=1"
        assert await asyncio.to_thread(process.wait, WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
        sock.close()
        os.unlink(path)


async def test_missing_internal_topics_are_created_like_the_event_topic(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    new_topic: Callable[..., Awaitable[str]],
    kafka_admin: AIOKafkaAdminClient,
) -> None:
    """A first start creates the delay tiers, notice and dead-letter topics it needs, with
    the event topic's partition count; not the pre-tier single delay topic."""
    tag = uuid.uuid4().hex[:8]
    settings = replace(
        isolated_settings,
        event_topics=(await new_topic("events", partitions=3),),
        retry_topic=f"retries-{tag}",
        notice_topic=f"notices-{tag}",
        dead_letter_topic=f"dead-{tag}",
        attempt_topic=f"attempts-{tag}",
    )
    internal = internal_topics(settings)
    assert len(internal) == 7 and f"{settings.retry_topic}-15m" in internal
    assert settings.attempt_topic in internal
    try:
        await start_daemon(settings)
        described = await kafka_admin.describe_topics(internal)
        assert sorted(t["topic"] for t in described) == sorted(internal)
        assert [len(t["partitions"]) for t in described] == [3] * 7
        assert settings.retry_topic not in await kafka_admin.list_topics()
    finally:
        await kafka_admin.delete_topics(internal)


async def test_roles_split_the_api_from_the_consumers(
    isolated_settings: Settings, start_daemon: StartDaemon
) -> None:
    """--role api serves the API and consumes nothing; --role dispatch the reverse."""
    api = await start_daemon(isolated_settings, role="api")
    assert api.daemon.workers == []
    status, _ = await get(api.base_url + "/openapi.json")
    assert status == 200
    status, _ = await get(api.base_url + "/readyz")
    assert status == 200

    dispatch = await start_daemon(
        replace(isolated_settings, http_port=free_port()), role="dispatch"
    )
    assert [w.name for w in dispatch.daemon.workers] == ["dispatch"]
    status, _ = await get(dispatch.base_url + "/openapi.json")
    assert status == 404
    status, _ = await get(dispatch.base_url + "/readyz")
    assert status == 200
