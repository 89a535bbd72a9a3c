"""The daemon's Kafka clients: built in one place, fit for a cluster, watched for /readyz.

**Building.** :func:`consumer`, :func:`producer` and :func:`admin` give every client the
settings that matter on a cluster (the bootstrap list, ``DISPATCHER_KAFKA_METADATA_MAX_AGE_MS``,
``DISPATCHER_KAFKA_REQUEST_TIMEOUT_MS``; the producer ``acks=all`` and idempotence) and
install :func:`rebootstrap` on its network client.

**Why rebootstrap.** aiokafka (0.11 to 0.14) uses the bootstrap addresses once, in
``AIOKafkaClient.bootstrap()`` at start. Every later metadata refresh
(``AIOKafkaClient._metadata_update``) asks only the brokers of the metadata it last got
(``ClusterMetadata.brokers()``), and a KRaft broker lists only live, unfenced brokers. A
client that refreshed during a two-broker outage therefore knows the survivor alone; once
the others are back nothing tells it (a refresh happens on errors and every
``metadata_max_age_ms``, five minutes by default), and when the survivor is lost next,
every refresh asks that dead broker only ("Unable to update metadata from [3]"), and
every coordinator it is told of is unknown to it ("StaleMetadata: Broker id 1 not in
current metadata"): the client is stuck until that one broker returns. The Java client
has the same flaw and the same cure since KIP-899 (``metadata.recovery.strategy=
rebootstrap``): when no known broker answers, ask the configured bootstrap addresses
again. :func:`rebootstrap` adds that to each client instance (aiokafka itself is not
patched); the bounded metadata age is a second line: a healthy client learns of brokers
that came back within that time.

**Watching.** :class:`KafkaHealth` samples every client each second (what aiokafka's
state tells: fetch answers per partition, the group coordinator, commits, records not yet
acknowledged, the producer's partition leaders), turns what lasted more than
:data:`STALE_AFTER` seconds into the reasons ``/readyz`` gives under ``kafka`` (and,
once failing, keeps it failing until a commit proves the outage over), logs them as one
outage (``kafka_outage_started``, ``kafka_outage_continues`` at most every
30 s, ``kafka_outage_ended``), and resets the cluster view of a client that stays stuck
(:func:`reset`: the metadata a new client would get, when it differs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import ConnectionGroup
from aiokafka.cluster import ClusterMetadata
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

from dispatcher.logs import Outage
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from dispatcher.consumer import Consumer

log = structlog.get_logger(__name__)

CLIENT_ID = "webhook-dispatcher"
STALE_AFTER = 4.0  # seconds a client may go without an answer before /readyz fails
COMMIT_STALE_AFTER = 2.0  # seconds a commit may go unanswered (they take milliseconds)
TICK = 1.0  # seconds between two samples of the clients
COMMIT_PROBE_AFTER = 3.0  # an idle consumer re-commits its offsets after this long
PROBE_TIMEOUT = 2.0  # seconds one probe of a partition leader may take
RESET_AFTER = 10.0  # seconds a client stays stuck before its cluster view is reset
RESET_INTERVAL = 30.0  # seconds between two resets of the same client
MAX_NAMED = 3  # partitions named in one reason; the rest are counted
RECOVERY_HOLD = 10.0  # seconds an outage outlives its problems without a commit proving it over


# --- building clients --------------------------------------------------------------------


def options(s: Settings) -> dict[str, Any]:
    """What every client of the daemon is built with."""
    return {
        "bootstrap_servers": s.kafka_bootstrap,
        "client_id": CLIENT_ID,
        "metadata_max_age_ms": s.kafka_metadata_max_age_ms,
        "request_timeout_ms": s.kafka_request_timeout_ms,
    }


def consumer(s: Settings, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    """A consumer committing by hand (at-least-once), from the earliest offset; ``extra``
    adds or overrides aiokafka options. ``group_id`` None: a consumer of no group, which
    assigns itself partitions (a replay)."""
    config = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        **options(s),
        **extra,
    }
    client = AIOKafkaConsumer(**config)
    rebootstrap(client._client, f"consumer {group_id or config['client_id']}")
    return client


def producer(s: Settings) -> Producer:
    """The process's producer: every record acked by all in-sync replicas, idempotent (a
    retry after a lost answer adds no duplicate), retried until acked."""
    client = Producer(
        **options(s),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        # Retry records carry whole notifications (up to 80 entities of an import):
        # compressed, they fit the broker's default 1 MB message limit far more often.
        # zstd: as small as gzip, five times cheaper to compress (a batch of attempt
        # records: 80 us against 410 us), which matters on the delivery path.
        compression_type="zstd",
        max_request_size=16 * 1024 * 1024,
    )
    rebootstrap(client.client, "producer")
    return client


def admin(s: Settings) -> AIOKafkaAdminClient:
    """A short-lived admin client (creating topics at start)."""
    client = AIOKafkaAdminClient(**options(s))
    rebootstrap(client._client, "admin")
    return client


class Producer(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's producer, knowing which of its records wait for an ack (for /readyz)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._unacked: dict[int, float] = {}  # send number -> monotonic time it was sent
        self._numbers = itertools.count()

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one record (see ``AIOKafkaProducer.send``); it counts as unacknowledged
        from now until its future is done."""
        number = next(self._numbers)
        self._unacked[number] = time.monotonic()
        try:
            ack: asyncio.Future[Any] = await super().send(
                topic, value, key, partition, timestamp_ms, headers
            )
        except BaseException:
            del self._unacked[number]
            raise
        ack.add_done_callback(lambda _: self._unacked.pop(number, None))
        return ack

    def unacked(self) -> tuple[int, float]:
        """How many records wait for an ack, and for how long the oldest has (seconds)."""
        if not self._unacked:
            return 0, 0.0
        return len(self._unacked), time.monotonic() - min(self._unacked.values())


# --- metadata that survives the loss of every broker it knew -----------------------------


def rebootstrap(client: Any, name: str) -> None:
    """Make ``client`` (an ``aiokafka.client.AIOKafkaClient``) ask its bootstrap addresses
    for metadata when none of the brokers it knows answers (see the module docstring)."""
    refresh = client._metadata_update

    async def metadata_update(cluster_metadata: Any, topics: Any) -> bool:
        if await refresh(cluster_metadata, topics):
            return True
        try:
            answer = await _ask_bootstrap(client, topics)
        except Exception as exc:  # aiokafka's metadata task must never die of this addition
            log.warning("kafka_rebootstrap_failed", client=name, error=repr(exc))
            return False
        if answer is None:
            return False
        metadata, via = answer
        cluster_metadata.update_metadata(metadata)
        log.info("kafka_metadata_rebootstrapped", client=name, via=via, brokers=_brokers(metadata))
        return True

    client._metadata_update = metadata_update


async def reset(client: Any, name: str) -> bool:
    """Give a stuck ``client`` the view of the cluster a new client would start with:
    metadata asked of the bootstrap addresses, taken when it differs from what the client
    holds (other brokers, other partition leaders). The consumer's group membership and
    positions and the producer's idempotence state are kept, which a new client would
    lose. True when the client's view was replaced."""
    topics = set(client._topics)
    answer = await _ask_bootstrap(client, topics)
    if answer is None:
        return False
    metadata, via = answer
    fresh = ClusterMetadata()
    fresh.update_metadata(metadata)
    if _view(fresh, topics) == _view(client.cluster, topics):
        return False  # the client sees what a new one would: the cluster is the problem
    client.cluster.update_metadata(metadata)
    log.warning("kafka_client_reset", client=name, via=via, brokers=_brokers(metadata))
    return True


async def _ask_bootstrap(client: Any, topics: Any) -> tuple[Any, str] | None:
    """The answer to the metadata request ``_metadata_update`` sends, from the first
    bootstrap address that gives one (in random order), and that address."""
    request = MetadataRequest(list(topics) if topics else None)
    hosts = list(client.hosts)
    random.shuffle(hosts)
    for host, port, _ in hosts:
        try:
            conn = await create_conn(
                host,
                port,
                client_id=client._client_id,
                request_timeout_ms=client._request_timeout_ms,
                ssl_context=client._ssl_context,
                security_protocol=client._security_protocol,
                max_idle_ms=client._connections_max_idle_ms,
                sasl_mechanism=client._sasl_mechanism,
                sasl_plain_username=client._sasl_plain_username,
                sasl_plain_password=client._sasl_plain_password,
                sasl_kerberos_service_name=client._sasl_kerberos_service_name,
                sasl_kerberos_domain_name=client._sasl_kerberos_domain_name,
                sasl_oauth_token_provider=client._sasl_oauth_token_provider,
            )
        except (OSError, KafkaError, TimeoutError):
            continue
        try:
            metadata = await conn.send(request)
        except (KafkaError, OSError, TimeoutError):
            continue
        finally:
            conn.close()
        if metadata.brokers:
            return metadata, f"{host}:{port}"
    return None


def _brokers(metadata: Any) -> list[int]:
    return sorted(int(broker[0]) for broker in metadata.brokers)


def _view(cluster: Any, topics: Iterable[str]) -> tuple[frozenset[int], dict[Any, Any]]:
    """The brokers and the partition leaders (of ``topics``) a cluster metadata holds."""
    leaders = {}
    for topic in topics:
        for partition in cluster.partitions_for_topic(topic) or ():
            tp = TopicPartition(topic, partition)
            leaders[tp] = cluster.leader_for_partition(tp)
    return frozenset(b.nodeId for b in cluster.brokers()), leaders


# --- health ------------------------------------------------------------------------------


@dataclass
class CommitHealth:
    """How one consumer's commits go: logged as an outage while they fail, read by
    :class:`KafkaHealth`."""

    consumer: str
    clock: Callable[[], float] = time.monotonic  # KafkaHealth's clock
    pending_since: float | None = None  # when the commit under way started
    failing_since: float | None = None  # when the first commit that failed started
    last_attempt: float = field(init=False)
    succeeded_at: float | None = None  # when the last commit that succeeded ended
    outage: Outage = field(init=False)

    def __post_init__(self) -> None:
        self.last_attempt = self.clock()
        self.outage = Outage(
            "consumer_commit_failed",
            "consumer_commit_still_failing",
            "consumer_commit_recovered",
            consumer=self.consumer,
        )

    def started(self) -> None:
        self.pending_since = self.last_attempt = self.clock()

    def succeeded(self) -> None:
        self.pending_since = self.failing_since = None
        self.succeeded_at = self.clock()
        self.outage.recovered()

    def failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = self.pending_since or self.clock()
        self.pending_since = None
        self.outage.failed(repr(exc))

    def problem(self, now: float, grace: float = STALE_AFTER) -> str | None:
        """Why commits cannot be trusted now, if they failed for over ``grace`` seconds
        (none during an outage) or hung long enough."""
        if self.failing_since is not None and now - self.failing_since > grace:
            return f"offsets not committed for {now - self.failing_since:.0f}s: {self.outage.error}"
        if self.pending_since is not None and now - self.pending_since > COMMIT_STALE_AFTER:
            return f"offset commit unanswered for {now - self.pending_since:.0f}s"
        return None


@dataclass
class KafkaHealth:
    """Samples the clients of one process; :attr:`problems` is what ``/readyz`` says."""

    settings: Settings
    workers: Sequence[Consumer]  # filled in as they start
    producer: Producer
    produced_topics: Sequence[str]  # the topics the producer must be able to reach
    stopping: asyncio.Event  # set on shutdown: clients closing are no outage
    clock: Callable[[], float] = time.monotonic
    problems: list[str] = field(default_factory=list)
    _first_seen: dict[tuple[str, Any], float] = field(default_factory=dict)
    _probes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _stuck_since: dict[str, float] = field(default_factory=dict)
    _reset_at: dict[str, float] = field(default_factory=dict)
    _outage_since: float | None = None  # when the problems of the outage under way began
    _clear_since: float | None = None  # when they last cleared, the outage not yet over
    _troubled_at: float | None = None  # the last sample that found a problem
    _outage: Outage = field(
        default_factory=lambda: Outage(
            "kafka_outage_started", "kafka_outage_continues", "kafka_outage_ended"
        )
    )

    async def run(self) -> None:
        """Sample every second until cancelled."""
        try:
            while True:
                await self.sample()
                await asyncio.sleep(TICK)  # a sampling period, not coordination
        finally:
            for probe in self._probes.values():
                probe.cancel()

    async def sample(self) -> None:
        """Look at every client once; update :attr:`problems`, the outage log line and
        the probes; reset a client that stays stuck."""
        if self.stopping.is_set():
            self.problems = []
            return
        self._revive_metadata_tasks()
        now = self.clock()
        problems: dict[str, list[str]] = {}
        for worker in list(self.workers):
            found = self._consumer_problems(worker, now)
            if found:
                problems[worker.name] = found
            self._maybe_probe_commit(worker, now)
        found = await self._producer_problems(now)
        if found:
            problems["producer"] = found
        troubled = set(problems)
        if troubled:
            self._clear_since, self._troubled_at = None, now
        elif self._outage_since is not None:
            problems = self._unproven_recovery(now)
        self.problems = [f"{name}: {', '.join(why)}" for name, why in problems.items()]
        if self.problems:
            if self._outage_since is None:
                self._outage_since = now
            self._outage.failed("; ".join(self.problems))
        else:
            self._outage_since = self._clear_since = self._troubled_at = None
            self._outage.recovered()
        await self._reset_stuck(troubled, now)

    def _unproven_recovery(self, now: float) -> dict[str, list[str]]:
        """The problems of an outage have cleared: it is over once every consumer that
        ever committed has committed since the last sample that found a problem (an idle
        one is probed every 3 s; a commit during the outage proves nothing: the
        coordinator may be the next to go), or after :data:`RECOVERY_HOLD` seconds without
        a problem. Until then it goes on, so that a moment between two problems (fetches
        answered by a new leader before the next commit fails) is not taken for the end
        of it."""
        if self._clear_since is None:
            self._clear_since = now
        if now - self._clear_since >= RECOVERY_HOLD:
            return {}
        since = self._troubled_at if self._troubled_at is not None else self._clear_since
        return {
            w.name: ["no offset commit succeeded since the problems cleared"]
            for w in self.workers
            if w.commits.succeeded_at is not None and w.commits.succeeded_at <= since
        }

    # --- consumers --------------------------------------------------------------------

    def _consumer_problems(self, worker: Consumer, now: float) -> list[str]:
        c = worker.consumer
        found = []
        assignment = c.assignment()
        paused = c.paused()
        fetcher = getattr(c, "_fetcher", None)
        buffered = set(getattr(fetcher, "_records", {}))
        wall = time.time()
        stale = []
        for tp in assignment:
            key = (worker.name, tp)
            if tp in paused or tp in buffered:
                self._first_seen[key] = now  # not fetched on purpose: waits for us
                continue
            polled = c.last_poll_timestamp(tp)
            age = now - self._first_seen.setdefault(key, now)
            if polled is not None:
                age = min(age, wall - polled / 1000)
            if age > STALE_AFTER:
                stale.append((tp, age))
        self._forget(worker.name, assignment)
        if stale:
            stale.sort()
            found.append(
                f"no fetch answered for {max(a for _, a in stale):.0f}s from the leader of "
                + _partitions([tp for tp, _ in stale])
            )
        coordinator = getattr(c, "_coordinator", None)
        key = (worker.name, "coordinator")
        if coordinator is not None and getattr(coordinator, "coordinator_id", 0) is None:
            age = now - self._first_seen.setdefault(key, now)
            if age > STALE_AFTER:
                found.append(f"no group coordinator for {age:.0f}s")
        else:
            self._first_seen.pop(key, None)
        # During an outage a failed commit counts at once: it is no blip.
        grace = 0.0 if self._outage_since is not None else STALE_AFTER
        commit = worker.commits.problem(now, grace)
        if commit is not None:
            found.append(commit)
        return found

    def _forget(self, name: str, assignment: Iterable[TopicPartition]) -> None:
        keep = set(assignment)
        for key in [k for k in self._first_seen if k[0] == name]:
            if isinstance(key[1], TopicPartition) and key[1] not in keep:
                del self._first_seen[key]

    def _maybe_probe_commit(self, worker: Consumer, now: float) -> None:
        """An idle consumer commits its last offsets again now and then: only a commit
        tells whether the group coordinator can still store offsets."""
        running = self._probes.get(worker.name)
        if running is not None and not running.done():
            return
        commits = worker.commits
        if commits.pending_since is None and now - commits.last_attempt > COMMIT_PROBE_AFTER:
            commits.last_attempt = now
            self._probes[worker.name] = asyncio.create_task(
                worker.probe_commit(), name=f"commit-probe-{worker.name}"
            )

    # --- the producer -----------------------------------------------------------------

    async def _producer_problems(self, now: float) -> list[str]:
        found = []
        count, oldest = self.producer.unacked()
        if oldest > STALE_AFTER:
            found.append(f"{count} records unacknowledged, the oldest for {oldest:.0f}s")
        unreachable = await self._unreachable_leaders()
        stale = []
        for key in [k for k in self._first_seen if k[0] == "producer"]:
            if key[1] not in unreachable:
                del self._first_seen[key]
        for tp in unreachable:
            if now - self._first_seen.setdefault(("producer", tp), now) > STALE_AFTER:
                stale.append(tp)
        if stale:
            found.append("cannot reach the leader of " + _partitions(stale))
        return found

    async def _unreachable_leaders(self) -> set[TopicPartition]:
        """The partitions of the topics the producer writes to whose leader is unknown or
        cannot be connected to (a connection is opened if none is)."""
        client = self.producer.client
        cluster = client.cluster
        by_leader: dict[int, list[TopicPartition]] = {}
        unreachable: set[TopicPartition] = set()
        for topic in self.produced_topics:
            partitions = cluster.partitions_for_topic(topic)
            if partitions is None:
                client.add_topic(topic)  # learnt by the next metadata refresh
                continue
            for partition in partitions:
                tp = TopicPartition(topic, partition)
                leader = cluster.leader_for_partition(tp)
                if leader is None or leader == -1:
                    unreachable.add(tp)
                else:
                    by_leader.setdefault(leader, []).append(tp)
        for leader, tps in by_leader.items():
            conn = client._conns.get((leader, ConnectionGroup.DEFAULT))
            if conn is not None and conn.connected():
                continue
            ready = False
            with contextlib.suppress(TimeoutError, KafkaError, OSError):
                ready = await asyncio.wait_for(client.ready(leader), PROBE_TIMEOUT)
            if not ready:
                unreachable.update(tps)
        return unreachable

    # --- stuck clients ----------------------------------------------------------------

    async def _reset_stuck(self, troubled: set[str], now: float) -> None:
        for name in list(self._stuck_since):
            if name not in troubled:
                del self._stuck_since[name]
        for name in troubled:
            since = self._stuck_since.setdefault(name, now)
            if now - since < RESET_AFTER or now - self._reset_at.get(name, -1e9) < RESET_INTERVAL:
                continue
            self._reset_at[name] = now
            client = self._client(name)
            if client is not None:
                await reset(client, name)
                client.force_metadata_update()  # a prompt refresh; its answer is not awaited

    def _revive_metadata_tasks(self) -> None:
        """Restart the metadata task of a client (aiokafka's ``_md_synchronizer``) that
        ended while the client is open: without it every metadata refresh, and every
        coordinator lookup waiting on one, would wait forever."""
        for name in ["producer", *(w.name for w in self.workers)]:
            client = self._client(name)
            task = getattr(client, "_sync_task", None)
            if not isinstance(task, asyncio.Task) or not task.done() or task.cancelled():
                continue
            log.error("kafka_metadata_task_restarted", client=name, error=repr(task.exception()))
            client._sync_task = asyncio.create_task(client._md_synchronizer())

    def _client(self, name: str) -> Any:
        if name == "producer":
            return self.producer.client
        for worker in self.workers:
            if worker.name == name:
                return getattr(worker.consumer, "_client", None)
        return None


def _partitions(tps: Sequence[TopicPartition]) -> str:
    names = sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
    more = len(names) - MAX_NAMED
    return ", ".join(names[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
