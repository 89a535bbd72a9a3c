"""The delivery history: an attempt record for every attempt, and its storage.

Every attempt (first tries, retries, import batches, the ``SUBSCRIBED`` test) becomes an
:class:`AttemptRecord`. Deliveries produce it to the attempt topic
(``DISPATCHER_ATTEMPT_TOPIC``) with the rest of the attempt's durable work, off the HTTP
path; the recorder (:mod:`dispatcher.recorder`) writes those to PostgreSQL in batches.
:class:`History` holds the SQL: the batched, idempotent write (a replayed record is
skipped), the daily partitions (created ahead, dropped after
``DISPATCHER_ATTEMPT_RETENTION_DAYS``: retention never deletes rows), and the queries of
the API and the CLI. Never the signing secret or the signature: a record holds the
request body, not its headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from dispatcher import durable
from dispatcher.client import Outcome
from dispatcher.notification import Notification, iso_millis

log = structlog.get_logger(__name__)

Trigger = Literal["scheduled", "retry", "subscribe", "manual", "recovery"]
MAX_ENTITY_IDS = 1000  # entity ids kept per attempt (an import batch has at most 80)
MAX_REQUEST_BODY = 1024 * 1024  # bytes of a failed attempt's request body kept
MAX_RESPONSE_BODY = 4096  # bytes of a failed attempt's response body kept
MAX_ERROR = 500  # characters of the error text kept
TABLE = "webhook_attempts"


# The attempt topic's record (a Kafka message holds a JSON array of them), in one of two
# forms, which the recorder reads both, even mixed in one batch:
# - a JSON object with the names of FIELDS (what the dispatchers before this one wrote,
#   "error" always there); now without the null bodies, the ids as 32 hex digits;
# - a JSON array of FIELDS in this order, the trailing nulls (a delivered attempt's error
#   and bodies) left out: ~190 bytes for a delivered attempt against ~340, and ~1.5 us
#   less CPU per attempt (encoding, compressing, consuming).
# The recorders before this one read objects only: arrays would be refused as malformed
# (lost) by one of them still running during a rolling upgrade. So the attempt log writes
# objects until POSITIONAL is turned on, in a release after this one (once no dispatcher
# older than this one runs). A new field goes at the end of FIELDS, optional.
POSITIONAL = False
FIELDS = (
    "id", "webhook_id", "environment_id", "notification_uuid", "n_retry", "attempted_at_ms",
    "duration_ms", "outcome", "status", "entity_ids", "trigger", "error", "request_body",
    "response_body",
)  # fmt: skip
REQUIRED_FIELDS = FIELDS.index("error")  # the leading fields every array has
_BODIES = FIELDS.index("request_body")  # where the bodies start (left out when too large)

# Attempt ids are random (version 4) UUIDs as 32 hex digits, drawn 256 at a time: one
# os.urandom call and one hex conversion for all of them, ~0.1 us an id against 0.7 for
# one call each (a system call per attempt is costly on a virtual machine). A forked
# child starts with none drawn, so no two processes share one.
_IDS_PER_DRAW = 256
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))  # the 7th byte: version 4
_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))  # the 9th: the RFC 4122 variant
_drawn_ids: list[str] = []
os.register_at_fork(after_in_child=_drawn_ids.clear)


def _new_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex``."""
    if not _drawn_ids:
        raw = bytearray(os.urandom(16 * _IDS_PER_DRAW))
        raw[6::16] = raw[6::16].translate(_VERSION_4)
        raw[8::16] = raw[8::16].translate(_VARIANT)
        text = raw.hex()
        _drawn_ids.extend(text[i : i + 32] for i in range(0, len(text), 32))
    return _drawn_ids.pop()


def _entity_ids(notification: Notification) -> list[str]:
    return list(notification.entity_ids[:MAX_ENTITY_IDS])


def _failure(body: bytes, outcome: Outcome) -> tuple[str, str, str]:
    """What a failed attempt keeps: its error, request body and response excerpt."""
    return (
        _clip(outcome.detail[:MAX_ERROR], MAX_ERROR),
        _clip(body.decode("utf-8", "replace"), MAX_REQUEST_BODY),
        _clip(outcome.body_head, MAX_RESPONSE_BODY),
    )


def encode_attempt(
    notification: Notification,
    environment_id: str,
    n_retry: int,
    *,
    at: float,
    body: bytes,
    outcome: Outcome,
    trigger: Trigger,
) -> bytes:
    """``AttemptRecord.of(...).encode()`` without building the record (the delivery path:
    half the CPU, or a third in arrays)."""
    if POSITIONAL:
        fields: list[Any] = [
            _new_id(), notification.webhook_id.hex, environment_id,
            notification.notification_uuid, n_retry, round(at * 1000), outcome.duration_ms,
            outcome.kind, outcome.status, _entity_ids(notification), trigger,
        ]  # fmt: skip
        if not outcome.ok:
            fields.extend(_failure(body, outcome))
        return orjson.dumps(fields)
    record: dict[str, Any] = {
        "id": _new_id(),
        "webhook_id": notification.webhook_id.hex,
        "environment_id": environment_id,
        "notification_uuid": notification.notification_uuid,
        "n_retry": n_retry,
        "attempted_at_ms": round(at * 1000),
        "duration_ms": outcome.duration_ms,
        "outcome": outcome.kind,
        "status": outcome.status,
        "error": None,
        "entity_ids": _entity_ids(notification),
        "trigger": trigger,
    }
    if not outcome.ok:
        record["error"], record["request_body"], record["response_body"] = _failure(body, outcome)
    return orjson.dumps(record)


def _encode(fields: list[Any]) -> bytes:
    """A record of the values of :data:`FIELDS` (in order), in the form the attempt log
    writes (see :data:`POSITIONAL`)."""
    if POSITIONAL:
        while len(fields) > REQUIRED_FIELDS and fields[-1] is None:
            fields.pop()
        return orjson.dumps(fields)
    record = dict(zip(FIELDS, fields, strict=True))
    for name in FIELDS[_BODIES:]:
        if record[name] is None:
            del record[name]
    return orjson.dumps(record)


def _without_bodies(record: Any) -> Any:
    """A record (either form) without its request and response bodies."""
    if isinstance(record, list):
        return record[:_BODIES]
    return {k: v for k, v in record.items() if k not in FIELDS[_BODIES:]}


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (never inside a character), without
    NUL characters (PostgreSQL's text refuses them; an endpoint may answer binary)."""
    text = text.replace("\x00", "\ufffd")  # see _no_nul
    raw = text.encode("utf-8")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt, as recorded. ``attempted_at`` is Unix seconds."""

    id: uuid.UUID
    webhook_id: uuid.UUID
    environment_id: str
    notification_uuid: str
    n_retry: int
    attempted_at: float
    duration_ms: float
    outcome: str  # delivered, http, timeout, connection, tls, blocked
    status: int | None
    error: str | None
    entity_ids: tuple[str, ...]
    trigger: Trigger
    request_body: str | None = None  # failed attempts only
    response_body: str | None = None  # failed attempts only

    @classmethod
    def of(
        cls,
        notification: Notification,
        environment_id: str,
        n_retry: int,
        *,
        at: float,
        body: bytes,
        outcome: Outcome,
        trigger: Trigger,
    ) -> AttemptRecord:
        error, request, response = (None, None, None) if outcome.ok else _failure(body, outcome)
        return cls(
            id=uuid.uuid4(),
            webhook_id=notification.webhook_id,
            environment_id=environment_id,
            notification_uuid=notification.notification_uuid,
            n_retry=n_retry,
            attempted_at=at,
            duration_ms=outcome.duration_ms,
            outcome=outcome.kind,
            status=outcome.status,
            error=error,
            entity_ids=tuple(_entity_ids(notification)),
            trigger=trigger,
            request_body=request,
            response_body=response,
        )

    def encode(self) -> bytes:
        """The record as the attempt topic carries it (see :data:`FIELDS`)."""
        fields: list[Any] = [
            self.id.hex, self.webhook_id.hex, self.environment_id, self.notification_uuid,
            self.n_retry, round(self.attempted_at * 1000), self.duration_ms, self.outcome,
            self.status, self.entity_ids, self.trigger, self.error, self.request_body,
            self.response_body,
        ]  # fmt: skip
        return _encode(fields)


@dataclass(frozen=True, slots=True)
class Health:
    """A webhook's delivery health, from its recorded attempts."""

    last_attempt_at: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    consecutive_failures: int

    @property
    def state(self) -> str:
        if self.last_attempt_at is None:
            return "unknown"
        return "failing" if self.consecutive_failures > 0 else "healthy"

    def to_json(self) -> dict[str, Any]:
        return {
            "last_attempt_at": _iso(self.last_attempt_at),
            "last_success_at": _iso(self.last_success_at),
            "last_failure_at": _iso(self.last_failure_at),
            "consecutive_failures": self.consecutive_failures,
            "state": self.state,
        }


UNKNOWN_HEALTH = Health(None, None, None, 0)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else iso_millis(moment)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of attempts (newest first) ended: the last row's time and id."""

    attempted_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.attempted_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raises ValueError for anything :meth:`encode` did not make."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            at, _, ident = raw.partition("|")
            moment = datetime.fromisoformat(at)
            if moment.tzinfo is None:
                raise ValueError("no time zone")
            return cls(moment.astimezone(UTC), uuid.UUID(ident))
        except (ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise ValueError(f"not a cursor of this API: {exc}") from None


@dataclass(frozen=True, slots=True)
class AttemptQuery:
    """The filters of a listing of attempts; everything optional but the limit."""

    limit: int
    webhook_id: uuid.UUID | None = None
    environment_id: str | None = None
    failed: bool | None = None  # True: failed only; False: delivered only
    since: datetime | None = None
    until: datetime | None = None
    notification_uuid: uuid.UUID | None = None
    entity_id: str | None = None
    cursor: Cursor | None = None


_COLUMNS = (
    "id, attempted_at, webhook_id, environment_id, notification_uuid, n_retry, duration_ms, "
    "outcome, status, error, entity_ids, trigger"
)


def partition_name(day: date) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


class History:
    """The delivery history's SQL, over a pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._partitions: set[date] = set()  # known to exist

    # --- writing ------------------------------------------------------------------------

    async def write(self, records: Sequence[AttemptRecord]) -> int:
        """Insert ``records`` (skipping those written before) and update the webhooks'
        health from the rows inserted now, in one statement; the rows inserted."""
        return await self.write_rows([row_values(orjson.loads(r.encode())) for r in records])

    async def write_json(self, payload: bytes) -> Written:
        """Write the attempt records of ``payload`` (a JSON array, as the attempt topic
        carries them) like :meth:`write`, PostgreSQL decoding them. Raises what
        PostgreSQL raised for a value of the wrong type; records of a day without a
        partition raise :class:`asyncpg.CheckViolationError` (the caller then writes
        them through :meth:`write_rows`, which creates it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_NO_NESTED_LOOPS)
            row = await conn.fetchrow(_WRITE_JSON, payload.decode("utf-8", "replace"))
        assert row is not None
        given, valid, inserted, newest, failing = row.values()
        return Written(int(given), int(valid), int(inserted), newest, frozenset(failing or ()))

    async def write_rows(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """:meth:`write` for rows made by :func:`row_values` (the recorder's lean path)."""
        if not rows:
            return 0
        days = {row[1].date() for row in rows}
        for day in days:
            await self.ensure_partition(day)
        columns = list(zip(*rows, strict=True))
        try:
            inserted = await self._write_columns(columns)
        except asyncpg.CheckViolationError:  # no partition: another recorder dropped it
            self._partitions -= days
            for day in days:
                await self.ensure_partition(day)
            inserted = await self._write_columns(columns)
        return int(inserted or 0)

    async def _write_columns(self, columns: list[tuple[Any, ...]]) -> Any:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_NO_NESTED_LOOPS)
            return await conn.fetchval(_WRITE, *columns)

    async def ensure_partition(self, day: date) -> None:
        """The partition of ``day`` exists (created if missing)."""
        if day in self._partitions:
            return
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        # Another recorder may create it at the same moment: then it exists all the same.
        with contextlib.suppress(asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
            await self._pool.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF {TABLE} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO "
                f"('{(start + timedelta(days=1)).isoformat()}')"
            )
        self._partitions.add(day)

    async def maintain(self, *, today: date, retention_days: int, ahead: int = 2) -> list[str]:
        """Create the partitions of ``today`` and ``ahead`` days more; drop those older
        than ``retention_days``. Returns the partitions dropped."""
        for n in range(ahead + 1):
            await self.ensure_partition(today + timedelta(days=n))
        oldest = today - timedelta(days=retention_days)
        rows = await self._pool.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = $1::regclass",
            TABLE,
        )
        dropped = []
        for row in rows:
            name: str = row["relname"]
            try:
                day = datetime.strptime(name.rsplit("_p", 1)[1], "%Y%m%d").date()
            except (IndexError, ValueError):
                continue  # not one of ours
            if day < oldest:
                await self._pool.execute(f'DROP TABLE IF EXISTS "{name}"')
                self._partitions.discard(day)
                dropped.append(name)
        if dropped:
            log.info("history_partitions_dropped", partitions=dropped)
        return dropped

    # --- reading ------------------------------------------------------------------------

    async def attempts(self, query: AttemptQuery) -> list[asyncpg.Record]:
        """Attempts matching ``query``, newest first, at most ``query.limit``."""
        where, args = [], []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.webhook_id is not None:
            where.append(f"webhook_id = {arg(query.webhook_id)}")
        if query.environment_id is not None:
            where.append(f"environment_id = {arg(query.environment_id)}")
        if query.failed is True:
            where.append("outcome <> 'delivered'")
        elif query.failed is False:
            where.append("outcome = 'delivered'")
        if query.since is not None:
            where.append(f"attempted_at >= {arg(query.since)}")
        if query.until is not None:
            where.append(f"attempted_at < {arg(query.until)}")
        if query.notification_uuid is not None:
            where.append(f"notification_uuid = {arg(query.notification_uuid)}")
        if query.entity_id is not None:
            where.append(f"entity_ids @> ARRAY[{arg(query.entity_id)}::text]")
        if query.cursor is not None:
            at, ident = arg(query.cursor.attempted_at), arg(query.cursor.id)
            where.append(f"(attempted_at, id) < ({at}, {ident})")
        sql = (
            f"SELECT {_COLUMNS} FROM {TABLE} WHERE {' AND '.join(where) or 'true'} "  # noqa: S608 - built from constants and placeholders
            f"ORDER BY attempted_at DESC, id DESC LIMIT {arg(query.limit)}"
        )
        return list(await self._pool.fetch(sql, *args))

    async def attempt(self, webhook_id: uuid.UUID, attempt_id: uuid.UUID) -> asyncpg.Record | None:
        """One attempt of ``webhook_id``, with its bodies."""
        return await self._pool.fetchrow(
            f"SELECT {_COLUMNS}, request_body, response_body FROM {TABLE} "  # noqa: S608
            "WHERE id = $1 AND webhook_id = $2",
            attempt_id,
            webhook_id,
        )

    async def health(self, webhook_id: uuid.UUID) -> Health:
        row = await self._pool.fetchrow(
            "SELECT last_attempt_at, last_success_at, last_failure_at, consecutive_failures "
            "FROM webhook_health WHERE webhook_id = $1",
            webhook_id,
        )
        return UNKNOWN_HEALTH if row is None else Health(*row.values())


def attempt_json(row: asyncpg.Record, *, with_bodies: bool = False) -> dict[str, Any]:
    """An attempt in the API's JSON (the names are a contract)."""
    out: dict[str, Any] = {
        "id": str(row["id"]),
        "webhook_id": str(row["webhook_id"]),
        "notification_uuid": str(row["notification_uuid"]),
        "nRetry": row["n_retry"],
        "attempted_at": iso_millis(row["attempted_at"]),
        "duration_ms": round(float(row["duration_ms"]), 2),
        "outcome": row["outcome"],
        "status": row["status"],
        "error": row["error"],
        "entity_ids": list(row["entity_ids"]),
        "trigger": row["trigger"],
    }
    if with_bodies:
        out["request_body"] = row["request_body"]
        out["response_body"] = row["response_body"]
    return out


def row_values(d: Any) -> tuple[Any, ...]:
    """The columns of one attempt record as encoded on the attempt topic, in either form
    (a JSON object with the names of :data:`FIELDS`, "error" always there, or a JSON array
    of them in order); ValueError when it is of neither shape."""
    try:
        if isinstance(d, list):
            if not REQUIRED_FIELDS <= len(d) <= len(FIELDS):
                raise ValueError(f"{len(d)} fields, not {REQUIRED_FIELDS} to {len(FIELDS)}")
            values = d + [None] * (len(FIELDS) - len(d))
        else:
            values = [d[name] for name in FIELDS[:_BODIES]]
            values += [d.get("request_body"), d.get("response_body")]
        (ident, webhook_id, environment_id, notification_uuid, n_retry, at_ms, duration_ms,
         outcome, status, ids, trigger, error, request, response) = values  # fmt: skip
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError("entity_ids must be an array of strings")
        if not isinstance(environment_id, str):
            raise TypeError("environment_id must be a string")
        for text in (error, request, response):
            if text is not None and not isinstance(text, str):
                raise TypeError("error and bodies must be strings or null")
        if outcome not in OUTCOMES or trigger not in TRIGGERS:
            raise ValueError(f"unknown outcome {outcome!r} or trigger {trigger!r}")
        return (
            uuid.UUID(ident),
            datetime.fromtimestamp(int(at_ms) / 1000, UTC),
            uuid.UUID(webhook_id),
            environment_id,
            uuid.UUID(notification_uuid),
            int(n_retry),
            float(duration_ms),
            outcome,
            None if status is None else int(status),
            _no_nul(error),
            orjson.dumps(ids).decode(),
            trigger,
            _no_nul(request),
            _no_nul(response),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"malformed attempt record: {exc!r}") from None


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL's text refuses NUL characters."""
    return None if text is None else text.replace("\x00", "\ufffd")


OUTCOMES = frozenset({"delivered", "http", "timeout", "connection", "tls", "blocked"})
TRIGGERS = frozenset({"scheduled", "retry", "subscribe", "manual", "recovery"})


_ROWS_OF_COLUMNS = """
WITH rows AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::uuid[], $6::int[],
        $7::real[], $8::text[], $9::smallint[], $10::text[], $11::text[], $12::text[],
        $13::text[], $14::text[]
    ) AS r(id, attempted_at, webhook_id, environment_id, notification_uuid, n_retry,
           duration_ms, outcome, status, error, entity_ids, trigger, request_body,
           response_body)
),"""

# The records as the attempt topic carries them (one JSON array of records of either
# form: objects, arrays, or both; see FIELDS), decoded by PostgreSQL itself: the recorder
# parses nothing. Records neither objects nor arrays, of an unknown outcome or trigger,
# or whose entity_ids is not an array of strings, are left out (counted in the answer); a
# value of the wrong type fails the whole statement, and the recorder then writes those
# records through the checked path (row_values).
_ROWS_OF_JSON = f"""
WITH records AS (
    SELECT r FROM jsonb_array_elements($1::jsonb) AS r
), given AS (
    SELECT (r->>0)::uuid AS id, (r->>5)::bigint AS attempted_at_ms, (r->>1)::uuid AS webhook_id,
           r->>2 AS environment_id, (r->>3)::uuid AS notification_uuid,
           (r->>4)::int AS n_retry, (r->>6)::real AS duration_ms, r->>7 AS outcome,
           (r->>8)::smallint AS status, r->>11 AS error, r->9 AS entity_ids,
           r->>10 AS trigger, r->>12 AS request_body, r->>13 AS response_body
    FROM records WHERE jsonb_typeof(r) = 'array'
    UNION ALL
    SELECT (r->>'id')::uuid, (r->>'attempted_at_ms')::bigint, (r->>'webhook_id')::uuid,
           r->>'environment_id', (r->>'notification_uuid')::uuid, (r->>'n_retry')::int,
           (r->>'duration_ms')::real, r->>'outcome', (r->>'status')::smallint, r->>'error',
           r->'entity_ids', r->>'trigger', r->>'request_body', r->>'response_body'
    FROM records WHERE jsonb_typeof(r) = 'object'
), rows AS (
    SELECT id, to_timestamp(attempted_at_ms / 1000.0) AS attempted_at, webhook_id,
           environment_id, notification_uuid, n_retry, duration_ms, outcome, status, error,
           entity_ids, trigger, request_body, response_body
    FROM given
    WHERE id IS NOT NULL AND attempted_at_ms IS NOT NULL AND webhook_id IS NOT NULL
      AND environment_id IS NOT NULL AND notification_uuid IS NOT NULL
      AND n_retry IS NOT NULL AND duration_ms IS NOT NULL
      AND outcome IN ({", ".join(f"'{o}'" for o in sorted(OUTCOMES))})
      AND trigger IN ({", ".join(f"'{t}'" for t in sorted(TRIGGERS))})
      AND jsonb_typeof(entity_ids) = 'array'
      AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(entity_ids) e
                      WHERE jsonb_typeof(e) <> 'string')
),"""  # noqa: S608 - constants

_WRITE_REST = f"""
ins AS (
    INSERT INTO {TABLE} (id, attempted_at, webhook_id, environment_id, notification_uuid,
                         n_retry, duration_ms, outcome, status, error, entity_ids, trigger,
                         request_body, response_body)
    SELECT id, attempted_at, webhook_id, environment_id, notification_uuid, n_retry,
           duration_ms, outcome, status, error,
           ARRAY(SELECT jsonb_array_elements_text(entity_ids::jsonb)), trigger,  -- jsonb or text
           request_body, response_body
    FROM rows
    ON CONFLICT DO NOTHING
    RETURNING webhook_id, attempted_at, outcome
), agg AS (
    SELECT webhook_id,
           min(attempted_at) AS first_attempt,
           max(attempted_at) AS last_attempt,
           max(attempted_at) FILTER (WHERE outcome = 'delivered') AS last_success,
           max(attempted_at) FILTER (WHERE outcome <> 'delivered') AS last_failure
    FROM ins GROUP BY webhook_id
), old AS (
    -- The health these webhooks had, locked (in one order: concurrent writers do not
    -- deadlock) until this statement's end.
    SELECT h.webhook_id, h.last_attempt_at, h.last_success_at, h.consecutive_failures
    FROM webhook_health h WHERE h.webhook_id IN (SELECT webhook_id FROM agg)
    ORDER BY h.webhook_id FOR UPDATE
), merged AS (
    SELECT a.webhook_id, a.first_attempt,
           GREATEST(o.last_attempt_at, a.last_attempt) AS last_attempt_at,
           GREATEST(o.last_success_at, a.last_success) AS last_success_at,
           a.last_failure, o.webhook_id IS NOT NULL AS known,
           o.last_attempt_at AS old_last, o.last_success_at AS old_success,
           o.consecutive_failures AS old_failures
    FROM agg a LEFT JOIN old o USING (webhook_id)
), batch_failures AS (
    -- Each webhook's failures of this batch after its newest success (old or new).
    SELECT i.webhook_id, count(*)::int AS n
    FROM ins i JOIN merged m USING (webhook_id)
    WHERE i.outcome <> 'delivered' AND i.attempted_at > coalesce(m.last_success_at, '-infinity')
    GROUP BY i.webhook_id
), counted AS (
    -- In order (every new attempt after the last one known), the failures since the last
    -- success follow from the batch and the old count; a batch that reaches back (attempt
    -- records travel on several partitions) recounts the older ones from the table (which
    -- this statement's own rows are not in yet). Joins only: linear in the batch.
    SELECT m.webhook_id, m.last_attempt_at, m.last_success_at, m.last_failure,
           CASE WHEN NOT m.known OR m.first_attempt > coalesce(m.old_last, '-infinity')
                THEN coalesce(b.n, 0) + CASE
                    WHEN m.last_success_at IS NOT DISTINCT FROM m.old_success
                    THEN coalesce(m.old_failures, 0) ELSE 0 END
                ELSE coalesce(b.n, 0) + (
                    SELECT count(*) FROM {TABLE} a
                    WHERE a.webhook_id = m.webhook_id AND a.outcome <> 'delivered'
                      AND a.attempted_at > coalesce(m.last_success_at, '-infinity'))::int
           END AS failures
    FROM merged m LEFT JOIN batch_failures b USING (webhook_id)
), health AS (
    INSERT INTO webhook_health AS h (webhook_id, last_attempt_at, last_success_at,
                                     last_failure_at, consecutive_failures)
    SELECT webhook_id, last_attempt_at, last_success_at, last_failure, failures FROM counted
    ORDER BY webhook_id
    -- A row another writer inserted meanwhile (the webhook's first attempts, written by
    -- two recorders at once) keeps the newest times; its count is this batch's.
    ON CONFLICT (webhook_id) DO UPDATE SET
        last_attempt_at = GREATEST(h.last_attempt_at, EXCLUDED.last_attempt_at),
        last_success_at = GREATEST(h.last_success_at, EXCLUDED.last_success_at),
        last_failure_at = GREATEST(h.last_failure_at, EXCLUDED.last_failure_at),
        consecutive_failures = EXCLUDED.consecutive_failures
    RETURNING 1
)"""  # noqa: S608 - constant table name

# The planner cannot know how many rows a batch holds (it guesses 1 or 100): left to
# itself it joins the batch's CTEs with nested loops, quadratic in the batch (3,000 rows
# took 800 us each). Hash joins keep a write linear. A plan that needs a nested loop all
# the same is then costed above 10^10, which JIT-compiles it: 0.7 s per write, whatever
# its size; never worth it for this statement, so JIT is off for it (one round trip).
_NO_NESTED_LOOPS = "SET LOCAL enable_nestloop = off; SET LOCAL jit = off"
_WRITE = _ROWS_OF_COLUMNS + _WRITE_REST + "\nSELECT count(*) FROM ins"
_ANSWER_OF_JSON = """
SELECT (SELECT count(*) FROM records), (SELECT count(*) FROM rows),
       (SELECT count(*) FROM ins), (SELECT max(attempted_at) FROM rows),
       ARRAY(SELECT DISTINCT webhook_id FROM rows WHERE outcome <> 'delivered')"""
_WRITE_JSON = _ROWS_OF_JSON + _WRITE_REST + _ANSWER_OF_JSON


@dataclass(frozen=True, slots=True)
class Written:
    """What one write of attempt records did."""

    given: int  # records in the write
    valid: int  # of those, of the attempt record's shape (the others are left out)
    inserted: int  # rows inserted (a record written before is skipped)
    newest: datetime | None  # the latest attempted_at of the valid records
    failing: frozenset[uuid.UUID]  # webhooks with failed attempts among them


class AttemptLog:
    """Produces attempt records to the attempt topic, durably, before the attempt's source
    offset may commit.

    :meth:`add` only queues a record: the attempt does not wait for it. The records of
    attempts made within ``LINGER`` seconds travel as one Kafka message (a JSON array; up
    to ``MAX_BATCH_BYTES``), retried while Kafka is unreachable. A consumer awaits
    :meth:`flushed` before it commits (:meth:`~dispatcher.consumer.Consumer.before_commit`):
    every record added before is then acked, so no offset commits ahead of the records of
    its attempts. Waiting per attempt instead cost about 40 us of CPU each, a tenth of a
    delivery; one wait per commit costs nothing measurable.

    A message costs a few milliseconds of CPU (to produce it, then to consume and write
    it) whatever it holds, so they are few and large: the commits flush them anyway
    (several times a second under load), the linger only bounds how long a record waits
    when no commit comes (at 20 ms, linger-driven sends cost ~7 us of CPU per attempt).
    """

    LINGER = 0.25  # seconds a batch stays open for more records
    MAX_BATCH_BYTES = 256 * 1024

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._parts: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()  # batches not acked yet

    def add(self, record: AttemptRecord) -> None:
        """Queue ``record``; it is sent within ``LINGER`` seconds."""
        self._queue(record.encode())

    def add_attempt(
        self,
        notification: Notification,
        environment_id: str,
        n_retry: int,
        *,
        at: float,
        body: bytes,
        outcome: Outcome,
        trigger: Trigger,
    ) -> None:
        """:meth:`add` of ``AttemptRecord.of(...)``, without building the record."""
        encoded = encode_attempt(
            notification, environment_id, n_retry,
            at=at, body=body, outcome=outcome, trigger=trigger,
        )  # fmt: skip
        self._queue(encoded)

    def _queue(self, encoded: bytes) -> None:
        if self._size + len(encoded) > self.MAX_BATCH_BYTES:
            self._flush()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.LINGER, self._flush)
        self._parts.append(encoded)
        self._size += len(encoded)

    async def flushed(self) -> None:
        """Return once every record added so far is acked (sent now, not after the
        linger). Raises what a batch's send raised (not a Kafka outage: that is waited
        out)."""
        self._flush()
        if self._sending:
            # Shielded: a caller given up (a commit's timeout) must not cancel the sends.
            await asyncio.shield(asyncio.gather(*self._sending))

    async def close(self) -> None:
        """Send what is queued and wait for it (at a stop, before the producer's)."""
        await self.flushed()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._parts:
            return
        parts = self._parts
        self._parts, self._size = [], 0
        task = asyncio.ensure_future(self._send(parts))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, parts: list[bytes]) -> None:
        try:
            await durable.send(self._producer, self._topic, b"[" + b",".join(parts) + b"]")
        except KafkaError as exc:  # not an outage: e.g. bodies too large for a message
            log.warning("attempt_records_too_large", records=len(parts), error=repr(exc))
            for part in parts:
                await self._send_alone(part)

    async def _send_alone(self, part: bytes) -> None:
        """One record in a message of its own, without its bodies if it must."""
        try:
            await durable.send(self._producer, self._topic, b"[" + part + b"]")
        except KafkaError:
            record = _without_bodies(orjson.loads(part))
            attempt_id = record[0] if isinstance(record, list) else record["id"]
            try:
                await durable.send(self._producer, self._topic, orjson.dumps([record]))
            except KafkaError as again:
                log.error("attempt_not_recorded", attempt_id=attempt_id, error=repr(again))
