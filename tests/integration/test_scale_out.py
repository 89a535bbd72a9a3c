"""Scaling out: several `dispatcher run` processes in one consumer group share a topic's
partitions, lose none of its events when one is killed, and take in one that joins; and
`dispatcher run --processes N` does the same under one supervisor on one HTTP port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson

from dispatcher.notification import notification_uuid
from dispatcher.store import Webhook
from tests.integration.support import (
    WAIT,
    Process,
    Spawn,
    World,
    environment,
    get,
    hanging_until,
    make_event,
    wait_status,
)

PARTITIONS = 6
PER_PHASE = 60  # events of each phase: 10 per partition
LAG = re.compile(r"^webhook_consumer_lag\{(?P<labels>[^}]*)\} ", re.MULTILINE)


async def produce_spread(world: World, topic: str, events: Sequence[dict[str, Any]]) -> None:
    """Produce ``events`` round robin over every partition of ``topic`` (one shop's
    events, whose key would put them all on one), and wait for the acks."""
    acks = [
        await world.producer.send(topic, orjson.dumps(e), partition=i % PARTITIONS)
        for i, e in enumerate(events)
    ]
    await asyncio.gather(*acks)


async def owned(base_url: str) -> dict[str, set[int]]:
    """The event-topic partitions each process has (its ``webhook_consumer_lag`` series
    of consumer ``dispatch``), by ``process`` label ("" for a process of its own)."""
    _, text = await get(base_url + "/metrics")
    out: dict[str, set[int]] = {}
    for match in LAG.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels["consumer"] == "dispatch":
            out.setdefault(labels.get("process", ""), set()).add(int(labels["partition"]))
    return out


async def wait_spread(owners: Callable[[], Awaitable[dict[str, set[int]]]], count: int) -> None:
    """Wait until ``count`` processes hold every partition, each some, none twice."""
    async with asyncio.timeout(WAIT):
        while True:
            held = await owners()
            shares = [s for s in held.values() if s]
            flat = [p for s in shares for p in s]
            if len(shares) == count and sorted(flat) == list(range(PARTITIONS)):
                return
            await asyncio.sleep(0.1)  # polling the processes' /metrics with a deadline


async def wait_delivered(world: World, events: Sequence[dict[str, Any]]) -> None:
    """Wait until every event of ``events`` reached the receiver at least once."""
    wanted = {e["entity"]["uuid"] for e in events}
    async with asyncio.timeout(WAIT):
        while not wanted <= received_entities(world):
            await world.receiver.wait_for(len(world.receiver.requests) + 1)


def received_entities(world: World) -> set[str]:
    return {r.json()["entities"][0]["uuid"] for r in world.receiver.requests}


def delivered_by(
    process: Process, uuids: set[str], *, tag: str | None = None, after: int = 0
) -> set[str]:
    """The notification uuids of ``uuids`` that ``process`` logged as delivered (only on
    lines of child ``tag`` when given, a supervisor's children sharing its output; only
    from line ``after`` on)."""
    return {
        line["notification_uuid"]
        for line in process.complete_lines()[after:]
        if line["event"] == "delivery"
        and line["outcome"] == "delivered"
        and line["notification_uuid"] in uuids
        and (tag is None or line.get("process") == tag)
    }


def uuids_of(events: Sequence[dict[str, Any]], webhook: Webhook) -> set[str]:
    return {str(notification_uuid(e["event_id"], webhook.id)) for e in events}


def assert_duplicates_share_their_uuid(world: World) -> None:
    ids: dict[str, set[str]] = {}
    for r in world.receiver.requests:
        body = r.json()
        ids.setdefault(body["entities"][0]["uuid"], set()).add(body["notification_uuid"])
    assert all(len(v) == 1 for v in ids.values())


async def six_partitions(world: World, new_topic: Callable[..., Awaitable[str]]) -> World:
    topic = await new_topic("events", partitions=PARTITIONS)
    return replace(world, settings=replace(world.settings, event_topics=(topic,)))


async def test_three_processes_share_the_partitions_survive_a_kill_and_take_in_a_fourth(
    world: World, spawn: Spawn, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """Three dispatch processes on 6 partitions: one SIGKILLed mid-stream and another
    started later, every event is delivered, duplicates keep their notification_uuid,
    and each live process delivers its share after each rebalance."""
    world = await six_partitions(world, new_topic)
    webhook = await world.subscribe()
    topic = world.topic

    def start() -> Awaitable[Process]:
        return spawn(environment(world.settings), "run", "--role", "dispatch")

    first = list(await asyncio.gather(start(), start(), start()))

    def owners(processes: Sequence[Process]) -> Callable[[], Awaitable[dict[str, set[int]]]]:
        async def read() -> dict[str, set[int]]:
            found = await asyncio.gather(*(owned(f"http://127.0.0.1:{p.port}") for p in processes))
            return {str(i): held.get("", set()) for i, held in enumerate(found)}

        return read

    await wait_spread(owners(first), 3)
    phases = [[make_event(world.shop) for _ in range(PER_PHASE)] for _ in range(3)]
    await produce_spread(world, topic, phases[0])
    await wait_delivered(world, phases[0])
    for process in first:
        assert delivered_by(process, uuids_of(phases[0], webhook)), process.log_path

    killed, survivors = first[1], [first[0], first[2]]
    killed.popen.kill()
    assert await killed.wait_exit() == -signal.SIGKILL
    await produce_spread(world, topic, phases[1])  # a third of it waits for a new owner
    await wait_delivered(world, phases[1])
    await wait_spread(owners(survivors), 2)

    joined = await start()
    live = [*survivors, joined]
    await wait_spread(owners(live), 3)
    await produce_spread(world, topic, phases[2])
    await wait_delivered(world, phases[2])
    for process in live:
        assert delivered_by(process, uuids_of(phases[2], webhook)), process.log_path
    assert received_entities(world) == {e["entity"]["uuid"] for p in phases for e in p}
    assert_duplicates_share_their_uuid(world)


async def test_supervisor_restarts_a_killed_child_and_drains_on_sigterm(
    world: World, spawn: Spawn, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """`dispatcher run --processes 3` serves one port whose /metrics labels each child;
    a child SIGKILLed is restarted and delivers again; SIGTERM drains all and exits 0."""
    world = await six_partitions(world, new_topic)
    webhook = await world.subscribe()
    env = {**environment(world.settings), "DISPATCHER_PROCESSES": "3"}
    supervisor = await spawn(env, "run", "--role", "dispatch")
    base = f"http://127.0.0.1:{supervisor.port}"

    async def children() -> dict[str, set[int]]:
        held = await owned(base)
        held.pop("supervisor", None)
        return held

    await wait_spread(children, 3)
    _, text = await get(base + "/metrics")
    for process in ("supervisor", "0", "1", "2"):
        assert f'process_start_time_seconds{{process="{process}"}}' in text, process
    phases = [[make_event(world.shop) for _ in range(PER_PHASE)] for _ in range(2)]
    await produce_spread(world, world.topic, phases[0])
    await wait_delivered(world, phases[0])

    def started(child: int) -> list[int]:
        return [
            line["pid"]
            for line in supervisor.complete_lines()
            if line["event"] == "process_started" and line["child"] == child
        ]

    (pid,) = started(1)
    killed_at = len(supervisor.complete_lines())
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(WAIT):
        while len(started(1)) < 2:
            await asyncio.sleep(0.05)  # polling the supervisor's log with a deadline
    exited = [
        line for line in supervisor.complete_lines() if line["event"].startswith("process_exited")
    ]
    assert [(e["event"], e["child"], e["exit"]) for e in exited] == [
        ("process_exited_unexpectedly", 1, "killed by SIGKILL")
    ]
    await wait_spread(children, 3)  # the new child 1 has partitions again
    # ready again: the new child's checks may pass a moment after it holds partitions
    await wait_status(supervisor, 200, WAIT)
    await produce_spread(world, world.topic, phases[1])
    await wait_delivered(world, phases[1])
    # the restarted child 1 delivers its share (its lines come after the kill)
    assert delivered_by(supervisor, uuids_of(phases[1], webhook), tag="1", after=killed_at)

    supervisor.popen.send_signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0
    lines = supervisor.lines()  # every line of the supervisor and its children is JSON
    stopped = sorted(line["process"] for line in lines if line["event"] == "daemon_stopped")
    assert stopped == ["0", "1", "2", "supervisor"]
    assert lines[-1]["event"] == "supervisor_stopped" and lines[-1]["clean"] is True
    assert received_entities(world) == {e["entity"]["uuid"] for p in phases for e in p}
    assert_duplicates_share_their_uuid(world)


async def test_a_second_sigterm_kills_the_children_that_still_drain(
    world: World, spawn: Spawn
) -> None:
    """A second SIGTERM to the supervisor kills the children still draining (a delivery
    held by its endpoint) and the supervisor exits 1: the stop was not clean."""
    release = asyncio.Event()
    world.receiver.responder = hanging_until(release)
    await world.subscribe()
    env = {
        **environment(world.settings),
        "DISPATCHER_PROCESSES": "2",
        "DISPATCHER_DRAIN_TIMEOUT_SECONDS": "60",
        "DISPATCHER_DELIVERY_TIMEOUT_SECONDS": "60",
    }
    try:
        supervisor = await spawn(env, "run", "--role", "dispatch")
        await world.produce(make_event(world.shop))
        await world.receiver.wait_for(1)  # held: its child cannot finish draining
        supervisor.popen.send_signal(signal.SIGTERM)
        await supervisor.wait_logged("processes_stopping")
        supervisor.popen.send_signal(signal.SIGTERM)
        assert await supervisor.wait_exit() == 1
    finally:
        release.set()
    lines = supervisor.lines()
    (killed,) = [line for line in lines if line["event"] == "processes_killed"]
    assert killed["reason"] == "second signal" and killed["children"]
    assert lines[-1]["event"] == "supervisor_stopped" and lines[-1]["clean"] is False


async def test_a_hung_child_is_killed_and_started_again(world: World, spawn: Spawn) -> None:
    """A child that stops answering (here: SIGSTOP, as a blocked event loop would) is
    killed once its /healthz failed for DISPATCHER_PROCESS_UNHEALTHY_SECONDS, started
    again, and the events go on being delivered; the supervisor itself never failed."""
    await world.subscribe()
    env = {
        **environment(world.settings),
        "DISPATCHER_PROCESSES": "2",
        "DISPATCHER_PROCESS_UNHEALTHY_SECONDS": "2",
    }
    supervisor = await spawn(env, "run", "--role", "dispatch")
    base = f"http://127.0.0.1:{supervisor.port}"
    healthy = await supervisor.wait_logged("process_healthy", lambda line: line["child"] == 0)
    os.kill(healthy["pid"], signal.SIGSTOP)
    killed = False
    try:
        # The supervisor's own liveness holds (at once): the hung child is its to restart.
        async with asyncio.timeout(2):
            status, _ = await get(base + "/healthz")
        assert status == 200
        unhealthy = await supervisor.wait_logged("process_unhealthy")
        killed = True
        assert (unhealthy["child"], unhealthy["pid"]) == (0, healthy["pid"])
        assert unhealthy["healthz"] == "no answer" and unhealthy["then"] == "SIGKILL"
        again = await supervisor.wait_logged(
            "process_healthy", lambda line: line["child"] == 0 and line["pid"] != healthy["pid"]
        )
    finally:
        if not killed:  # not left stopped if the test failed (once killed, the pid is free)
            with contextlib.suppress(ProcessLookupError):
                os.kill(healthy["pid"], signal.SIGKILL)
    exited = [line for line in supervisor.complete_lines() if line["event"].startswith("process_")]
    assert [
        (e["event"], e.get("exit")) for e in exited if e["event"].startswith("process_exit")
    ] == [("process_exited_unexpectedly", "killed by SIGKILL")]
    assert again["pid"] != healthy["pid"]
    await wait_status(supervisor, 200, WAIT)
    events = [make_event(world.shop) for _ in range(5)]
    await world.produce(*events)
    await world.receiver.wait_for(5)
    supervisor.popen.send_signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0
