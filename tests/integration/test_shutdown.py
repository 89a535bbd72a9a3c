"""What a stop costs in duplicates: none after a SIGTERM, about a second's worth after a
SIGKILL. Both run the real `dispatcher` process (the ``spawn`` fixture).
"""

from __future__ import annotations

import asyncio
import signal
import time

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.support import (
    WAIT,
    Mailbox,
    Spawn,
    World,
    deferral_topic,
    end_offset,
    entity_uuids,
    environment,
    free_port,
    hanging_until,
    make_event,
    read_partition,
)


async def test_sigterm_hands_unfinished_attempts_to_retry_and_duplicates_nothing(
    world: World, spawn: Spawn, kafka_admin: AIOKafkaAdminClient, mailbox: Mailbox
) -> None:
    """On SIGTERM, attempts unfinished at the drain timeout are deferred (no mail), every
    offset commits, and after the restart no delivered event is sent again."""
    release = asyncio.Event()  # never set before teardown: H hangs for the whole test
    hanging = await world.receivers(responder=hanging_until(release))
    healthy = await world.receivers()
    h_shop, g_shop = await world.new_shop("hangs"), await world.new_shop("healthy")
    h_hook = await world.subscribe(hanging, shop=h_shop)
    await world.subscribe(healthy, shop=g_shop)
    drain = 2.0
    env = {
        **environment(world.settings),
        "DISPATCHER_DRAIN_TIMEOUT_SECONDS": str(drain),
        # H's attempts must still be unfinished when the drain times out, not failed.
        "DISPATCHER_DELIVERY_TIMEOUT_SECONDS": "120",
        "DISPATCHER_SMTP_HOST": mailbox.host,
        "DISPATCHER_SMTP_PORT": str(mailbox.port),
    }
    topic = world.topic
    try:
        process = await spawn(env)
        # 30 events for H among 100 for G, interleaved on the one partition.
        events = [make_event(h_shop if i % 13 in (0, 4, 8) else g_shop) for i in range(130)]
        h_events = [e for e in events if e["environment_id"] == h_shop.environment_id]
        assert len(h_events) == 30
        await world.produce(*events)
        await healthy.wait_for(100)
        await hanging.wait_for(1)  # H's attempts are in flight, held by its receiver

        process.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await process.wait_exit() == 0
        assert time.monotonic() - signalled < drain + 5

        tp = TopicPartition(topic, 0)  # the test's topics have one partition each
        committed = await kafka_admin.list_consumer_group_offsets(world.settings.consumer_group)
        offset = committed[tp].offset if tp in committed else None
        assert offset == await end_offset(tp) == len(events), f"committed {offset} of {len(events)}"
        retries = [
            r for r in await read_partition(TopicPartition(deferral_topic(world.settings), 0))
            if r["webhook_id"] == str(h_hook.id)
        ]  # fmt: skip
        assert sorted(e["uuid"] for r in retries for e in r["notification"]["entities"]) == sorted(
            e["entity"]["uuid"] for e in h_events
        )
        assert all(r["n_retry"] == 0 for r in retries)  # the same attempt: not a failure
        assert await end_offset(TopicPartition(world.settings.notice_topic, 0)) == 0
        assert mailbox.messages == []

        # Restarted from the committed offsets: only a new event reaches G.
        await spawn({**env, "DISPATCHER_HTTP_PORT": str(free_port())})
        last = make_event(g_shop)
        await world.produce(last)
        async with asyncio.timeout(WAIT):
            while last["entity"]["uuid"] not in entity_uuids(healthy):
                await healthy.wait_for(len(healthy.requests) + 1)
        assert len(healthy.requests) == 101  # 100 before the SIGTERM, then the new one only
        assert mailbox.messages == []
    finally:
        release.set()


async def test_sigkill_at_a_steady_rate_sends_at_most_half_a_second_of_duplicates(
    world: World, spawn: Spawn
) -> None:
    """A SIGKILL at 200 events/s re-sends at most 0.5 s of throughput after the restart."""
    shop, receiver = world.shop, world.receiver
    await world.subscribe()
    env = environment(world.settings)
    process = await spawn(env)
    rate, seconds, tick = 200, 8, 0.05
    events = [make_event(shop) for _ in range(rate * seconds)]
    per_tick = int(rate * tick)

    async def produce_steadily() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, i in enumerate(range(0, len(events), per_tick)):
            await asyncio.sleep(max(0.0, start + n * tick - loop.time()))  # the pace, a timer
            await world.produce(*events[i : i + per_tick])

    producing = asyncio.create_task(produce_steadily())
    try:
        await receiver.wait_for(rate * 3)  # about 3 s of steady delivery
        process.popen.kill()
        assert await process.wait_exit() == -signal.SIGKILL
        await spawn({**env, "DISPATCHER_HTTP_PORT": str(free_port())})
        async with asyncio.timeout(WAIT * 2):
            await producing
            wanted = {e["entity"]["uuid"] for e in events}
            while not wanted <= set(entity_uuids(receiver)):
                await receiver.wait_for(len(receiver.requests) + 1, timeout=WAIT * 2)
    finally:
        producing.cancel()
    duplicates = len(receiver.requests) - len(set(entity_uuids(receiver)))
    print(
        f"\nSIGKILL at {rate} events/s: {duplicates} duplicates"
        f" = {duplicates / rate:.2f} s of throughput"
    )
    assert duplicates <= rate * 0.5
