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
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from dispatcher.backoff import Backoff
from dispatcher.consumer import Consumer, Record
from dispatcher.deadletter import DeadLetters
from dispatcher.history import History, Written, row_values
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

MAINTENANCE_SECONDS = 3600.0  # partitions are created and dropped this often
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# SQLSTATE classes that waiting cures: connection, insufficient resources, operator
# intervention (shutdown, cannot connect now), transaction rollback (deadlock, serialization).
RETRIABLE_STATES = ("08", "53", "57", "40")
# A fetch of the attempt topic waits (up to aiokafka's fetch_max_wait_ms, 0.5 s) for this
# many bytes: under load one write then takes several of the attempt log's messages, and
# the fixed cost of a fetch, a write and a commit is paid less often. A row appears at
# most 0.5 s later for it.
FETCH_MIN_BYTES = 128 * 1024


def _payload(records: list[Record]) -> bytes | None:
    """The records' attempts as one JSON array, or None when a record is not a JSON
    array or object (it is then decoded here, and refused with a reason)."""
    parts = []
    for record in records:
        value = (record.value or b"").strip()
        if value.startswith(b"[") and value.endswith(b"]"):
            inner = value[1:-1].strip()
            if inner:
                parts.append(inner)
        elif value.startswith(b"{") and value.endswith(b"}"):
            parts.append(value)
        else:
            return None
    return b"[" + b",".join(parts) + b"]"


def retriable(exc: BaseException) -> bool:
    """Whether a database error is an outage (try again) rather than a refusal of data."""
    if isinstance(exc, asyncpg.DataError):  # asyncpg could not encode a value: never will
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "").startswith(RETRIABLE_STATES)
    return isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError)


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
        failing: Callable[[set[uuid.UUID]], None] | None = None,
    ) -> None:
        """``failing`` is told, after each write, the webhooks with failed attempts in it
        (the :class:`~dispatcher.disabling.Disabler`)."""
        super().__init__(
            consumer,
            settings=settings,
            metrics=metrics,
            max_pending=500,  # Kafka records (each up to 256 KiB) taken and not yet written
            dead_letters=dead_letters,
            fetch_max_records=500,
        )
        self._history = history
        self._failing = failing
        # the latest write: the next one starts after it (see _write_after)
        self._writing: asyncio.Future[None] | None = None
        self._retention_days = settings.attempt_retention_days

    async def process(self, tp: TopicPartition, records: list[Record]) -> None:
        """One write for every attempt record of this fetch of ``tp`` (each Kafka record
        holds the attempts of up to a quarter of a second, as a JSON array: see
        :class:`~dispatcher.history.AttemptLog`)."""
        taken: list[Record] = []
        for record in records:
            if not self.accepting(tp):
                break
            taken.append(record)
        write = asyncio.ensure_future(self._write_after(self._writing, taken))
        self._writing = write
        for record in taken:  # a slot each: while PostgreSQL is down, fetching stops
            await self.track(tp, record, write)

    async def _write_after(
        self, previous: asyncio.Future[None] | None, records: list[Record]
    ) -> None:
        """Write once the previous write ended (whichever way): fetching goes on
        meanwhile, but two writes never run at once, so a webhook's health counts the
        attempts of both (two racing writers of a webhook's first attempts would each
        count its own; the last to commit would win). A write of a few thousand attempts
        takes ~0.1 s, so one at a time keeps up with many times the delivery rate."""
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        await self._write_records(records)

    async def _write_records(self, records: list[Record]) -> None:
        """The records' attempts, decoded by PostgreSQL (the recorder parses nothing);
        if it refuses them (a value of the wrong type, a day with no partition), decoded
        and checked here, record by record (:meth:`_rows`), and written as rows."""
        payload = _payload(records)
        if payload == b"[]":
            return
        if payload is not None:
            backoff = Backoff(first=0.5, cap=30.0)
            while True:
                try:
                    written = await self._history.write_json(payload)
                except DATABASE_ERRORS as exc:
                    if not retriable(exc):
                        log.warning("history_batch_checked", error=repr(exc)[:300])
                        break
                    self._metrics.recorder_errors.inc()
                    delay = backoff.next()
                    log.warning("history_write_failed", error=repr(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)  # backoff while PostgreSQL is unreachable
                    continue
                self._written(written, records)
                return
        rows = [row for record in records for row in self._rows(record)]
        if rows:
            await self._write(rows)

    def _written(self, written: Written, records: list[Record]) -> None:
        if written.valid < written.given:
            malformed = written.given - written.valid
            self._metrics.recorder_errors.inc(malformed)
            log.error(
                "attempt_record_malformed",
                records=malformed,
                error="not of the attempt record's shape (outcome, trigger or entity_ids)",
                offset=records[0].offset,
            )
        self._metrics.attempts_recorded.inc(written.valid)
        if self._failing is not None and written.failing:
            self._failing(set(written.failing))
        if written.newest is not None:
            lag = time.time() - written.newest.timestamp()
            self._metrics.attempt_record_lag.set(max(0.0, lag))

    def _rows(self, record: Record) -> list[tuple[Any, ...]]:
        """The rows of one Kafka record; malformed attempts are logged and left out."""
        try:
            data = orjson.loads(record.value or b"")
        except orjson.JSONDecodeError as exc:
            data = exc
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            self._malformed(record, "expected a JSON array of attempt records")
            return []
        rows = []
        for item in data:
            try:
                rows.append(row_values(item))
            except ValueError as exc:
                self._malformed(record, str(exc))
        return rows

    def _malformed(self, record: Record, error: str) -> None:
        self._metrics.recorder_errors.inc()
        log.error("attempt_record_malformed", error=error[:300], offset=record.offset)

    async def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """Write ``rows``; retried while PostgreSQL is unreachable. Rows it refuses for
        good (a value it cannot store) are written one by one, and those refused again
        are logged and left out, so that one bad row never holds the history back."""
        backoff = Backoff(first=0.5, cap=30.0)
        while True:
            try:
                await self._history.write_rows(rows)
                break
            except DATABASE_ERRORS as exc:
                self._metrics.recorder_errors.inc()
                if not retriable(exc):
                    await self._write_one_by_one(rows, exc)
                    break
                delay = backoff.next()
                log.warning("history_write_failed", error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)  # backoff while PostgreSQL is unreachable
        self._metrics.attempts_recorded.inc(len(rows))
        if self._failing is not None:
            self._failing({row[2] for row in rows if row[7] != "delivered"})
        newest = max(row[1] for row in rows).timestamp()
        self._metrics.attempt_record_lag.set(max(0.0, time.time() - newest))

    async def _write_one_by_one(self, rows: list[tuple[Any, ...]], first: BaseException) -> None:
        log.warning("history_batch_refused", rows=len(rows), error=repr(first))
        for row in rows:
            backoff = Backoff(first=0.5, cap=30.0)
            while True:
                try:
                    await self._history.write_rows([row])
                    break
                except DATABASE_ERRORS as exc:
                    self._metrics.recorder_errors.inc()
                    if not retriable(exc):
                        log.error("attempt_not_recorded", attempt_id=str(row[0]), error=repr(exc))
                        break
                    await asyncio.sleep(backoff.next())  # backoff while PostgreSQL is down

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
