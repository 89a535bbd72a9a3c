"""A Kafka consumer loop with at-least-once commits and a bounded amount of work in flight.

Subclasses decide what a batch of records becomes (:meth:`KafkaWorker.process`); each
record's offset is registered with :meth:`KafkaWorker.track` together with the work that
finishes it. An offset is committed only once every record up to it has finished, on a
timer, on partition revocation and on shutdown. Work that raises stops the loop: the
process fails loudly and the uncommitted records are consumed again after the restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from dispatcher.offsets import PartitionOffsets

log = structlog.get_logger(__name__)


class KafkaWorker:
    """Consumes, hands records to :meth:`process`, commits what finished in order."""

    name = "worker"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        max_pending: int,
        drain_timeout: float,
        commit_interval: float = 1.0,
        fetch_max_records: int = 500,
    ) -> None:
        self.consumer = consumer
        self._slots = asyncio.Semaphore(max_pending)
        self._drain_timeout = drain_timeout
        self._commit_interval = commit_interval
        self._fetch_max = fetch_max_records
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        # work in flight -> the entries it finishes: (partition, that partition's offsets
        # bookkeeping when the work was taken, offset, holds a slot)
        self._inflight: dict[asyncio.Future[None], list[_Entry]] = {}
        self._owned: set[TopicPartition] = set()  # assigned to us now
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._last_commit = time.monotonic()
        self.assigned = asyncio.Event()
        self.lag: dict[TopicPartition, int] = {}  # records behind the partition's end

    # --- for subclasses -----------------------------------------------------------------

    async def process(self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]) -> None:
        raise NotImplementedError

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with (commits what finished on revoke)."""
        return _Rebalance(self)

    def accepting(self, tp: TopicPartition) -> bool:
        """Whether records of ``tp`` may be taken now: it is ours and we neither stop nor
        failed. :meth:`process` checks it before each record, so that once one record of
        a batch was refused, no later one of the same partition is taken (and committed
        past it)."""
        return tp in self._owned and not self._stop.is_set() and not self._failed.is_set()

    async def track(
        self,
        tp: TopicPartition,
        offset: int,
        work: Awaitable[None] | None,
        *,
        bounded: bool = True,
    ) -> bool:
        """Register ``offset``; it finishes when ``work`` does (at once when None).

        ``work`` may be a coroutine or a future shared by several offsets (an import
        batch). Bounded work first waits for a free slot, so a burst of records cannot
        grow memory without limit; unbounded work is bounded by its owner. False when the
        record was not taken: its partition was revoked meanwhile, or the worker stops
        (the record is consumed again by the partition's next owner).
        """
        if bounded and work is not None and not await self._acquire():
            _discard(work)
            return False
        if tp not in self._owned:
            if bounded and work is not None:
                self._slots.release()
            _discard(work)
            return False
        offsets = self._offsets.setdefault(tp, PartitionOffsets())
        offsets.add(offset)
        if work is None:
            offsets.done(offset)
            return True
        future = asyncio.ensure_future(work)
        waiting = self._inflight.get(future)
        if waiting is None:
            waiting = self._inflight[future] = []
            future.add_done_callback(self._finished)
        waiting.append((tp, offsets, offset, bounded))
        return True

    async def _acquire(self) -> bool:
        """A slot; False if the worker stops or fails first (the caller then checks that
        the partition is still ours)."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        acquire = asyncio.ensure_future(self._slots.acquire())
        others = {asyncio.ensure_future(e.wait()) for e in (self._stop, self._failed)}
        await asyncio.wait({acquire, *others}, return_when=asyncio.FIRST_COMPLETED)
        for other in others:
            other.cancel()
        if not acquire.done():
            acquire.cancel()
            return False
        return True

    # --- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, commit and close the consumer."""
        self._stop = stop
        log.info(f"{self.name}_started")
        stopping = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            while not stop.is_set():
                fetch = asyncio.ensure_future(
                    self.consumer.getmany(timeout_ms=500, max_records=self._fetch_max)
                )
                await asyncio.wait({fetch, stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
                self._raise_failure()
                if not fetch.done():
                    fetch.cancel()
                    break
                for tp, records in fetch.result().items():
                    self._note_lag(tp, records[-1].offset)
                    await self.process(tp, records)
                    self._raise_failure()
                await self.commit(force=False)
            await self.drain(self._drain_timeout)
            self._raise_failure()
            await self.commit(force=True)
        finally:
            stopping.cancel()
            failed.cancel()
            for future in list(self._inflight):
                future.cancel()
            await self.consumer.stop()
            log.info(f"{self.name}_stopped")

    async def drain(
        self, within: float, partitions: Iterable[TopicPartition] | None = None
    ) -> None:
        """Wait up to ``within`` seconds for work in flight (of ``partitions``, or all)."""
        wanted = None if partitions is None else set(partitions)
        tasks = [
            f
            for f, entries in self._inflight.items()
            if wanted is None or any(entry[0] in wanted for entry in entries)
        ]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=within)
        if late:
            log.warning(f"{self.name}_drain_timeout", unfinished=len(late))

    async def commit(
        self, *, force: bool, partitions: Iterable[TopicPartition] | None = None
    ) -> None:
        """Commit every partition whose committable offset moved."""
        now = time.monotonic()
        if not force and now - self._last_commit < self._commit_interval:
            return
        self._last_commit = now
        wanted = self._owned if partitions is None else set(partitions)
        chosen = {tp: o for tp, o in self._offsets.items() if tp in wanted}
        to_commit = {}
        for tp, offsets in chosen.items():
            offset = offsets.committable()
            if offset is not None:
                to_commit[tp] = offset
        if not to_commit:
            return
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT):
                await self.consumer.commit(
                    {tp: OffsetAndMetadata(o, "") for tp, o in to_commit.items()}
                )
        except (KafkaError, TimeoutError) as exc:  # tried again later; at worst re-delivered
            log.warning(f"{self.name}_commit_failed", error=repr(exc))
            return
        for tp, offset in to_commit.items():
            self._offsets[tp].committed(offset)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._owned -= revoked  # from now on no record of these is taken
        await self.drain(self._drain_timeout, revoked)
        await self.commit(force=True, partitions=revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
            self.lag.pop(tp, None)
        log.info(f"{self.name}_partitions_revoked", partitions=_names(revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owned |= assigned
        log.info(f"{self.name}_partitions_assigned", partitions=_names(assigned))
        self.assigned.set()

    # --- internals ----------------------------------------------------------------------

    def _finished(self, future: asyncio.Future[None]) -> None:
        entries = self._inflight.pop(future)
        for _, _, _, bounded in entries:
            if bounded:
                self._slots.release()
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            if self._failure is None:
                self._failure = exc
                self._failed.set()
            return
        for tp, offsets, offset, _ in entries:
            # Only the assignment the work was taken under: after a revoke (and perhaps a
            # new assignment of the same partition) its bookkeeping is gone or another.
            if self._offsets.get(tp) is offsets:
                offsets.done(offset)

    def _note_lag(self, tp: TopicPartition, last_offset: int) -> None:
        end = self.consumer.highwater(tp)
        if end is not None:
            self.lag[tp] = max(0, end - last_offset - 1)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            log.error(f"{self.name}_failed", error=repr(self._failure))
            raise self._failure


_Entry = tuple[TopicPartition, PartitionOffsets, int, bool]
COMMIT_TIMEOUT = 10.0  # seconds; a commit that takes longer is given up and tried later


def _discard(work: Awaitable[None] | None) -> None:
    """Drop work that will not run (closing a coroutine so it is not reported unawaited)."""
    if asyncio.iscoroutine(work):
        work.close()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: KafkaWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.on_assigned(assigned)


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
