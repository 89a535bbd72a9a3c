"""Attempts deferred unmade, on the real stack: a Retry-After holds back one webhook only,
and a deferred attempt whose webhook is deleted before it comes due is counted and logged,
never dropped in silence (issue #18, items 3 and 4)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson
from aiohttp import web
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from tests.integration.support import (
    WAIT,
    Responder,
    World,
    deferral_topic,
    hanging_until,
    make_event,
    read_partition,
)

DELAY = 2.0  # the retry delay: the shortest tier, where deferrals go, is 2 s


def busy_once_for(environment_id: str, retry_after: int) -> Responder:
    """429 with ``Retry-After`` to this shop's first request; 200 to everything else."""
    asked = False

    async def respond(request: web.Request, _n: int) -> web.StreamResponse:
        nonlocal asked
        body = orjson.loads(await request.read())
        if body["environment_id"] == environment_id and not asked:
            asked = True
            return web.Response(status=429, headers={"Retry-After": str(retry_after)})
        return web.Response(status=200)

    return respond


async def test_a_retry_after_holds_back_that_webhook_only(world: World) -> None:
    """After a 429 with Retry-After: 4 to shop A, A's next event is deferred until then
    and sent after it; shop B on the same endpoint is served at once meanwhile."""
    a, b = world.shop, await world.new_shop("neighbour")
    receiver = await world.receivers(responder=busy_once_for(a.environment_id, 4))
    hook_a = await world.subscribe(receiver, shop=a)
    await world.subscribe(receiver, shop=b)
    settings = replace(world.settings, retry_delay_seconds=DELAY, max_retries=1)
    running = await world.start(settings)
    await world.produce(make_event(a))
    (asked,) = await receiver.wait_for(1)
    second_a = make_event(a)
    await world.produce(second_a, make_event(b))

    registry = running.daemon.metrics.registry
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_deferrals_total", {"reason": "retry_after"}):
            await asyncio.sleep(0.05)  # polling a counter with a deadline
    got = await receiver.wait_for(2)
    assert got[1].json()["environment_id"] == b.environment_id
    assert got[1].at - asked.at < 4.0  # B was not held back
    # A's deferred event and A's retry of the first both wait for the Retry-After.
    later = await receiver.wait_for(4)
    assert {r.json()["environment_id"] for r in later[2:]} == {a.environment_id}
    assert all(r.at - asked.at >= 4.0 * 0.99 for r in later[2:])
    by_n_retry = {r.json()["nRetry"]: r.json()["entities"][0]["uuid"] for r in later[2:]}
    assert by_n_retry[0] == second_a["entity"]["uuid"]  # deferred: not a failed attempt
    records = await read_partition(TopicPartition(deferral_topic(settings), 0))
    deferred = [r for r in records if r["last_failure"].startswith("deferred")]
    assert len(deferred) >= 1 and {r["webhook_id"] for r in deferred} == {str(hook_a.id)}
    assert "Retry-After" in deferred[0]["last_failure"]


async def test_a_deferred_event_of_a_webhook_deleted_before_it_came_due_is_counted_and_logged(
    world: World,
) -> None:
    """An event consumed while its webhook existed is attempted, even once the webhook is
    deleted; one that was deferred instead (its webhook's backlog at a slow endpoint) and
    whose webhook is deleted before it comes due is not sent: it is counted, by reason, and
    logged as a warning saying so."""
    release = asyncio.Event()
    receiver = await world.receivers(responder=hanging_until(release))
    webhook = await world.subscribe(receiver)
    settings = replace(
        world.settings,
        retry_delay_seconds=DELAY,
        delivery_timeout_seconds=60.0,
        max_in_flight_per_endpoint=2,  # a share of 1 slot, so a backlog bound of 8
        drain_timeout_seconds=1.0,
    )
    running = await world.start(settings)
    registry = running.daemon.metrics.registry

    def deferred() -> float:
        value = registry.get_sample_value("webhook_deferrals_total", {"reason": "webhook_backlog"})
        return value or 0.0

    await world.produce(*[make_event(world.shop) for _ in range(8)])  # the bound
    produced = 8
    await receiver.wait_for(1)
    async with asyncio.timeout(WAIT):
        while not deferred():
            await world.produce(make_event(world.shop))
            produced += 1
            await asyncio.sleep(0.2)  # the attempt must hang for a second to count as slow
    with capture_logs() as logs:
        await world.store.delete_webhook(world.shop.environment_id, webhook.id)
        async with asyncio.timeout(WAIT):
            while running.daemon.cache.get(webhook.id) is not None:
                await asyncio.sleep(0.02)  # polling the cache with a deadline
        dropped = deferred()  # nothing more is deferred: the webhook matches no event now
        labels = {"reason": "webhook_deleted_before_first_attempt"}
        async with asyncio.timeout(WAIT):
            while (registry.get_sample_value("webhook_retries_dropped_total", labels) or 0) < (
                dropped
            ):
                await asyncio.sleep(0.05)  # polling a counter with a deadline
        release.set()  # those taken while the webhook existed go out, to its old URL
        await receiver.wait_for(produced - int(dropped))
        await running.stop()
    assert dropped >= 1
    assert len(receiver.requests) == produced - dropped  # and none of the deferred ones
    lines = [e for e in logs if e["event"] == "retry_dropped"]
    assert len(lines) == dropped
    assert {e["log_level"] for e in lines} == {"warning"}
    assert {e["webhook_id"] for e in lines} == {str(webhook.id)}
    assert "never sent" in lines[0]["reason"]
    assert lines[0]["last_failure"].startswith("deferred: ")
    retries = registry.get_sample_value(
        "webhook_retries_dropped_total", {"reason": "webhook_deleted_before_retry"}
    )
    assert retries == 0
