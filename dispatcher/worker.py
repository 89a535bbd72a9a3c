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
        # work in flight -> the (partition, offset, holds a slot) entries it finishes
        self._inflight: dict[asyncio.Future[None], list[tuple[TopicPartition, int, bool]]] = {}
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

    async def track(
        self,
        tp: TopicPartition,
        offset: int,
        work: Awaitable[None] | None,
        *,
        bounded: bool = True,
    ) -> None:
        """Register ``offset``; it finishes when ``work`` does (at once when None).

        ``work`` may be a coroutine or a future shared by several offsets (an import
        batch). Bounded work first waits for a free slot, so a burst of records cannot
        grow memory without limit; unbounded work is bounded by its owner.
        """
        offsets = self._offsets.setdefault(tp, PartitionOffsets())
        offsets.add(offset)
        if work is None:
            offsets.done(offset)
            return
        if bounded:
            await self._slots.acquire()
        future = asyncio.ensure_future(work)
        waiting = self._inflight.get(future)
        if waiting is None:
            waiting = self._inflight[future] = []
            future.add_done_callback(self._finished)
        waiting.append((tp, offset, bounded))

    def pending(self, tp: TopicPartition) -> int:
        offsets = self._offsets.get(tp)
        return offsets.in_flight if offsets else 0

    # --- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, commit and close the consumer."""
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
            if wanted is None or any(tp in wanted for tp, _, _ in entries)
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
        chosen = (
            self._offsets
            if partitions is None
            else {tp: self._offsets[tp] for tp in partitions if tp in self._offsets}
        )
        to_commit = {}
        for tp, offsets in chosen.items():
            offset = offsets.committable()
            if offset is not None:
                to_commit[tp] = offset
        if not to_commit:
            return
        try:
            await self.consumer.commit(
                {tp: OffsetAndMetadata(o, "") for tp, o in to_commit.items()}
            )
        except KafkaError as exc:  # tried again at the next commit; at worst re-delivered
            log.warning(f"{self.name}_commit_failed", error=repr(exc))
            return
        for tp, offset in to_commit.items():
            self._offsets[tp].committed(offset)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.drain(self._drain_timeout, revoked)
        await self.commit(force=True, partitions=revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
            self.lag.pop(tp, None)
        log.info(f"{self.name}_partitions_revoked", partitions=_names(revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(f"{self.name}_partitions_assigned", partitions=_names(assigned))
        self.assigned.set()

    # --- internals ----------------------------------------------------------------------

    def _finished(self, future: asyncio.Future[None]) -> None:
        entries = self._inflight.pop(future)
        for _, _, bounded in entries:
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
        for tp, offset, _ in entries:
            offsets = self._offsets.get(tp)
            if offsets is not None:  # None: the partition was revoked meanwhile
                offsets.done(offset)

    def _note_lag(self, tp: TopicPartition, last_offset: int) -> None:
        end = self.consumer.highwater(tp)
        if end is not None:
            self.lag[tp] = max(0, end - last_offset - 1)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            log.error(f"{self.name}_failed", error=repr(self._failure))
            raise self._failure


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: KafkaWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.on_assigned(assigned)


def _names(tps: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
