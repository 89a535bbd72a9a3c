"""The import batcher's bookkeeping, with a recording stand-in for the attempts."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import orjson

from dispatcher.attempts import Attempts
from dispatcher.events import Event
from dispatcher.imports import ImportBatcher
from dispatcher.notification import Notification
from dispatcher.store import Webhook


class RecordingAttempts:
    """Stands in for :class:`Attempts`: records each notification it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def make(self, webhook: Webhook, notification: Notification, n_retry: int) -> Any:
        self.sent.append(notification)


def webhook(shop: str) -> Webhook:
    return Webhook(
        uuid.uuid4(), shop, "app", "items", "CREATED", "https://example.com/h", "a@b.test",
        "whsec_AAAA", datetime.now(UTC),
    )  # fmt: skip


def event(shop: str, import_id: str, n: int) -> Event:
    return Event(
        str(uuid.uuid4()), "items", "CREATED", shop, "app", None, "2026-01-01T00:00:00Z",
        orjson.dumps({"id": n}), str(n), import_id,
    )  # fmt: skip


async def test_batches_never_exceed_the_size_and_keep_the_order() -> None:
    """Seven entities with a size of three go out as 3, 3 and 1, in order."""
    sender = RecordingAttempts()
    batcher = ImportBatcher(cast(Attempts, sender), batch_size=3, linger=60, max_open=10)
    hook = webhook("s1")
    futures = [batcher.add(event("s1", "i", n), hook) for n in range(7)]
    batcher.end("s1", "i")
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    sent = [[e["id"] for e in orjson.loads(n.body(0, 0.0))["entities"]] for n in sender.sent]
    assert sent == [[0, 1, 2], [3, 4, 5], [6]]
    assert [n.entity_ids for n in sender.sent] == [("0", "1", "2"), ("3", "4", "5"), ("6",)]
    assert len(batcher) == 0


async def test_too_many_open_batches_flush_the_least_recently_fed_first() -> None:
    """Past the cap, the batch fed longest ago goes out early; memory stays bounded."""
    sender = RecordingAttempts()
    batcher = ImportBatcher(cast(Attempts, sender), batch_size=80, linger=60, max_open=2)
    hooks = {shop: webhook(shop) for shop in ("a", "b", "c")}
    first = batcher.add(event("a", "i", 0), hooks["a"])
    second = batcher.add(event("b", "i", 0), hooks["b"])
    batcher.add(event("a", "i", 1), hooks["a"])  # "a" is now the most recently fed
    batcher.add(event("c", "i", 0), hooks["c"])  # a third batch: "b" must go
    await asyncio.wait_for(second, 5)
    assert [n.environment_id for n in sender.sent] == ["b"]
    assert len(batcher) == 2
    assert not first.done()
    batcher.flush_all()
    await asyncio.wait_for(first, 5)
    assert sorted(n.environment_id for n in sender.sent) == ["a", "b", "c"]
