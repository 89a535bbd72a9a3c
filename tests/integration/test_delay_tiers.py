"""Delay tiers on real Kafka: no retry waits behind another webhook's, long waits are
honoured, and records of the pre-tier single delay topic are still attempted."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import orjson
import pytest
from aiohttp import web

from dispatcher.delays import RetryRecord
from dispatcher.notification import Notification
from dispatcher.policy import DelayTiers
from tests.integration.support import (
    WAIT,
    Responder,
    World,
    make_event,
    produce,
    read_records,
    wait_metric,
)

DELAY = 1.0


@pytest.fixture
def tier_world(world: World) -> World:
    """This test's world with a 1 s retry delay (tiers 1s, 30s, 1h, 6h)."""
    return replace(world, settings=replace(world.settings, retry_delay_seconds=DELAY))


def answering(*answers: tuple[int, dict[str, str]]) -> Responder:
    """A responder giving ``answers`` in turn (status, headers), then 200."""

    async def respond(_request: web.Request, n: int) -> web.Response:
        if n <= len(answers):
            status, headers = answers[n - 1]
            return web.Response(status=status, headers=headers, text="not now")
        return web.Response(status=200)

    return respond


async def test_a_day_long_retry_after_does_not_delay_another_webhooks_retry(
    tier_world: World,
) -> None:
    """Webhook A's retry after `Retry-After: 86400` is queued first and webhook B's short
    retry right behind it on the same partition: B is retried on time, A is not."""
    world = tier_world
    a = await world.receivers(responder=answering((503, {"Retry-After": "86400"})))
    b = await world.receivers(responder=answering((500, {})))
    other = await world.new_shop("other")
    webhook_a = await world.subscribe(a)
    await world.subscribe(b, shop=other)
    await world.start()
    await world.produce(make_event(world.shop))
    await a.wait_for(1)  # A failed first: its retry record is queued first
    await world.produce(make_event(other))
    first, retry = await b.wait_for(2)
    assert retry.json()["nRetry"] == 1
    assert DELAY * 0.99 <= retry.at - first.at <= DELAY + 3.0  # on time, not a day late
    assert len(a.requests) == 1
    tiers = DelayTiers.for_settings(world.settings.retry_topic, retry_delay=DELAY)
    (held,) = await read_records(tiers.for_wait(86400).topic, 1)
    record = RetryRecord.decode(held.value)
    assert record.notification.webhook_id == webhook_a.id and record.tier == "6h"
    assert record.due_ms / 1000 - time.time() > 86400 - WAIT


async def test_a_long_retry_after_is_honoured_within_the_shortest_tier(
    tier_world: World,
) -> None:
    """`Retry-After: 3` with a 1 s retry delay: the retry comes 3 to 4 s later, the
    record re-queued on the 1 s tier for what remained each time it was released."""
    world = tier_world
    receiver = await world.receivers(responder=answering((503, {"Retry-After": "3"})))
    await world.subscribe(receiver)
    running = await world.start()
    await world.produce(make_event(world.shop))
    first, retry = await receiver.wait_for(2)
    assert retry.json()["nRetry"] == 1
    assert 3.0 * 0.99 <= retry.at - first.at <= 3.0 + DELAY + 1.5
    await wait_metric(
        running.base_url, "webhook_delay_records_total", 'kind="requeue",tier="1s"', 2
    )


async def test_records_of_the_single_delay_topic_of_earlier_versions_are_attempted(
    tier_world: World,
) -> None:
    """After an upgrade, retry records left on DISPATCHER_RETRY_TOPIC itself (no tier) are
    attempted when due: one already due at once, one due in 2 s then."""
    world = tier_world
    await world.subscribe()
    webhook = await world.store.find_webhook(world.shop.environment_id, "sales", "CLOSED")
    assert webhook is not None
    now = time.time()

    def old_record(entity_id: int, due: float) -> bytes:
        event = make_event(world.shop, entity={"id": entity_id})
        notification = Notification(
            notification_uuid=str(uuid.uuid4()),
            webhook_id=webhook.id,
            type="CLOSED",
            entity_name="sales",
            environment_id=world.shop.environment_id,
            client_id="pos-app",
            from_user=None,
            entities=(event["entity"],),
        )
        data = orjson.loads(RetryRecord(notification, 1, int(due * 1000), "HTTP 500").encode())
        assert "hold_until_ms" not in data  # the shape written before the tiers
        return orjson.dumps(data)

    for value in (old_record(1, now - 5), old_record(2, now + 2)):
        await (await world.producer.send(world.settings.retry_topic, value, key=b"k"))
    await world.start()
    first, second = await world.receiver.wait_for(2)
    assert [r.json()["entities"][0]["id"] for r in (first, second)] == [1, 2]
    assert all(r.json()["nRetry"] == 1 for r in (first, second))
    assert second.at - first.at >= 1.0  # the second waited for its due time


async def test_an_event_produced_while_retries_wait_goes_out_at_once(tier_world: World) -> None:
    """Retries waiting on the tiers never hold up the event consumer."""
    world = tier_world
    slow = await world.receivers(responder=answering((503, {"Retry-After": "86400"})))
    other = await world.new_shop("other")
    await world.subscribe(slow, shop=other)
    await world.subscribe()
    await world.start()
    await produce(world.producer, world.topic, make_event(other))
    await slow.wait_for(1)
    await world.produce(make_event(world.shop))
    (got,) = await world.receiver.wait_for(1)
    assert got.json()["nRetry"] == 0
