"""Committed lag: how many records of each assigned partition wait, as an operator means it.

``webhook_consumer_lag{consumer,topic,partition}`` is the partition's end offset minus the
offset its consumer group has committed: records consumed but still in flight (a hanging
endpoint, SMTP down, a retry not due) count as waiting, as do records not yet fetched.
Every assigned partition has a series, an idle one too (0); a revoked one loses it.

Two sources keep it current without a request per scrape: the end offsets, asked of the
brokers every :data:`REFRESH_SECONDS` (``ListOffsets``) and otherwise taken from the
highwater marks of the fetches; and the committed offsets, which are the consumer's own
commits (it alone commits its partitions), or, until its first commit of a partition,
the group's committed offset asked once of the coordinator (the log start when the group
never committed: the consumer starts there). :meth:`CommittedLag.publish` sets the gauge
from what is known; :meth:`CommittedLag.refresh` asks the brokers.

    >>> lag_of(end=120, committed=100)
    20
    >>> lag_of(end=None, committed=100) is None
    True
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

REFRESH_SECONDS = 5.0  # end offsets are asked of the brokers this often
REFRESH_TIMEOUT = 10.0  # seconds; a refresh that takes longer is given up (tried again)


def lag_of(*, end: int | None, committed: int | None) -> int | None:
    """Records between ``committed`` and ``end`` (never negative); None when unknown."""
    if end is None or committed is None:
        return None
    return max(0, end - committed)


class CommittedLag:
    """The committed lag of one consumer's assigned partitions, published to a gauge."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        gauge: Gauge,
        name: str,
        *,
        committed_by_us: Callable[[TopicPartition], int | None],
    ) -> None:
        """``committed_by_us(tp)`` is the offset this consumer last committed for ``tp``
        in its current assignment, or None before its first commit of it."""
        self._consumer = consumer
        self._gauge = gauge
        self._name = name
        self._ours = committed_by_us
        self._ends: dict[TopicPartition, int] = {}  # asked of the brokers
        self._base: dict[TopicPartition, int] = {}  # the group's commit at assignment
        self._shown: set[TopicPartition] = set()  # partitions with a series

    def publish(self, owned: Collection[TopicPartition]) -> None:
        """Set the gauge of every owned partition whose end and commit are known."""
        assignment = self._consumer.assignment()
        for tp in owned:
            end = self._ends.get(tp)
            if tp in assignment:
                highwater = self._consumer.highwater(tp)
                if highwater is not None and (end is None or highwater > end):
                    end = highwater
            ours = self._ours(tp)
            lag = lag_of(end=end, committed=ours if ours is not None else self._base.get(tp))
            if lag is not None:
                self._gauge.labels(self._name, tp.topic, str(tp.partition)).set(lag)
                self._shown.add(tp)

    async def refresh(self, owned: Callable[[], Collection[TopicPartition]]) -> None:
        """Ask the brokers for the end offsets of the owned partitions (and, for those
        not committed by us yet, the group's committed offset), then publish."""
        partitions = set(owned())
        if not partitions:
            return
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                ends = await self._consumer.end_offsets(list(partitions))
                unknown = [
                    tp for tp in partitions if tp not in self._base and self._ours(tp) is None
                ]
                if unknown:
                    bases = await self._group_offsets(unknown)
                else:
                    bases = {}
        except (KafkaError, TimeoutError) as exc:  # Kafka trouble: logged where it matters
            log.debug("consumer_lag_refresh_failed", consumer=self._name, error=repr(exc))
            return
        now_owned = owned()
        for tp, end in ends.items():
            if tp in now_owned:
                self._ends[tp] = max(end, self._ends.get(tp, end))
        for tp, base in bases.items():
            if tp in now_owned:
                self._base[tp] = base
        self.publish(now_owned)

    async def run(self, owned: Callable[[], Collection[TopicPartition]]) -> None:
        """Refresh every :data:`REFRESH_SECONDS`, and within a second of an assignment."""
        while True:
            try:
                await self.refresh(owned)
            except Exception:  # a bug here costs the metric, not the consumer
                log.exception("consumer_lag_refresh_failed", consumer=self._name)
            waiting = REFRESH_SECONDS
            if any(tp not in self._shown for tp in owned()):
                waiting = 1.0  # a new assignment: show its partitions soon
            await asyncio.sleep(waiting)  # a timer: the lag is refreshed this often

    def forget(self, revoked: Iterable[TopicPartition]) -> None:
        """Drop what is known of revoked partitions, and their series."""
        for tp in revoked:
            self._ends.pop(tp, None)
            self._base.pop(tp, None)
            if tp in self._shown:
                self._shown.discard(tp)
                self._gauge.remove(self._name, tp.topic, str(tp.partition))

    async def _group_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offset of each partition, or its log start when the
        group never committed it (where a consumer with ``earliest`` reset starts)."""
        found = await asyncio.gather(*(self._consumer.committed(tp) for tp in partitions))
        out = {tp: int(o) for tp, o in zip(partitions, found, strict=True) if o is not None}
        never = [tp for tp, o in zip(partitions, found, strict=True) if o is None]
        if never:
            starts = await self._consumer.beginning_offsets(never)
            out.update({tp: int(o) for tp, o in starts.items()})
        return out
