"""What /readyz says of Kafka: problems of this process's own clients that lasted over 4 s.

The clients are stand-ins exposing what :class:`dispatcher.kafka.KafkaHealth` reads of
aiokafka's (assignment, paused partitions, buffered records, last fetch answer per
partition, the group coordinator); no broker is involved.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import structlog
from aiokafka import TopicPartition

from dispatcher import kafka
from dispatcher.kafka import RECOVERY_HOLD, CommitHealth, KafkaHealth
from dispatcher.settings import Settings

TP0, TP1, TP2 = (TopicPartition("events", p) for p in range(3))


class Clock:
    """Monotonic time that moves only when told (it starts at the real one)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeConsumer:
    """The parts of an AIOKafkaConsumer the health sampling reads."""

    assigned: set[TopicPartition]
    polled_ms: dict[TopicPartition, int] = field(default_factory=dict)  # wall clock, ms
    paused_tps: set[TopicPartition] = field(default_factory=set)
    buffered: set[TopicPartition] = field(default_factory=set)
    coordinator_id: int | None = 1

    def __post_init__(self) -> None:
        self._fetcher = SimpleNamespace(_records={tp: object() for tp in self.buffered})
        self._coordinator = SimpleNamespace(coordinator_id=self.coordinator_id)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def paused(self) -> set[TopicPartition]:
        return self.paused_tps

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.polled_ms.get(tp)


@dataclass
class FakeWorker:
    consumer: Any
    name: str = "dispatch"
    commits: CommitHealth = field(default_factory=lambda: CommitHealth("dispatch"))
    probes: int = 0

    async def probe_commit(self) -> None:
        self.probes += 1


def idle_producer() -> Any:
    cluster = SimpleNamespace(partitions_for_topic=lambda _topic: None)
    return SimpleNamespace(unacked=lambda: (0, 0.0), client=SimpleNamespace(cluster=cluster))


def health(worker: FakeWorker, clock: Clock) -> KafkaHealth:
    workers: list[Any] = [worker]
    return KafkaHealth(
        Settings.from_env({}), workers, idle_producer(), [], stopping=asyncio.Event(), clock=clock
    )


def ago_ms(seconds: float) -> int:
    return int((time.time() - seconds) * 1000)


async def test_a_partition_without_fetch_answers_for_4s_is_named_once_it_lasted() -> None:
    """A partition whose leader answered no fetch for 10 s fails readiness only once it has
    been seen so for over 4 s; paused ones and ones whose records wait for us never do."""
    clock = Clock()
    consumer = FakeConsumer(
        {TP0, TP1, TP2}, polled_ms={TP0: ago_ms(10)}, paused_tps={TP1}, buffered={TP2}
    )
    kafka = health(FakeWorker(consumer), clock)
    with structlog.testing.capture_logs() as lines:
        await kafka.sample()
        assert kafka.problems == []  # first seen now: not for 4 s yet
        clock.now += 5
        consumer.polled_ms[TP0] = ago_ms(15)
        await kafka.sample()
        assert kafka.problems == ["dispatch: no fetch answered for 5s from the leader of events[0]"]
        clock.now += 1
        await kafka.sample()
        consumer.polled_ms[TP0] = ago_ms(0.2)  # answers again
        clock.now += 1
        await kafka.sample()
    assert kafka.problems == []
    assert [line["event"] for line in lines] == ["kafka_outage_started", "kafka_outage_ended"]


async def test_a_partition_resumed_after_a_long_pause_is_not_stale() -> None:
    """A partition paused for minutes (a retry not due) has an old last answer: resumed, it
    has 4 s for its first answer."""
    clock = Clock()
    consumer = FakeConsumer({TP0}, polled_ms={TP0: ago_ms(600)}, paused_tps={TP0})
    kafka = health(FakeWorker(consumer), clock)
    await kafka.sample()
    consumer.paused_tps = set()
    clock.now += 3
    await kafka.sample()
    assert kafka.problems == []
    clock.now += 2
    await kafka.sample()
    assert kafka.problems == ["dispatch: no fetch answered for 5s from the leader of events[0]"]


async def test_no_group_coordinator_and_failing_commits_are_named() -> None:
    """No coordinator for over 4 s, and commits failing for over 4 s, fail readiness; an
    idle consumer is made to commit again so that a failing coordinator shows."""
    clock = Clock()
    consumer = FakeConsumer({TP0}, polled_ms={TP0: ago_ms(0.1)}, coordinator_id=None)
    worker = FakeWorker(consumer)
    kafka = health(worker, clock)
    await kafka.sample()
    clock.now += 5
    consumer.polled_ms[TP0] = ago_ms(0.1)
    await kafka.sample()
    assert kafka.problems == ["dispatch: no group coordinator for 5s"]
    await asyncio.sleep(0)  # the probe task runs
    assert worker.probes >= 1

    commits = CommitHealth("dispatch")
    commits.started()
    assert commits.problem(time.monotonic()) is None
    assert commits.problem(time.monotonic() + 3) == "offset commit unanswered for 3s"
    commits.failed(TimeoutError())
    assert commits.problem(time.monotonic() + 5) == ("offsets not committed for 5s: TimeoutError()")
    commits.succeeded()
    assert commits.problem(time.monotonic() + 5) is None


async def test_the_installed_aiokafka_has_what_rebootstrap_and_health_read() -> None:
    """The private parts of aiokafka that ``dispatcher/kafka.py`` relies on exist (a new
    aiokafka that renamed them fails here, not in production)."""
    consumer = kafka.consumer(Settings.from_env({}), "unit-test")  # built, never started
    client = consumer._client
    for name in (
        "_client_id", "_request_timeout_ms", "_ssl_context", "_security_protocol",
        "_connections_max_idle_ms", "_sasl_mechanism", "_sasl_plain_username",
        "_sasl_plain_password", "_sasl_kerberos_service_name", "_sasl_kerberos_domain_name",
        "_sasl_oauth_token_provider", "_topics", "_conns", "cluster", "hosts",
    ):  # fmt: skip
        assert hasattr(client, name), name
    assert client._metadata_update.__qualname__.startswith("rebootstrap.")
    assert client.hosts == [("127.0.0.1", 9092, client.hosts[0][2])]
    for name in ("_fetcher", "_coordinator", "last_poll_timestamp", "paused"):
        assert hasattr(consumer, name), name
    producer = kafka.producer(Settings.from_env({}))
    assert producer.client._metadata_update.__qualname__.startswith("rebootstrap.")
    assert producer.unacked() == (0, 0.0)
    await consumer.stop()
    await producer.stop()


class FakeClient:
    """An aiokafka client's metadata task (``_sync_task``), as KafkaHealth sees it."""

    def __init__(self) -> None:
        self.started = 0
        self._sync_task: asyncio.Task[None] | None = None

    async def _md_synchronizer(self) -> None:
        self.started += 1
        await asyncio.Event().wait()  # runs until cancelled, as aiokafka's does


async def test_a_metadata_task_that_died_is_started_again_and_a_live_one_is_left_alone() -> None:
    """A client whose metadata task ended with an error would never refresh metadata nor
    find its group coordinator again: sampling starts it again, once, and logs it."""

    async def crashed() -> None:
        raise RuntimeError("unable to perform operation: the handler is closed")

    client = FakeClient()
    client._sync_task = asyncio.create_task(crashed())
    await asyncio.gather(client._sync_task, return_exceptions=True)
    consumer = FakeConsumer({TP0})
    consumer._client = client  # type: ignore[attr-defined]
    h = health(FakeWorker(consumer), Clock())
    with structlog.testing.capture_logs() as logs:
        await h.sample()
        await asyncio.sleep(0)  # let the new task start
        await h.sample()
    assert client.started == 1
    assert client._sync_task is not None and not client._sync_task.done()
    restarted = [e for e in logs if e["event"] == "kafka_metadata_task_restarted"]
    assert len(restarted) == 1 and "handler is closed" in restarted[0]["error"]
    client._sync_task.cancel()


async def test_an_outage_ends_on_a_commit_not_on_a_quiet_moment_between_two_problems() -> None:
    """Two brokers lost: fetches stop (readiness fails), a new leader answers them again
    before the next commit probe fails. The outage goes on through that moment; a commit
    that succeeded during it proves nothing (the coordinator may be the next to go), one
    failing counts at once, and it ends when a commit succeeds after the problems
    cleared: one outage in the log, not two."""
    clock = Clock()
    consumer = FakeConsumer({TP0}, polled_ms={TP0: ago_ms(0.1)})
    worker = FakeWorker(consumer, commits=CommitHealth("dispatch", clock=clock))
    worker.commits.succeeded()  # it committed before the outage
    kafka = health(worker, clock)
    with structlog.testing.capture_logs() as lines:
        await kafka.sample()
        assert kafka.problems == []
        clock.now += 5
        consumer.polled_ms[TP0] = ago_ms(5)  # no fetch answered since
        await kafka.sample()
        assert kafka.problems == ["dispatch: no fetch answered for 5s from the leader of events[0]"]
        worker.commits.started()
        worker.commits.succeeded()  # the coordinator's broker still up
        clock.now += 1
        consumer.polled_ms[TP0] = ago_ms(0.1)  # the new leader answers
        await kafka.sample()
        assert kafka.problems == ["dispatch: no offset commit succeeded since the problems cleared"]
        worker.commits.started()
        worker.commits.failed(TimeoutError())  # the next probe's commit fails
        clock.now += 1  # failing for 1 s: under the 4 s grace, none during an outage
        await kafka.sample()
        assert kafka.problems[0].startswith("dispatch: offsets not committed for"), kafka.problems
        worker.commits.started()
        clock.now += 1
        worker.commits.succeeded()  # the cluster healed: a commit after the last problem
        await kafka.sample()
        assert kafka.problems == []
    events = [line["event"] for line in lines if line["event"].startswith("kafka_outage")]
    assert events == ["kafka_outage_started", "kafka_outage_ended"], events


async def test_an_outage_without_a_commit_to_prove_its_end_ends_after_the_hold() -> None:
    """A consumer that has nothing to commit again (it owns no committed offset) cannot
    prove the outage over: it ends once no problem was seen for RECOVERY_HOLD seconds."""
    clock = Clock()
    consumer = FakeConsumer({TP0}, polled_ms={TP0: ago_ms(0.1)})
    worker = FakeWorker(consumer, commits=CommitHealth("dispatch", clock=clock))
    worker.commits.succeeded()
    kafka = health(worker, clock)
    await kafka.sample()
    clock.now += 5
    consumer.polled_ms[TP0] = ago_ms(5)
    await kafka.sample()
    assert kafka.problems != []
    consumer.polled_ms[TP0] = ago_ms(0.1)
    clock.now += 1
    await kafka.sample()
    assert kafka.problems != []  # the hold starts
    clock.now += RECOVERY_HOLD - 1
    consumer.polled_ms[TP0] = ago_ms(0.1)
    await kafka.sample()
    assert kafka.problems != []
    clock.now += 1
    consumer.polled_ms[TP0] = ago_ms(0.1)
    await kafka.sample()
    assert kafka.problems == []


async def test_an_outage_of_commits_ends_with_the_commit_that_succeeded() -> None:
    """Commits alone failed: the first that succeeds again (before the next sample)
    clears the problem and proves the end at once, not one probe later."""
    clock = Clock()
    consumer = FakeConsumer({TP0}, polled_ms={TP0: ago_ms(0.1)})
    worker = FakeWorker(consumer, commits=CommitHealth("dispatch", clock=clock))
    worker.commits.succeeded()
    kafka = health(worker, clock)
    worker.commits.started()
    worker.commits.failed(TimeoutError())
    clock.now += 5
    consumer.polled_ms[TP0] = ago_ms(0.1)
    await kafka.sample()
    assert kafka.problems[0].startswith("dispatch: offsets not committed for"), kafka.problems
    worker.commits.started()
    clock.now += 0.5
    worker.commits.succeeded()
    clock.now += 0.5
    consumer.polled_ms[TP0] = ago_ms(0.1)
    await kafka.sample()
    assert kafka.problems == []
