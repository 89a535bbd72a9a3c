"""A Kafka consumer loop with at-least-once commits and a bounded amount of work in flight.

The loop is here, once, for every consumer: fetch, hand each record to
:meth:`Consumer.handle` (a subclass decodes it and registers its offset with
:meth:`Consumer.track`, together with the work that finishes it), stop taking records
when the worker no longer accepts them. An offset is committed only once every record up
to it has finished: by a commit loop at least every ``COMMIT_INTERVAL`` seconds and soon
after a partition's records in flight have all finished, on revocation and on shutdown.

A record must cost at most itself: when handling it or its work raises, the error is
logged with its traceback, counted, and the record goes to the dead-letter topic with the
reason ``internal: ...``; the loop goes on. On shutdown, work still
unfinished when the drain timeout expires is handed off (:meth:`Consumer.hand_off`:
the sender defers it to the delay topic) so that every offset can commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from dispatcher.backoff import Backoff
from dispatcher.deadletter import DeadLetters, where
from dispatcher.kafka import CommitHealth
from dispatcher.lag import CommittedLag
from dispatcher.metrics import Metrics
from dispatcher.offsets import PartitionOffsets
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

COMMIT_INTERVAL = 0.5  # seconds: what finished is committed at least this often
COMMIT_GAP = 0.1  # seconds: commits asked for by finished batches are at most this often
COMMIT_TIMEOUT = 10.0  # seconds; a commit that takes longer is given up and tried later
HAND_OFF_TIMEOUT = 10.0  # seconds allowed, after the drain timeout, for handed-off work
# Records handled between two turns of the event loop: handling a record that does not
# wait never yields, so a fetch of hundreds would hold back, for milliseconds, the answers
# of the POSTs under way (an import's next batch waits for its previous one's answer).
YIELD_EVERY = 32
Record: TypeAlias = "ConsumerRecord[Any, Any]"


@dataclass(slots=True)
class _Entry:
    """One record that a piece of work in flight finishes."""

    tp: TopicPartition
    offsets: PartitionOffsets  # the partition's bookkeeping when the work was taken
    record: Record
    bounded: bool  # holds one of the worker's slots


class Consumer:
    """Consumes, hands records to :meth:`handle`, commits what finished in order."""

    name = "worker"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        settings: Settings,
        metrics: Metrics,
        max_pending: int,
        dead_letters: DeadLetters | None = None,
        commit_interval: float = COMMIT_INTERVAL,
        fetch_max_records: int = 500,
    ) -> None:
        """``settings`` gives the drain timeout and whether undecodable batches are
        skipped; ``max_pending`` bounds the records taken and not finished."""
        self.consumer = consumer
        self._metrics = metrics
        self.undecodable = Undecodable(skip=settings.skip_undecodable_batches)
        self._slots = asyncio.Semaphore(max_pending)
        self._drain_timeout = settings.drain_timeout_seconds
        self._dead_letters = dead_letters
        self._commit_interval = commit_interval
        self._fetch_max = fetch_max_records
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._inflight: dict[asyncio.Future[None], list[_Entry]] = {}
        self._owned: set[TopicPartition] = set()  # assigned to us now
        self._generation = 0  # bumped on every revoke: records fetched before are stale
        self._stop = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self.commits = CommitHealth(self.name)  # how commits go (/readyz, outage lines)
        self.assigned = asyncio.Event()
        self.lag = CommittedLag(
            consumer, metrics.consumer_lag, self.name, committed_by_us=self._committed_by_us
        )

    # --- for subclasses -----------------------------------------------------------------

    async def handle(self, tp: TopicPartition, record: Record) -> None:
        """Decode one record and :meth:`track` its offset (with the work finishing it)."""
        raise NotImplementedError

    def hand_off(self) -> None:
        """The drain timeout expired on shutdown: make the work in flight finish now
        without losing it (the sender defers its attempts to the delay topic)."""

    def held(self, tp: TopicPartition) -> bool:
        """Whether the subclass keeps ``tp`` paused for a reason of its own."""
        return False

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with (commits what finished on revoke)."""
        return _Rebalance(self)

    def accepting(self, tp: TopicPartition) -> bool:
        """Whether records of ``tp`` may be taken now: it is ours and we do not stop.
        The loop checks it before each record, so that once one record of a batch was
        refused, no later one of the same partition is taken (and committed past it)."""
        return tp in self._owned and not self._stop.is_set()

    async def track(
        self,
        tp: TopicPartition,
        record: Record,
        work: Awaitable[None] | None,
        *,
        bounded: bool = True,
    ) -> bool:
        """Register ``record``'s offset; it finishes when ``work`` does (at once when None).

        ``work`` may be a coroutine or a future shared by several offsets (an import
        batch). Bounded work first waits for a free slot, so a burst of records cannot
        grow memory without limit; unbounded work is bounded by its owner. False when the
        record was not taken: its partition was revoked meanwhile, or the worker stops
        (the record is consumed again by the partition's next owner).
        """
        if bounded and work is not None and not await self._acquire():
            _discard(work)
            return False
        return self._register(tp, record, work, bounded)

    def take(self, tp: TopicPartition, record: Record, work: Awaitable[None] | None) -> bool:
        """:meth:`track` for unbounded work (or none), without a coroutine of its own: an
        import takes one per entity."""
        return self._register(tp, record, work, False)

    def _register(
        self, tp: TopicPartition, record: Record, work: Awaitable[None] | None, bounded: bool
    ) -> bool:
        if tp not in self._owned:
            if bounded and work is not None:
                self._slots.release()
            _discard(work)
            return False
        offsets = self._offsets.get(tp)
        if offsets is None:  # not setdefault: that builds a PartitionOffsets per record
            offsets = self._offsets[tp] = PartitionOffsets()
        try:
            offsets.add(record.offset)
        except ValueError:  # fetched before a revoke and re-assignment: re-read from there
            if bounded and work is not None:
                self._slots.release()
            _discard(work)
            return False
        if work is None:
            offsets.done(record.offset)
            return True
        future = work if isinstance(work, asyncio.Future) else asyncio.ensure_future(work)
        waiting = self._inflight.get(future)
        if waiting is None:
            waiting = self._inflight[future] = []
            future.add_done_callback(self._finished)
        waiting.append(_Entry(tp, offsets, record, bounded))
        return True

    def resume(self, tp: TopicPartition) -> None:
        """Resume ``tp`` unless it was revoked meanwhile."""
        if tp in self.consumer.assignment():
            self.consumer.resume(tp)

    async def _acquire(self) -> bool:
        """A slot; False if the worker stops first (the caller then checks that the
        partition is still ours)."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        acquire = asyncio.ensure_future(self._slots.acquire())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not acquire.done():
            acquire.cancel()
            return False
        return True

    # --- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, commit and close the consumer."""
        self._stop = stop
        log.info("consumer_started", consumer=self.name)
        stopping = asyncio.ensure_future(stop.wait())
        committer = asyncio.ensure_future(self._commit_loop())
        try:
            while not stop.is_set():
                fetch = asyncio.ensure_future(self._fetch())
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    break
                for tp, records in fetch.result().items():
                    if tp not in self.consumer.assignment():
                        continue  # moved to another member while an earlier one was handled
                    await self.process(tp, records)
            committer.cancel()
            if await self.drain(self._drain_timeout):
                self.hand_off()
                await self.drain(HAND_OFF_TIMEOUT)
            await self.commit()
        finally:
            stopping.cancel()
            committer.cancel()
            for future in list(self._inflight):
                future.cancel()
            await self.consumer.stop()
            log.info("consumer_stopped", consumer=self.name)

    async def process(self, tp: TopicPartition, records: list[Record]) -> None:
        """Hand each record of one fetch to :meth:`handle`, in offset order. A revoke
        meanwhile (even followed by the same partition's re-assignment) ends the batch:
        its records are read again from the committed offset."""
        generation = self._generation
        for i, record in enumerate(records):
            if i and not i % YIELD_EVERY:
                await asyncio.sleep(0)  # the loop's turn (see YIELD_EVERY)
            if not self.accepting(tp) or generation != self._generation:
                return
            try:
                await self.handle(tp, record)
            except Exception as exc:  # a bug in our code costs this record, not the loop
                await self._record_failed(tp, record, exc)

    async def drain(self, within: float, partitions: Iterable[TopicPartition] | None = None) -> int:
        """Wait up to ``within`` seconds for work in flight (of ``partitions``, or all);
        the number of pieces of work still unfinished then."""
        wanted = None if partitions is None else set(partitions)
        tasks = [
            f
            for f, entries in self._inflight.items()
            if wanted is None or any(entry.tp in wanted for entry in entries)
        ]
        if not tasks:
            return 0
        _, late = await asyncio.wait(tasks, timeout=within)
        if late:
            log.warning("consumer_drain_timeout", consumer=self.name, unfinished=len(late))
        return len(late)

    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit every partition (of ``partitions``, or every one we own) whose
        committable offset moved."""
        async with self._commit_lock:
            wanted = self._owned if partitions is None else set(partitions)
            to_commit = {}
            for tp, offsets in self._offsets.items():
                offset = offsets.committable() if tp in wanted else None
                if offset is not None:
                    to_commit[tp] = offset
            if not to_commit:
                return
            try:
                async with asyncio.timeout(COMMIT_TIMEOUT):
                    await self.before_commit()
            except TimeoutError:
                log.warning(
                    "commit_postponed", consumer=self.name, reason="attempt records not acked"
                )
                return
            if not await self._send_commit(to_commit):
                return
            for tp, offset in to_commit.items():
                if tp in self._offsets:
                    self._offsets[tp].committed(offset)

    async def before_commit(self) -> None:
        """What must be durable before offsets commit (the consumers that make attempts:
        their attempt records); nothing by default."""

    async def probe_commit(self) -> None:
        """Commit again the offsets last committed, unchanged: while nothing new finishes,
        only a commit tells whether the group coordinator can still store offsets (the
        commit health that ``/readyz`` reads)."""
        async with self._commit_lock:
            again = {
                tp: offsets.last_committed
                for tp, offsets in self._offsets.items()
                if tp in self._owned and offsets.last_committed is not None
            }
            if again:
                await self._send_commit(again)

    async def _send_commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets``; False when it failed (logged as an outage, tried again
        later: at worst records are consumed twice)."""
        self.commits.started()
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT):
                await self.consumer.commit(
                    {tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()}
                )
        except (KafkaError, TimeoutError) as exc:
            self.commits.failed(exc)
            return False
        self.commits.succeeded()
        return True

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._owned -= revoked  # from now on no record of these is taken
        self._generation += 1
        await self.drain(self._drain_timeout, revoked)
        await self.commit(revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
        self.lag.forget(revoked)
        log.info("consumer_partitions_revoked", consumer=self.name, partitions=_names(revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owned |= assigned
        log.info("consumer_partitions_assigned", consumer=self.name, partitions=_names(assigned))
        self.assigned.set()

    # --- internals ----------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commits at least every commit interval, and soon after a partition's work in
        flight all finished (a completed batch); publishes the committed lag after each
        commit (the end offsets are refreshed beside it, see :mod:`dispatcher.lag`)."""
        refresher = asyncio.ensure_future(self.lag.run(lambda: self._owned))
        try:
            while True:
                wanted = asyncio.ensure_future(self._commit_wanted.wait())
                await asyncio.wait({wanted}, timeout=self._commit_interval)
                wanted.cancel()
                self._commit_wanted.clear()
                await self.commit()
                self.lag.publish(self._owned)
                await asyncio.sleep(COMMIT_GAP)  # a rate limit: finished batches coalesce
        finally:
            refresher.cancel()

    def _committed_by_us(self, tp: TopicPartition) -> int | None:
        offsets = self._offsets.get(tp)
        return offsets.last_committed if offsets is not None else None

    async def _record_failed(self, tp: TopicPartition, record: Record, exc: Exception) -> None:
        self._count_errors(1)
        log.error("record_failed", consumer=self.name, **where(record), exc_info=exc)
        offsets = self._offsets.get(tp)
        last = offsets.last if offsets is not None else None
        if last is not None and record.offset <= last:
            return  # taken before it failed: the work it was taken with finishes it
        await self.track(tp, record, self._dead_letter(record, exc), bounded=False)

    async def _dead_letter(self, record: Record, exc: BaseException) -> None:
        """Dead-letter a record whose handling failed; never raises (a dead letter that
        cannot be produced is logged with the record's coordinates, then given up)."""
        if self._dead_letters is None:
            return
        try:
            await self._dead_letters.send(record, f"internal: {type(exc).__name__}: {exc}")
        except Exception as error:
            log.error("dead_letter_failed", consumer=self.name, **where(record), error=repr(error))

    def _finished(self, future: asyncio.Future[None]) -> None:
        entries = self._inflight.pop(future)
        for entry in entries:
            if entry.bounded:
                self._slots.release()
        if future.cancelled():
            return
        # Only the assignment the work was taken under: after a revoke (and perhaps a
        # new assignment of the same partition) its bookkeeping is gone or another.
        current = [e for e in entries if self._offsets.get(e.tp) is e.offsets]
        exc = future.exception()
        if exc is not None:
            self._work_failed(current, exc)
            return
        for entry in current:
            entry.offsets.done(entry.record.offset)
            if entry.offsets.in_flight == 0:
                self._commit_wanted.set()

    def _work_failed(self, entries: list[_Entry], exc: BaseException) -> None:
        """Work raised: each record it finishes goes to the dead-letter topic instead."""
        self._count_errors(len(entries))
        log.error(
            "record_work_failed",
            consumer=self.name,
            records=[f"{e.record.topic}/{e.record.partition}/{e.record.offset}" for e in entries],
            exc_info=exc,
        )
        for entry in entries:
            rescue = asyncio.ensure_future(self._dead_letter(entry.record, exc))
            self._inflight[rescue] = [_Entry(entry.tp, entry.offsets, entry.record, False)]
            rescue.add_done_callback(self._finished)

    def _count_errors(self, records: int) -> None:
        self._metrics.record_errors.labels(self.name).inc(records)
        self._metrics.dead_letters.labels("internal").inc(records)

    # --- batches that cannot be decoded ------------------------------------------------

    async def _fetch(self) -> dict[TopicPartition, list[Record]]:
        """``getmany``, surviving a record batch that cannot be decoded.

        Such a batch (a codec we lack, a bad CRC, corrupt data) makes aiokafka's
        ``getmany`` raise, every time, at the same place. Its partition waits there,
        paused and tried again with backoff (``/readyz`` names it meanwhile), unless
        ``DISPATCHER_SKIP_UNDECODABLE_BATCHES`` is set: then the batch is skipped, its
        offsets logged. The records the failed call had taken are returned, not lost.
        """
        self._retry_stuck()
        try:
            fetched: dict[TopicPartition, list[Record]] = await self.consumer.getmany(
                timeout_ms=500, max_records=self._fetch_max
            )
        except Exception as exc:
            failure = _decode_failure(exc)
            if failure is None:
                raise
            return self._undecodable_batch(failure)
        if self.undecodable.stuck:
            self._passed(fetched)
        return fetched

    def _undecodable_batch(self, failure: _DecodeFailure) -> dict[TopicPartition, list[Record]]:
        tp, first, end = failure.tp, failure.offset, failure.end
        fetched = dict(failure.drained)
        if failure.before:
            fetched[tp] = failure.before
        self._passed(failure.drained)
        if tp not in self.consumer.assignment():
            return fetched  # revoked meanwhile: its next owner meets the batch
        state = self.undecodable
        where = {
            "consumer": self.name,
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": first,
            "last_offset": end - 1,
            "error": failure.error,
        }
        if state.skip:
            self.consumer.seek(tp, end)
            state.stuck.pop(tp, None)
            self._metrics.undecodable_batches.labels(self.name, tp.topic).inc()
            self._metrics.undecodable_skipped.labels(self.name, tp.topic).inc(end - first)
            log.error("undecodable_batch_skipped", **where, skipped=end - first)
            return fetched
        self.consumer.seek(tp, first)  # not past the records returned before the batch
        self.consumer.pause(tp)
        now = time.monotonic()
        stuck = state.stuck.get(tp)
        if stuck is None or stuck.offset != first:
            stuck = state.stuck[tp] = _Stuck(first, failure.error, since=now, logged=now)
            self._metrics.undecodable_batches.labels(self.name, tp.topic).inc()
            log.error(
                "undecodable_batch",
                **where,
                waiting="the partition waits at this offset; retried with backoff",
                to_skip=(
                    f"set {SKIP_SETTING}=true and restart: offsets {first}..{end - 1} are "
                    "then skipped, their records lost"
                ),
            )
        elif now - stuck.logged >= STUCK_LOG_INTERVAL:
            stuck.logged = now
            log.error(
                "undecodable_batch_still_stuck",
                **where,
                stuck_s=round(now - stuck.since),
                attempts=stuck.attempts + 1,
                to_skip=f"set {SKIP_SETTING}=true and restart",
            )
        stuck.attempts += 1
        stuck.retry_at = now + stuck.backoff.next()
        return fetched

    def _retry_stuck(self) -> None:
        """Resume the stuck partitions whose backoff is over (the next fetch tries them)."""
        stuck = self.undecodable.stuck
        if not stuck:
            return
        now = time.monotonic()
        for tp, entry in list(stuck.items()):
            if tp not in self._owned:
                del stuck[tp]  # revoked: its next owner meets the batch (and says so)
            elif entry.retry_at <= now and not self.held(tp):
                entry.retry_at = float("inf")  # until it fails again, or passes
                self.resume(tp)

    def _passed(self, fetched: dict[TopicPartition, list[Record]]) -> None:
        """Stuck partitions that returned records are past their batch (it was deleted
        or decoded after all)."""
        stuck = self.undecodable.stuck
        for tp in fetched.keys() & stuck.keys():
            entry = stuck.pop(tp)
            log.info(
                "undecodable_batch_passed",
                consumer=self.name,
                topic=tp.topic,
                partition=tp.partition,
                offset=entry.offset,
                attempts=entry.attempts,
            )


def _discard(work: Awaitable[None] | None) -> None:
    """Drop work that will not run (closing a coroutine so it is not reported unawaited)."""
    if asyncio.iscoroutine(work):
        work.close()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Consumer) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.on_assigned(assigned)


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)


# --- batches that cannot be decoded ------------------------------------------------------

SKIP_SETTING = "DISPATCHER_SKIP_UNDECODABLE_BATCHES"
STUCK_LOG_INTERVAL = 60.0  # seconds: a partition stuck at a batch is logged this often


@dataclass(slots=True)
class _Stuck:
    """A partition waiting at a batch that cannot be decoded."""

    offset: int  # the first offset not consumed: where the batch is met
    error: str
    since: float  # monotonic time it was first met
    logged: float  # monotonic time of its last log line
    attempts: int = 0  # fetches that failed at it
    retry_at: float = 0.0  # monotonic time of the next attempt
    backoff: Backoff = field(default_factory=lambda: Backoff(first=0.5, cap=30.0))


@dataclass(slots=True)
class Undecodable:
    """What one worker met that it could not decode (read by ``/readyz`` and metrics)."""

    skip: bool = False  # DISPATCHER_SKIP_UNDECODABLE_BATCHES: skip such batches
    stuck: dict[TopicPartition, _Stuck] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        """One line per stuck partition, naming it, its offset and the error."""
        return [
            f"{tp.topic}[{tp.partition}] at offset {s.offset}: {s.error}"
            for tp, s in sorted(self.stuck.items())
        ]


@dataclass(frozen=True, slots=True)
class _DecodeFailure:
    tp: TopicPartition  # the partition whose batch could not be decoded
    offset: int  # its first offset not consumed (in the batch, usually its first)
    end: int  # one past the batch's last offset: where skipping it resumes
    error: str
    drained: dict[TopicPartition, list[Record]]  # taken from other partitions meanwhile
    before: list[Record]  # the partition's records before the batch, in the same fetch


_FETCHER = "aiokafka.consumer.fetcher"


def _decode_failure(exc: Exception) -> _DecodeFailure | None:
    """What a ``getmany`` error says when a fetched batch could not be decoded, or None
    when it came from anywhere else.

    aiokafka (0.11 to 0.14) decodes batches lazily while ``getmany`` drains what was
    fetched (``Fetcher.fetched_records`` -> ``FetchResult.getall`` ->
    ``PartitionRecords._unpack_records``) and lets the error escape, naming no partition.
    The records drained before it in that call are dropped although their partitions'
    positions moved past them, the bad partition's position stays put (the next call
    fetches the same batch and fails again), and its records before the batch are
    dropped too. The traceback's frames still hold all of it: this reads them.
    """
    frames: dict[str, dict[str, Any]] = {}
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == _FETCHER:
            frames.setdefault(frame.f_code.co_qualname, frame.f_locals)
        tb = tb.tb_next
    drain = frames.get("Fetcher.fetched_records")
    getall = frames.get("FetchResult.getall")
    unpack = frames.get("PartitionRecords._unpack_records")
    if drain is None or getall is None or unpack is None:
        return None
    try:
        tp = unpack["tp"]
        offset = unpack["self"].next_fetch_offset
        batch = unpack.get("next_batch")
        # next_batch is the previous batch when reading the next one's header failed
        end = batch.next_offset if batch is not None else offset + 1
        drained = dict(drain["drained"])
        before = list(getall["ret_list"])
    except (KeyError, AttributeError, TypeError):  # another aiokafka: cannot tell safely
        return None
    text = str(exc)
    name = type(exc).__name__
    return _DecodeFailure(
        tp=tp,
        offset=offset,
        end=max(end, offset + 1),
        error=text if text.startswith(name) else f"{name}: {text}",
        drained=drained,
        before=before,
    )
