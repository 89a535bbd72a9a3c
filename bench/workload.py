"""The workload: subscriptions in PostgreSQL and events on Kafka.

Every entity carries what the receiver needs: ``phase`` (which scenario it belongs to),
``seq`` (to count distinct deliveries) and ``produced_at`` (``time.time()`` when it was
handed to the producer, for sub-millisecond latency; the event's ISO ``time`` field
holds the same moment at millisecond precision).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from msgspec.structs import replace

from dispatcher import events
from dispatcher.notices import Notice
from dispatcher.notification import Notification

SHOP_PREFIX = "bench-shop-"
IMPORT_SHOP = "bench-import-shop"
CLIENT_ID = "bench-pos"
ACK_CHUNK = 5_000  # acks awaited per chunk while bulk producing, to bound memory
PACING_TICK = 0.005  # seconds between two wake-ups of the paced producer

Message = tuple[bytes, bytes]  # key, value
MakeMessage = Callable[[int, float], Message]  # (seq, produced_at) -> message


def shop(i: int) -> str:
    return f"{SHOP_PREFIX}{i:06d}"


def iso_millis(moment: float) -> str:
    """``2026-01-01T10:00:00.123Z`` for a ``time.time()`` value."""
    whole = int(moment)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + (
        f".{int((moment - whole) * 1000):03d}Z"
    )


# --- subscriptions ------------------------------------------------------------------------


def _secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


async def insert_webhooks(
    database_url: str,
    shops: Iterable[str],
    *,
    entity_name: str,
    event_type: str,
    url_of: Callable[[str], str],
) -> int:
    """COPY one webhook per shop into ``webhooks``; the number of rows written."""
    rows = [
        (
            uuid.uuid4(),
            env,
            CLIENT_ID,
            entity_name,
            event_type,
            url_of(env),
            f"ops@{env}.example.com",
            _secret(),
        )
        for env in shops
    ]
    columns = ["id", "environment_id", "client_id", "entity_name", "event_type"]
    columns += ["url", "email", "secret"]
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        await conn.copy_records_to_table("webhooks", records=rows, columns=columns)
    finally:
        await conn.close()
    return len(rows)


async def count_webhooks(database_url: str) -> int:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM webhooks"))
    finally:
        await conn.close()


# --- events -------------------------------------------------------------------------------


def _event(
    env: str, entity_name: str, event_type: str, entity: dict[str, Any], now: float
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "entity_name": entity_name,
        "event_type": event_type,
        "environment_id": env,
        "client_id": CLIENT_ID,
        "from_user": "cashier@example.com",
        "time": iso_millis(now),
        "entity": entity,
        "import_id": None,
        "import_end": False,
    }


def sale(phase: str, shops: int) -> MakeMessage:
    """Closed sales of a realistic size, spread round-robin over ``shops`` shops."""

    def make(seq: int, now: float) -> Message:
        env = shop(seq % shops)
        entity = {
            "id": seq,
            "uuid": str(uuid.uuid4()),
            "phase": phase,
            "seq": seq,
            "produced_at": now,
            "number": f"T{seq:08d}",
            "final_amount": 23.4,
            "currency": "EUR",
            "table": 12,
            "lines": [
                {"item_id": 101, "name": "Espresso", "quantity": 2, "unit_price": 1.8},
                {"item_id": 202, "name": "Croissant", "quantity": 1, "unit_price": 2.2},
                {"item_id": 303, "name": "Club sandwich", "quantity": 1, "unit_price": 17.6},
            ],
        }
        value = orjson.dumps(_event(env, "sales", "CLOSED", entity, now))
        return env.encode(), value

    return make


def sales_of(shops: Sequence[str], phase_of: Callable[[str], str]) -> MakeMessage:
    """Closed sales spread round-robin over ``shops``, each in the phase ``phase_of`` gives
    its shop (so the receiver counts some shops apart)."""
    phases = [phase_of(s) for s in shops]
    makers = {phase: sale(phase, 1) for phase in set(phases)}

    def make(seq: int, now: float) -> Message:
        i = seq % len(shops)
        _, value = makers[phases[i]](seq, now)
        event = orjson.loads(value)
        event["environment_id"] = shops[i]
        return shops[i].encode(), orjson.dumps(event)

    return make


def import_item(import_id: str, total: int, *, phase: str = "import") -> MakeMessage:
    """Items of one import of ``total`` entities for :data:`IMPORT_SHOP`."""

    def make(seq: int, now: float) -> Message:
        entity = {
            "id": seq,
            "uuid": str(uuid.uuid4()),
            "phase": phase,
            "seq": seq,
            "produced_at": now,
            "name": f"Item {seq}",
            "sku": f"SKU-{seq:08d}",
            "price": 9.9,
            "vat_rate": 20.0,
            "category_id": 7,
        }
        event = _event(IMPORT_SHOP, "items", "CREATED", entity, now)
        event["import_id"] = import_id
        event["import_end"] = seq == total - 1
        return IMPORT_SHOP.encode(), orjson.dumps(event)

    return make


def notice(phase: str, domain: str, shops: int) -> MakeMessage:
    """Failure notices as the delivery path produces them (a failed first attempt of a
    closed sale, its ~640-byte request body quoted), to ``bench-<phase>@<domain>``."""
    body = sample_body(sale(phase, shops), phase).decode()

    def make(seq: int, now: float) -> Message:
        notification = str(uuid.uuid4())
        webhook = str(uuid.uuid4())
        record = Notice(
            notice_id=Notice.make_id(notification, 0),
            to=f"bench-{phase}@{domain}",
            webhook_id=webhook,
            url=f"https://hooks.example.com/hook/{shop(seq % shops)}",
            entity_name="sales",
            event_type="CLOSED",
            notification_uuid=notification,
            n_retry=0,
            max_retries=3,
            final=False,
            failed_at=iso_millis(now),
            error="HTTP 500 Internal Server Error",
            status=500,
            response_head="upstream database unavailable",
            next_attempt_at=iso_millis(now + 900),
            request_body=body,
        )
        return webhook.encode(), record.encode()

    return make


def sample_body(make: MakeMessage, phase: str) -> bytes:
    """The dispatcher's notification body for one event of ``make``, in ``phase``."""
    event = _in_phase(events.decode(make(0, time.time())[1]), phase)
    return Notification.for_event(event, uuid.uuid4()).body(0, datetime.now(UTC))


def batch_body(make: MakeMessage, phase: str, size: int) -> bytes:
    """The dispatcher's body for one import batch of ``size`` events of ``make``."""
    now = time.time()
    decoded = [_in_phase(events.decode(make(i, now)[1]), phase) for i in range(size)]
    notification = Notification.for_event(decoded[0], uuid.uuid4(), decoded)
    return notification.body(0, datetime.now(UTC))


def _in_phase(event: events.Event, phase: str) -> events.Event:
    return replace(event, entity_json=orjson.dumps({**event.entity, "phase": phase}))


# --- producing ----------------------------------------------------------------------------


def producer(bootstrap: str, *, linger_ms: int) -> AIOKafkaProducer:
    """A producer with broker acks (acks=all; one broker, so the same as acks=1)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
        client_id="bench",
    )


async def produce_bulk(kafka: AIOKafkaProducer, topic: str, make: MakeMessage, count: int) -> float:
    """Produce ``count`` messages as fast as possible; seconds until all were acked."""
    start = time.perf_counter()
    pending: list[asyncio.Future[Any]] = []
    for seq in range(count):
        key, value = make(seq, time.time())
        pending.append(await kafka.send(topic, value, key=key))
        if len(pending) >= ACK_CHUNK:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Paced:
    """How a paced production went."""

    sent: int
    seconds: float
    max_behind_ms: float  # worst lateness of a send against its scheduled moment

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


async def produce_paced(
    kafka: AIOKafkaProducer, topic: str, make: MakeMessage, *, rate: float, seconds: float
) -> Paced:
    """Produce at ``rate``/s for ``seconds`` on a fixed schedule (no cumulative drift).

    Message ``i`` is due at ``t0 + i / rate`` (loop time). The producer wakes up every
    :data:`PACING_TICK` seconds (or later, if late) and sends every message due by then,
    so a late wake-up catches up instead of shifting the rest. Each message's
    ``produced_at`` is the moment it is handed to the producer, not its due time.
    """
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    acks: list[asyncio.Future[Any]] = []
    behind = 0.0
    t0 = loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - t0) * rate) + 1)
        while sent < due:
            behind = max(behind, loop.time() - (t0 + sent / rate))
            key, value = make(sent, time.time())
            acks.append(await kafka.send(topic, value, key=key))
            sent += 1
        delay = max(PACING_TICK, t0 + sent / rate - loop.time())
        await asyncio.sleep(delay)  # the schedule's timer
    await asyncio.gather(*acks)
    return Paced(sent, loop.time() - t0, round(behind * 1000, 2))
