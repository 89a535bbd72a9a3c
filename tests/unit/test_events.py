"""The event contract: the decoder and the published JSON Schema accept and refuse alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from dispatcher.events import InvalidEvent, decode

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
