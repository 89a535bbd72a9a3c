"""``webhook_consumer_lag`` is the committed lag: end offset minus committed offset, for
every assigned partition (idle ones too), read from a real daemon's /metrics while a
backlog is held on real Kafka."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace

import orjson

from tests.integration.support import (
    WAIT,
    Running,
    World,
    get,
    hanging_until,
    make_event,
)


async def lag_series(running: Running, consumer: str, topic: str) -> dict[int, float]:
    """partition -> lag of every series of ``consumer`` and ``topic`` on /metrics now."""
    _, text = await get(running.base_url + "/metrics")
    out = {}
    for labels, value in re.findall(r"^webhook_consumer_lag\{(.*)\} (\S+)$", text, re.MULTILINE):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if pairs["consumer"] == consumer and pairs["topic"] == topic:
            out[int(pairs["partition"])] = float(value)
    return out


async def test_a_held_backlog_shows_as_lag_and_idle_partitions_show_zero(
    world: World, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """Events consumed but unfinished (a hanging endpoint) and events not yet fetched
    behind them all count; the other partitions read 0; once delivered, 0 everywhere."""
    release = asyncio.Event()
    hanging = await world.receivers(responder=hanging_until(release))
    await world.subscribe(hanging)
    topic = await new_topic("events", partitions=3)
    settings = replace(
        world.settings,
        event_topics=(topic,),
        max_in_flight=1,  # four records taken at most: the rest wait unfetched
        delivery_timeout_seconds=120.0,  # the hang outlasts the test: no failure, no retry
    )
    running = await world.start(settings)
    await wait_series(running, "dispatch", topic, {0: 0.0, 1: 0.0, 2: 0.0})
    await wait_series(running, "notices", settings.notice_topic, {0: 0.0})

    await produce_to(world, topic, 1, 30)
    await hanging.wait_for(1)
    await wait_series(running, "dispatch", topic, {0: 0.0, 1: 30.0, 2: 0.0})
    await produce_to(world, topic, 1, 20)
    # 4 records in flight, 46 not fetched (their partition's fetching is stalled): all wait
    await wait_series(running, "dispatch", topic, {0: 0.0, 1: 50.0, 2: 0.0})

    release.set()
    await hanging.wait_for(50)
    await wait_series(running, "dispatch", topic, {0: 0.0, 1: 0.0, 2: 0.0})


async def produce_to(world: World, topic: str, partition: int, count: int) -> None:
    """``count`` events of the world's shop onto one partition of ``topic``."""
    acks = [
        await world.producer.send(topic, orjson.dumps(make_event(world.shop)), partition=partition)
        for _ in range(count)
    ]
    await asyncio.gather(*acks)


async def wait_series(
    running: Running, consumer: str, topic: str, expected: dict[int, float]
) -> None:
    """Poll /metrics until ``consumer`` has exactly these series for ``topic``."""
    async with asyncio.timeout(WAIT):
        while await lag_series(running, consumer, topic) != expected:
            await asyncio.sleep(0.1)  # polling /metrics with a deadline


async def test_partitions_that_move_to_another_process_leave_its_metrics(
    world: World, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """A second process of the group takes some partitions: each partition then has its
    series on exactly one of the two, the one that owns it."""
    topic = await new_topic("events", partitions=4)
    settings = replace(world.settings, event_topics=(topic,))
    first = await world.start(settings)
    await wait_series(first, "dispatch", topic, dict.fromkeys(range(4), 0.0))
    second = await world.start(replace(settings, http_port=0))
    async with asyncio.timeout(WAIT):
        while True:
            a = await lag_series(first, "dispatch", topic)
            b = await lag_series(second, "dispatch", topic)
            if a and b and not a.keys() & b.keys() and a.keys() | b.keys() == set(range(4)):
                break
            await asyncio.sleep(0.1)  # polling /metrics with a deadline
    await second.stop()
    await wait_series(first, "dispatch", topic, dict.fromkeys(range(4), 0.0))
