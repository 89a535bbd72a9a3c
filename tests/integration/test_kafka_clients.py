"""The daemon's Kafka clients recover a cluster view that names only lost brokers.

aiokafka refreshes metadata from the brokers of its last metadata only (see
``dispatcher/kafka.py``). These tests give a client, against the stack's broker, the view
a client keeps after its brokers were lost (one broker that no longer exists), then
refresh it: the daemon's clients ask their bootstrap addresses, aiokafka's own do not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import BrokerMetadata

from dispatcher import kafka
from dispatcher.settings import Settings
from tests.integration.support import KAFKA, free_port

GONE = 4242  # the id of a broker that is no more


def settings() -> Settings:
    return Settings.from_env({"DISPATCHER_KAFKA_BOOTSTRAP": KAFKA})


def lose_every_broker(client: Any) -> None:
    """Make ``client`` (an AIOKafkaClient) believe the cluster is one broker, now gone."""
    client.cluster._brokers = {GONE: BrokerMetadata(GONE, "127.0.0.1", free_port(), None)}


def broker_ids(client: Any) -> set[int]:
    return {b.nodeId for b in client.cluster.brokers()}


async def test_a_refresh_asks_the_bootstrap_addresses_when_no_known_broker_answers(
    new_topic: Callable[..., Awaitable[str]],
) -> None:
    """The daemon's producer, knowing only a lost broker, learns the live ones at its next
    metadata refresh and produces again; aiokafka's own producer stays stuck."""
    topic = await new_topic("clients")
    ours = kafka.producer(settings())
    plain = AIOKafkaProducer(bootstrap_servers=KAFKA)
    await ours.start()
    await plain.start()
    try:
        live = broker_ids(ours.client)
        assert GONE not in live
        lose_every_broker(ours.client)
        lose_every_broker(plain.client)
        # False: not updated; aiokafka asks the brokers it knows, never its bootstrap list
        assert await plain.client.force_metadata_update() is False
        assert broker_ids(plain.client) == {GONE}
        assert await ours.client.force_metadata_update() is True
        assert broker_ids(ours.client) == live
        await ours.send_and_wait(topic, b"acked through the brokers learnt again")
    finally:
        await ours.stop()
        await plain.stop()


async def test_reset_replaces_a_stale_view_and_leaves_an_accurate_one() -> None:
    """:func:`kafka.reset` gives a client the metadata a new client would get when its own
    differs, and does nothing when it is already what a new client would see."""
    producer = kafka.producer(settings())
    await producer.start()
    try:
        live = broker_ids(producer.client)
        assert await kafka.reset(producer.client, "producer") is False
        lose_every_broker(producer.client)
        assert await kafka.reset(producer.client, "producer") is True
        assert broker_ids(producer.client) == live
    finally:
        await producer.stop()
