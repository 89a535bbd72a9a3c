"""Failure mails at volume: concurrent, reused SMTP sessions; one mail per notice; the
notice topic's offsets commit only behind mails the SMTP server accepted. Real Kafka, a
real SMTP server (aiosmtpd), the daemon in-process (and once as a process, killed)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from dispatcher.notices import Notice
from dispatcher.settings import Settings
from tests.integration.support import (
    WAIT,
    Mailbox,
    MailboxServer,
    Spawn,
    World,
    end_offsets,
    environment,
    free_port,
    produce_raw,
)


def notice(n: int, to: str = "") -> Notice:
    """A notice of a failed first attempt, as the delivery path produces it."""
    notification = str(uuid.uuid4())
    return Notice(
        notice_id=Notice.make_id(notification, 0),
        to=to or f"dev-{n % 7}@shop.test",
        webhook_id=str(uuid.uuid4()),
        url="https://hooks.shop.test/hook",
        entity_name="sales",
        event_type="CLOSED",
        notification_uuid=notification,
        n_retry=0,
        max_retries=3,
        final=False,
        failed_at="2026-01-01T10:00:00.000Z",
        error="HTTP 500",
        status=500,
        response_head="database on fire",
        next_attempt_at="2026-01-01T10:15:00.000Z",
        request_body=f'{{"type": "CLOSED", "seq": {n}}}',
    )


async def produce_notices(producer: AIOKafkaProducer, topic: str, count: int) -> list[Notice]:
    notices = [notice(n) for n in range(count)]
    await produce_raw(producer, topic, [(n.webhook_id.encode(), n.encode()) for n in notices])
    return notices


async def committed(admin: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, int]:
    """The offsets ``group`` committed, by partition."""
    offsets = await admin.list_consumer_group_offsets(group)
    return {tp: meta.offset for tp, meta in offsets.items()}


async def wait_committed(
    admin: AIOKafkaAdminClient, group: str, expected: dict[TopicPartition, int]
) -> None:
    """Poll the group's committed offsets until they are ``expected``; fail after WAIT."""
    async with asyncio.timeout(WAIT):
        while await committed(admin, group) != expected:
            await asyncio.sleep(0.1)  # polling Kafka with a deadline


def mailing(world: World, mailbox: Mailbox, notice_topic: str, **changes: object) -> Settings:
    return replace(
        world.settings,
        notice_topic=notice_topic,
        smtp_host=mailbox.host,
        smtp_port=mailbox.port,
        **changes,  # type: ignore[arg-type]
    )


async def test_a_burst_of_notices_is_mailed_once_each_over_a_few_reused_sessions(
    world: World,
    mailbox: Mailbox,
    new_topic: Callable[..., Awaitable[str]],
    kafka_admin: AIOKafkaAdminClient,
) -> None:
    """600 notices on 3 partitions: one mail each, sent over at most 4 sessions at once,
    each carrying many mails, and every offset committed."""
    topic = await new_topic("notices", partitions=3)
    settings = mailing(world, mailbox, topic, smtp_connections=4)
    notices = await produce_notices(world.producer, topic, 600)
    running = await world.start(settings, role="retry")

    await mailbox.wait_for(600)
    group = f"{settings.consumer_group}-notices"
    await wait_committed(kafka_admin, group, await end_offsets(topic, 3))
    await running.stop()
    assert sorted(mailbox.notice_ids()) == sorted(n.notice_id for n in notices)
    assert 2 <= mailbox.peak_sessions <= 4  # concurrent, and within the pool
    assert mailbox.sessions <= 4 + 600 // 100  # reused: a session carries up to 100 mails
    registry = running.daemon.metrics.registry
    assert registry.get_sample_value("webhook_notices_sent_total") == 600
    assert registry.get_sample_value("webhook_notices_failed_total") == 0


async def test_sessions_dropped_mid_way_are_replaced_and_no_notice_is_lost_or_doubled(
    world: World, mailbox: Mailbox, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """The server closes every session while its sixth mail is in: each such mail goes
    out again at once on a new session, every notice exactly once, no send counted failed."""
    mailbox.close_after = 5
    topic = await new_topic("notices", partitions=2)
    notices = await produce_notices(world.producer, topic, 200)
    running = await world.start(mailing(world, mailbox, topic, smtp_connections=3), role="retry")

    await mailbox.wait_for(200)
    await running.stop()
    assert Counter(mailbox.notice_ids()) == Counter(n.notice_id for n in notices)
    assert mailbox.dropped >= 200 // 6 - 3  # sessions were dropped all along, and replaced
    assert mailbox.sessions >= mailbox.dropped
    registry = running.daemon.metrics.registry
    assert registry.get_sample_value("webhook_notices_failed_total") == 0


async def test_notices_wait_while_smtp_is_unreachable_and_then_all_go_out_once(
    world: World, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """No SMTP server listening: sessions cannot be opened, nothing is dropped; once one
    listens, every notice is mailed exactly once."""
    box = Mailbox("127.0.0.1", free_port())
    topic = await new_topic("notices", partitions=2)
    notices = await produce_notices(world.producer, topic, 50)
    running = await world.start(mailing(world, box, topic), role="retry")
    registry = running.daemon.metrics.registry
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_notices_failed_total"):
            await asyncio.sleep(0.05)  # polling a counter with a deadline

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MailboxServer(box, hostname="late.test"), box.host, box.port
    )
    try:
        await box.wait_for(50, timeout=WAIT + 60)  # the shared backoff may be at 60 s
        await running.stop()
    finally:
        server.close()
    assert Counter(box.notice_ids()) == Counter(n.notice_id for n in notices)
    assert registry.get_sample_value("webhook_notices_rejected_total") == 0


async def test_a_mail_the_server_defers_does_not_hold_back_the_others(
    world: World, mailbox: Mailbox, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """A recipient answered 451 (greylisting): its notice is retried alone while the 60
    behind it are mailed; once accepted it is mailed, once, and nothing is dropped."""
    mailbox.greylisted.add("grey@shop.test")
    topic = await new_topic("notices")
    notices = [notice(0, to="grey@shop.test")] + [notice(n) for n in range(1, 61)]
    await produce_raw(world.producer, topic, [(b"one-key", n.encode()) for n in notices])
    running = await world.start(mailing(world, mailbox, topic), role="retry")
    registry = running.daemon.metrics.registry

    await mailbox.wait_for(60)
    assert notices[0].notice_id not in mailbox.notice_ids()
    async with asyncio.timeout(WAIT):
        while not registry.get_sample_value("webhook_notices_failed_total"):
            await asyncio.sleep(0.05)  # polling a counter with a deadline
    mailbox.greylisted.clear()
    await mailbox.wait_for(61)
    await running.stop()
    assert Counter(mailbox.notice_ids()) == Counter(n.notice_id for n in notices)
    assert mailbox.notice_ids()[-1] == notices[0].notice_id
    assert registry.get_sample_value("webhook_notices_rejected_total") == 0


async def test_the_notice_offset_commits_only_behind_mails_the_server_accepted(
    world: World,
    mailbox: Mailbox,
    new_topic: Callable[..., Awaitable[str]],
    kafka_admin: AIOKafkaAdminClient,
) -> None:
    """While the server holds the mail of notice 10, the 39 others go out, but the
    partition's committed offset stays at 10 and the lag shows 30; once accepted, 40."""
    topic = await new_topic("notices")
    notices = [notice(n) for n in range(40)]
    mailbox.hold.add(notices[10].notice_id)
    await produce_raw(world.producer, topic, [(b"one-key", n.encode()) for n in notices])
    running = await world.start(mailing(world, mailbox, topic), role="retry")
    group = f"{world.settings.consumer_group}-notices"
    tp = TopicPartition(topic, 0)

    await mailbox.wait_for(39)
    await wait_committed(kafka_admin, group, {tp: 10})
    lag = {"consumer": "notices", "topic": topic, "partition": "0"}
    registry = running.daemon.metrics.registry
    async with asyncio.timeout(WAIT):
        while registry.get_sample_value("webhook_consumer_lag", lag) != 30:
            await asyncio.sleep(0.05)  # polling the gauge with a deadline
    assert await committed(kafka_admin, group) == {tp: 10}  # not past the held mail
    assert notices[10].notice_id not in mailbox.notice_ids()

    mailbox.release.set()
    await mailbox.wait_for(40)
    await wait_committed(kafka_admin, group, {tp: 40})
    async with asyncio.timeout(WAIT):
        while registry.get_sample_value("webhook_consumer_lag", lag) != 0:
            await asyncio.sleep(0.05)  # polling the gauge with a deadline
    await running.stop()
    assert sorted(mailbox.notice_ids()) == sorted(n.notice_id for n in notices)


async def test_a_killed_process_loses_no_notice(
    world: World,
    mailbox: Mailbox,
    new_topic: Callable[..., Awaitable[str]],
    spawn: Spawn,
    kafka_admin: AIOKafkaAdminClient,
) -> None:
    """SIGKILL while the mail of notice 10 is held, the 39 others sent: after a restart
    the held notice is mailed (with those behind it again, at least once), none lost."""
    topic = await new_topic("notices")
    notices = [notice(n) for n in range(40)]
    mailbox.hold.add(notices[10].notice_id)
    await produce_raw(world.producer, topic, [(b"one-key", n.encode()) for n in notices])
    env = {
        **environment(world.settings),
        "DISPATCHER_NOTICE_TOPIC": topic,
        "DISPATCHER_SMTP_HOST": mailbox.host,
        "DISPATCHER_SMTP_PORT": str(mailbox.port),
    }
    first = await spawn(env)
    await mailbox.wait_for(39)
    group = f"{world.settings.consumer_group}-notices"
    await wait_committed(kafka_admin, group, {TopicPartition(topic, 0): 10})
    first.popen.send_signal(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL
    assert notices[10].notice_id not in mailbox.notice_ids()

    mailbox.hold.clear()
    await spawn(env)
    async with asyncio.timeout(WAIT):
        while notices[10].notice_id not in mailbox.notice_ids():
            await mailbox.wait_for(len(mailbox.messages) + 1)
    sent = Counter(mailbox.notice_ids())
    assert set(sent) == {n.notice_id for n in notices}  # none lost
    assert all(sent[n.notice_id] == 1 for n in notices[:10])  # committed before the kill
    assert sent[notices[10].notice_id] == 1
