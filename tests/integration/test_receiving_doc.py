"""The Python example of docs/receiving.md verifies real deliveries of a running daemon:
the SUBSCRIBED test message and a notification, with the secret the API answers, and
refuses a tampered body or another secret."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from tests.integration.support import ROOT, Received, World, make_event, new_shop_with_token

GUIDE = ROOT / "docs" / "receiving.md"
MARKER = "<!-- tested-example: python -->"


def example() -> dict[str, Any]:
    """The names the guide's tested example defines, after running it."""
    text = GUIDE.read_text()
    assert MARKER in text, f"{GUIDE.name} lost its tested example"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert match, f"no ```python block right after {MARKER}"
    namespace: dict[str, Any] = {"__name__": "receiving_example"}
    exec(compile(match.group(1), str(GUIDE), "exec"), namespace)  # noqa: S102 - our own doc
    return namespace


async def test_the_guides_example_verifies_a_real_delivery(world: World) -> None:
    """handle() answers 200 to a real SUBSCRIBED message and notification (processing the
    notification once, even delivered twice), and 401 to a tampered one or another secret."""
    receiver = world.receiver
    shop, token = await new_shop_with_token(world.store)
    running = await world.start()
    auth = {"Authorization": f"Bearer {token}"}
    create = {"url": receiver.url, "entity_name": "sales", "event_type": "closed"}
    async with aiohttp.ClientSession(running.base_url, headers=auth) as session:
        async with session.post("/webhooks", json={**create, "email": "dev@shop.test"}) as r:
            assert r.status == 201, await r.text()
            webhook_id = (await r.json())["id"]
        async with session.get(f"/webhooks/{webhook_id}/secret") as r:
            assert r.status == 200
            secret = (await r.json())["secret"]
    event = make_event(shop)
    await world.produce(event)
    subscribed, delivered = await receiver.wait_for(2)
    assert subscribed.json()["type"] == "SUBSCRIBED"

    names = example()
    processed: list[tuple[str, str, dict[str, Any]]] = []
    names["process"] = lambda *args: processed.append(args)  # the example's own work, seen
    handle = names["handle"]

    def answer(got: Received, key: str = secret, body: bytes | None = None) -> int:
        status: int = handle(key, got.headers, got.body if body is None else body)
        return status

    assert answer(subscribed) == 200
    assert answer(delivered) == 200
    assert processed == [("sales", "CLOSED", event["entity"])]
    assert answer(delivered) == 200  # the same notification again: not processed twice
    assert len(processed) == 1
    tampered = delivered.body.replace(b'"nRetry":0', b'"nRetry":1')
    assert tampered != delivered.body
    assert answer(delivered, body=tampered) == 401
    other = "whsec_" + "A" * 43 + "="
    assert answer(delivered, key=other) == 401
    assert answer(subscribed, key=other) == 200  # its secret comes only after it
    assert len(processed) == 1
