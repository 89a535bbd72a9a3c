"""A webhook the API created (201) gets every event produced after that answer.

The API writes PostgreSQL; the consumers match events against their in-memory cache.
These tests produce an event the moment ``POST /webhooks`` answers 201 and require its
delivery: with API and consumers in one process, in separate roles, and right after
PostgreSQL came back from an outage (while the cache may still be reconnecting).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest

from dispatcher.store import Principal
from tests.integration.support import (
    WAIT,
    Receiver,
    World,
    entity_uuids,
    free_port,
    make_event,
    needs_own_stack,
    new_shop_with_token,
    readiness,
    stack,
)


async def post_webhook(
    session: aiohttp.ClientSession, base_url: str, token: str, url: str
) -> tuple[int, Any]:
    """POST /webhooks for (sales, CLOSED): the status and the decoded answer."""
    body = {"url": url, "entity_name": "sales", "event_type": "CLOSED", "email": "dev@shop.test"}
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(base_url + "/webhooks", json=body, headers=headers) as answer:
        return answer.status, orjson.loads(await answer.read())


async def assert_all_delivered(receiver: Receiver, wanted: set[str]) -> None:
    """Wait up to WAIT for every entity of ``wanted``; fail saying how many came."""
    try:
        async with asyncio.timeout(WAIT):
            while not wanted <= set(entity_uuids(receiver)):
                await receiver.wait_for(len(receiver.requests) + 1)
    except TimeoutError:
        pass
    got = len(wanted & set(entity_uuids(receiver)))
    assert got == len(wanted), f"{got} of {len(wanted)} delivered"


async def poll_readiness(
    base_url: str, wanted: Callable[[int, dict[str, str]], bool], timeout: float = WAIT * 2
) -> tuple[int, dict[str, str]] | None:
    """Poll /readyz until ``wanted``; its answer, or None after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                status, checks = await readiness(base_url)
                if wanted(status, checks):
                    return status, checks
                await asyncio.sleep(0.2)  # polling readiness with a deadline
    except TimeoutError:
        return None


@pytest.mark.parametrize("roles", ["all", "api+dispatch"])
async def test_event_produced_right_after_201_is_delivered(roles: str, world: World) -> None:
    """An event produced as soon as POST /webhooks answered 201 reaches the new webhook."""
    receiver = world.receiver
    if roles == "all":
        api_url = (await world.start()).base_url
    else:
        api_url = (await world.start(role="api")).base_url
        await world.start(replace(world.settings, http_port=free_port()), role="dispatch")
    shops = [await new_shop_with_token(world.store) for _ in range(20)]

    async def subscribe_then_produce(shop: Principal, token: str) -> str:
        status, answer = await post_webhook(session, api_url, token, receiver.url)
        assert status == 201, answer
        event = make_event(shop)
        await world.produce(event)
        return str(event["entity"]["uuid"])

    # 20 integrators subscribing at once, each producer acting on its own 201.
    async with aiohttp.ClientSession() as session:
        wanted = set(await asyncio.gather(*(subscribe_then_produce(*s) for s in shops)))
    await assert_all_delivered(receiver, wanted)


@needs_own_stack
async def test_webhook_created_right_after_a_database_outage_gets_every_event(
    world: World, restore_stack: None
) -> None:
    """After PostgreSQL stops and starts, a webhook created at once gets all its events."""
    receiver = world.receiver
    shop, token = await new_shop_with_token(world.store)
    running = await world.start()
    assert await poll_readiness(running.base_url, lambda status, _: status == 200)

    await stack("down", "postgres")
    # Not ready while the cache cannot hear of changes (recorded, asserted below; a short
    # deadline: the stopped PostgreSQL is shared with other test runs).
    while_down = await poll_readiness(
        running.base_url,
        lambda status, checks: status == 503 and checks.get("cache") != "ok",
        timeout=10,
    )
    _, checks_down = await readiness(running.base_url)
    await stack("up", "postgres")

    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT * 2):
        while True:  # create as soon as the API stops answering 503
            status, answer = await post_webhook(session, running.base_url, token, receiver.url)
            if status != 503:
                break
            await asyncio.sleep(0.05)  # polling the API's recovery with a deadline
    assert status == 201, answer
    events = [make_event(shop) for _ in range(20)]
    await world.produce(*events)
    await assert_all_delivered(receiver, {e["entity"]["uuid"] for e in events})

    assert while_down is not None, f"/readyz while PostgreSQL was down: {checks_down}"
    assert await poll_readiness(running.base_url, lambda status, _: status == 200)
