"""Retries on the delay topic and failure notices, on real Kafka, SMTP and HTTPS."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from email.message import Message

import pytest
from aiohttp import web
from aiokafka.structs import TopicPartition
from structlog.testing import capture_logs

from tests.integration.support import WAIT, Mailbox, World, end_offset, make_event

DELAY = 1.0


@pytest.fixture
def retry_world(world: World, mailbox: Mailbox) -> World:
    """This test's world with short retry delays and its SMTP server."""
    settings = replace(
        world.settings,
        retry_delay_seconds=DELAY,
        max_retries=3,
        smtp_host=mailbox.host,
        smtp_port=mailbox.port,
        smtp_sender="webhooks@dispatcher.test",
    )
    return replace(world, settings=settings)


def failing_then(ok_from: int | None) -> Callable[[web.Request, int], Awaitable[web.Response]]:
    """A responder answering 500 until request number ``ok_from`` (1-based), then 200."""

    async def respond(_request: web.Request, n: int) -> web.Response:
        if ok_from is not None and n >= ok_from:
            return web.Response(status=200)
        return web.Response(status=500, text="database on fire")

    return respond


def text_of(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError("no text/plain part")


async def test_failing_endpoint_gets_exactly_one_plus_max_retries_attempts_and_a_mail_each(
    retry_world: World, mailbox: Mailbox
) -> None:
    """A message that always fails is tried 4 times, DELAY apart, and each failure is mailed."""
    receiver = await retry_world.receivers(responder=failing_then(None))
    webhook = await retry_world.subscribe(receiver)
    running = await retry_world.start()
    event = make_event(retry_world.shop)
    await retry_world.produce(event)

    requests = await receiver.wait_for(4)
    bodies = [r.json() for r in requests]
    assert [b["nRetry"] for b in bodies] == [0, 1, 2, 3]
    assert len({b["notification_uuid"] for b in bodies}) == 1
    for before, after in itertools.pairwise(requests):
        assert after.at - before.at >= DELAY * 0.99
    mails = await mailbox.wait_for(4)
    await running.stop()  # drains: any fifth attempt would have been made by now
    assert len(receiver.requests) == 4
    assert len(mailbox.messages) == 4
    for n, mail in enumerate(mails):
        assert mail["To"] == "dev@shop.test"
        text = text_of(mail)
        assert webhook.url in text
        assert f"Attempt: {n + 1} of 4 (nRetry {n})" in text
        assert "HTTP 500" in text and "database on fire" in text
        assert bodies[0]["notification_uuid"] in text  # the request body is in the mail
        assert f'"nRetry":{n}' in text
        assert webhook.secret not in mail.as_string()
    assert "retry limit" not in mails[2]["Subject"]
    assert "retry limit reached" in mails[3]["Subject"]
    assert "will not be sent again" in text_of(mails[3])
    assert "next attempt is due" in text_of(mails[0])


async def test_endpoint_that_recovers_on_retry_two_gets_it_and_no_more_mails_follow(
    retry_world: World, mailbox: Mailbox
) -> None:
    """Two failures, then success on nRetry 2: two mails, three requests, nothing after."""
    receiver = await retry_world.receivers(responder=failing_then(3))
    await retry_world.subscribe(receiver)
    running = await retry_world.start()
    await retry_world.produce(make_event(retry_world.shop))

    requests = await receiver.wait_for(3)
    assert [r.json()["nRetry"] for r in requests] == [0, 1, 2]
    await mailbox.wait_for(2)
    await running.stop()
    assert len(receiver.requests) == 3
    assert await end_offset(TopicPartition(retry_world.settings.notice_topic, 0)) == 2
    assert len(mailbox.messages) == 2


async def test_every_notice_arrives_once_after_smtp_comes_back(
    retry_world: World, mailbox: Mailbox
) -> None:
    """Notices queued while SMTP refuses mail are all delivered, none twice, once it accepts."""
    mailbox.accept = False
    receiver = await retry_world.receivers(responder=failing_then(None))
    await retry_world.subscribe(receiver)
    settings = replace(retry_world.settings, max_retries=1)
    running = await retry_world.start(settings)
    await retry_world.produce(make_event(retry_world.shop), make_event(retry_world.shop))

    await receiver.wait_for(4)  # 2 events x (1 + 1 retry), all failed
    registry = running.daemon.metrics.registry
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_notices_failed_total"):
            await asyncio.sleep(0.05)  # polling a counter with a deadline
    assert mailbox.messages == []
    mailbox.accept = True
    mails = await mailbox.wait_for(4)
    await running.stop()
    ids = [m["X-Webhook-Notice-Id"] for m in mails]
    assert len(ids) == 4 and len(set(ids)) == 4


async def test_pending_retry_survives_a_restart_and_fires_once_on_time(retry_world: World) -> None:
    """A retry scheduled before a restart is made once, by the new process, not early."""
    settings = replace(retry_world.settings, retry_delay_seconds=3.0, max_retries=1)
    receiver = await retry_world.receivers(responder=failing_then(2))
    await retry_world.subscribe(receiver)
    first = await retry_world.start(settings)
    await retry_world.produce(make_event(retry_world.shop))
    (failed,) = await receiver.wait_for(1)
    await first.stop()

    await retry_world.start(settings)
    requests = await receiver.wait_for(2)
    assert requests[1].json()["nRetry"] == 1
    assert requests[1].at - failed.at >= 3.0 * 0.99
    assert len(receiver.requests) == 2


async def test_deleting_the_webhook_stops_its_pending_retries(retry_world: World) -> None:
    """A retry whose webhook was deleted meanwhile is dropped, not sent."""
    receiver = await retry_world.receivers(responder=failing_then(None))
    webhook = await retry_world.subscribe(receiver)
    running = await retry_world.start()
    await retry_world.produce(make_event(retry_world.shop))
    await receiver.wait_for(1)
    await retry_world.store.delete_webhook(retry_world.shop.environment_id, webhook.id)

    registry = running.daemon.metrics.registry
    reason = {"reason": "webhook_deleted_before_retry"}
    with capture_logs() as logs:
        async with asyncio.timeout(WAIT):
            while not registry.get_sample_value("webhook_retries_dropped_total", reason):
                await asyncio.sleep(0.05)  # polling a counter with a deadline
    assert len(receiver.requests) == 1
    (line,) = [e for e in logs if e["event"] == "retry_dropped"]
    assert line["webhook_id"] == str(webhook.id) and line["n_retry"] == 1
    assert line["reason"] == "webhook deleted before the retry was due"


async def test_retry_after_longer_than_the_delay_is_honoured(retry_world: World) -> None:
    """An endpoint answering 503 with Retry-After: 3 is not retried before 3 seconds."""

    async def busy_then_ok(_request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=503, headers={"Retry-After": "3"})
        return web.Response(status=200)

    receiver = await retry_world.receivers(responder=busy_then_ok)
    await retry_world.subscribe(receiver)
    await retry_world.start()
    await retry_world.produce(make_event(retry_world.shop))
    first, second = await receiver.wait_for(2)
    assert second.at - first.at >= 3.0 * 0.99


async def test_digest_groups_a_webhooks_failures_into_one_mail_with_every_body(
    retry_world: World, mailbox: Mailbox
) -> None:
    """With a digest window, four failed attempts of one webhook make one mail listing all."""
    receiver = await retry_world.receivers(responder=failing_then(None))
    await retry_world.subscribe(receiver)
    settings = replace(
        retry_world.settings, max_retries=1, retry_delay_seconds=0.5, notice_digest_seconds=3.0
    )
    running = await retry_world.start(settings)
    events = [make_event(retry_world.shop), make_event(retry_world.shop)]
    await retry_world.produce(*events)

    await receiver.wait_for(4)
    (mail,) = await mailbox.wait_for(1)
    await running.stop()
    assert len(mailbox.messages) == 1
    assert "failed 4 times, retry limit reached for 2" in mail["Subject"]
    text = text_of(mail)
    assert text.count("Request body:") == 4
    for event in events:
        assert event["entity"]["uuid"] in text


async def test_mailbox_that_does_not_exist_does_not_hold_back_other_notices(
    retry_world: World, mailbox: Mailbox
) -> None:
    """A notice refused for good (550) is dropped and counted; the next one is mailed."""
    mailbox.no_such_user.add("gone@shop.test")
    settings = replace(retry_world.settings, max_retries=0)
    receiver = await retry_world.receivers(responder=failing_then(None))
    shops = []
    for email in ("gone@shop.test", "dev@shop.test"):
        shop = await retry_world.new_shop(f"shop-{email}")
        await retry_world.store.create_webhook(
            shop, url=receiver.url, entity_name="sales", event_type="CLOSED", email=email
        )
        shops.append(shop)
    running = await retry_world.start(settings)
    registry = running.daemon.metrics.registry
    await retry_world.produce(make_event(shops[0]))
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_notices_rejected_total"):
            await asyncio.sleep(0.05)  # polling a counter with a deadline
    await retry_world.produce(make_event(shops[1]))
    (mail,) = await mailbox.wait_for(1)
    assert mail["To"] == "dev@shop.test"
    assert registry.get_sample_value("webhook_notices_rejected_total") == 1
