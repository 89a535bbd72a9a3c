"""On a cluster of three brokers (RF 3, min ISR 2): broker losses, readiness and logs.

Each test runs the real `dispatcher` process against the ``kafka_cluster`` fixture (three
brokers and a controller of their own, see ``kafka_cluster.py``), kills brokers with
SIGKILL and restarts them; the fixture leaves the cluster whole after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.integration.kafka_cluster import BROKER_IDS, KafkaCluster
from tests.integration.support import (
    WAIT,
    Process,
    Receiver,
    Spawn,
    entity_uuids,
    environment,
    make_event,
    readiness,
    subscribe,
    wait_status,
)

READY_WITHIN = 10.0  # seconds from a loss of consumption to a failing /readyz
MAX_GAP = 15.0  # seconds without a delivery a single broker loss may cause
MAX_ALERTS_PER_MINUTE = 100  # log lines at WARNING or above, per minute of outage


class Traffic:
    """Events produced at a steady rate by a producer of the test's own, created fresh
    (what the daemon's clients learnt before is no help to it); remembers the uuid of
    every event the cluster acknowledged."""

    def __init__(self, bootstrap: str, topic: str, shop: Principal, per_second: float) -> None:
        self._bootstrap, self._topic, self._shop = bootstrap, topic, shop
        self._interval = 1 / per_second
        self.acked: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        async with asyncio.timeout(WAIT * 2):
            await self._task

    async def _run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        sends: list[asyncio.Future[Any]] = []
        try:
            while not self._stop.is_set():
                event = make_event(self._shop)
                ack = await producer.send(
                    self._topic, _json(event), key=self._shop.environment_id.encode()
                )
                ack.add_done_callback(self._acked(event["entity"]["uuid"]))
                sends.append(ack)
                with contextlib.suppress(TimeoutError):  # a steady rate, not coordination
                    await asyncio.wait_for(self._stop.wait(), self._interval)
            await asyncio.gather(*sends, return_exceptions=True)
        finally:
            await producer.stop()

    def _acked(self, entity_uuid: str) -> Any:
        def done(ack: asyncio.Future[Any]) -> None:
            if not ack.cancelled() and ack.exception() is None:
                self.acked.append(entity_uuid)

        return done


def _json(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


async def produce_now(bootstrap: str, topic: str, shop: Principal, count: int) -> list[str]:
    """Produce ``count`` events with a fresh producer; their entity uuids once acked."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        events = [make_event(shop) for _ in range(count)]
        acks = [
            await producer.send(topic, _json(e), key=shop.environment_id.encode()) for e in events
        ]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return [e["entity"]["uuid"] for e in events]


async def wait_received(receiver: Receiver, uuids: list[str], timeout: float = WAIT) -> None:
    """Wait until every event of ``uuids`` was delivered at least once."""
    async with asyncio.timeout(timeout):
        while missing := set(uuids) - set(entity_uuids(receiver)):
            await asyncio.sleep(0.1)  # polling the receiver with a deadline
    assert not missing


def alert_lines(process: Process, since: float, until: float) -> list[dict[str, Any]]:
    """The log lines at WARNING or above the process wrote between two wall-clock times."""
    out = []
    for line in process.complete_lines():
        at = datetime.fromisoformat(line["timestamp"]).timestamp()
        if since <= at <= until and line.get("level") in ("warning", "error", "critical"):
            out.append(line)
    return out


async def wait_committed(cluster: KafkaCluster, group: str, topic: str, count: int) -> None:
    """Wait until ``group`` committed ``count`` records of ``topic`` over its partitions."""
    async with asyncio.timeout(WAIT):
        while True:
            async with cluster.admin() as admin:
                offsets = await admin.list_consumer_group_offsets(group)
            if sum(o.offset for tp, o in offsets.items() if tp.topic == topic) >= count:
                return
            await asyncio.sleep(0.2)  # polling the group's offsets with a deadline


def leader_of_everything(partitions: list[dict[str, Any]]) -> int | None:
    leaders = {p["leader"] for p in partitions}
    return leaders.pop() if len(leaders) == 1 else None


async def start_daemon(spawn: Spawn, settings: Settings, **env: str) -> Process:
    return await spawn({**environment(settings), **env})


async def test_two_broker_outage_fails_readiness_quietly_and_heals(
    cluster: KafkaCluster,
    cluster_settings: Settings,
    spawn: Spawn,
    store: Store,
    shop: Principal,
    receiver: Receiver,
) -> None:
    """Two of three brokers lost (min ISR 2: nothing can be committed or produced):
    /readyz answers 503 naming Kafka within 10 s and for as long as it lasts, the log gets
    an outage warning and fewer than 100 lines at WARNING or above per minute; healed,
    /readyz is 200 again and events flow."""
    await subscribe(store, shop, receiver)
    process = await start_daemon(spawn, cluster_settings)
    topic = cluster_settings.event_topics[0]
    await wait_received(receiver, await produce_now(cluster.bootstrap, topic, shop, 20))
    # Idle when the brokers go: everything committed, nothing waiting for an ack, so only
    # what the daemon asks of Kafka by itself can tell it that Kafka is gone.
    await wait_committed(cluster, cluster_settings.consumer_group, topic, 20)

    lost = [b for b in BROKER_IDS if b != 3]
    started = time.time()
    await cluster.kill(*lost)
    checks = await wait_status(process, 503, READY_WITHIN - (time.time() - started))
    assert checks["kafka"] != "ok", checks
    failing_after = time.time() - started
    # It stays unready for the whole outage.
    outage = 35.0
    while time.time() - started < outage:
        status, checks = await readiness(f"http://127.0.0.1:{process.port}")
        assert status == 503 and checks["kafka"] != "ok", (
            round(time.time() - started),
            checks,
            [line for line in process.complete_lines() if line["event"].startswith("kafka")],
        )
        await asyncio.sleep(0.5)  # sampling readiness through the outage
    ended = time.time()
    await cluster.restart(*lost)
    await cluster.wait_healed()
    checks = await wait_status(process, 200, WAIT)
    assert checks["kafka"] == "ok"
    await wait_received(receiver, await produce_now(cluster.bootstrap, topic, shop, 5))

    alerts = alert_lines(process, started, ended)
    per_minute = len(alerts) * 60 / (ended - started)
    assert per_minute < MAX_ALERTS_PER_MINUTE, (
        f"{len(alerts)} lines in {ended - started:.0f}s; first: {alerts[:20]}"
    )
    events = [line["event"] for line in process.complete_lines()]
    assert events.count("kafka_outage_started") == 1, events
    assert events.count("kafka_outage_ended") == 1, events
    assert failing_after <= READY_WITHIN


async def test_losing_the_broker_leading_everything_after_a_healed_outage(
    cluster: KafkaCluster,
    cluster_settings: Settings,
    spawn: Spawn,
    store: Store,
    shop: Principal,
    receiver: Receiver,
) -> None:
    """After a two-broker outage has healed (every partition back to 3 in-sync replicas),
    killing the broker that then leads every partition stops delivery for at most 15 s
    and loses no acknowledged event, though the daemon's clients learnt a one-broker
    layout during the outage and metadata is refreshed only every 5 minutes (aiokafka's
    default, the conditions of issue 19)."""
    await subscribe(store, shop, receiver)
    process = await start_daemon(
        spawn, cluster_settings, DISPATCHER_KAFKA_METADATA_MAX_AGE_MS="300000"
    )
    topic = cluster_settings.event_topics[0]
    await wait_received(receiver, await produce_now(cluster.bootstrap, topic, shop, 20))

    survivor, lost = 3, [1, 2]
    await cluster.kill(*lost)
    await cluster.wait_brokers({survivor}, timeout=WAIT)
    await wait_status(process, 503, WAIT)  # the daemon met the outage
    await cluster.restart(*lost)
    await cluster.wait_healed()
    await wait_status(process, 200, WAIT)
    partitions = await cluster.partitions()
    assert leader_of_everything(partitions) == survivor, partitions

    async with Traffic(cluster.bootstrap, topic, shop, per_second=20) as traffic:
        async with asyncio.timeout(WAIT):
            while len(traffic.acked) < 40:
                await asyncio.sleep(0.05)  # polling the producer with a deadline
        await wait_received(receiver, list(traffic.acked))
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await cluster.kill(survivor)
        # Traffic goes on until deliveries are seen past the longest gap allowed.
        async with asyncio.timeout(WAIT * 2):
            while not receiver.requests or receiver.requests[-1].at < killed_at + MAX_GAP:
                await asyncio.sleep(0.1)  # polling the receiver with a deadline
    await wait_received(receiver, list(traffic.acked), timeout=WAIT * 2)

    arrivals = sorted(r.at for r in receiver.requests if r.at >= killed_at - 1)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals and max(gaps) <= MAX_GAP, f"delivery stopped for {max(gaps):.1f}s"
    assert not set(traffic.acked) - set(entity_uuids(receiver))
    assert process.popen.poll() is None


async def test_losing_every_broker_reads_unreachable_and_heals_without_restart(
    cluster: KafkaCluster,
    cluster_settings: Settings,
    spawn: Spawn,
    store: Store,
    shop: Principal,
    receiver: Receiver,
) -> None:
    """Every broker lost: /readyz names Kafka unreachable within 10 s; all back: /readyz is
    200 again and events are delivered, by the same process."""
    await subscribe(store, shop, receiver)
    process = await start_daemon(spawn, cluster_settings)
    topic = cluster_settings.event_topics[0]
    await wait_received(receiver, await produce_now(cluster.bootstrap, topic, shop, 5))

    await cluster.kill(*BROKER_IDS)
    checks = await wait_status(process, 503, READY_WITHIN)
    assert checks["kafka"].startswith("unreachable"), checks
    await cluster.restart(*BROKER_IDS)
    await cluster.wait_healed()
    # All three brokers restarted at once: the group coordinators move and load again,
    # which on a loaded 2-core machine can take longer than one WAIT.
    assert (await wait_status(process, 200, WAIT * 2))["kafka"] == "ok"
    await wait_received(receiver, await produce_now(cluster.bootstrap, topic, shop, 5))
    assert process.popen.poll() is None
