"""Import batches on real Kafka: 80 entities at most, in order, movements left out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaProducer

from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.conftest import Receiver, Running, make_event, new_shop, produce, subscribe

StartDaemon = Callable[..., Awaitable[Running]]
MakeReceiver = Callable[..., Awaitable[Receiver]]


def import_events(
    shop: Principal, import_id: str, count: int, *, entity: str = "items", end: bool = True
) -> list[dict[str, Any]]:
    return [
        make_event(
            shop,
            entity_name=entity,
            event_type="CREATED",
            entity={"id": i, "name": f"{entity} {i}"},
            import_id=import_id,
            import_end=end and i == count - 1,
        )
        for i in range(count)
    ]


async def test_import_of_200_items_arrives_as_80_80_40_in_order(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """200 items of one import reach the webhook as three requests of 80, 80 and 40."""
    await subscribe(store, shop, receiver, "items", "CREATED")
    # A long linger: only the size and the end marker may close these batches.
    await start_daemon(replace(isolated_settings, import_linger_seconds=60))
    await produce(producer, isolated_settings.event_topics[0], *import_events(shop, "imp-1", 200))

    requests = await receiver.wait_for(3)
    bodies = [r.json() for r in requests]
    assert [len(b["entities"]) for b in bodies] == [80, 80, 40]
    ids = [e["id"] for b in bodies for e in b["entities"]]
    assert ids == list(range(200))
    assert len({b["notification_uuid"] for b in bodies}) == 3
    assert all(b["type"] == "CREATED" and b["entity_name"] == "items" for b in bodies)


async def test_import_without_end_marker_is_flushed_after_the_linger(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """A batch that never fills and never ends still goes out after the linger time."""
    await subscribe(store, shop, receiver, "customers", "CREATED")
    await start_daemon(replace(isolated_settings, import_linger_seconds=0.5))
    events = import_events(shop, "imp-2", 5, entity="customers", end=False)
    await produce(producer, isolated_settings.event_topics[0], *events)
    (got,) = await receiver.wait_for(1)
    assert [e["id"] for e in got.json()["entities"]] == [0, 1, 2, 3, 4]


async def test_movements_from_imports_are_never_sent(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """Stock, fidelity and prepaid movements of an import are dropped; live ones are sent."""
    for entity in ("stock_movements", "fidelities_movements", "prepaid_movements"):
        await store.create_webhook(
            shop, url=receiver.url, entity_name=entity, event_type="CREATED", email="a@b.test"
        )
    running = await start_daemon(isolated_settings)
    topic = isolated_settings.event_topics[0]
    for entity in ("stock_movements", "fidelities_movements", "prepaid_movements"):
        await produce(producer, topic, *import_events(shop, f"imp-{entity}", 3, entity=entity))
    live = make_event(shop, entity_name="prepaid_movements", event_type="CREATED")
    await produce(producer, topic, live)  # after the imports, on the same partition

    (got,) = await receiver.wait_for(1)
    assert got.json()["entities"] == [live["entity"]]
    worker = running.daemon.workers[0]
    assert worker.counts["import_skipped"] == 9  # type: ignore[attr-defined]


async def test_two_shops_importing_at_once_never_mix_entities(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver_factory: MakeReceiver,
    producer: AIOKafkaProducer,
) -> None:
    """Interleaved imports of two shops each arrive whole, to their own webhook only."""
    other = await new_shop(store)
    mine, theirs = await receiver_factory(), await receiver_factory()
    for owner, target in ((shop, mine), (other, theirs)):
        await subscribe(store, owner, target, "items", "CREATED")
    await start_daemon(replace(isolated_settings, import_linger_seconds=60))
    a = import_events(shop, "same-import-id", 100)
    b = import_events(other, "same-import-id", 100)
    interleaved = [e for pair in zip(a, b, strict=True) for e in pair]
    await produce(producer, isolated_settings.event_topics[0], *interleaved)

    for target, owner in ((mine, shop), (theirs, other)):
        bodies = [r.json() for r in await target.wait_for(2)]
        assert [len(b["entities"]) for b in bodies] == [80, 20]
        assert {b["environment_id"] for b in bodies} == {owner.environment_id}
        assert [e["id"] for b in bodies for e in b["entities"]] == list(range(100))
