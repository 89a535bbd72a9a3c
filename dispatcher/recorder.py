"""The recorder: writes the attempt topic to the delivery history, in batches.

It consumes ``DISPATCHER_ATTEMPT_TOPIC`` and writes each fetched batch of a partition
with one statement (:meth:`~dispatcher.history.History.write`: idempotent, so a record
read again after a crash adds no row). While PostgreSQL is down the batch is tried
again with backoff and nothing is committed: attempt records wait in Kafka, and since
delivery only produces them, delivery neither slows nor stops. Once an hour (and at
start) it creates the coming days' partitions and drops those past the retention.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.backoff import Backoff
from dispatcher.consumer import Consumer, Record
from dispatcher.deadletter import DeadLetters
from dispatcher.history import History, row_values
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

MAINTENANCE_SECONDS = 3600.0  # partitions are created and dropped this often
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Recorder(Consumer):
    """Consumes the attempt topic into PostgreSQL."""

    name = "recorder"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        history: History,
        *,
        dead_letters: DeadLetters,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        super().__init__(
            consumer,
            settings=settings,
            metrics=metrics,
            max_pending=10_000,
            dead_letters=dead_letters,
            fetch_max_records=2000,
        )
        self._history = history
        self._retention_days = settings.attempt_retention_days

    async def process(self, tp: TopicPartition, records: list[Record]) -> None:
        """One write for every attempt record of this fetch of ``tp`` (each Kafka record
        holds the attempts of a few milliseconds, as a JSON array)."""
        rows: list[tuple[Any, ...]] = []
        taken: list[Record] = []
        for record in records:
            if not self.accepting(tp):
                break
            try:
                rows.extend(_rows(record.value))
            except ValueError as exc:
                log.error("attempt_record_malformed", error=str(exc), offset=record.offset)
                await self.track(tp, record, None)
                continue
            taken.append(record)
        if not rows:
            for record in taken:
                await self.track(tp, record, None)
            return
        write = asyncio.ensure_future(self._write(rows))
        for record in taken:
            await self.track(tp, record, write, bounded=False)

    async def _write(self, rows: list[tuple[Any, ...]]) -> None:
        backoff = Backoff(first=0.5, cap=30.0)
        while True:
            try:
                await self._history.write_rows(rows)
                break
            except DATABASE_ERRORS as exc:
                self._metrics.recorder_errors.inc()
                delay = backoff.next()
                log.warning("history_write_failed", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)  # backoff while PostgreSQL is unreachable
        self._metrics.attempts_recorded.inc(len(rows))
        newest = max(row[1] for row in rows).timestamp()
        self._metrics.attempt_record_lag.set(max(0.0, time.time() - newest))

    async def maintain(self) -> None:
        """Create and drop partitions at start and then hourly; a long-lived task."""
        backoff = Backoff(first=1.0, cap=60.0)
        while True:
            try:
                await self._history.maintain(
                    today=datetime.now(UTC).date(), retention_days=self._retention_days
                )
            except DATABASE_ERRORS as exc:
                delay = backoff.next()
                log.warning("history_maintenance_failed", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)  # backoff while PostgreSQL is unreachable
                continue
            backoff.reset()
            await asyncio.sleep(MAINTENANCE_SECONDS)  # a timer: hourly maintenance


def _rows(value: bytes | None) -> list[tuple[Any, ...]]:
    """The rows of one Kafka record of the attempt topic; ValueError if malformed."""
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of attempt records")
    return [row_values(d) for d in data]
