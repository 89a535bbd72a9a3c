"""Runs recovery jobs (:mod:`dispatcher.recovery`) in a consuming process.

Every consuming process polls for jobs nobody holds and runs up to ``MAX_JOBS`` at once,
each under a lease renewed with every save of its progress, so no two processes run one
job and a job of a process that died is taken over once its lease runs out. Progress is
saved after every notification sent (and at least every ``SAVE_SECONDS`` while a replay
scans): a job resumed after a stop or a crash sends nothing it sent before its last save,
and a stop saves before it lets go. Notifications of a job are sent one at a time, in
order, through :class:`~dispatcher.attempts.Attempts` (the per-endpoint bounds), as
attempts without retries or mails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from dispatcher import kafka
from dispatcher.attempts import Attempts
from dispatcher.backoff import Backoff
from dispatcher.catalog import Catalog
from dispatcher.client import Outcome
from dispatcher.events import Event, InvalidEvent, decode
from dispatcher.history import History, Trigger
from dispatcher.notification import Notification
from dispatcher.recorder import DATABASE_ERRORS
from dispatcher.recovery import (
    Counts,
    Job,
    Jobs,
    State,
    event_partitions,
    parse_partition_key,
    partition_key,
)
from dispatcher.settings import Settings
from dispatcher.store import Store, Webhook

log = structlog.get_logger(__name__)

POLL_SECONDS = 1.0  # how often a runner looks for a job to take
LEASE_SECONDS = 30.0  # a job whose runner stopped renewing is taken over after this
SAVE_SECONDS = 0.5  # a replay's progress is saved (and a cancel noticed) this often
MAX_JOBS = 4  # jobs one process runs at once
REFRESH_SECONDS = 30.0  # a running job reads its webhook again this often (secret, state)
PAUSE_SECONDS = 10.0  # a job paused by an outage is taken again after this
WINDOW = 8  # notifications of one replay sent (or waiting for their endpoint) at once


class KeptNotification(Notification, frozen=True):
    """A notification whose request body was kept by the history: sent as it was."""

    kept_body: bytes = b""

    def body(self, n_retry: int, sent_at: datetime | float) -> bytes:
        return self.kept_body


class _Stopped(Exception):
    """The job must stop here: cancelled, taken over, or this process is stopping."""


class _Ended(Exception):
    """The job cannot go on: it ends in ``state`` with the reason given."""

    def __init__(self, state: State, reason: str) -> None:
        super().__init__(reason)
        self.state: State = state
        self.reason = reason


@dataclass
class _Run:
    """One job being run: its webhook, how far it got, and its lease."""

    job: Job
    webhook: Webhook
    owner: str
    stop: asyncio.Event
    counts: Counts
    progress: dict[str, Any] | None
    saved_at: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.monotonic)  # when ``webhook`` was read


@dataclass
class _Batch:
    """An import's entities gathered by a replay for one batch."""

    first_offset: int
    first: Event
    events: list[Event]  # one entity each


class RecoveryRunner:
    """Takes and runs recovery jobs until stopped."""

    def __init__(
        self,
        jobs: Jobs,
        store: Store,
        attempts: Attempts,
        *,
        history: History | None,
        catalog: Catalog,
        settings: Settings,
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._attempts = attempts
        self._history = history
        self._catalog = catalog
        self._settings = settings
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.running: set[asyncio.Task[None]] = set()  # one task per job being run

    async def run(self, stop: asyncio.Event) -> None:
        """Poll for jobs and run them; on ``stop``, save and release what runs, return."""
        running = self.running
        backoff = Backoff(first=POLL_SECONDS, cap=30.0)
        while not stop.is_set():
            wait = POLL_SECONDS
            while len(running) < MAX_JOBS:
                try:
                    job = await self._jobs.claim(self.owner, LEASE_SECONDS)
                except DATABASE_ERRORS as exc:
                    wait = backoff.next()
                    log.warning("recovery_poll_failed", error=repr(exc), retry_in_s=wait)
                    break
                backoff.reset()
                if job is None:
                    break
                task = asyncio.create_task(self._run(job, stop), name=f"recovery-{job.id}")
                running.add(task)
                task.add_done_callback(running.discard)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # a timer: the poll's period, or backoff
                    await stop.wait()
        if running:
            await asyncio.wait(running)

    async def _run(self, job: Job, stop: asyncio.Event) -> None:
        fields = {"job_id": str(job.id), "webhook_id": str(job.webhook_id), "mode": job.mode}
        try:
            webhook = await self._store.webhook_by_id(job.webhook_id)
        except DATABASE_ERRORS as exc:
            log.warning("recovery_job_paused", error=repr(exc), **fields)
            await self._release(job)
            return
        if webhook is None:
            return  # deleted: its jobs went with it
        run = _Run(job, webhook, self.owner, stop, job.counts, job.progress)
        log.info("recovery_job_started", resumed=job.progress is not None, **fields)
        try:
            if job.mode == "resend":
                await self._resend(run)
            elif job.mode == "failed":
                await self._recover_failed(run)
            else:
                await self._replay(run)
        except _Stopped:
            if stop.is_set():
                with contextlib.suppress(_Stopped, *DATABASE_ERRORS):
                    await self._save(run, force=True, renew=False)
                await self._release(job)
                log.info("recovery_job_released", **fields, **_counts(run.counts))
            else:
                log.info("recovery_job_stopped", **fields, **_counts(run.counts))
            return
        except _Ended as ended:
            log.warning("recovery_job_ended", state=ended.state, reason=ended.reason, **fields)
            await self._finish(run, ended.state, ended.reason)
            return
        except (*DATABASE_ERRORS, KafkaError) as exc:
            # An outage: let the job go; a runner takes it again from its saved progress
            # once PAUSE_SECONDS have passed.
            log.warning("recovery_job_paused", error=repr(exc), retry_in_s=PAUSE_SECONDS, **fields)
            await self._release(job, after=PAUSE_SECONDS)
            return
        except Exception as exc:  # a bug, or data it cannot handle: the job fails, loudly
            log.exception("recovery_job_failed", **fields)
            await self._finish(run, "failed", f"internal error: {exc!r}"[:500])
            return
        await self._finish(run, "done")
        log.info("recovery_job_done", **fields, **_counts(run.counts))

    # --- the modes ----------------------------------------------------------------------

    async def _resend(self, run: _Run) -> None:
        job = run.job
        row = None
        if self._history is not None and job.attempt_id is not None:
            row = await self._history.attempt(job.webhook_id, job.attempt_id)
        if row is None or row["request_body"] is None:
            raise _Ended("failed", "the attempt keeps no request body to send again")
        run.counts = run.counts.add(scanned=1, matched=1)
        notification = _kept(run.webhook, row)
        await self._send(run, notification, row["n_retry"], "manual")

    async def _recover_failed(self, run: _Run) -> None:
        job = run.job
        after = None
        if run.progress is not None:
            at, ident = run.progress["after"]
            after = (datetime.fromisoformat(at), uuid.UUID(ident))
        while True:
            page = await self._jobs.failed_page(job, after)
            if not page:
                return
            for row in page:
                await self._save(run)
                run.counts = run.counts.add(scanned=1, matched=1)
                await self._send(run, _kept(run.webhook, row), row["n_retry"], "recovery")
                after = (row["first_at"], row["notification_uuid"])
                run.progress = {"after": [after[0].isoformat(), str(after[1])]}
                await self._save(run, force=True)

    async def _replay(self, run: _Run) -> None:
        s = self._settings
        consumer = kafka.consumer(
            s,
            None,
            client_id="webhook-dispatcher-recovery",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            await _Replay(self, run, consumer).run()
        finally:
            await consumer.stop()

    # --- sending and saving -------------------------------------------------------------

    async def _send(
        self, run: _Run, notification: Notification, n_retry: int, trigger: Trigger
    ) -> None:
        """One attempt; :class:`_Stopped` if it could not be made (shutting down)."""
        result = await self._attempts.make(
            run.webhook, notification, n_retry, trigger, follow_up=False
        )
        if not isinstance(result, Outcome):
            raise _Stopped
        run.counts = run.counts.add(delivered=int(result.ok), failed=int(not result.ok))

    async def _save(self, run: _Run, *, force: bool = False, renew: bool = True) -> None:
        """Save progress (when ``force``d, or ``SAVE_SECONDS`` after the last save);
        :class:`_Stopped` when the job is no longer this runner's or the process stops."""
        now = time.monotonic()
        if renew and now - run.loaded_at >= REFRESH_SECONDS:
            await self._refresh(run)
        if force or now - run.saved_at >= SAVE_SECONDS:
            lease = LEASE_SECONDS if renew else 0.0
            ours = await self._jobs.save(
                run.job, run.owner, run.counts, run.progress, lease_seconds=lease
            )
            run.saved_at = now
            if not ours:
                raise _Stopped
        if renew and run.stop.is_set():
            raise _Stopped

    async def _refresh(self, run: _Run) -> None:
        """Read the job's webhook again: a rotated secret signs what follows; a disabled
        webhook ends the job (cancelled), a deleted one stops it (its jobs went too)."""
        webhook = await self._store.webhook_by_id(run.job.webhook_id)
        run.loaded_at = time.monotonic()
        if webhook is None:
            raise _Stopped
        if webhook.disabled and run.job.mode != "resend":
            raise _Ended("cancelled", "the webhook was disabled")
        run.webhook = webhook

    async def _release(self, job: Job, *, after: float = 0.0) -> None:
        with contextlib.suppress(*DATABASE_ERRORS):
            await self._jobs.release(job, self.owner, after=after)

    async def _finish(self, run: _Run, state: State, error: str | None = None) -> None:
        try:
            await self._jobs.finish(run.job, run.owner, state, run.counts, error)
        except DATABASE_ERRORS as exc:  # the lease runs out: a runner takes it again
            log.warning("recovery_job_not_finished", job_id=str(run.job.id), error=repr(exc))


class _Replay:
    """One replay: the event topics from the offsets at ``since`` to those at ``until``.

    Matching notifications are sent in the order they are read, up to ``WINDOW`` at once
    (each within the endpoint's bounds); a partition's saved position never passes a
    notification not yet sent, so a resume reads it again. A stop waits for the sends
    under way before saving: it sends nothing twice. A crash may send again what was sent
    after the last save (at most ``SAVE_SECONDS`` of it).
    """

    def __init__(self, runner: RecoveryRunner, run: _Run, consumer: AIOKafkaConsumer) -> None:
        self._runner = runner
        self._run = run
        self._consumer = consumer
        webhook = run.webhook
        self._webhook = webhook
        self._catalog = runner._catalog
        self._batch_size = runner._settings.import_batch_size
        # A cheap test before decoding: the shop's id as JSON text. Only where no
        # producer could have escaped it differently.
        env = webhook.environment_id
        plain = env.isascii() and env.isprintable() and not any(c in env for c in '\\"/')
        self._marker = orjson.dumps(env) if plain else None
        self._positions: dict[TopicPartition, int] = {}  # the next offset to read
        self._ends: dict[TopicPartition, int] = {}
        self._open: dict[TopicPartition, _Batch] = {}
        # Sends under way, in the order they started: (partition, first offset, send).
        self._sending: deque[tuple[TopicPartition, int, asyncio.Task[None]]] = deque()

    async def run(self) -> None:
        try:
            await self._read()
        except _Stopped:
            # Cancelled: what has not been answered yet is given up. Stopping: it is
            # waited for, so that the resumed job sends none of it again.
            await self._settle(give_up=not self._run.stop.is_set())
            raise
        finally:
            await self._settle(give_up=False)

    async def _read(self) -> None:
        await self._bounds()
        todo = [tp for tp, end in self._ends.items() if self._positions[tp] < end]
        consumer = self._consumer
        consumer.assign(todo)
        for tp in todo:
            consumer.seek(tp, self._positions[tp])
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                await self._scan(tp, records)
            for tp in list(todo):
                if not batches.get(tp) and await consumer.position(tp) >= self._ends[tp]:
                    self._positions[tp] = self._ends[tp]  # only control records were left
                if self._positions[tp] >= self._ends[tp]:
                    await self._flush(tp)
                    todo.remove(tp)
                    consumer.pause(tp)
            await self._save()
        await self._wait_sends(0)
        await self._save(force=True)

    async def _bounds(self) -> None:
        """Where each partition's replay starts and ends: saved by the job's first run."""
        run = self._run
        if run.progress is not None:
            for key, offset in run.progress["positions"].items():
                self._positions[parse_partition_key(key)] = int(offset)
            for key, offset in run.progress["ends"].items():
                self._ends[parse_partition_key(key)] = int(offset)
            return
        consumer = self._consumer
        tps = await event_partitions(consumer, self._runner._settings.event_topics)
        if tps:
            since = int(run.job.since.timestamp() * 1000)
            until = int(run.job.until.timestamp() * 1000)
            starts = await consumer.offsets_for_times(dict.fromkeys(tps, since))
            ends = await consumer.offsets_for_times(dict.fromkeys(tps, until))
            now = await consumer.end_offsets(tps)
            for tp in tps:
                end = ends[tp].offset if ends[tp] is not None else now[tp]
                start = starts[tp].offset if starts[tp] is not None else now[tp]
                self._ends[tp] = end
                self._positions[tp] = min(start, end)
        await self._save(force=True)

    async def _scan(self, tp: TopicPartition, records: list[Any]) -> None:
        end = self._ends[tp]
        marker = self._marker
        run = self._run
        scanned = 0
        for record in records:
            if record.offset >= end:
                break
            scanned += 1
            value = record.value
            if value is not None and (marker is None or marker in value):
                event = self._matching(value)
                if event is not None:
                    run.counts = run.counts.add(scanned=scanned)
                    scanned = 0
                    await self._matched(tp, record.offset, event)
            self._positions[tp] = record.offset + 1
        run.counts = run.counts.add(scanned=scanned)

    def _matching(self, value: bytes) -> Event | None:
        try:
            event = decode(value)
        except InvalidEvent:
            return None
        w = self._webhook
        if (
            event.environment_id != w.environment_id
            or event.entity_name != w.entity_name
            or event.event_type != w.event_type
            or not self._catalog.allows(event.entity_name, event.event_type)
        ):
            return None
        return event

    async def _matched(self, tp: TopicPartition, offset: int, event: Event) -> None:
        run = self._run
        policy = self._catalog.import_policy(event.entity_name)
        if event.import_id is not None and policy == "skip":
            return  # movements of imports are not sent
        run.counts = run.counts.add(matched=1)
        if event.import_id is None or policy == "single":
            await self._flush(tp)
            await self._send(Notification.for_event(event, self._webhook.id), tp, offset)
            return
        batch = self._open.get(tp)
        if batch is not None and batch.first.import_id != event.import_id:
            await self._flush(tp)
            batch = None
        if batch is None:
            batch = self._open[tp] = _Batch(offset, event, [])
        batch.events.append(event)
        if len(batch.events) >= self._batch_size or event.import_end:
            await self._flush(tp)

    async def _flush(self, tp: TopicPartition) -> None:
        batch = self._open.pop(tp, None)
        if batch is not None:
            notification = Notification.for_event(batch.first, self._webhook.id, batch.events)
            await self._send(notification, tp, batch.first_offset)

    async def _send(self, notification: Notification, tp: TopicPartition, first: int) -> None:
        """Start sending; wait while ``WINDOW`` sends are under way."""
        await self._save()  # raises _Stopped if the process stops or the job was cancelled
        send = asyncio.ensure_future(self._runner._send(self._run, notification, 0, "recovery"))
        self._sending.append((tp, first, send))
        await self._wait_sends(WINDOW - 1)

    async def _wait_sends(self, keep: int) -> None:
        """Wait until at most ``keep`` sends are under way; raise what a send raised."""
        while len(self._sending) > keep:
            send = self._sending[0][2]
            done, _ = await asyncio.wait({send}, timeout=SAVE_SECONDS)
            if not done:  # a slow endpoint: the job may have been cancelled meanwhile
                await self._save()
                continue
            self._sending.popleft()
            send.result()  # _Stopped (not sent: shutting down) or an error

    async def _settle(self, *, give_up: bool) -> None:
        """Let the sends under way finish (or ``give_up`` those not answered yet), then
        note how far the job got: a partition stops at its first notification not sent."""
        sends = [send for _, _, send in self._sending if not send.done()]
        if give_up:
            for send in sends:
                send.cancel()
        if sends:
            await asyncio.wait(sends)
        while self._sending and _sent(self._sending[0][2]):
            self._sending.popleft()
        self._run.progress = self._progress()

    async def _save(self, *, force: bool = False) -> None:
        self._run.progress = self._progress()
        await self._runner._save(self._run, force=force)

    def _progress(self) -> dict[str, Any]:
        positions = dict(self._positions)
        for tp, batch in self._open.items():  # an open batch is read again on a resume
            positions[tp] = min(positions[tp], batch.first_offset)
        for tp, first, send in self._sending:  # and so is what is not sent yet
            if not _sent(send):
                positions[tp] = min(positions[tp], first)
        return {
            "positions": {partition_key(tp): o for tp, o in positions.items()},
            "ends": {partition_key(tp): o for tp, o in self._ends.items()},
        }


def _sent(send: asyncio.Task[None]) -> bool:
    return send.done() and not send.cancelled() and send.exception() is None


def _kept(webhook: Webhook, row: asyncpg.Record) -> KeptNotification:
    """The notification of a kept attempt, its body as it was sent."""
    return KeptNotification(
        notification_uuid=str(row["notification_uuid"]),
        webhook_id=webhook.id,
        type=webhook.event_type,
        entity_name=webhook.entity_name,
        environment_id=webhook.environment_id,
        client_id=webhook.client_id,
        from_user=None,
        entities=tuple({"id": i} for i in row["entity_ids"]),
        kept_body=row["request_body"].encode("utf-8"),
    )


def _counts(counts: Counts) -> dict[str, int]:
    return {
        "scanned": counts.scanned,
        "matched": counts.matched,
        "sent": counts.sent,
        "delivered": counts.delivered,
        "failed": counts.failed,
    }
