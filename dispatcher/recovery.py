"""Recovery of what an endpoint missed: resend one attempt, recover failed notifications,
replay a time range of the event log.

A :class:`Job` is a row of ``webhook_recoveries``, made by the API or the CLI
(:class:`Jobs`) and run by a :class:`~dispatcher.recovery_runner.RecoveryRunner` in
whichever consuming process holds its lease. Three modes:

- ``resend``: the request body kept with one failed attempt, freshly signed, sent once.
- ``failed``: every notification of the webhook first attempted in the range whose last
  attempt failed, oldest first, once each (the history's request bodies).
- ``replay``: the event topics read from the offsets at ``since`` to those at ``until``
  (or the end at the job's start): every event the webhook matches, sent before or not.

Recovery attempts are outside the retry schedule (no retries, no failure mails) and go
through the per-endpoint bounds like every attempt. Only ``failed`` and ``replay`` jobs are
listed and limited to one queued or running per webhook; resends are not.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaTimeoutError

from dispatcher import kafka
from dispatcher.notification import iso_millis
from dispatcher.settings import Settings
from dispatcher.store import Webhook

Mode = Literal["failed", "replay", "resend"]
State = Literal["queued", "running", "done", "failed", "cancelled"]
MODES: tuple[Mode, ...] = ("failed", "replay")  # the modes of POST /recover
ACTIVE: tuple[State, ...] = ("queued", "running")


@dataclass(frozen=True, slots=True)
class Counts:
    """How far a job got: events (or notifications) looked at, matching the webhook,
    sent, and of those sent, delivered (HTTP 200) and failed."""

    scanned: int = 0
    matched: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0

    def add(
        self, *, scanned: int = 0, matched: int = 0, delivered: int = 0, failed: int = 0
    ) -> Counts:
        return Counts(
            self.scanned + scanned,
            self.matched + matched,
            self.sent + delivered + failed,
            self.delivered + delivered,
            self.failed + failed,
        )


@dataclass(frozen=True, slots=True)
class Job:
    """One recovery job (or resend) and how far it got."""

    id: uuid.UUID
    webhook_id: uuid.UUID
    environment_id: str
    mode: Mode
    since: datetime
    until: datetime
    attempt_id: uuid.UUID | None
    state: State
    counts: Counts
    progress: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict[str, Any]:
        """A job in the API's JSON (the names are a contract)."""
        c = self.counts
        out: dict[str, Any] = {
            "id": str(self.id),
            "webhook_id": str(self.webhook_id),
            "mode": self.mode,
            "since": iso_millis(self.since),
            "until": iso_millis(self.until),
            "state": self.state,
            "scanned": c.scanned,
            "matched": c.matched,
            "sent": c.sent,
            "delivered": c.delivered,
            "failed": c.failed,
            "created_at": iso_millis(self.created_at),
            "started_at": None if self.started_at is None else iso_millis(self.started_at),
            "finished_at": None if self.finished_at is None else iso_millis(self.finished_at),
            "error": self.error,
        }
        if self.attempt_id is not None:
            out["attempt_id"] = str(self.attempt_id)
        return out


class ActiveJob(Exception):
    """The webhook already has a recovery job queued or running."""

    def __init__(self, existing: uuid.UUID | None) -> None:
        super().__init__(f"recovery job {existing} is already queued or running")
        self.existing = existing


PAGE_TIMEOUT = 600.0  # seconds one page of a "failed" job may take (see failed_page)
_COLUMNS = (
    "id, webhook_id, environment_id, mode, since, until, attempt_id, state, scanned, "
    "matched, sent, delivered, failed, progress, error, created_at, started_at, finished_at"
)


def _job(row: asyncpg.Record) -> Job:
    progress = row["progress"]
    return Job(
        id=row["id"],
        webhook_id=row["webhook_id"],
        environment_id=row["environment_id"],
        mode=row["mode"],
        since=row["since"],
        until=row["until"],
        attempt_id=row["attempt_id"],
        state=row["state"],
        counts=Counts(row["scanned"], row["matched"], row["sent"], row["delivered"], row["failed"]),
        progress=None if progress is None else orjson.loads(progress),
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class Jobs:
    """The recovery jobs' SQL, over a pool. Reads are scoped to one webhook."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self,
        webhook: Webhook,
        mode: Mode,
        since: datetime,
        until: datetime,
        *,
        attempt_id: uuid.UUID | None = None,
    ) -> Job:
        """Queue a job; :class:`ActiveJob` when a recovery job is queued or running."""
        try:
            row = await self._pool.fetchrow(
                f"""INSERT INTO webhook_recoveries (id, webhook_id, environment_id, mode,
                                                    since, until, attempt_id)
                    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}""",  # noqa: S608
                uuid.uuid4(),
                webhook.id,
                webhook.environment_id,
                mode,
                since,
                until,
                attempt_id,
            )
        except asyncpg.UniqueViolationError:
            existing = await self._pool.fetchval(
                "SELECT id FROM webhook_recoveries WHERE webhook_id = $1 "
                "AND state IN ('queued', 'running') AND mode <> 'resend'",
                webhook.id,
            )
            raise ActiveJob(existing) from None
        assert row is not None
        return _job(row)

    async def of_webhook(self, webhook_id: uuid.UUID, *, limit: int = 100) -> list[Job]:
        """The webhook's recovery jobs (not its resends), newest first."""
        rows = await self._pool.fetch(
            f"""SELECT {_COLUMNS} FROM webhook_recoveries
                WHERE webhook_id = $1 AND mode <> 'resend'
                ORDER BY created_at DESC, id DESC LIMIT $2""",  # noqa: S608
            webhook_id,
            limit,
        )
        return [_job(r) for r in rows]

    async def get(self, webhook_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM webhook_recoveries WHERE id = $1 AND webhook_id = $2",  # noqa: S608
            job_id,
            webhook_id,
        )
        return _job(row) if row else None

    async def cancel(self, webhook_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
        """Cancel a queued or running job (its runner stops within seconds); a finished
        job is returned unchanged. None if the webhook has no such job."""
        row = await self._pool.fetchrow(
            f"""UPDATE webhook_recoveries
                SET state = CASE WHEN state IN ('queued', 'running') THEN 'cancelled'
                                 ELSE state END,
                    finished_at = coalesce(finished_at, now())
                WHERE id = $1 AND webhook_id = $2 RETURNING {_COLUMNS}""",  # noqa: S608
            job_id,
            webhook_id,
        )
        return _job(row) if row else None

    # --- the runners' side --------------------------------------------------------------

    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the oldest job to run that nobody holds (queued, or running with a lease
        that ran out: its process died), or None."""
        row = await self._pool.fetchrow(
            f"""UPDATE webhook_recoveries
                SET state = 'running', owner = $1,
                    lease_until = now() + make_interval(secs => $2::float8),
                    started_at = coalesce(started_at, now())
                WHERE id = (SELECT id FROM webhook_recoveries
                            WHERE state IN ('queued', 'running')
                              AND (lease_until IS NULL OR lease_until < now())
                            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
                RETURNING {_COLUMNS}""",  # noqa: S608
            owner,
            lease_seconds,
        )
        return _job(row) if row else None

    async def save(
        self,
        job: Job,
        owner: str,
        counts: Counts,
        progress: dict[str, Any] | None,
        *,
        lease_seconds: float,
    ) -> bool:
        """Save how far the job got and renew its lease; False when the job is no longer
        this owner's to run (cancelled, or taken over after a lost lease): stop it."""
        result = await self._pool.execute(
            """UPDATE webhook_recoveries
               SET scanned = $3, matched = $4, sent = $5, delivered = $6, failed = $7,
                   progress = $8::jsonb,
                   lease_until = now() + make_interval(secs => $9::float8)
               WHERE id = $1 AND owner = $2 AND state = 'running'""",
            job.id,
            owner,
            counts.scanned,
            counts.matched,
            counts.sent,
            counts.delivered,
            counts.failed,
            None if progress is None else orjson.dumps(progress).decode(),
            lease_seconds,
        )
        return result == "UPDATE 1"

    async def release(self, job: Job, owner: str, *, after: float = 0.0) -> None:
        """Give the job back (this process stops, or an outage paused it): a runner
        resumes it from its saved progress ``after`` seconds from now."""
        await self._pool.execute(
            "UPDATE webhook_recoveries SET owner = NULL, "
            "lease_until = CASE WHEN $3::float8 > 0 "
            "THEN now() + make_interval(secs => $3::float8) END "
            "WHERE id = $1 AND owner = $2 AND state = 'running'",
            job.id,
            owner,
            after,
        )

    async def finish(
        self, job: Job, owner: str, state: State, counts: Counts, error: str | None = None
    ) -> None:
        await self._pool.execute(
            """UPDATE webhook_recoveries
               SET state = $3, scanned = $4, matched = $5, sent = $6, delivered = $7,
                   failed = $8, error = $9, finished_at = now(), owner = NULL,
                   lease_until = NULL
               WHERE id = $1 AND owner = $2 AND state = 'running'""",
            job.id,
            owner,
            state,
            counts.scanned,
            counts.matched,
            counts.sent,
            counts.delivered,
            counts.failed,
            error,
        )

    async def failed_page(
        self, job: Job, after: tuple[datetime, uuid.UUID] | None, limit: int = 100
    ) -> list[asyncpg.Record]:
        """The next notifications of a ``failed`` job, oldest first: first attempted in the
        range, last attempt failed, with the request body of that last attempt."""
        after_at, after_id = after or (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
        return list(
            await self._pool.fetch(
                """SELECT f.notification_uuid, f.first_at, l.request_body, l.n_retry,
                          l.entity_ids
                   FROM (SELECT notification_uuid, min(attempted_at) AS first_at
                         FROM webhook_attempts
                         WHERE webhook_id = $1 AND attempted_at >= $2 AND attempted_at < $3
                           AND trigger <> 'subscribe'
                         GROUP BY notification_uuid) f
                   CROSS JOIN LATERAL (
                       SELECT outcome, request_body, n_retry, entity_ids
                       FROM webhook_attempts a
                       WHERE a.notification_uuid = f.notification_uuid
                         AND a.webhook_id = $1 AND a.attempted_at >= f.first_at
                       ORDER BY a.attempted_at DESC, a.id DESC LIMIT 1) l
                   WHERE l.outcome <> 'delivered' AND l.request_body IS NOT NULL
                     AND (f.first_at, f.notification_uuid) > ($4, $5)
                   ORDER BY f.first_at, f.notification_uuid
                   LIMIT $6""",
                job.webhook_id,
                job.since,
                job.until,
                after_at,
                after_id,
                limit,
                # Each page groups the whole range again: on a webhook with millions of
                # attempts it may take longer than DISPATCHER_DATABASE_TIMEOUT_SECONDS,
                # and a page that always timed out would stall its job for good.
                timeout=PAGE_TIMEOUT,
            )
        )


# --- what the event log still holds ---------------------------------------------------


def partition_key(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


def parse_partition_key(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition(":")
    return TopicPartition(topic, int(partition))


async def event_partitions(
    consumer: AIOKafkaConsumer, topics: tuple[str, ...]
) -> list[TopicPartition]:
    """Every partition of the event topics that exist."""
    # consumer.topics() fetches the metadata of every topic but keeps it from
    # partitions_for_topic(), which knows only the topics the consumer already tracks:
    # the metadata it fetched is read directly.
    cluster = await consumer._client.fetch_all_metadata()
    tps = []
    for topic in topics:
        for partition in sorted(cluster.partitions_for_topic(topic) or ()):
            tps.append(TopicPartition(topic, partition))
    return tps


async def log_floor(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> datetime | None:
    """The time from which the event topics hold every event, or None when no partition
    has lost any to retention yet (a partition whose log starts after offset 0 has: its
    first event held is the floor; the latest of those is the topics')."""
    starts = await consumer.beginning_offsets(tps)
    trimmed = [tp for tp, offset in starts.items() if offset > 0]
    if not trimmed:
        return None
    ends = await consumer.end_offsets(trimmed)
    floor: datetime | None = None
    for tp in trimmed:
        if ends[tp] <= starts[tp]:
            continue  # empty: its events all expired, so nothing of it is newer than them
        consumer.assign([tp])
        consumer.seek(tp, starts[tp])
        record = await consumer.getone(tp)
        moment = datetime.fromtimestamp(record.timestamp / 1000, UTC)
        floor = moment if floor is None else max(floor, moment)
    consumer.assign([])
    return floor


class BadRange(ValueError):
    """A recovery range refused: ``field`` names the field at fault; ``status`` is 400
    (the request's shape) or 422 (its values)."""

    def __init__(self, message: str, field: str, status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


def check_range(
    since: datetime, until: datetime | None, *, now: datetime, max_days: int, field: str = "since"
) -> tuple[datetime, datetime]:
    """``(since, until)`` of a job, ``until`` defaulting to ``now``; :class:`BadRange`
    for an empty, future or too long range."""
    until = now if until is None else until
    if until > now:
        until = now  # nothing was produced after now: the same range
    if since >= until:
        raise BadRange(f"{field}: must be before until ({iso_millis(until)})", field)
    if until - since > timedelta(days=max_days):
        raise BadRange(
            f"{field}: the range is longer than {max_days} days (DISPATCHER_RECOVERY_MAX_DAYS); "
            "recover it in several jobs",
            field,
        )
    return since, until


async def check_log_holds(settings: Settings, since: datetime, *, field: str = "since") -> None:
    """:class:`BadRange` when the event topics no longer hold events from ``since`` on
    (retention deleted some); KafkaError when Kafka cannot say."""
    consumer = kafka.consumer(
        settings,
        None,
        auto_offset_reset="latest",
        client_id="webhook-dispatcher-recovery",
        request_timeout_ms=10_000,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(20):
            tps = await event_partitions(consumer, settings.event_topics)
            floor = await log_floor(consumer, tps) if tps else None
    except TimeoutError:
        raise KafkaTimeoutError("Kafka did not say what the event topics hold") from None
    finally:
        await consumer.stop()
    if floor is not None and since < floor:
        raise BadRange(
            f"{field}: the event topics hold events from {iso_millis(floor)} on (older ones "
            f"were deleted by their retention); replay from then or later",
            field,
        )
