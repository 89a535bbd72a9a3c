"""Committed lag: end offset minus committed offset, for every assigned partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Gauge

from dispatcher.lag import CommittedLag

A, B = TopicPartition("events", 0), TopicPartition("events", 1)


@dataclass
class FakeConsumer:
    """What CommittedLag asks of an AIOKafkaConsumer, with answers set by the test."""

    assigned: set[TopicPartition] = field(default_factory=set)
    highwaters: dict[TopicPartition, int] = field(default_factory=dict)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    group: dict[TopicPartition, int | None] = field(default_factory=dict)
    starts: dict[TopicPartition, int] = field(default_factory=dict)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        assert tp in self.assigned  # aiokafka asserts it too
        return self.highwaters.get(tp)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp] for tp in tps}

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.group.get(tp)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.starts[tp] for tp in tps}


def setup(ours: dict[TopicPartition, int]) -> tuple[FakeConsumer, CommittedLag, Any]:
    consumer = FakeConsumer()
    registry = CollectorRegistry()
    gauge = Gauge("lag", "", ["consumer", "topic", "partition"], registry=registry)
    lag = CommittedLag(
        cast(AIOKafkaConsumer, consumer), gauge, "dispatch", committed_by_us=ours.get
    )

    def value(tp: TopicPartition) -> float | None:
        labels = {"consumer": "dispatch", "topic": tp.topic, "partition": str(tp.partition)}
        return registry.get_sample_value("lag", labels)

    return consumer, lag, value


async def test_idle_partitions_show_zero_and_a_backlog_counts_from_the_group_commit() -> None:
    """Before any commit of ours, the group's commit (or the log start) is the base."""
    consumer, lag, value = setup({})
    consumer.assigned = {A, B}
    consumer.ends = {A: 50, B: 7}
    consumer.group = {A: 50, B: None}  # B: the group never committed; it starts at 2
    consumer.starts = {B: 2}
    await lag.refresh(lambda: {A, B})
    assert (value(A), value(B)) == (0, 5)


async def test_our_commits_and_fresh_highwater_marks_move_it_without_asking_kafka() -> None:
    """Records consumed but not committed count; a fetch's highwater raises the end."""
    ours: dict[TopicPartition, int] = {}
    consumer, lag, value = setup(ours)
    consumer.assigned = {A}
    consumer.ends = {A: 100}
    consumer.group = {A: 100}
    await lag.refresh(lambda: {A})
    assert value(A) == 0
    consumer.highwaters[A] = 160  # 60 more fetched (in flight, not committed)
    lag.publish({A})
    assert value(A) == 60
    ours[A] = 150  # committed by us
    lag.publish({A})
    assert value(A) == 10


async def test_a_revoked_partition_loses_its_series_and_an_unknown_one_has_none() -> None:
    """No series for what is not known; none left behind for a partition revoked."""
    consumer, lag, value = setup({})
    consumer.assigned = {A, B}
    lag.publish({A, B})
    assert value(A) is None
    consumer.ends = {A: 10, B: 10}
    consumer.group = {A: 4, B: 10}
    await lag.refresh(lambda: {A, B})
    assert (value(A), value(B)) == (6, 0)
    consumer.assigned = {B}
    lag.forget({A})
    lag.publish({B})
    assert (value(A), value(B)) == (None, 0)
