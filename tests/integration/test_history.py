"""The delivery history on the real stack: every attempt recorded (off the delivery path,
through the attempt topic and the recorder) and shown by the API.

The recorder writes asynchronously: tests poll the API with a deadline until the rows
they expect are there, never sleep for them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from dispatcher.client import Outcome
from dispatcher.history import FIELDS, AttemptRecord, History, partition_name, row_values
from dispatcher.notification import Notification
from dispatcher.store import Principal, Store, Webhook
from tests.integration.support import (
    WAIT,
    Mailbox,
    Received,
    Running,
    World,
    make_event,
    metric,
    needs_own_stack,
    stack,
)
from tests.integration.test_api import Reply, check_against_doc, load_openapi
from tests.unit.test_attempt_records import array, legacy, obj

OPENAPI = load_openapi()
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ATTEMPT_FIELDS = {
    "id", "webhook_id", "notification_uuid", "nRetry", "attempted_at", "duration_ms",
    "outcome", "status", "error", "entity_ids", "trigger",
}  # fmt: skip
HEALTH_FIELDS = {
    "last_attempt_at", "last_success_at", "last_failure_at", "consecutive_failures", "state",
    "disabled_at", "disabled_reason",
}  # fmt: skip
FAILURE_TEXT = "database on fire"
LONG_BODY = FAILURE_TEXT + " " + "x" * 10_000  # more than the 4 KiB excerpt kept


# --- the API as an integrator calls it ------------------------------------------------


@dataclass(frozen=True)
class Integrator:
    """A shop's integrator calling the running daemon's API with its token; every answer
    is checked against the OpenAPI document (its status documented, its body valid)."""

    base_url: str
    token: str

    async def get(self, path: str, **params: str | int) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        query = {k: str(v) for k, v in params.items()}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.base_url + path, headers=headers, params=query) as response,
        ):
            assert response.content_type == "application/json"
            body = orjson.loads(await response.read())
            reply = Reply(response.status, response.headers, body)
        check_against_doc(OPENAPI, "GET", path, reply)  # the outage's 503 included
        return response.status, body

    async def page(self, webhook_id: uuid.UUID, **params: str | int) -> dict[str, Any]:
        status, body = await self.get(f"/webhooks/{webhook_id}/attempts", **params)
        assert status == 200, body
        assert set(body) == {"results", "next_cursor"}
        return dict(body)

    async def all_attempts(self, webhook_id: uuid.UUID, **params: str | int) -> list[Any]:
        """Every attempt of the listing, following ``next_cursor`` to the end."""
        got: list[Any] = []
        cursor: str | None = None
        while True:
            extra = {} if cursor is None else {"cursor": cursor}
            body = await self.page(webhook_id, limit=250, **params, **extra)
            got += body["results"]
            cursor = body["next_cursor"]
            if cursor is None:
                return got

    async def wait_attempts(
        self, webhook_id: uuid.UUID, count: int, timeout: float = WAIT, **params: str | int
    ) -> list[Any]:
        """Poll the listing until it has at least ``count`` attempts; fail after ``timeout``."""
        async with asyncio.timeout(timeout):
            while len(got := await self.all_attempts(webhook_id, **params)) < count:
                await asyncio.sleep(0.1)  # polling the API with a deadline: the recorder is async
        return got

    async def attempt(self, webhook_id: uuid.UUID, attempt_id: str) -> dict[str, Any]:
        status, body = await self.get(f"/webhooks/{webhook_id}/attempts/{attempt_id}")
        assert status == 200, body
        assert set(body) == ATTEMPT_FIELDS | {"request_body", "response_body"}
        return dict(body)

    async def health(self, webhook_id: uuid.UUID) -> dict[str, Any]:
        status, body = await self.get(f"/webhooks/{webhook_id}")
        assert status == 200, body
        health: dict[str, Any] = body["health"]
        assert set(health) == HEALTH_FIELDS
        return health


async def integrator(store: Store, shop: Principal, running: Running) -> Integrator:
    _, token = await store.issue_token(shop.environment_id, shop.client_id)
    return Integrator(running.base_url, token)


def failing(status: int = 500, body: str = LONG_BODY) -> Any:
    """A responder that always answers ``status`` with ``body``."""

    async def respond(_request: web.Request, _n: int) -> web.Response:
        return web.Response(status=status, text=body)

    return respond


def check_shape(attempt: dict[str, Any], webhook: Webhook) -> None:
    """The names and types of an attempt in the API's JSON."""
    assert set(attempt) >= ATTEMPT_FIELDS
    uuid.UUID(attempt["id"])
    assert attempt["webhook_id"] == str(webhook.id)
    uuid.UUID(attempt["notification_uuid"])
    assert ISO_MS.fullmatch(attempt["attempted_at"]), attempt["attempted_at"]
    assert isinstance(attempt["duration_ms"], int | float) and attempt["duration_ms"] >= 0
    assert attempt["outcome"] in ("delivered", "http", "timeout", "connection", "tls", "blocked")
    assert attempt["status"] is None or isinstance(attempt["status"], int)
    assert attempt["error"] is None or isinstance(attempt["error"], str)
    assert all(isinstance(i, str) for i in attempt["entity_ids"])
    assert attempt["trigger"] in ("scheduled", "retry", "subscribe", "manual", "recovery")


def by_retry(requests: list[Received]) -> dict[int, bytes]:
    return {r.json()["nRetry"]: r.body for r in requests}


@pytest.fixture
def retry_world(world: World, mailbox: Mailbox) -> World:
    """This test's world with 1 s retry delays (3 retries) and its own SMTP server."""
    settings = replace(
        world.settings,
        retry_delay_seconds=1.0,
        max_retries=3,
        smtp_host=mailbox.host,
        smtp_port=mailbox.port,
    )
    return replace(world, settings=settings)


# --- what is recorded -------------------------------------------------------------------


async def test_a_delivered_event_appears_with_its_fields_and_makes_the_webhook_healthy(
    world: World,
) -> None:
    """A delivered event is one `delivered` attempt with every field, no bodies, and health."""
    webhook = await world.subscribe()
    running = await world.start()
    api = await integrator(world.store, world.shop, running)
    assert await api.health(webhook.id) == {
        "last_attempt_at": None, "last_success_at": None, "last_failure_at": None,
        "consecutive_failures": 0, "state": "unknown", "disabled_at": None,
        "disabled_reason": None,
    }  # fmt: skip
    before = datetime.now(UTC) - timedelta(seconds=1)
    await world.produce(make_event(world.shop, entity={"id": 42, "uuid": str(uuid.uuid4())}))
    (received,) = await world.receiver.wait_for(1)

    (attempt,) = await api.wait_attempts(webhook.id, 1)
    check_shape(attempt, webhook)
    assert set(attempt) == ATTEMPT_FIELDS
    assert attempt["notification_uuid"] == received.json()["notification_uuid"]
    assert attempt["nRetry"] == 0
    assert (attempt["outcome"], attempt["status"], attempt["error"]) == ("delivered", 200, None)
    assert attempt["entity_ids"] == ["42"]
    assert attempt["trigger"] == "scheduled"
    at = datetime.fromisoformat(attempt["attempted_at"])
    assert before <= at <= datetime.now(UTC)

    one = await api.attempt(webhook.id, attempt["id"])
    assert one == {**attempt, "request_body": None, "response_body": None}
    assert await api.health(webhook.id) == {
        "last_attempt_at": attempt["attempted_at"], "last_success_at": attempt["attempted_at"],
        "last_failure_at": None, "consecutive_failures": 0, "state": "healthy",
        "disabled_at": None, "disabled_reason": None,
    }  # fmt: skip


async def test_the_subscribed_test_of_a_create_is_a_subscribe_attempt(world: World) -> None:
    """Creating a webhook through the API records its SUBSCRIBED test as a `subscribe` attempt."""
    running = await world.start()
    api = await integrator(world.store, world.shop, running)
    sub = {"url": world.receiver.url, "entity_name": "sales", "event_type": "CLOSED"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            running.base_url + "/webhooks",
            json={**sub, "email": "dev@shop.test"},
            headers={"Authorization": f"Bearer {api.token}"},
        ) as answer,
    ):
        assert answer.status == 201, await answer.text()
        webhook_id = uuid.UUID((await answer.json())["id"])
    (test_message,) = world.receiver.requests

    (attempt,) = await api.wait_attempts(webhook_id, 1)
    assert attempt["trigger"] == "subscribe"
    assert (attempt["outcome"], attempt["status"], attempt["nRetry"]) == ("delivered", 200, 0)
    assert attempt["entity_ids"] == []
    assert attempt["notification_uuid"] == test_message.headers["webhook-id"]
    assert (await api.health(webhook_id))["state"] == "healthy"


async def test_a_failed_event_and_its_retries_keep_the_bodies_and_never_the_secret(
    retry_world: World,
) -> None:
    """An always-failing event gives 4 attempts (nRetry 0..3, one notification_uuid), each
    with the request body sent and the first 4 KiB of the response, and a failing health."""
    receiver = await retry_world.receivers(responder=failing())
    webhook = await retry_world.subscribe(receiver)
    running = await retry_world.start()
    api = await integrator(retry_world.store, retry_world.shop, running)
    await retry_world.produce(make_event(retry_world.shop, entity={"id": 7, "uuid": "u-7"}))
    sent = by_retry(await receiver.wait_for(4))

    attempts = await api.wait_attempts(webhook.id, 4)
    assert len(attempts) == 4
    assert [a["nRetry"] for a in attempts] == [3, 2, 1, 0]  # newest first
    assert len({a["notification_uuid"] for a in attempts}) == 1
    assert [a["trigger"] for a in attempts] == ["retry", "retry", "retry", "scheduled"]
    for attempt in attempts:
        check_shape(attempt, webhook)
        assert (attempt["outcome"], attempt["status"]) == ("http", 500)
        assert attempt["error"], attempt
        assert attempt["entity_ids"] == ["7"]
        one = await api.attempt(webhook.id, attempt["id"])
        assert one["request_body"] == sent[attempt["nRetry"]].decode()  # resendable as is
        assert one["response_body"] == LONG_BODY[:4096]
        assert webhook.secret not in orjson.dumps(one).decode()
        assert "v1," not in one["request_body"]  # never a signature
    health = await api.health(webhook.id)
    assert health["state"] == "failing"
    assert health["consecutive_failures"] == 4
    assert health["last_success_at"] is None
    assert health["last_failure_at"] == health["last_attempt_at"] == attempts[0]["attempted_at"]


async def test_an_import_batch_records_all_its_entity_ids(world: World) -> None:
    """Each import batch is one attempt carrying every entity id of the batch."""
    webhook = await world.subscribe(entity="items", event="CREATED")
    running = await world.start(replace(world.settings, import_linger_seconds=60))
    api = await integrator(world.store, world.shop, running)
    events = [
        make_event(
            world.shop, entity_name="items", event_type="CREATED", entity={"id": i},
            import_id="imp-history", import_end=i == 99,
        )
        for i in range(100)
    ]  # fmt: skip
    await world.produce(*events)
    await world.receiver.wait_for(2)

    attempts = await api.wait_attempts(webhook.id, 2)
    assert sorted(len(a["entity_ids"]) for a in attempts) == [20, 80]
    ids = sorted((a["entity_ids"] for a in attempts), key=len, reverse=True)
    assert ids == [[str(i) for i in range(80)], [str(i) for i in range(80, 100)]]
    assert {a["outcome"] for a in attempts} == {"delivered"}
    (second,) = (await api.page(webhook.id, entity_id="85"))["results"]
    assert second["entity_ids"][0] == "80"


# --- the listing: filters and paging ----------------------------------------------------


async def test_filters_and_cursor_paging_work_across_pages_while_rows_arrive(
    world: World,
) -> None:
    """outcome, since, until, notification_uuid and entity_id filter; cursor pages cover
    every row once, newest first, while newer rows arrive meanwhile; bad values are 400."""

    async def odd_ids_fail(request: web.Request, _n: int) -> web.Response:
        odd = (await request.json())["entities"][0]["id"] % 2 == 1
        return web.Response(status=503 if odd else 200, text="odd" if odd else "ok")

    receiver = await world.receivers(responder=odd_ids_fail)
    webhook = await world.subscribe(receiver)
    running = await world.start(replace(world.settings, max_retries=0))
    api = await integrator(world.store, world.shop, running)
    await world.produce(*(make_event(world.shop, entity={"id": i}) for i in range(12)))
    await receiver.wait_for(12)
    first_twelve = await api.wait_attempts(webhook.id, 12)
    assert len(first_twelve) == 12

    # Pages of 5 while 6 more rows arrive: the rows as of the first page, each once.
    pages: list[list[Any]] = []
    body = await api.page(webhook.id, limit=5)
    pages.append(body["results"])
    await world.produce(*(make_event(world.shop, entity={"id": i}) for i in range(12, 18)))
    await receiver.wait_for(18)
    await api.wait_attempts(webhook.id, 18)  # the new rows are in the table now
    while body["next_cursor"] is not None:
        body = await api.page(webhook.id, limit=5, cursor=body["next_cursor"])
        pages.append(body["results"])
    assert [len(p) for p in pages] == [5, 5, 2]
    paged = [a for p in pages for a in p]
    assert [a["id"] for a in paged] == [a["id"] for a in first_twelve]
    assert len({a["id"] for a in paged}) == 12

    everything = await api.all_attempts(webhook.id)
    assert len(everything) == 18
    keys = [(a["attempted_at"], a["id"]) for a in everything]
    assert keys == sorted(keys, reverse=True)  # newest first
    failed = await api.all_attempts(webhook.id, outcome="failed")
    delivered = await api.all_attempts(webhook.id, outcome="delivered")
    assert sorted(int(a["entity_ids"][0]) for a in failed) == list(range(1, 18, 2))
    assert sorted(int(a["entity_ids"][0]) for a in delivered) == list(range(0, 18, 2))
    assert {(a["outcome"], a["status"]) for a in failed} == {("http", 503)}

    middle = everything[9]["attempted_at"]
    since = await api.all_attempts(webhook.id, since=middle)
    until = await api.all_attempts(webhook.id, until=middle)
    assert [a["id"] for a in since] == [a["id"] for a in everything if a["attempted_at"] >= middle]
    assert [a["id"] for a in until] == [a["id"] for a in everything if a["attempted_at"] < middle]
    newest = everything[0]["attempted_at"]
    both = await api.all_attempts(webhook.id, since=middle, until=newest, outcome="delivered")
    assert [a["id"] for a in both] == [
        a["id"] for a in delivered if middle <= a["attempted_at"] < newest
    ]

    chosen = everything[4]
    (one,) = await api.all_attempts(webhook.id, notification_uuid=chosen["notification_uuid"])
    assert one["id"] == chosen["id"]
    (seventh,) = await api.all_attempts(webhook.id, entity_id="7")
    assert seventh["entity_ids"] == ["7"]
    assert await api.all_attempts(webhook.id, entity_id="700") == []

    for bad in (
        {"outcome": "maybe"}, {"since": "yesterday"}, {"until": "2026-01-01T00:00:00"},
        {"notification_uuid": "nope"}, {"limit": "251"}, {"limit": "0"}, {"cursor": "%%%"},
        {"since": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC: out of range
    ):  # fmt: skip
        status, error = await api.get(f"/webhooks/{webhook.id}/attempts", **bad)
        assert status == 400, (bad, error)
        assert error["error"]["type"] == "invalid_request", error
        assert error["error"]["field"] == next(iter(bad)), error
    body = await api.page(webhook.id)
    assert len(body["results"]) == 18 and body["next_cursor"] is None  # default limit 50


async def test_another_shops_webhook_and_attempts_are_404(world: World) -> None:
    """Another shop's integrator gets 404 for a webhook's attempts, one attempt and its
    health; an attempt id of another webhook is 404 too."""
    webhook = await world.subscribe()
    mine_too = await world.subscribe(entity="sales", event="CREATED")
    running = await world.start()
    api = await integrator(world.store, world.shop, running)
    await world.produce(make_event(world.shop))
    (attempt,) = await api.wait_attempts(webhook.id, 1)
    other = await integrator(world.store, await world.new_shop("other"), running)

    for path in (
        f"/webhooks/{webhook.id}",
        f"/webhooks/{webhook.id}/attempts",
        f"/webhooks/{webhook.id}/attempts/{attempt['id']}",
    ):
        status, body = await other.get(path)
        assert status == 404, (path, body)
        assert body["error"]["type"] == "not_found"
    for path in (
        f"/webhooks/{mine_too.id}/attempts/{attempt['id']}",
        f"/webhooks/{webhook.id}/attempts/{uuid.uuid4()}",
        f"/webhooks/{webhook.id}/attempts/not-a-uuid",
    ):
        status, body = await api.get(path)
        assert status == 404, (path, body)
        assert body["error"]["type"] == "not_found"


# --- durability ---------------------------------------------------------------------------


@needs_own_stack
async def test_a_database_outage_delays_the_history_and_loses_or_duplicates_nothing(
    world: World, restore_stack: None
) -> None:
    """PostgreSQL stops for 30 s while events keep being delivered; once it is back every
    attempt has exactly one row."""
    webhook = await world.subscribe()
    running = await world.start()
    api = await integrator(world.store, world.shop, running)
    loop = asyncio.get_running_loop()
    sent = 0

    async def deliver(count: int, within: float = WAIT) -> None:
        nonlocal sent
        await world.produce(
            *(make_event(world.shop, entity={"id": sent + i}) for i in range(count))
        )
        sent += count
        await world.receiver.wait_for(sent, timeout=within)

    await deliver(5)
    await api.wait_attempts(webhook.id, 5)

    await stack("down", "postgres")
    down_at = loop.time()
    while loop.time() - down_at < 30:
        await deliver(5, within=5)  # delivered within 5 s while the database is down
        await asyncio.sleep(1)  # pacing the producer over the outage, not waiting for a result
    assert sent >= 5 + 5 * 20
    status, _ = await api.get(f"/webhooks/{webhook.id}/attempts")
    assert status == 503  # the API needs the database; the history waits in Kafka
    await stack("up", "postgres")
    await deliver(5)  # and after it

    # The recorder's backoff is at most 30 s apart: allow for it.
    attempts = await api.wait_attempts(webhook.id, sent, timeout=WAIT * 3)
    delivered = {r.json()["notification_uuid"] for r in world.receiver.requests}
    assert len(delivered) == sent
    rows = Counter(a["notification_uuid"] for a in attempts)
    assert set(rows) == delivered  # none missing
    assert [n for n, count in rows.items() if count > 1] == []  # none duplicated
    conn = await asyncpg.connect(world.settings.database_url)
    try:
        total = await conn.fetchval(
            "SELECT count(*) FROM webhook_attempts WHERE webhook_id = $1", webhook.id
        )
    finally:
        await conn.close()
    assert total == sent


# --- the table itself: idempotent writes, bounded storage ---------------------------------


def record(
    webhook_id: uuid.UUID, at: float, *, ok: bool, n_retry: int = 0, nid: str | None = None
) -> AttemptRecord:
    notification = Notification(
        nid or str(uuid.uuid4()), webhook_id, "CLOSED", "sales", "shop-x", "app", None,
        ({"id": 1},),
    )  # fmt: skip
    outcome = (
        Outcome(200, None, "HTTP 200", 12.5)
        if ok
        else Outcome(500, "http", "HTTP 500", 12.5, body_head=FAILURE_TEXT)
    )
    return AttemptRecord.of(
        notification, "shop-x", n_retry, at=at, body=b'{"x": 1}', outcome=outcome,
        trigger="retry" if n_retry else "scheduled",
    )  # fmt: skip


async def health_row(pool: asyncpg.Pool, webhook_id: uuid.UUID) -> dict[str, Any]:
    row = await pool.fetchrow("SELECT * FROM webhook_health WHERE webhook_id = $1", webhook_id)
    assert row is not None
    return dict(row)


async def test_a_replayed_record_adds_no_row_and_leaves_the_health_unchanged(
    pool: asyncpg.Pool,
) -> None:
    """The same attempt record written twice (a recorder replaying Kafka) is one row, and
    the health counters count it once."""
    history = History(pool)
    webhook_id, now = uuid.uuid4(), time.time()
    delivered, failed = record(webhook_id, now - 2, ok=True), record(webhook_id, now - 1, ok=False)
    assert await history.write([delivered, failed]) == 2
    health = await health_row(pool, webhook_id)
    assert health["consecutive_failures"] == 1

    assert await history.write([failed]) == 0
    assert await history.write([delivered, failed]) == 0
    assert await health_row(pool, webhook_id) == health
    count = await pool.fetchval(
        "SELECT count(*) FROM webhook_attempts WHERE webhook_id = $1", webhook_id
    )
    assert count == 2

    later = record(webhook_id, now, ok=False, n_retry=1)
    assert await history.write([failed, later]) == 1  # a replay next to a new one
    after = await health_row(pool, webhook_id)
    assert after["consecutive_failures"] == 2
    assert (await history.health(webhook_id)).state == "failing"


async def test_retention_drops_the_old_partition_and_keeps_the_new(pool: asyncpg.Pool) -> None:
    """With a retention of 1 day, the partition of 5 days ago is dropped with its rows;
    today's (and the days ahead) are kept with theirs."""
    history = History(pool)
    webhook_id, now = uuid.uuid4(), time.time()
    today = datetime.fromtimestamp(now, UTC).date()
    old_day = today - timedelta(days=5)
    old = [record(webhook_id, now - 5 * 86_400 + i, ok=True) for i in range(3)]
    new = [record(webhook_id, now - i, ok=i == 0) for i in range(2)]
    assert await history.write(old + new) == 5

    async def partitions() -> set[str]:
        rows = await pool.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'webhook_attempts'::regclass"
        )
        return {r["relname"] for r in rows}

    assert {partition_name(old_day), partition_name(today)} <= await partitions()
    dropped = await history.maintain(today=today, retention_days=1)
    assert dropped == [partition_name(old_day)]
    kept = await partitions()
    assert partition_name(old_day) not in kept
    assert {partition_name(today + timedelta(days=n)) for n in range(3)} <= kept
    rows = await pool.fetch("SELECT id FROM webhook_attempts WHERE webhook_id = $1", webhook_id)
    assert {r["id"] for r in rows} == {r.id for r in new}
    assert await history.maintain(today=today, retention_days=1) == []  # nothing more to drop


async def test_health_counts_failures_since_the_newest_success_whatever_the_write_order(
    pool: asyncpg.Pool,
) -> None:
    """Attempt records travel on several partitions, so batches arrive out of order: a
    late failure older than the last success leaves the webhook healthy, and a late
    success older than newer failures leaves it failing with those failures counted."""
    history = History(pool)
    webhook_id, t = uuid.uuid4(), time.time() - 100
    await history.write([record(webhook_id, t + 5, ok=True)])
    await history.write([record(webhook_id, t + 1, ok=False)])  # late, older than it
    assert (await history.health(webhook_id)).state == "healthy"
    assert (await health_row(pool, webhook_id))["consecutive_failures"] == 0

    await history.write([record(webhook_id, t + s, ok=False) for s in (6, 7, 8)])
    await history.write([record(webhook_id, t + 5.5, ok=True)])  # late, older than them
    health = await history.health(webhook_id)
    assert health.state == "failing" and health.consecutive_failures == 3
    assert health.last_success_at is not None
    assert health.last_success_at.timestamp() == pytest.approx(t + 5.5, abs=0.01)


async def test_a_response_body_with_nul_bytes_is_recorded_not_refused(pool: asyncpg.Pool) -> None:
    """An endpoint answering binary (NUL bytes) cannot hold the history back: the row is
    written, the NULs replaced."""
    history = History(pool)
    webhook_id = uuid.uuid4()
    notification = Notification(
        str(uuid.uuid4()), webhook_id, "CLOSED", "sales", "shop-x", "app", None, ({"id": 1},)
    )
    outcome = Outcome(500, "http", "HTTP 500", 3.0, body_head="bin\x00ary")
    bad = AttemptRecord.of(
        notification, "shop-x", 0, at=time.time(), body=b'{"a": "\x00"}', outcome=outcome,
        trigger="scheduled",
    )  # fmt: skip
    assert await history.write([bad]) == 1
    row = await pool.fetchrow(
        "SELECT response_body, request_body FROM webhook_attempts WHERE webhook_id = $1",
        webhook_id,
    )
    assert row is not None
    assert row["response_body"] == "bin\ufffdary" and "\x00" not in row["request_body"]


async def test_postgresql_decodes_todays_records_and_those_of_the_dispatchers_before_alike(
    pool: asyncpg.Pool,
) -> None:
    """The recorder's fast path (PostgreSQL decodes the topic's JSON): arrays, objects and
    the objects of the dispatchers before, mixed in one write, give the rows the checked
    path (row_values) gives; a replay in another form adds nothing."""
    history = History(pool)
    webhook_id, now = uuid.uuid4(), time.time()
    records = [
        record(webhook_id, now - 4, ok=True),
        record(webhook_id, now - 3, ok=False, n_retry=1),
        replace(record(webhook_id, now - 2, ok=False, n_retry=2), status=None, outcome="timeout"),
        replace(record(webhook_id, now - 1, ok=True), entity_ids=("a", "b", "7")),
    ]
    await history.ensure_partition(datetime.fromtimestamp(now, UTC).date())
    forms = [array(records[0]), legacy(records[1]), obj(records[2]), array(records[3])]
    written = await history.write_json(b"[" + b",".join(forms) + b"]")
    assert (written.given, written.valid, written.inserted) == (4, 4, 4)
    assert written.failing == {webhook_id}
    again = [legacy(records[0]), array(records[1]), legacy(records[2]), obj(records[3])]
    replayed = await history.write_json(b"[" + b",".join(again) + b"]")
    assert (replayed.given, replayed.valid, replayed.inserted) == (4, 4, 0)

    rows = await pool.fetch(
        "SELECT id, attempted_at, webhook_id, environment_id, notification_uuid, n_retry, "
        "duration_ms, outcome, status, error, entity_ids, trigger, request_body, "
        "response_body FROM webhook_attempts WHERE webhook_id = $1 ORDER BY attempted_at",
        webhook_id,
    )
    for row, r in zip(rows, records, strict=True):
        checked = row_values(orjson.loads(r.encode()))
        assert tuple(row.values())[:10] == checked[:10]
        assert row["entity_ids"] == orjson.loads(checked[10]) == list(r.entity_ids)
        assert tuple(row.values())[11:] == checked[11:]
    health = await health_row(pool, webhook_id)
    assert health["consecutive_failures"] == 0  # the newest attempt was delivered


async def test_the_recorder_writes_every_kind_of_record_on_the_topic_and_refuses_the_bad(
    world: World, pool: asyncpg.Pool
) -> None:
    """PostgreSQL decodes the attempt topic's JSON (the recorder's fast path); what it
    cannot take (NUL escapes, a day with no partition, a value not JSON) goes through the
    checked path: each good attempt becomes one row, a replay adds none, and records not of
    the attempt record's shape are left out and counted as recorder errors. Records in
    arrays, and those of the dispatchers before (left on the topic by a rolling upgrade),
    are written like today's objects."""
    running = await world.start()
    webhook_id, now = uuid.uuid4(), time.time()
    good = [record(webhook_id, now - 3, ok=True), record(webhook_id, now - 2, ok=False)]
    before = [record(webhook_id, now - 5, ok=True), record(webhook_id, now - 4, ok=False)]
    nul = replace(record(webhook_id, now - 1, ok=False), response_body="bin\x00ary")
    old = record(webhook_id, now - 50 * 86400, ok=False)  # its day has no partition
    wrong = orjson.loads(array(record(webhook_id, now, ok=True)))
    wrong[FIELDS.index("outcome")] = "teleported"
    topic = world.settings.attempt_topic
    errors_before = await metric(running.base_url, "webhook_recorder_errors_total")
    values = [
        b"[" + array(good[0]) + b"," + obj(good[1]) + b"]",
        b"[" + array(nul) + b"]",
        b"[" + obj(old) + b"]",
        orjson.dumps([wrong]),
        b"not json at all",
        b"[" + good[0].encode() + b"]",  # a replay
        b"[" + legacy(before[0]) + b"]",  # an array of objects, as the dispatchers before
        legacy(before[1]),  # one object alone
        b"[" + legacy(good[1]) + b"]",  # a replay, in the old form
    ]
    for value in values:
        await (await world.producer.send(topic, value))

    async def written() -> int:
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM webhook_attempts WHERE webhook_id = $1", webhook_id
            )
        )

    async with asyncio.timeout(WAIT):
        while await written() < 6:
            await asyncio.sleep(0.1)  # polling with a deadline: the recorder is async
        while await metric(running.base_url, "webhook_recorder_errors_total") < errors_before + 2:
            await asyncio.sleep(0.1)
    rows = await pool.fetch(
        "SELECT id, outcome, response_body FROM webhook_attempts WHERE webhook_id = $1",
        webhook_id,
    )
    expected = [*good, nul, old, *before]
    assert sorted(str(r["id"]) for r in rows) == sorted(str(r.id) for r in expected)
    kept = {str(r["id"]): r["response_body"] for r in rows}
    assert kept[str(nul.id)] == "bin\ufffdary"
    health = await health_row(pool, webhook_id)
    assert health["consecutive_failures"] == 2  # the failure of good[1], then the NUL one
