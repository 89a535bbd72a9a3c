"""The event contract: the decoder and the published JSON Schema accept and refuse alike."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from dispatcher.delays import RetryRecord
from dispatcher.events import InvalidEvent, _decode_checked, decode
from dispatcher.notification import Notification

ROOT = Path(__file__).resolve().parents[2]

VALID: dict[str, Any] = {
    "event_id": "6f1c3c57-2f0e-4a51-9a35-0c7a2b7d1e11",
    "entity_name": "sales",
    "event_type": "closed",
    "environment_id": "shop-1",
    "client_id": "app",
    "from_user": "user@example.com",
    "time": "2026-01-01T10:00:00.000Z",
    "entity": {"id": 1},
    "import_id": None,
    "import_end": False,
}

INVALID: list[tuple[dict[str, Any], str]] = [
    ({k: v for k, v in VALID.items() if k != "event_id"}, "'event_id' is missing"),
    ({**VALID, "event_id": "x"}, "'event_id' must be a UUID"),
    ({**VALID, "entity_name": 3}, "'entity_name' must be a string"),
    ({**VALID, "environment_id": ""}, "'environment_id' must not be empty"),
    ({**VALID, "entity": [1]}, "'entity' must be a JSON object"),
    ({**VALID, "entity": {"uuid": "x"}}, "'entity' must have an 'id'"),
    ({**VALID, "entity": {"id": ""}}, "'entity' must have an 'id'"),
    ({**VALID, "entity": {"id": None}}, "'entity' must have an 'id'"),
    ({**VALID, "entity": {"id": [1]}}, "'entity' must have an 'id'"),
    ({**VALID, "import_end": "yes"}, "'import_end' must be true or false"),
    ({**VALID, "import_id": [1]}, "'import_id' must be a string, a number or null"),
    ({k: v for k, v in VALID.items() if k != "time"}, "'time' is missing"),
]


def test_valid_event_decodes_and_upper_cases_the_event_type() -> None:
    """A valid event decodes; its event type is stored upper case."""
    event = decode(orjson.dumps(VALID))
    assert event.event_type == "CLOSED"
    assert event.entity == {"id": 1}


@pytest.mark.parametrize(("data", "reason"), INVALID)
def test_invalid_events_say_why(data: dict[str, Any], reason: str) -> None:
    """A broken event raises InvalidEvent whose reason names the field."""
    with pytest.raises(InvalidEvent) as caught:
        decode(orjson.dumps(data))
    assert caught.value.reason.startswith(reason)


def test_json_schema_and_decoder_agree() -> None:
    """The published JSON Schema accepts the valid event and rejects each invalid one."""
    schema = json.loads((ROOT / "schemas" / "event.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(VALID))
    for data, _ in INVALID:
        assert list(validator.iter_errors(data)), data


# --- the fast decoder (msgspec, entity kept as text) against the checked one ---------------

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["", "x" * 201, "2026-01-01T10:00:00Z", VALID["event_id"], "yes"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["id", "uuid", "x"]), st.integers() | st.text(max_size=3)),
)


def _outcome(decoder: Any, raw: bytes) -> Any:
    try:
        event = decoder(raw)
    except InvalidEvent as exc:
        return ("refused", exc.reason, exc.kind)
    return (
        "accepted",
        event.entity,
        event.entity_id,
        replace(event, entity_json=b""),
    )


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(VALID)), _VALUES, max_size=3))
def test_the_fast_decoder_accepts_and_refuses_as_the_checked_one(changes: dict[str, Any]) -> None:
    """Whatever an event's fields hold, decode() gives the event (or the reason) that the
    checked decoder gives: the fast path never accepts what the contract refuses."""
    raw = json.dumps({**VALID, **changes}).encode()  # integers past 64 bits too
    assert _outcome(decode, raw) == _outcome(_decode_checked, raw)


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        (b'{"id": 1, "name": "\xff"}', "not valid JSON"),  # not UTF-8, where msgspec skips
        (b'{"id": 1, "name": "\\ud800"}', "not valid JSON"),  # a lone surrogate
        (b'{"id": 1, "name": "a\x01b"}', "not valid JSON"),
        (b'{"id": 1, "x": [1,]}', "not valid JSON"),
        (b'{"id": true}', "'entity' must have an 'id'"),
        (b'{"id": 1.5}', "'entity' must have an 'id'"),
        (b'{"id": 123456789012345678901234567890}', "'entity' must have an 'id'"),  # a float
    ],
)
def test_a_broken_entity_is_refused_with_the_reason(entity: bytes, reason: str) -> None:
    """The entity is not parsed into objects, but what is not valid JSON (or has no
    usable id) is refused all the same."""
    raw = orjson.dumps({**VALID, "entity": None}).replace(b'"entity":null', b'"entity":' + entity)
    with pytest.raises(InvalidEvent) as caught:
        decode(raw)
    assert caught.value.reason.startswith(reason)


def test_the_entity_goes_out_as_the_producer_wrote_it() -> None:
    """Key order, spacing and numbers no double holds reach the endpoint unchanged, and a
    retry (its record parsed again 15 minutes later) sends the same body."""
    entity = b'{ "z": 1e400, "id": 7, "big": 123456789012345678901234567890, "a": "\\u00e9" }'
    raw = orjson.dumps({**VALID, "entity": None}).replace(b'"entity":null', b'"entity":' + entity)
    event = decode(raw)
    assert (event.entity_json, event.entity_id) == (entity, "7")
    first = Notification.for_event(event, uuid.uuid4())
    assert b'"entities":[' + entity + b"]" in first.body(0, 0.0)
    record = RetryRecord.decode(RetryRecord(first, 1, 1_800_000_000_000, "HTTP 500").encode())
    assert record.notification.body(0, 0.0) == first.body(0, 0.0)
    assert record.notification.entity_ids == ("7",)
