"""Attempt records without a broker: the two forms on the attempt topic (objects, as the
dispatchers before wrote them and as the attempt log writes them now; arrays, the
positional form of :data:`dispatcher.history.POSITIONAL`), all decoding to the same rows;
the attempt log's batches."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from unittest import mock

import orjson
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from dispatcher import history
from dispatcher.client import Outcome
from dispatcher.deadletter import DeadLetters
from dispatcher.history import (
    FIELDS,
    REQUIRED_FIELDS,
    AttemptLog,
    AttemptRecord,
    _new_id,
    encode_attempt,
    row_values,
)
from dispatcher.metrics import Metrics
from dispatcher.notification import Notification
from dispatcher.recorder import Recorder, _payload
from dispatcher.settings import Settings

WEBHOOK = uuid.UUID("27cdeff6-eb51-43f1-8cbc-f4aabf59a4e1")
AT = 1_800_000_000.123
BODY = b'{"type": "CLOSED", "entities": [{"id": 7}]}'
DELIVERED = Outcome(200, None, "HTTP 200", 12.5)
HTTP_500 = Outcome(500, "http", "HTTP 500", 30.25, body_head="database on fire")
TIMEOUT = Outcome(None, "timeout", "no answer within 10 s", 10_000.0)
OUTCOMES = {"delivered": DELIVERED, "http": HTTP_500, "timeout": TIMEOUT}


def notification(*entity_ids: Any) -> Notification:
    return Notification(
        str(uuid.uuid4()), WEBHOOK, "CLOSED", "sales", "shop-1", "app", None,
        tuple({"id": i} for i in entity_ids),
    )  # fmt: skip


def attempt(outcome: Outcome, *entity_ids: Any, n_retry: int = 0) -> AttemptRecord:
    return AttemptRecord.of(
        notification(*entity_ids), "shop-1", n_retry, at=AT, body=BODY, outcome=outcome,
        trigger="retry" if n_retry else "scheduled",
    )  # fmt: skip


def legacy(record: AttemptRecord) -> bytes:
    """The record as the dispatchers before the positional encoding produced it."""
    return orjson.dumps(
        {
            "id": str(record.id),
            "webhook_id": str(record.webhook_id),
            "environment_id": record.environment_id,
            "notification_uuid": record.notification_uuid,
            "n_retry": record.n_retry,
            "attempted_at_ms": round(record.attempted_at * 1000),
            "duration_ms": record.duration_ms,
            "outcome": record.outcome,
            "status": record.status,
            "error": record.error,
            "entity_ids": record.entity_ids,
            "trigger": record.trigger,
            "request_body": record.request_body,
            "response_body": record.response_body,
        }
    )


def array(record: AttemptRecord) -> bytes:
    """The record in the positional form, whichever form the attempt log writes."""
    with mock.patch.object(history, "POSITIONAL", True):
        return record.encode()


def obj(record: AttemptRecord) -> bytes:
    """The record as an object, whichever form the attempt log writes."""
    with mock.patch.object(history, "POSITIONAL", False):
        return record.encode()


@pytest.fixture(params=[False, True], ids=["objects", "arrays"])
def positional(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Each test of this fixture runs with the attempt log writing objects, then arrays."""
    with mock.patch.object(history, "POSITIONAL", request.param):
        yield request.param


def kafka_record(value: bytes, offset: int = 0) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        "attempts", 0, offset, 0, 0, None, value, None, 0, len(value), []
    )  # fmt: skip


def recorder() -> Recorder:
    return Recorder(
        mock.MagicMock(), mock.MagicMock(), dead_letters=DeadLetters(mock.MagicMock(), "dl"),
        settings=Settings(), metrics=Metrics(),
    )  # fmt: skip


# --- the encoding ---------------------------------------------------------------------


def test_the_attempt_log_writes_objects_until_every_recorder_reads_arrays() -> None:
    """The recorders before this release refuse arrays: objects stay the default."""
    assert history.POSITIONAL is False
    assert isinstance(orjson.loads(attempt(DELIVERED, 1).encode()), dict)


@pytest.mark.parametrize("kind", sorted(OUTCOMES))
def test_every_form_of_a_record_decodes_to_the_same_row(kind: str) -> None:
    """A record as an array, as an object of today and as the object the dispatchers
    before produced give the same columns: a recorder reads the topic whichever
    dispatcher wrote it."""
    record = attempt(OUTCOMES[kind], 7, "x-8", n_retry=2)
    new, now, old = (orjson.loads(e) for e in (array(record), obj(record), legacy(record)))
    assert isinstance(new, list) and isinstance(now, dict) and isinstance(old, dict)
    row = row_values(new)
    assert row == row_values(now) == row_values(old)
    assert row[0] == record.id and row[2] == WEBHOOK and row[7] == kind
    assert row[10] == '["7","x-8"]' and row[11] == "retry"
    if kind == "delivered":  # its error and bodies are null: left out of the array
        assert len(new) == REQUIRED_FIELDS
        assert "request_body" not in now and "response_body" not in now
        assert now["error"] is None  # the recorders before need it there
        assert row[9] is None and row[12] is None and row[13] is None
    else:
        assert len(new) == len(FIELDS)
        assert row[12] == BODY.decode() and row[13] == OUTCOMES[kind].body_head


def test_the_records_are_smaller_than_the_dispatchers_before_wrote() -> None:
    record = attempt(DELIVERED, 12345)
    assert len(obj(record)) < len(legacy(record)) - 40  # ids in hex, no null bodies
    assert len(array(record)) < len(legacy(record)) / 2


@pytest.mark.parametrize("kind", sorted(OUTCOMES))
def test_the_delivery_paths_encoding_is_the_records(kind: str, positional: bool) -> None:
    """encode_attempt (the delivery path: no AttemptRecord built) writes what
    AttemptRecord.of(...).encode() writes, but for the attempt's own new id."""
    n = notification(1, 2, 3)
    args: dict[str, Any] = {"at": AT, "body": BODY, "outcome": OUTCOMES[kind], "trigger": "manual"}
    fast = orjson.loads(encode_attempt(n, "shop-1", 1, **args))
    slow = orjson.loads(AttemptRecord.of(n, "shop-1", 1, **args).encode())
    assert isinstance(fast, list) is positional
    fast_row, slow_row = row_values(fast), row_values(slow)
    if positional:
        fast_id, slow_id = fast[0], slow[0]
        assert fast[1:] == slow[1:]
    else:
        fast_id, slow_id = fast.pop("id"), slow.pop("id")
        assert fast == slow
    assert uuid.UUID(fast_id).version == 4 and fast_id != slow_id
    assert fast_row[1:] == slow_row[1:]


def test_new_ids_are_random_version_4_uuids() -> None:
    ids = [uuid.UUID(_new_id()) for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert {i.version for i in ids} == {4} and {i.variant for i in ids} == {uuid.RFC_4122}


def test_a_forked_child_draws_ids_of_its_own() -> None:
    """Ids are drawn 256 at a time: a child forked with some drawn and not used yet (a
    supervisor's child, a worker) must not hand out the same ones as its parent."""
    history._drawn_ids.clear()
    _new_id()  # 256 drawn, 255 waiting in this process
    waiting = set(history._drawn_ids)
    assert len(waiting) == 255
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.write(write, _new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert uuid.UUID(child_id).version == 4
    assert child_id not in waiting


def test_nul_characters_are_replaced_in_every_form() -> None:
    record = replace(attempt(HTTP_500, 1), response_body="bin\x00ary", error="e\x00")
    for encoded in (array(record), obj(record), legacy(record)):
        row = row_values(orjson.loads(encoded))
        assert row[13] == "bin\ufffdary" and row[9] == "e\ufffd"


def _set(fields: list[Any], name: str, value: Any) -> list[Any]:
    fields = list(fields)
    fields[FIELDS.index(name)] = value
    return fields


GOOD = orjson.loads(array(attempt(HTTP_500, 1)))
OLD_GOOD = orjson.loads(legacy(attempt(HTTP_500, 1)))


@pytest.mark.parametrize(
    "item",
    [
        GOOD[: REQUIRED_FIELDS - 1],  # the trigger missing
        [*GOOD, "one field too many"],
        _set(GOOD, "outcome", "teleported"),
        _set(GOOD, "trigger", "whim"),
        _set(GOOD, "entity_ids", [1, 2]),
        _set(GOOD, "entity_ids", "1"),
        _set(GOOD, "environment_id", 5),
        _set(GOOD, "response_body", {"a": 1}),
        _set(GOOD, "id", "not a uuid"),
        _set(GOOD, "attempted_at_ms", "soon"),
        {k: v for k, v in OLD_GOOD.items() if k != "error"},  # the objects always had it
        {**OLD_GOOD, "outcome": "teleported"},
        "a string",
        42,
        None,
    ],
)
def test_malformed_records_of_either_form_are_refused(item: Any) -> None:
    with pytest.raises(ValueError, match="malformed attempt record"):
        row_values(item)


# --- the recorder's side ----------------------------------------------------------------


def test_the_recorder_decodes_every_form_of_kafka_record_alike() -> None:
    """The checked path (when PostgreSQL refused a batch): Kafka records of arrays, of
    objects (in an array, or one object alone), of both, give the same rows."""
    records = [attempt(DELIVERED, 1), attempt(HTTP_500, 2, n_retry=1), attempt(TIMEOUT, 3)]
    expected = [row_values(orjson.loads(legacy(r))) for r in records]
    values = [
        b"[" + b",".join(array(r) for r in records) + b"]",
        b"[" + b",".join(obj(r) for r in records) + b"]",
        b"[" + b",".join(legacy(r) for r in records) + b"]",
        b"[" + legacy(records[0]) + b"," + array(records[1]) + b"," + obj(records[2]) + b"]",
    ]
    r = recorder()
    for value in values:
        assert r._rows(kafka_record(value)) == expected
    assert r._rows(kafka_record(legacy(records[1]))) == expected[1:2]
    assert r._rows(kafka_record(b"[" + array(records[0]) + b', "junk"]')) == expected[:1]


def test_one_payload_carries_the_records_of_every_form() -> None:
    """The fast path hands PostgreSQL one JSON array of every Kafka record's attempts,
    whatever their form; a value that is neither an array nor an object sends them the
    checked way."""
    a, b = attempt(DELIVERED, 1), attempt(HTTP_500, 2)
    values = [b"[" + array(a) + b"," + obj(b) + b"]", b"[" + legacy(a) + b"]", legacy(b), b"[]"]
    payload = _payload([kafka_record(v, i) for i, v in enumerate(values)])
    assert payload is not None
    items = orjson.loads(payload)
    assert [type(i) for i in items] == [list, dict, dict, dict]
    assert [row_values(i) for i in items] == [
        row_values(orjson.loads(legacy(r))) for r in (a, b) * 2
    ]
    assert _payload([kafka_record(b"not json")]) is None


# --- the attempt log --------------------------------------------------------------------


class FakeProducer:
    """Acks every message at once; refuses those over ``limit`` bytes (as a broker
    refuses a message over its size limit)."""

    def __init__(self, limit: int = 1 << 30) -> None:
        self.limit = limit
        self.sent: list[bytes] = []

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
        if len(value) > self.limit:
            raise MessageSizeTooLargeError()
        self.sent.append(value)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


async def test_the_log_sends_its_records_as_one_array_per_batch(positional: bool) -> None:
    producer = FakeProducer()
    attempt_log = AttemptLog(producer, "attempts")
    n = notification(1)
    attempt_log.add_attempt(
        n, "shop-1", 0, at=AT, body=BODY, outcome=DELIVERED, trigger="scheduled"
    )  # fmt: skip
    attempt_log.add(attempt(HTTP_500, 2))
    await attempt_log.flushed()
    assert len(producer.sent) == 1
    items = orjson.loads(producer.sent[0])
    assert [isinstance(i, list) for i in items] == [positional, positional]
    rows = [row_values(item) for item in items]
    assert [row[7] for row in rows] == ["delivered", "http"]
    assert rows[0][4] == uuid.UUID(n.notification_uuid)
    await attempt_log.flushed()  # nothing more queued: nothing sent
    assert len(producer.sent) == 1


async def test_a_full_batch_goes_out_at_once_and_the_rest_when_flushed() -> None:
    producer = FakeProducer()
    attempt_log = AttemptLog(producer, "attempts")
    attempt_log.MAX_BATCH_BYTES = 3 * len(attempt(DELIVERED, 1).encode()) + 10
    for _ in range(4):
        attempt_log.add(attempt(DELIVERED, 1))
    assert attempt_log._timer is not None  # the rest waits for the linger, or a flush
    await attempt_log.flushed()
    assert [len(orjson.loads(m)) for m in producer.sent] == [3, 1]
    assert attempt_log._timer is None


async def test_a_record_too_large_for_a_message_is_sent_without_its_bodies(
    positional: bool,
) -> None:
    """A batch the broker refuses is sent record by record; one still refused loses its
    bodies, not its row."""
    small, large = attempt(HTTP_500, 1), replace(attempt(HTTP_500, 2), request_body="x" * 5000)
    producer = FakeProducer(limit=3000)
    attempt_log = AttemptLog(producer, "attempts")
    attempt_log.add(small)
    attempt_log.add(large)
    await attempt_log.flushed()
    sent = [orjson.loads(m) for m in producer.sent]
    assert [len(m) for m in sent] == [1, 1]
    assert sent[0][0] == orjson.loads(small.encode())
    assert isinstance(sent[1][0], list) is positional
    stripped = row_values(sent[1][0])
    assert stripped[0] == large.id and stripped[9] == large.error
    assert stripped[12] is None and stripped[13] is None
