"""One record costs at most itself: events outside the catalog and bugs in our own code
never stop the consumer, and no log call can crash on structlog's reserved names."""

from __future__ import annotations

import ast
import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from structlog.testing import capture_logs

from dispatcher import sender
from dispatcher.deadletter import REASON_HEADER, SOURCE_HEADER
from dispatcher.notification import Notification
from dispatcher.settings import Settings
from dispatcher.store import Principal, Store
from tests.conftest import KAFKA, WAIT, Receiver, Running, make_event, produce, subscribe

ROOT = Path(__file__).resolve().parent.parent
StartDaemon = Callable[..., Awaitable[Running]]
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"}
LOG_METHODS |= {"log", "bind", "new", "adebug", "ainfo", "awarning", "aerror", "aexception"}


def test_no_log_call_passes_a_field_named_event() -> None:
    """No structlog call in our code passes ``event=`` (structlog's own positional name:
    such a call raises TypeError, even at a level that is filtered out)."""
    offenders = []
    for path in sorted([*ROOT.glob("dispatcher/*.py"), *ROOT.glob("tools/*.py"),
                        *ROOT.glob("bench/*.py")]):  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and any(k.arg == "event" for k in node.keywords)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_source_check_finds_an_offending_call() -> None:
    """The check above does see ``log.debug("x", event=...)`` (it can fail)."""
    tree = ast.parse('log.debug("event_outside_catalog", entity="stock", event="DELETED")')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert any(k.arg == "event" for c in calls for k in c.keywords)


async def metric(base_url: str, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{labels}}}" if labels else name):
            return float(value)
    return 0.0


async def wait_metric(base_url: str, name: str, labels: str, value: float) -> None:
    async with asyncio.timeout(WAIT):
        while await metric(base_url, name, labels) != value:
            await asyncio.sleep(0.05)  # polling /metrics with a deadline


async def dead_letters(topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        auto_offset_reset="earliest",
        group_id=f"check-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    got: list[Any] = []
    try:
        async with asyncio.timeout(WAIT):
            while len(got) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return got


async def test_events_outside_the_catalog_are_counted_and_skipped_between_good_ones(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
) -> None:
    """A known entity with an unknown event and an unknown entity, between good events:
    the good ones are delivered, the daemon keeps running, the two are counted."""
    await subscribe(store, shop, receiver)
    running = await start_daemon(replace(isolated_settings, log_level="DEBUG"))
    topic = isolated_settings.event_topics[0]
    good = [make_event(shop, entity={"id": i}) for i in range(3)]
    await produce(
        producer,
        topic,
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
    await produce(producer, topic, make_event(shop, entity={"id": 3}))  # still consuming
    assert (await receiver.wait_for(4))[-1].json()["entities"][0]["id"] == 3


async def test_an_exception_while_handling_a_record_costs_that_record_only(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug raising while one event is handled dead-letters that record with the reason
    ``internal: ...``, logs the traceback, counts it, and every other event goes out."""
    real = Notification.for_event

    def for_event(event: Any, webhook_id: uuid.UUID, **kwargs: Any) -> Any:
        if event.entity.get("id") == 666:
            raise RuntimeError("injected handler bug")
        return real(event, webhook_id, **kwargs)

    monkeypatch.setattr(Notification, "for_event", staticmethod(for_event))
    await subscribe(store, shop, receiver)
    running = await start_daemon(isolated_settings)
    topic = isolated_settings.event_topics[0]
    with capture_logs() as logs:
        await produce(
            producer,
            topic,
            make_event(shop, entity={"id": 1}),
            make_event(shop, entity={"id": 666}),
            make_event(shop, entity={"id": 2}),
        )
        got = await receiver.wait_for(2)
        (letter,) = await dead_letters(isolated_settings.dead_letter_topic, 1)
    assert sorted(r.json()["entities"][0]["id"] for r in got) == [1, 2]
    headers = dict(letter.headers)
    assert headers[REASON_HEADER] == b"internal: RuntimeError: injected handler bug"
    assert headers[SOURCE_HEADER] == f"{topic}/0/1".encode()
    failed = [entry for entry in logs if entry["event"] == "record_failed"]
    assert len(failed) == 1 and isinstance(failed[0]["exc_info"], RuntimeError)
    await wait_metric(running.base_url, "webhook_record_errors_total", 'consumer="dispatch"', 1)
    assert not running.task.done()


async def test_an_exception_in_a_delivery_costs_that_record_only(
    isolated_settings: Settings,
    start_daemon: StartDaemon,
    store: Store,
    shop: Principal,
    receiver: Receiver,
    producer: AIOKafkaProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug raising inside a delivery (after the record was taken) dead-letters that
    record; the consumer goes on and commits past it."""
    real = sender.Sender._attempt

    async def attempt(self: sender.Sender, webhook: Any, notification: Any, n: int) -> Any:
        if notification.entities[0].get("id") == 666:
            raise KeyError("injected delivery bug")
        return await real(self, webhook, notification, n)

    monkeypatch.setattr(sender.Sender, "_attempt", attempt)
    await subscribe(store, shop, receiver)
    running = await start_daemon(isolated_settings)
    topic = isolated_settings.event_topics[0]
    await produce(
        producer,
        topic,
        make_event(shop, entity={"id": 666}),
        make_event(shop, entity={"id": 1}),
    )
    (letter,) = await dead_letters(isolated_settings.dead_letter_topic, 1)
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
