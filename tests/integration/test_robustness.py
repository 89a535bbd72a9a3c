"""One record costs at most itself: events outside the catalog and bugs in our own code
never stop the consumer (the check of the log calls' names is in tests/unit)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from dispatcher.attempts import Attempts
from dispatcher.deadletter import REASON_HEADER, SOURCE_HEADER
from dispatcher.notification import Notification
from tests.integration.support import WAIT, World, make_event, read_records, wait_metric


async def test_events_outside_the_catalog_are_counted_and_skipped_between_good_ones(
    world: World,
) -> None:
    """A known entity with an unknown event and an unknown entity, between good events:
    the good ones are delivered, the daemon keeps running, the two are counted."""
    shop, receiver = world.shop, world.receiver
    await world.subscribe()
    running = await world.start(replace(world.settings, log_level="DEBUG"))
    good = [make_event(shop, entity={"id": i}) for i in range(3)]
    await world.produce(
        good[0],
        make_event(shop, entity_name="stock", event_type="DELETED"),
        good[1],
        make_event(shop, entity_name="widgets", event_type="CREATED"),
        good[2],
    )
    got = await receiver.wait_for(3)
    assert sorted(r.json()["entities"][0]["id"] for r in got) == [0, 1, 2]
    base = running.base_url
    await wait_metric(base, "webhook_events_skipped_total", 'reason="outside_catalog"', 2)
    assert not running.task.done()
    await world.produce(make_event(shop, entity={"id": 3}))  # still consuming
    assert (await receiver.wait_for(4))[-1].json()["entities"][0]["id"] == 3


async def test_an_exception_while_handling_a_record_costs_that_record_only(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raising while one event is handled dead-letters that record with the reason
    ``internal: ...``, logs the traceback, counts it, and every other event goes out."""
    real = Notification.for_event

    def for_event(event: Any, webhook_id: uuid.UUID, **kwargs: Any) -> Any:
        if event.entity.get("id") == 666:
            raise RuntimeError("injected handler bug")
        return real(event, webhook_id, **kwargs)

    monkeypatch.setattr(Notification, "for_event", staticmethod(for_event))
    shop, receiver, topic = world.shop, world.receiver, world.topic
    await world.subscribe()
    running = await world.start()
    with capture_logs() as logs:
        await world.produce(
            make_event(shop, entity={"id": 1}),
            make_event(shop, entity={"id": 666}),
            make_event(shop, entity={"id": 2}),
        )
        got = await receiver.wait_for(2)
        (letter,) = await read_records(world.settings.dead_letter_topic, 1)
    assert sorted(r.json()["entities"][0]["id"] for r in got) == [1, 2]
    headers = dict(letter.headers)
    assert headers[REASON_HEADER] == b"internal: RuntimeError: injected handler bug"
    assert headers[SOURCE_HEADER] == f"{topic}/0/1".encode()
    failed = [entry for entry in logs if entry["event"] == "record_failed"]
    assert len(failed) == 1 and isinstance(failed[0]["exc_info"], RuntimeError)
    await wait_metric(running.base_url, "webhook_record_errors_total", 'consumer="dispatch"', 1)
    assert not running.task.done()


async def test_an_exception_in_a_delivery_costs_that_record_only(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raising inside a delivery (after the record was taken) dead-letters that
    record; the consumer goes on and commits past it."""
    real = Attempts._attempt

    async def attempt(self: Attempts, webhook: Any, notification: Any, *args: Any) -> Any:
        if notification.entity_ids == ("666",):
            raise KeyError("injected delivery bug")
        return await real(self, webhook, notification, *args)

    monkeypatch.setattr(Attempts, "_attempt", attempt)
    shop, receiver = world.shop, world.receiver
    await world.subscribe()
    running = await world.start()
    await world.produce(
        make_event(shop, entity={"id": 666}),
        make_event(shop, entity={"id": 1}),
    )
    (letter,) = await read_records(world.settings.dead_letter_topic, 1)
    assert dict(letter.headers)[REASON_HEADER] == b"internal: KeyError: 'injected delivery bug'"
    assert (await receiver.wait_for(1))[0].json()["entities"][0]["id"] == 1
    await wait_metric(running.base_url, "webhook_record_errors_total", 'consumer="dispatch"', 1)
    worker = running.daemon.event_worker
    assert worker is not None
    async with asyncio.timeout(WAIT):  # both offsets finish, so both commit
        while True:
            committed = await worker.consumer.committed(next(iter(worker.consumer.assignment())))
            if committed == 2:
                break
            await asyncio.sleep(0.05)  # polling the committed offset with a deadline
