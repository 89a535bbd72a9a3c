"""Import batches on real Kafka: 80 entities at most, in order, movements left out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dispatcher.store import Principal
from tests.integration.support import World, make_event


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


async def test_import_of_200_items_arrives_as_80_80_40_in_order(world: World) -> None:
    """200 items of one import reach the webhook as three requests of 80, 80 and 40."""
    await world.subscribe(entity="items", event="CREATED")
    # A long linger: only the size and the end marker may close these batches.
    await world.start(replace(world.settings, import_linger_seconds=60))
    await world.produce(*import_events(world.shop, "imp-1", 200))

    requests = await world.receiver.wait_for(3)
    bodies = [r.json() for r in requests]
    assert [len(b["entities"]) for b in bodies] == [80, 80, 40]
    ids = [e["id"] for b in bodies for e in b["entities"]]
    assert ids == list(range(200))
    assert len({b["notification_uuid"] for b in bodies}) == 3
    assert all(b["type"] == "CREATED" and b["entity_name"] == "items" for b in bodies)


async def test_import_without_end_marker_is_flushed_after_the_linger(world: World) -> None:
    """A batch that never fills and never ends still goes out after the linger time."""
    await world.subscribe(entity="customers", event="CREATED")
    await world.start(replace(world.settings, import_linger_seconds=0.5))
    events = import_events(world.shop, "imp-2", 5, entity="customers", end=False)
    await world.produce(*events)
    (got,) = await world.receiver.wait_for(1)
    assert [e["id"] for e in got.json()["entities"]] == [0, 1, 2, 3, 4]


async def test_movements_from_imports_are_never_sent(world: World) -> None:
    """Stock, fidelity and prepaid movements of an import are dropped; live ones are sent."""
    shop, receiver = world.shop, world.receiver
    for entity in ("stock_movements", "fidelities_movements", "prepaid_movements"):
        await world.store.create_webhook(
            shop, url=receiver.url, entity_name=entity, event_type="CREATED", email="a@b.test"
        )
    running = await world.start()
    for entity in ("stock_movements", "fidelities_movements", "prepaid_movements"):
        await world.produce(*import_events(shop, f"imp-{entity}", 3, entity=entity))
    live = make_event(shop, entity_name="prepaid_movements", event_type="CREATED")
    await world.produce(live)  # after the imports, on the same partition

    (got,) = await receiver.wait_for(1)
    assert got.json()["entities"] == [live["entity"]]
    registry = running.daemon.metrics.registry
    skipped = {"reason": "import_skipped"}
    assert registry.get_sample_value("webhook_events_skipped_total", skipped) == 9


async def test_two_shops_importing_at_once_never_mix_entities(world: World) -> None:
    """Interleaved imports of two shops each arrive whole, to their own webhook only."""
    shop = world.shop
    other = await world.new_shop()
    mine, theirs = await world.receivers(), await world.receivers()
    for owner, target in ((shop, mine), (other, theirs)):
        await world.subscribe(target, "items", "CREATED", shop=owner)
    await world.start(replace(world.settings, import_linger_seconds=60))
    a = import_events(shop, "same-import-id", 100)
    b = import_events(other, "same-import-id", 100)
    interleaved = [e for pair in zip(a, b, strict=True) for e in pair]
    await world.produce(*interleaved)

    for target, owner in ((mine, shop), (theirs, other)):
        bodies = [r.json() for r in await target.wait_for(2)]
        assert [len(b["entities"]) for b in bodies] == [80, 20]
        assert {b["environment_id"] for b in bodies} == {owner.environment_id}
        assert [e["id"] for b in bodies for e in b["entities"]] == list(range(100))
