"""The dispatch pipeline end to end: real Kafka, PostgreSQL and HTTPS receivers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from standardwebhooks.webhooks import Webhook as StandardWebhook

from dispatcher.deadletter import REASON_HEADER
from dispatcher.notification import notification_uuid
from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.conftest import (
    KAFKA,
    WAIT,
    Receiver,
    Running,
    free_port,
    hanging_until,
    make_event,
    new_shop,
    produce,
    subscribe,
)

StartDaemon = Callable[..., Awaitable[Running]]
MakeReceiver = Callable[..., Awaitable[Receiver]]


async def test_matching_event_is_posted_with_the_documented_envelope_and_signature(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """An event matching a webhook arrives once, as the domain's envelope, signed."""
    webhook = await subscribe(store, shop, receiver)
    await start_daemon(isolated_settings)
    event = make_event(shop)
    await produce(producer, isolated_settings.event_topics[0], event)

    (got,) = await receiver.wait_for(1)
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


async def test_events_match_by_shop_entity_and_event_type(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
) -> None:
    """Only the webhook of the event's own shop and (entity, event) receives it."""
    closed, created = await receiver_factory(), await receiver_factory()
    other_shop_receiver = await receiver_factory()
    await subscribe(store, shop, closed, "sales", "CLOSED")
    await subscribe(store, shop, created, "sales", "CREATED")
    other = await new_shop(store, "another-shop")
    await subscribe(store, other, other_shop_receiver, "sales", "CLOSED")
    await start_daemon(isolated_settings)

    topic = isolated_settings.event_topics[0]
    await produce(
        producer,
        topic,
        make_event(shop, event_type="closed"),  # any case on input
        make_event(shop, event_type="CREATED"),
        make_event(shop, event_type="UPDATED"),  # nobody subscribed
        make_event(shop, entity_name="items", event_type="CREATED"),
    )
    # A marker event for the other shop, produced last on the same partition: once it
    # arrives, everything before it has been handled.
    await produce(producer, topic, make_event(other))
    await other_shop_receiver.wait_for(1)
    await closed.wait_for(1)
    await created.wait_for(1)
    assert len(closed.requests) == 1
    assert closed.requests[0].json()["type"] == "CLOSED"
    assert len(created.requests) == 1
    assert created.requests[0].json()["type"] == "CREATED"
    assert len(other_shop_receiver.requests) == 1


async def test_new_webhook_gets_next_event_and_deleted_one_gets_nothing(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
) -> None:
    """Webhook changes reach a running daemon at once, without a restart."""
    first, second = await receiver_factory(), await receiver_factory()
    running = await start_daemon(isolated_settings)
    topic = isolated_settings.event_topics[0]

    webhook = await subscribe(store, shop, first)
    async with asyncio.timeout(WAIT):
        while running.daemon.cache.get(webhook.id) is None:
            await asyncio.sleep(0.02)  # polling the cache with a deadline
    await produce(producer, topic, make_event(shop))
    await first.wait_for(1)

    await store.delete_webhook(shop.environment_id, webhook.id)
    replacement = await subscribe(store, shop, second)
    async with asyncio.timeout(WAIT):
        while running.daemon.cache.get(replacement.id) is None:
            await asyncio.sleep(0.02)
    await produce(producer, topic, make_event(shop))
    await second.wait_for(1)
    assert len(first.requests) == 1


async def test_malformed_events_go_to_the_dead_letter_topic_with_the_reason(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """Bad messages are dead-lettered with a reason header and the consumer moves on."""
    await subscribe(store, shop, receiver)
    await start_daemon(isolated_settings)
    topic = isolated_settings.event_topics[0]
    bad = [b"not json", b"[1, 2]", orjson.dumps({**make_event(shop), "event_id": "nope"})]
    for value in bad:
        await (await producer.send(topic, value))
    await produce(producer, topic, make_event(shop))
    await receiver.wait_for(1)

    consumer = AIOKafkaConsumer(
        isolated_settings.dead_letter_topic,
        bootstrap_servers=KAFKA,
        auto_offset_reset="earliest",
        group_id=f"check-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    try:
        got: list[Any] = []
        async with asyncio.timeout(WAIT):
            while len(got) < 3:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    got.extend(records)
    finally:
        await consumer.stop()
    assert [r.value for r in got] == bad
    reasons = [dict(r.headers)[REASON_HEADER].decode() for r in got]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "expected a JSON object, got list"
    assert reasons[2] == "'event_id' must be a UUID, got 'nope'"


async def test_hanging_endpoint_does_not_delay_another_shop(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
) -> None:
    """While one endpoint hangs, another shop's events are delivered at once."""
    release = asyncio.Event()
    slow = await receiver_factory(responder=hanging_until(release))
    fast = await receiver_factory()
    await subscribe(store, shop, slow)
    other = await new_shop(store, "fast-shop")
    await subscribe(store, other, fast)
    settings = replace(isolated_settings, delivery_timeout_seconds=60.0)
    await start_daemon(settings)
    topic = settings.event_topics[0]

    await produce(producer, topic, *[make_event(shop) for _ in range(20)])
    await slow.wait_for(settings.max_in_flight_per_endpoint)  # its slots are all taken
    await produce(producer, topic, *[make_event(other) for _ in range(5)])
    await fast.wait_for(5, timeout=10)
    assert len(slow.requests) == settings.max_in_flight_per_endpoint  # still hanging
    release.set()
    await slow.wait_for(20)


async def test_backlog_of_a_hanging_endpoint_is_deferred_not_queued_without_end(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
) -> None:
    """Past its queue bound, a hanging endpoint's new events go to the delay topic."""
    release = asyncio.Event()
    slow = await receiver_factory(responder=hanging_until(release))
    await subscribe(store, shop, slow)
    settings = replace(
        isolated_settings, delivery_timeout_seconds=60.0, max_in_flight_per_endpoint=2
    )
    running = await start_daemon(settings)
    topic = settings.event_topics[0]
    await produce(producer, topic, *[make_event(shop) for _ in range(16)])  # the bound: 2 x 8
    await slow.wait_for(2)

    registry = running.daemon.metrics.registry
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_deliveries_total", {"outcome": "deferred"}):
            await produce(producer, topic, make_event(shop))
            await asyncio.sleep(0.2)  # the endpoint must hang for a second to count as slow
    assert len(slow.requests) == 2
    consumer = AIOKafkaConsumer(
        settings.retry_topic, bootstrap_servers=KAFKA, auto_offset_reset="earliest",
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
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
    new_topic: Callable[..., Awaitable[str]],
    kafka_admin: AIOKafkaAdminClient,
) -> None:
    """A rebalance mid-stream: every event arrives, and the group commits every offset."""

    async def slowish(_request: web.Request, _n: int) -> web.StreamResponse:
        await asyncio.sleep(0.01)  # the endpoint takes 10 ms to answer
        return web.Response(status=200)

    receiver = await receiver_factory(responder=slowish)
    shops = []
    for n in range(8):
        shop = await new_shop(store, f"rebalance-shop-{n}")
        await subscribe(store, shop, receiver)
        shops.append(shop)
    topic = await new_topic("events", partitions=2)
    settings = replace(isolated_settings, event_topics=(topic,), max_in_flight=4)
    events = [make_event(shops[n % 8]) for n in range(300)]
    await produce(producer, topic, *events)

    first = await start_daemon(settings)
    await receiver.wait_for(20)
    second = await start_daemon(replace(settings, http_port=free_port()))  # rebalance
    wanted = {e["entity"]["uuid"] for e in events}
    async with asyncio.timeout(WAIT * 2):
        while not wanted <= {r.json()["entities"][0]["uuid"] for r in receiver.requests}:
            await receiver.wait_for(len(receiver.requests) + 1)
    assert second.daemon.workers[0].assigned.is_set()
    await first.stop()
    await second.stop()

    committed = await kafka_admin.list_consumer_group_offsets(settings.consumer_group)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in (0, 1)]
        end_offsets = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    assert {tp: committed[tp].offset for tp in partitions} == end_offsets
