"""Recovering what an endpoint missed, on the real stack: resend one attempt, recover the
failed notifications of a time range, replay the event log, cancel, resume after a
restart, and disable/enable a webhook.

Jobs run asynchronously in the daemon: tests poll the job (or the receiver) with a
deadline, never sleep for it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from dispatcher import signing
from dispatcher.disabling import Disabler
from dispatcher.history import AttemptRecord, History
from dispatcher.recovery import Jobs
from dispatcher.store import Principal, Store, Webhook
from tests.integration.support import (
    KAFKA,
    WAIT,
    Mailbox,
    Receiver,
    Running,
    World,
    environment,
    free_port,
    make_event,
    metric,
    subscribe,
)
from tests.integration.test_api import Reply, check_against_doc, load_openapi
from tests.integration.test_cli import dispatcher

OPENAPI = load_openapi()
JOB_FIELDS = {
    "id", "webhook_id", "mode", "since", "until", "state", "scanned", "matched", "sent",
    "delivered", "failed", "created_at", "finished_at",
}  # fmt: skip


@dataclass(frozen=True)
class Client:
    """The shop's integrator calling the API; every answer checked against the document."""

    base_url: str
    token: str

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.base_url + path, headers=headers, json=body) as response,
        ):
            raw = await response.read()
            decoded = orjson.loads(raw) if raw else None
            reply = Reply(response.status, response.headers, decoded)
        check_against_doc(OPENAPI, method, path, reply)
        return response.status, decoded

    async def recover(self, webhook: Webhook, **body: Any) -> tuple[int, Any]:
        return await self.call("POST", f"/webhooks/{webhook.id}/recover", body)

    async def job(self, webhook: Webhook, job_id: str) -> dict[str, Any]:
        status, job = await self.call("GET", f"/webhooks/{webhook.id}/recoveries/{job_id}")
        assert status == 200, job
        assert set(job) >= JOB_FIELDS
        return dict(job)

    async def wait_job(
        self, webhook: Webhook, job_id: str, state: str = "done", timeout: float = WAIT
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while (job := await self.job(webhook, job_id))["state"] != state:
                assert job["state"] in ("queued", "running"), job
                await asyncio.sleep(0.1)  # polling the API with a deadline: jobs are async
        return job

    async def attempts(self, webhook: Webhook, **params: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, body = await self.call("GET", f"/webhooks/{webhook.id}/attempts?limit=250&{query}")
        assert status == 200, body
        return list(body["results"])


async def client(world: World, running: Running, shop: Principal | None = None) -> Client:
    shop = shop or world.shop
    _, token = await world.store.issue_token(shop.environment_id, shop.client_id)
    return Client(running.base_url, token)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def uuids(receiver: Receiver, start: int = 0) -> list[str]:
    return [r.json()["notification_uuid"] for r in receiver.requests[start:]]


def switchable(state: dict[str, int]) -> Any:
    """A responder answering ``state["status"]``, changeable while the test runs."""

    async def respond(_request: web.Request, _n: int) -> web.Response:
        return web.Response(status=state["status"], text="down for maintenance")

    return respond


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)  # polling with a deadline


# --- recover failed notifications -----------------------------------------------------


async def test_recover_failed_resends_exactly_the_failed_notifications_once_each_in_order(
    world: World, mailbox: Mailbox
) -> None:
    """An endpoint answering 500 for a while, then 200: `failed` mode sends each failed
    notification once more, oldest first, with its notification_uuid, and no mail."""
    state = {"status": 200}
    receiver = await world.receivers(responder=switchable(state))
    webhook = await world.subscribe(receiver)
    settings = replace(
        world.settings, max_retries=0, smtp_host=mailbox.host, smtp_port=mailbox.port
    )
    running = await world.start(settings)
    api = await client(world, running)
    since = datetime.now(UTC) - timedelta(seconds=1)

    await world.produce(make_event(world.shop))  # delivered: not recovered
    await receiver.wait_for(1)
    state["status"] = 500
    failed = [make_event(world.shop, entity={"id": n, "uuid": str(uuid.uuid4())}) for n in range(5)]
    for event in failed:  # one at a time: their order is known
        expected = len(receiver.requests) + 1  # counted before: the POST may beat produce()
        await world.produce(event)
        await receiver.wait_for(expected)
    await mailbox.wait_for(5)  # the last of the failed attempts is final: one mail each
    failed_uuids = uuids(receiver, 1)
    assert len(set(failed_uuids)) == 5
    await wait_for(lambda: _recorded(api, webhook, 6))
    state["status"] = 200

    status, job = await api.recover(webhook, since=iso(since), mode="failed")
    assert status == 202, job
    assert set(job) >= JOB_FIELDS and job["mode"] == "failed" and job["state"] == "queued"
    done = await api.wait_job(webhook, job["id"])
    assert (done["matched"], done["sent"], done["delivered"], done["failed"]) == (5, 5, 5, 0)
    assert done["finished_at"] is not None

    assert uuids(receiver, 6) == failed_uuids  # exactly those, once each, in order
    resent = receiver.requests[6:]
    assert [r.body for r in resent] == [r.body for r in receiver.requests[1:6]]
    await wait_for(lambda: _recovery_attempts(api, webhook, 5))  # in the history too
    assert len(mailbox.messages) == 5  # recovery attempts mail nobody

    # Run again: nothing failed any more, nothing is sent.
    status, again = await api.recover(webhook, since=iso(since), mode="failed")
    assert status == 202
    assert (await api.wait_job(webhook, again["id"]))["sent"] == 0
    assert len(receiver.requests) == 11


async def _recovery_attempts(api: Client, webhook: Webhook, count: int) -> bool:
    """The history shows ``count`` recovery attempts (never more)."""
    got = sum(a["trigger"] == "recovery" for a in await api.attempts(webhook))
    assert got <= count
    return bool(got == count)


async def _recorded(api: Client, webhook: Webhook, count: int) -> bool:
    return len(await api.attempts(webhook)) >= count


# --- replay the event log ---------------------------------------------------------------


async def test_replay_delivers_every_matching_event_of_the_range_and_nothing_else(
    world: World,
) -> None:
    """`replay` sends every event of the range this webhook matches, delivered before or
    not, import entities in batches; nothing of other shops or other entity/event pairs."""
    webhook = await world.subscribe(entity="items", event="CREATED")
    other_shop = await world.new_shop("other")
    other = await world.receivers()
    await world.subscribe(other, "items", "CREATED", shop=other_shop)
    running = await world.start()
    api = await client(world, running)

    def item(n: int, **fields: Any) -> dict[str, Any]:
        entity = {"id": n, "uuid": str(uuid.uuid4())}
        return make_event(world.shop, entity_name="items", event_type="CREATED", entity=entity,
                          **fields)  # fmt: skip

    await world.produce(item(-1), item(-2))  # before the range: not replayed
    await world.receiver.wait_for(2)
    # Kafka's timestamps are milliseconds: the range starts at this one.
    now = datetime.now(UTC)
    since = now.replace(microsecond=now.microsecond // 1000 * 1000)
    ours = [item(n) for n in range(4)]
    noise = [make_event(other_shop, entity_name="items", event_type="CREATED") for _ in range(20)]
    noise += [make_event(world.shop, entity_name="items", event_type="UPDATED") for _ in range(3)]
    noise += [make_event(world.shop)]  # a sale
    imported = [item(1000 + n, import_id="imp-1", import_end=n == 99) for n in range(100)]
    await world.produce(*ours, *noise, *imported)
    # Live: 4 single events and the import in batches of at most 80.
    live = len(await world.receiver.wait_for(2 + 4 + 2))
    await other.wait_for(20)

    status, job = await api.recover(webhook, since=iso(since), mode="replay")
    assert status == 202, job
    done = await api.wait_job(webhook, job["id"])
    assert done["scanned"] == len(ours) + len(noise) + len(imported)
    assert done["matched"] == len(ours) + len(imported)
    assert (done["sent"], done["delivered"]) == (4 + 2, 4 + 2)
    assert len(world.receiver.requests) == live + 6
    replayed = [r.json() for r in world.receiver.requests[live:]]
    assert sorted(uuids(world.receiver, live)) == sorted(uuids(world.receiver, 2)[:6])
    assert [r["entities"][0]["id"] for r in replayed if len(r["entities"]) == 1] == [0, 1, 2, 3]
    assert [len(r["entities"]) for r in replayed if r["entities"][0]["id"] >= 1000] == [80, 20]
    assert len(other.requests) == 20  # the other shop's webhook got nothing more
    await wait_for(lambda: _recovery_attempts(api, webhook, 6))


async def test_a_range_the_event_log_no_longer_holds_is_422_saying_what_it_holds(
    world: World,
) -> None:
    webhook = await world.subscribe()
    running = await world.start()
    api = await client(world, running)
    await world.produce(*[make_event(world.shop) for _ in range(3)])
    await world.receiver.wait_for(3)
    tp = TopicPartition(world.topic, 0)
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(2)})  # retention took the first two
    finally:
        await admin.close()
    since = datetime.now(UTC) - timedelta(days=1)

    status, body = await api.recover(webhook, since=iso(since), mode="replay")
    assert status == 422, body
    assert body["error"]["field"] == "since"
    assert "hold events from" in body["error"]["message"]
    status, body = await api.recover(webhook, since=iso(since), until=iso(since), mode="replay")
    assert status == 422 and body["error"]["field"] == "since"
    too_long = datetime.now(UTC) - timedelta(days=15)
    status, body = await api.recover(webhook, since=iso(too_long), mode="failed")
    assert status == 422 and "14 days" in body["error"]["message"]
    status, body = await api.recover(webhook, since="yesterday", mode="failed")
    assert status == 400 and body["error"]["field"] == "since"
    status, body = await api.recover(webhook, since=iso(since), mode="everything")
    assert status == 400 and body["error"]["field"] == "mode"


# --- jobs: one at a time, cancel, resume -------------------------------------------------


async def test_a_second_job_is_409_and_cancel_stops_the_first(world: World) -> None:
    release = asyncio.Event()

    async def slow(_request: web.Request, n: int) -> web.Response:
        if n > 1:  # the first replayed notification passes; the others wait for the test
            await release.wait()
        return web.Response(status=200)

    receiver = await world.receivers(responder=slow)
    webhook = await world.subscribe(receiver)
    since = datetime.now(UTC) - timedelta(seconds=1)
    await world.produce(*[make_event(world.shop) for _ in range(50)])
    running = await world.start(role="retry")  # no live delivery: only the replay sends
    pool = running.daemon._pool
    assert pool is not None
    jobs = Jobs(pool)
    job = await jobs.create(webhook, "replay", since, datetime.now(UTC))
    api_running = await world.start(replace(world.settings, http_port=free_port()), role="api")
    api = await client(world, api_running)

    status, body = await api.recover(webhook, since=iso(since), mode="failed")
    assert status == 409, body
    assert str(job.id) in body["error"]["message"]
    await receiver.wait_for(2)  # the second replayed notification is under way

    status, cancelled = await api.call("DELETE", f"/webhooks/{webhook.id}/recoveries/{job.id}")
    assert status == 200 and cancelled["state"] == "cancelled"
    runner = running.daemon.recoveries
    assert runner is not None
    await wait_for(lambda: _idle(runner))  # it noticed, and gave up what was not answered
    sent = len(receiver.requests)
    assert sent < 50
    release.set()
    status, listed = await api.call("GET", f"/webhooks/{webhook.id}/recoveries")
    assert status == 200 and [j["id"] for j in listed["results"]] == [str(job.id)]
    assert listed["results"][0]["state"] == "cancelled"
    status, body = await api.recover(webhook, since=iso(since), mode="replay")
    assert status == 202, body  # no job running any more: a new one is accepted
    await api.wait_job(webhook, body["id"])
    assert len(receiver.requests) == sent + 50  # the cancelled job sent nothing more


async def _idle(runner: Any) -> bool:
    return not runner.running


async def test_a_restart_mid_job_resumes_and_sends_nothing_twice(world: World) -> None:
    gate = asyncio.Event()

    async def gated(_request: web.Request, n: int) -> web.Response:
        if n == 30:
            await gate.wait()  # holds the job mid-way until the daemon is stopping
        return web.Response(status=200)

    receiver = await world.receivers(responder=gated)
    webhook = await world.subscribe(receiver)
    since = datetime.now(UTC) - timedelta(seconds=1)
    events = [
        make_event(world.shop, entity={"id": n, "uuid": str(uuid.uuid4())}) for n in range(120)
    ]
    await world.produce(*events)
    first = await world.start(role="retry")
    assert first.daemon._pool is not None
    job = await Jobs(first.daemon._pool).create(webhook, "replay", since, datetime.now(UTC))
    await receiver.wait_for(30)
    stopping = asyncio.create_task(first.stop())
    await wait_for(lambda: _true(first.daemon.stop.is_set()))
    gate.set()
    await stopping
    assert 30 <= len(receiver.requests) < 120

    second = await world.start(role="retry")
    assert second.daemon._pool is not None
    jobs = Jobs(second.daemon._pool)

    async def finished() -> bool:
        got = await jobs.get(webhook.id, job.id)
        return got is not None and got.state == "done"

    await wait_for(finished)
    got = uuids(receiver)
    assert len(got) == 120 and len(set(got)) == 120  # every event once, none twice
    entity_ids = [r.json()["entities"][0]["id"] for r in receiver.requests]
    assert sorted(entity_ids) == list(range(120))  # sent a few at a time: in about that order


async def _true(value: bool) -> bool:
    return value


# --- resend -----------------------------------------------------------------------------


async def test_resend_sends_the_same_body_freshly_signed_as_one_more_attempt_and_no_mail(
    world: World, mailbox: Mailbox
) -> None:
    state = {"status": 200}
    receiver = await world.receivers(responder=switchable(state))
    webhook = await world.subscribe(receiver)
    settings = replace(
        world.settings, max_retries=0, smtp_host=mailbox.host, smtp_port=mailbox.port
    )
    running = await world.start(settings)
    api = await client(world, running)
    state["status"] = 500
    await world.produce(make_event(world.shop))
    (failed,) = await receiver.wait_for(1)
    await mailbox.wait_for(1)
    await wait_for(lambda: _recorded(api, webhook, 1))
    (attempt,) = await api.attempts(webhook)
    assert attempt["outcome"] == "http"
    state["status"] = 200

    status, job = await api.call("POST", f"/webhooks/{webhook.id}/attempts/{attempt['id']}/resend")
    assert status == 202, job
    (_, resent) = await receiver.wait_for(2)
    assert resent.body == failed.body  # the same request body, same notification_uuid
    timestamp = resent.headers["webhook-timestamp"]
    expected = signing.headers(
        signing.secret_key(webhook.secret), resent.headers["webhook-id"], int(timestamp),
        resent.body,
    )["webhook-signature"]  # fmt: skip
    assert resent.headers["webhook-signature"] == expected
    await wait_for(lambda: _recorded(api, webhook, 2))
    newest = (await api.attempts(webhook))[0]
    assert (newest["trigger"], newest["outcome"]) == ("manual", "delivered")
    assert newest["notification_uuid"] == attempt["notification_uuid"]
    assert len(mailbox.messages) == 1

    status, body = await api.call("POST", f"/webhooks/{webhook.id}/attempts/{newest['id']}/resend")
    assert status == 409, body  # a delivered attempt keeps no body
    other = await client(world, running, await world.new_shop("other"))
    status, _ = await other.call("POST", f"/webhooks/{webhook.id}/attempts/{attempt['id']}/resend")
    assert status == 404


# --- disable and enable -----------------------------------------------------------------


async def test_a_disabled_mail_refused_for_good_does_not_hold_back_the_others(
    world: World, mailbox: Mailbox, pool: asyncpg.Pool
) -> None:
    """One owner's address refused with a 550: that mail is given up (it would be refused
    again), the other owner's mail still goes out, and neither is tried again."""
    refused = await subscribe(world.store, world.shop, world.receiver, email="gone@shop.test")
    other_shop = await world.new_shop("other")
    mailed = await subscribe(world.store, other_shop, world.receiver, email="dev@other.test")
    mailbox.no_such_user.add("gone@shop.test")
    for webhook in (refused, mailed):
        await pool.execute(
            "UPDATE webhooks SET disabled_at = now(), disabled_reason = 'test', "
            "disabled_mail_pending = true WHERE id = $1",
            webhook.id,
        )
    settings = replace(world.settings, smtp_host=mailbox.host, smtp_port=mailbox.port)
    disabler = Disabler(pool, settings)

    assert await disabler.mail_pending() == 2
    assert [m["To"] for m in mailbox.messages] == ["dev@other.test"]
    pending = await pool.fetch(
        "SELECT id FROM webhooks WHERE disabled_mail_pending AND id = ANY($1::uuid[])",
        [refused.id, mailed.id],
    )
    assert pending == []
    assert await disabler.mail_pending() == 0  # nothing is tried again


async def test_two_sweeps_at_once_send_each_disabled_mail_once(
    world: World, mailbox: Mailbox, pool: asyncpg.Pool
) -> None:
    """Every process sweeps the pending mails at start (``--processes 2``, or two
    instances restarted together): each owner still gets one mail, not one per process."""
    webhooks = []
    for n in range(4):
        shop = await world.new_shop(f"sweep{n}")
        webhooks.append(
            await subscribe(world.store, shop, world.receiver, email=f"dev{n}@sweep.test")
        )
    await pool.execute(
        "UPDATE webhooks SET disabled_at = now(), disabled_reason = 'test', "
        "disabled_mail_pending = true WHERE id = ANY($1::uuid[])",
        [w.id for w in webhooks],
    )
    settings = replace(world.settings, smtp_host=mailbox.host, smtp_port=mailbox.port)
    handled = await asyncio.gather(
        Disabler(pool, settings).mail_pending(), Disabler(pool, settings).mail_pending()
    )
    assert sum(handled) == 4
    assert sorted(m["To"] for m in mailbox.messages) == [f"dev{n}@sweep.test" for n in range(4)]
    pending = await pool.fetchval(
        "SELECT count(*) FROM webhooks WHERE disabled_mail_pending AND id = ANY($1::uuid[])",
        [w.id for w in webhooks],
    )
    assert pending == 0


async def test_an_enabled_webhook_is_not_disabled_again_by_the_failures_from_before(
    world: World, pool: asyncpg.Pool
) -> None:
    """Enabled again, a webhook is disabled again only for failures made after that: not
    by the ones that disabled it, nor by those of attempts under way when it was enabled
    (recorded just after), which used to disable it again at once (and mail again)."""
    webhook = await subscribe(world.store, world.shop, world.receiver)
    history = History(pool)
    disabler = Disabler(pool, replace(world.settings, disable_after_hours=1 / 3600))

    def failure(n: int, since: float) -> AttemptRecord:
        return AttemptRecord(
            id=uuid.uuid4(), webhook_id=webhook.id, environment_id=webhook.environment_id,
            notification_uuid=str(uuid.uuid4()), n_retry=0, attempted_at=since + n / 1000,
            duration_ms=1.0, outcome="http", status=500, error="HTTP 500",
            entity_ids=(str(n),), trigger="scheduled",
        )  # fmt: skip

    def failures(count: int, since: float) -> list[AttemptRecord]:
        return [failure(n, since) for n in range(count)]

    await history.write(failures(12, time.time() - 60))
    assert await disabler.check({webhook.id}) == [webhook.id]
    await world.store.set_disabled(webhook.environment_id, webhook.id, None)  # enabled
    await pool.execute(  # 30 s ago, so that what follows can be dated after it
        "UPDATE webhooks SET enabled_at = now() - interval '30 seconds' WHERE id = $1",
        webhook.id,
    )
    await history.write(failures(2, time.time() - 40))  # under way when it was enabled
    assert await disabler.check({webhook.id}) == []
    # Failing on after it, the first failure 20 s ago (the threshold is 1 s): 9 are not
    # enough, though the webhook's failures in a row are 23.
    await history.write(failures(9, time.time() - 20))
    assert await disabler.check({webhook.id}) == []
    await history.write(failures(1, time.time() - 10))
    assert await disabler.check({webhook.id}) == [webhook.id]
    reason = await pool.fetchval("SELECT disabled_reason FROM webhooks WHERE id = $1", webhook.id)
    assert reason.endswith("(10 attempts in a row)"), reason


async def test_a_webhook_failing_past_the_threshold_is_disabled_mailed_once_then_recovered(
    world: World, mailbox: Mailbox, pool: asyncpg.Pool
) -> None:
    state = {"status": 500}
    receiver = await world.receivers(responder=switchable(state))
    webhook = await world.subscribe(receiver)
    settings = replace(
        world.settings,
        max_retries=0,
        smtp_host=mailbox.host,
        smtp_port=mailbox.port,
        disable_after_hours=2 / 3600,  # 2 s
    )
    running = await world.start(settings)
    api = await client(world, running)
    since = datetime.now(UTC)
    store = Store(pool)

    async def disabled() -> bool:
        got = await store.webhook_by_id(webhook.id)
        return got is not None and got.disabled

    sent = 0
    async with asyncio.timeout(WAIT):
        while not await disabled():  # failures for more than 2 s, 10 at least
            await world.produce(make_event(world.shop))
            sent += 1

            async def answered_or_disabled(count: int = sent) -> bool:
                # Disabling may land between the check above and this event's delivery.
                return len(receiver.requests) >= count or await disabled()

            await wait_for(answered_or_disabled)
            await asyncio.sleep(0.3)  # pacing, not waiting: spreads the failures over 2 s
    assert sent >= 10
    status, shown = await api.call("GET", f"/webhooks/{webhook.id}")
    assert status == 200 and shown["health"]["state"] == "disabled"
    assert "every attempt failed" in shown["health"]["disabled_reason"]
    mails = await mailbox.wait_for(len(receiver.requests) + 1)  # a mail per failure, one more
    disabled_mails = [m for m in mails if m["Subject"].startswith("Webhook disabled")]
    assert len(disabled_mails) == 1
    text = "".join(
        bytes(part.get_payload(decode=True)).decode()
        for part in disabled_mails[0].walk()
        if part.get_content_type() == "text/plain"
    )
    assert f"/webhooks/{webhook.id}/enable" in text

    # Disabled: events are counted, not sent. (The cache hears of it through NOTIFY.)
    await wait_for(lambda: _true(_cached_disabled(running, webhook)))
    got = len(receiver.requests)
    skipped = 'reason="webhook_disabled"'
    before = await metric(running.base_url, "webhook_events_skipped_total", skipped)
    missed = [make_event(world.shop) for _ in range(3)]
    await world.produce(*missed)
    await wait_for(lambda: _metric_at_least(running, skipped, before + 3))
    assert len(receiver.requests) == got

    state["status"] = 200
    status, enabled = await api.call(
        "POST", f"/webhooks/{webhook.id}/enable", {"recover_since": iso(since)}
    )
    assert status == 200, enabled
    assert enabled["health"]["state"] != "disabled" and enabled["health"]["disabled_at"] is None
    job = enabled["recovery"]
    done = await api.wait_job(webhook, job["id"])
    assert done["matched"] == sent + 3 and done["delivered"] == sent + 3
    replayed = uuids(receiver, got)
    assert len(set(replayed)) == sent + 3
    assert len([m for m in mailbox.messages if m["Subject"].startswith("Webhook disabled")]) == 1


def _cached_disabled(running: Running, webhook: Webhook) -> bool:
    cached = running.daemon.cache.get(webhook.id)
    return cached is not None and cached.disabled


async def _metric_at_least(running: Running, labels: str, value: float) -> bool:
    return await metric(running.base_url, "webhook_events_skipped_total", labels) >= value


async def test_the_integrator_disables_and_enables_a_webhook(world: World) -> None:
    webhook = await world.subscribe()
    running = await world.start()
    api = await client(world, running)
    status, body = await api.call("POST", f"/webhooks/{webhook.id}/disable")
    assert status == 200 and body["health"]["state"] == "disabled"
    await wait_for(lambda: _true(_cached_disabled(running, webhook)))
    await world.produce(make_event(world.shop))
    await wait_for(lambda: _metric_at_least(running, 'reason="webhook_disabled"', 1))
    assert world.receiver.requests == []
    status, body = await api.recover(
        webhook, since=iso(datetime.now(UTC) - timedelta(hours=1)), mode="replay"
    )
    assert status == 409  # enable it first

    status, body = await api.call("POST", f"/webhooks/{webhook.id}/enable")
    assert status == 200 and body["health"]["state"] != "disabled" and "recovery" not in body
    await wait_for(lambda: _true(not _cached_disabled(running, webhook)))
    await world.produce(make_event(world.shop))
    await world.receiver.wait_for(1)


# --- the operator's CLI -----------------------------------------------------------------


async def test_the_operator_queues_a_replay_and_lists_it_with_the_cli(world: World) -> None:
    webhook = await world.subscribe()
    since = datetime.now(UTC) - timedelta(seconds=5)
    await world.produce(*[make_event(world.shop) for _ in range(3)])
    env = environment(world.settings)
    queued = await asyncio.to_thread(
        dispatcher, "recover", "--webhook", str(webhook.id), "--since", iso(since),
        "--mode", "replay", "--json", **env,
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    job = orjson.loads(queued.stdout)
    assert (job["mode"], job["state"]) == ("replay", "queued")
    again = await asyncio.to_thread(
        dispatcher, "recover", "--webhook", str(webhook.id), "--since", iso(since), **env
    )
    assert again.returncode == 1 and "already queued or running" in again.stderr

    await world.start(role="retry")  # a consuming process takes the job
    await world.receiver.wait_for(3)

    async def listed_done() -> bool:
        run = await asyncio.to_thread(
            dispatcher, "recoveries", "--webhook", str(webhook.id), "--json", **env
        )
        assert run.returncode == 0, run.stderr
        (shown,) = orjson.loads(run.stdout)
        return bool(shown["state"] == "done" and shown["delivered"] == 3)

    await wait_for(listed_done)
    table = await asyncio.to_thread(dispatcher, "recoveries", "--webhook", str(webhook.id), **env)
    assert table.stdout.splitlines()[0].split()[:5] == ["id", "mode", "since", "until", "state"]
    assert job["id"] in table.stdout and " done " in table.stdout
    too_long = await asyncio.to_thread(
        dispatcher, "recover", "--webhook", str(webhook.id),
        "--since", iso(datetime.now(UTC) - timedelta(days=30)), **env,
    )  # fmt: skip
    assert too_long.returncode == 2 and "14 days" in too_long.stderr
