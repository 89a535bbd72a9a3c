"""The dispatch pipeline end to end: real Kafka, PostgreSQL and HTTPS receivers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from standardwebhooks.webhooks import Webhook as StandardWebhook

from dispatcher.deadletter import REASON_HEADER
from dispatcher.notification import notification_uuid
from tests.integration.support import (
    KAFKA,
    WAIT,
    World,
    deferral_topic,
    end_offset,
    free_port,
    hanging_until,
    make_event,
    read_records,
)


async def test_matching_event_is_posted_with_the_documented_envelope_and_signature(
    world: World,
) -> None:
    """An event matching a webhook arrives once, as the domain's envelope, signed."""
    shop = world.shop
    webhook = await world.subscribe()
    await world.start()
    event = make_event(shop)
    await world.produce(event)

    (got,) = await world.receiver.wait_for(1)
    body = got.json()
    assert list(body) == [
        "type", "entity_name", "time", "notification_uuid", "environment_id",
        "client_id", "from_user", "entities", "nRetry",
    ]  # fmt: skip
    assert body["type"] == "CLOSED"
    assert body["entity_name"] == "sales"
    assert body["notification_uuid"] == notification_uuid(event["event_id"], webhook.id)
    assert body["environment_id"] == shop.environment_id
    assert body["client_id"] == "pos-app"
    assert body["from_user"] == "cashier@example.com"
    assert body["entities"] == [event["entity"]]
    assert body["nRetry"] == 0
    assert body["time"].endswith("Z") and len(body["time"]) == len("2022-02-22T11:13:04.892Z")
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"].startswith("webhook-dispatcher/")
    assert got.headers["webhook-id"] == body["notification_uuid"]
    # An independent Standard Webhooks implementation accepts the signature.
    verified = StandardWebhook(webhook.secret).verify(got.body, got.headers)
    assert verified["notification_uuid"] == body["notification_uuid"]


async def test_events_match_by_shop_entity_and_event_type(world: World) -> None:
    """Only the webhook of the event's own shop and (entity, event) receives it."""
    shop = world.shop
    closed, created = await world.receivers(), await world.receivers()
    other_shop_receiver = await world.receivers()
    await world.subscribe(closed, "sales", "CLOSED")
    await world.subscribe(created, "sales", "CREATED")
    other = await world.new_shop("another-shop")
    await world.subscribe(other_shop_receiver, "sales", "CLOSED", shop=other)
    await world.start()

    await world.produce(
        make_event(shop, event_type="closed"),  # any case on input
        make_event(shop, event_type="CREATED"),
        make_event(shop, event_type="UPDATED"),  # nobody subscribed
        make_event(shop, entity_name="items", event_type="CREATED"),
    )
    # A marker event for the other shop, produced last on the same partition: once it
    # arrives, everything before it has been handled.
    await world.produce(make_event(other))
    await other_shop_receiver.wait_for(1)
    await closed.wait_for(1)
    await created.wait_for(1)
    assert len(closed.requests) == 1
    assert closed.requests[0].json()["type"] == "CLOSED"
    assert len(created.requests) == 1
    assert created.requests[0].json()["type"] == "CREATED"
    assert len(other_shop_receiver.requests) == 1


async def test_new_webhook_gets_next_event_and_deleted_one_gets_nothing(world: World) -> None:
    """Webhook changes reach a running daemon at once, without a restart."""
    shop = world.shop
    first, second = await world.receivers(), await world.receivers()
    running = await world.start()

    webhook = await world.subscribe(first)
    async with asyncio.timeout(WAIT):
        while running.daemon.cache.get(webhook.id) is None:
            await asyncio.sleep(0.02)  # polling the cache with a deadline
    await world.produce(make_event(shop))
    await first.wait_for(1)

    await world.store.delete_webhook(shop.environment_id, webhook.id)
    replacement = await world.subscribe(second)
    async with asyncio.timeout(WAIT):
        while running.daemon.cache.get(replacement.id) is None:
            await asyncio.sleep(0.02)
    await world.produce(make_event(shop))
    await second.wait_for(1)
    assert len(first.requests) == 1


async def test_malformed_events_go_to_the_dead_letter_topic_with_the_reason(world: World) -> None:
    """Bad messages are dead-lettered with a reason header and the consumer moves on."""
    shop = world.shop
    await world.subscribe()
    await world.start()
    bad = [b"not json", b"[1, 2]", orjson.dumps({**make_event(shop), "event_id": "nope"})]
    for value in bad:
        await (await world.producer.send(world.topic, value))
    await world.produce(make_event(shop))
    await world.receiver.wait_for(1)

    got = await read_records(world.settings.dead_letter_topic, 3)
    assert [r.value for r in got] == bad
    reasons = [dict(r.headers)[REASON_HEADER].decode() for r in got]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "expected a JSON object, got list"
    assert reasons[2] == "'event_id' must be a UUID, got 'nope'"


async def test_hanging_endpoint_does_not_delay_another_shop(world: World) -> None:
    """While one endpoint hangs, another shop's events are delivered at once."""
    release = asyncio.Event()
    shop = world.shop
    slow = await world.receivers(responder=hanging_until(release))
    fast = await world.receivers()
    await world.subscribe(slow)
    other = await world.new_shop("fast-shop")
    await world.subscribe(fast, shop=other)
    settings = replace(world.settings, delivery_timeout_seconds=60.0)
    await world.start(settings)

    await world.produce(*[make_event(shop) for _ in range(20)])
    share = 2  # of the endpoint's 8 slots (DISPATCHER_WEBHOOK_SHARE_OF_ENDPOINT = 0.25)
    await slow.wait_for(share)  # its share is taken
    await world.produce(*[make_event(other) for _ in range(5)])
    await fast.wait_for(5, timeout=10)
    assert len(slow.requests) == share  # still hanging
    release.set()
    await slow.wait_for(20)


async def test_backlog_of_a_hanging_endpoint_is_deferred_not_queued_without_end(
    world: World,
) -> None:
    """Past its queue bound, a hanging webhook's new events go to the delay topic."""
    release = asyncio.Event()
    shop = world.shop
    slow = await world.receivers(responder=hanging_until(release))
    await world.subscribe(slow)
    settings = replace(world.settings, delivery_timeout_seconds=60.0, max_in_flight_per_endpoint=2)
    running = await world.start(settings)
    await world.produce(*[make_event(shop) for _ in range(8)])  # the bound: a share of 1 x 8
    await slow.wait_for(1)

    registry = running.daemon.metrics.registry
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_deliveries_total", {"outcome": "deferred"}):
            await world.produce(make_event(shop))
            await asyncio.sleep(0.2)  # the endpoint must hang for a second to count as slow
    assert len(slow.requests) == 1
    reason = {"reason": "webhook_backlog"}
    assert registry.get_sample_value(
        "webhook_deferrals_total", reason
    ) == registry.get_sample_value("webhook_deliveries_total", {"outcome": "deferred"})
    consumer = AIOKafkaConsumer(
        deferral_topic(settings), bootstrap_servers=KAFKA, auto_offset_reset="earliest",
        group_id=f"check-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    await consumer.start()
    try:
        async with asyncio.timeout(WAIT):
            record = await consumer.getone()
    finally:
        await consumer.stop()
    scheduled = orjson.loads(record.value)
    assert scheduled["n_retry"] == 0  # not an attempt: nRetry unchanged
    assert scheduled["last_failure"].startswith("deferred")
    release.set()


async def test_a_second_dispatcher_joining_mid_stream_loses_nothing_and_commits_all(
    world: World, new_topic: Callable[..., Awaitable[str]], kafka_admin: AIOKafkaAdminClient
) -> None:
    """A rebalance mid-stream: every event arrives, and the group commits every offset."""

    async def slowish(_request: web.Request, _n: int) -> web.StreamResponse:
        await asyncio.sleep(0.01)  # the endpoint takes 10 ms to answer
        return web.Response(status=200)

    receiver = await world.receivers(responder=slowish)
    shops = []
    for n in range(8):
        shop = await world.new_shop(f"rebalance-shop-{n}")
        await world.subscribe(receiver, shop=shop)
        shops.append(shop)
    topic = await new_topic("events", partitions=2)
    settings = replace(world.settings, event_topics=(topic,), max_in_flight=4)
    events = [make_event(shops[n % 8]) for n in range(300)]
    await world.produce(*events, topic=topic)

    first = await world.start(settings)
    await receiver.wait_for(20)
    second = await world.start(replace(settings, http_port=free_port()))  # rebalance
    wanted = {e["entity"]["uuid"] for e in events}
    async with asyncio.timeout(WAIT * 2):
        while not wanted <= {r.json()["entities"][0]["uuid"] for r in receiver.requests}:
            await receiver.wait_for(len(receiver.requests) + 1)
    assert second.daemon.workers[0].assigned.is_set()
    await first.stop()
    await second.stop()

    committed = await kafka_admin.list_consumer_group_offsets(settings.consumer_group)
    partitions = [TopicPartition(topic, p) for p in (0, 1)]
    end_offsets = {tp: await end_offset(tp) for tp in partitions}
    assert {tp: committed[tp].offset for tp in partitions} == end_offsets
