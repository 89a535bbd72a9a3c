"""The catalog and the published notification schemas are one source: the checked-in
schemas/notification.schema.json and the OpenAPI ``webhooks`` are what the code builds
from the catalog, and the bodies the dispatcher writes are exactly what they allow."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from msgspec.structs import replace

from dispatcher import catalog, event_types
from dispatcher.events import Event
from dispatcher.notification import Notification, subscribed_body

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "schemas" / "notification.schema.json"
OPENAPI = ROOT / "schemas" / "openapi.json"
SENT_AT = datetime(2026, 1, 1, 10, 0, 0, 123000, tzinfo=UTC)
ENVELOPE = [
    "type", "entity_name", "time", "notification_uuid", "environment_id", "client_id",
    "from_user", "entities", "nRetry",
]  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def published(key: str) -> Draft202012Validator:
    """A validator of ``$defs[key]`` of the checked-in document."""
    doc = load(DOCUMENT)
    return Draft202012Validator({"$defs": doc["$defs"], "$ref": f"#/$defs/{key}"})


def served(entity_name: str, event_type: str, the_catalog: catalog.Catalog | None = None) -> Any:
    """The self-contained schema GET /event-types serves for the pair."""
    for t in event_types.event_types(the_catalog or catalog.load()):
        if (t.entity_name, t.event_type) == (entity_name, event_type):
            return Draft202012Validator(t.schema)
    raise AssertionError(f"no event type {entity_name} {event_type}")


def event(entity_name: str = "sales", event_type: str = "CLOSED", **entity: Any) -> Event:
    return Event(
        event_id=str(uuid.uuid4()),
        entity_name=entity_name,
        event_type=event_type,
        environment_id="shop-1",
        client_id="app",
        from_user="user@example.com",
        time="2026-01-01T10:00:00.000Z",
        entity_json=orjson.dumps(
            entity or {"id": 1, "uuid": str(uuid.uuid4()), "final_amount": 12.5}
        ),
        entity_id=str(entity.get("id", 1)),
    )


def body(e: Event, entities: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
    """The decoded body the dispatcher sends for ``e`` on its first attempt (for an import
    batch of ``entities``, whose first event ``e`` is)."""
    batch = (
        None if entities is None else [replace(e, entity_json=orjson.dumps(x)) for x in entities]
    )
    data: dict[str, Any] = orjson.loads(
        Notification.for_event(e, uuid.uuid4(), batch).body(0, SENT_AT)
    )
    return data


def pairs(the_catalog: catalog.Catalog) -> set[tuple[str, str]]:
    return {(name, ev) for name, e in the_catalog.entities.items() for ev in e.events}


# --- one source -------------------------------------------------------------------------


def test_published_document_is_what_the_catalog_builds() -> None:
    """schemas/notification.schema.json is up to date (tools/publish_schemas.py writes it)."""
    assert load(DOCUMENT) == event_types.document(catalog.load()), (
        "stale: run .venv/bin/python tools/publish_schemas.py"
    )


def test_openapi_webhooks_are_what_the_catalog_builds() -> None:
    """The OpenAPI document's webhooks and their components are up to date."""
    doc = load(OPENAPI)
    assert event_types.with_openapi_parts(doc, catalog.load()) == doc, (
        "stale: run .venv/bin/python tools/publish_schemas.py"
    )


def test_catalog_pairs_and_published_schemas_agree() -> None:
    """Every pair of the catalog has its schema in the document, the API list and the
    OpenAPI webhooks, and none of them has a pair the catalog lacks."""
    built_in = catalog.load()
    expected = pairs(built_in)
    doc = load(DOCUMENT)
    in_document = {tuple(ref["$ref"].rsplit("/", 1)[1].split(".")) for ref in doc["oneOf"][1:]}
    assert doc["oneOf"][0] == {"$ref": "#/$defs/subscribed"}
    assert in_document == expected
    assert {(t.entity_name, t.event_type) for t in event_types.event_types(built_in)} == expected
    webhooks = set(load(OPENAPI)["webhooks"]) - {"subscribed"}
    assert {tuple(key.split(".")) for key in webhooks} == expected
    for name in built_in.entities:
        assert f"entity.{name}" in doc["$defs"], name


def test_every_schema_is_a_valid_json_schema() -> None:
    """The document, each served schema and each OpenAPI webhook body are valid 2020-12."""
    Draft202012Validator.check_schema(load(DOCUMENT))
    for t in event_types.event_types(catalog.load()):
        Draft202012Validator.check_schema(t.schema)
        assert t.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for key, webhook in load(OPENAPI)["webhooks"].items():
        schema = webhook["post"]["requestBody"]["content"]["application/json"]["schema"]
        Draft202012Validator.check_schema(schema)
        assert webhook["post"]["responses"].keys() == {"200"}, key


def test_every_entity_schema_requires_an_id_and_allows_more() -> None:
    """The platform's models are open: items require id (the decoder enforces it) and
    allow other fields, but a DELETED entity carries id and uuid only."""
    doc = load(DOCUMENT)
    for key, schema in doc["$defs"].items():
        if key.startswith("entity."):
            assert schema["required"] == ["id"], key
            assert schema["additionalProperties"] is True, key
    assert doc["$defs"]["deleted_entity"]["additionalProperties"] is False


def test_deprecated_entities_stay_listed_with_a_note() -> None:
    """orders is deprecated in favour of sales: listed, and its descriptions say so."""
    listed = [t for t in event_types.event_types(catalog.load()) if t.entity_name == "orders"]
    assert {t.event_type for t in listed} == {"CREATED", "UPDATED", "DELETED", "CLOSED"}
    assert all(t.description.startswith("Deprecated (use sales).") for t in listed)


# --- the envelope -----------------------------------------------------------------------


def test_notification_body_is_exactly_the_published_envelope() -> None:
    """Notification.body writes the nine fields, in order, and validates against both the
    document's and the served schema of its pair."""
    sent = body(event())
    assert list(sent) == ENVELOPE
    assert list(load(DOCUMENT)["$defs"]["envelope"]["properties"]) == ENVELOPE
    published("sales.CLOSED").validate(sent)
    served("sales", "CLOSED").validate(sent)


@pytest.mark.parametrize("field", ENVELOPE)
def test_a_body_missing_a_field_is_rejected(field: str) -> None:
    """Removing any field of the envelope breaks both schemas of the pair."""
    sent = body(event())
    del sent[field]
    assert not published("sales.CLOSED").is_valid(sent)
    assert not served("sales", "CLOSED").is_valid(sent)


def test_a_body_with_an_extra_field_is_rejected() -> None:
    """A field the schema does not name breaks the envelope: add it to the schema first."""
    sent = {**body(event()), "webhook_id": str(uuid.uuid4())}
    assert not published("sales.CLOSED").is_valid(sent)
    assert not served("sales", "CLOSED").is_valid(sent)


def test_a_body_of_another_pair_is_rejected() -> None:
    """The type and entity_name are fixed by the pair's schema."""
    sent = body(event())
    assert not published("sales.CREATED").is_valid(sent)
    assert not served("sales", "CREATED").is_valid(sent)


def test_entities_are_open_but_need_an_id() -> None:
    """Fields of an entity beyond its schema are allowed; an entity without id is not."""
    sent = body(event(id=7, anything={"nested": [1]}))
    served("sales", "CLOSED").validate(sent)
    sent["entities"] = [{"uuid": str(uuid.uuid4())}]
    assert not served("sales", "CLOSED").is_valid(sent)
    assert not published("sales.CLOSED").is_valid(sent)


def test_deleted_notifications_carry_only_id_and_uuid() -> None:
    """The dispatcher keeps only id and uuid of a DELETED entity; the schema allows no more."""
    entity_uuid = str(uuid.uuid4())
    sent = body(event("sales", "DELETED", id=3, uuid=entity_uuid, final_amount=1.0))
    assert sent["entities"] == [{"id": 3, "uuid": entity_uuid}]
    published("sales.DELETED").validate(sent)
    served("sales", "DELETED").validate(sent)
    sent["entities"] = [{"id": 3, "final_amount": 1.0}]
    assert not published("sales.DELETED").is_valid(sent)
    assert not served("sales", "DELETED").is_valid(sent)


def test_import_batches_fit_the_batch_entities_only() -> None:
    """items (batched) allows 80 entities in a notification; sales (single) only one."""
    batch = tuple({"id": i, "name": f"item {i}"} for i in range(80))
    sent = body(event("items", "CREATED", id=0), batch)
    published("items.CREATED").validate(sent)
    served("items", "CREATED").validate(sent)
    two = body(event(), ({"id": 1}, {"id": 2}))
    assert not published("sales.CLOSED").is_valid(two)
    assert not served("sales", "CLOSED").is_valid(two)


def test_subscribed_message_is_exactly_its_schema() -> None:
    """The SUBSCRIBED test message validates; with a field more or less it does not."""
    sent = orjson.loads(subscribed_body("sales", "shop-1", "client-1", SENT_AT))
    assert sent["time"] == "2026-01-01T10:00:00.123Z"
    validator = published("subscribed")
    validator.validate(sent)
    assert not validator.is_valid({**sent, "nRetry": 0})
    assert not validator.is_valid({k: v for k, v in sent.items() if k != "client_id"})
    assert not validator.is_valid({**sent, "entity_name": "widgets"})


def test_the_document_accepts_every_body_and_names_its_pair() -> None:
    """The whole document (its oneOf) accepts a body of any pair, and SUBSCRIBED."""
    whole = Draft202012Validator(load(DOCUMENT))
    whole.validate(body(event()))
    whole.validate(body(event("stock", "UPDATED", id=5, stock_quantity=3)))
    whole.validate(orjson.loads(subscribed_body("items", "shop-1", "c", SENT_AT)))
    assert not whole.is_valid(body(event("widgets", "CREATED", id=1)))


def test_dispatcher_catalog_prints_the_same_list() -> None:
    """`dispatcher catalog --json` prints the list of GET /event-types; without --json, a
    table of entity, event, import policy and description."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    command = [sys.executable, "-m", "dispatcher", "catalog"]
    listed = subprocess.run([*command, "--json"], env=env, capture_output=True, check=True)  # noqa: S603 - our own command
    expected = [t.to_json() for t in event_types.event_types(catalog.load())]
    assert orjson.loads(listed.stdout) == expected
    table = subprocess.run(command, env=env, capture_output=True, check=True, text=True)  # noqa: S603 - our own command
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["entity", "event", "import", "description"]
    assert len(rows) == len(expected)
    assert rows[0].split(None, 3) == [
        expected[0]["entity_name"],
        expected[0]["event_type"],
        expected[0]["import"],
        expected[0]["description"],
    ]


# --- a catalog an operator replaced -----------------------------------------------------


def test_a_replaced_catalog_gets_its_own_schemas(tmp_path: Path) -> None:
    """An entity without entity_schema is only known to have an id; described events and
    a deprecation note come from the file; the OpenAPI webhooks follow it."""
    path = tmp_path / "catalog.json"
    path.write_text(
        orjson.dumps(
            {
                "vouchers": {"events": ["created", "USED"], "imports": "batch"},
                "gifts": {
                    "description": "A gift.",
                    "deprecated": "use vouchers",
                    "events": {"GIVEN": "A gift was given."},
                    "entity_schema": {"type": "object", "required": ["id", "to"]},
                },
            }
        ).decode()
    )
    replaced = catalog.load(str(path))
    listed = {(t.entity_name, t.event_type): t for t in event_types.event_types(replaced)}
    assert set(listed) == {("gifts", "GIVEN"), ("vouchers", "CREATED"), ("vouchers", "USED")}
    assert listed["gifts", "GIVEN"].description == "Deprecated (use vouchers). A gift was given."
    assert listed["vouchers", "USED"].imports == "batch"
    used = served("vouchers", "USED", replaced)
    used.validate(body(event("vouchers", "USED", id="v-1", code="X")))
    assert not used.is_valid(body(event("vouchers", "USED", code="X")))
    given = served("gifts", "GIVEN", replaced)
    assert not given.is_valid(body(event("gifts", "GIVEN", id=1)))
    given.validate(body(event("gifts", "GIVEN", id=1, to="a@b.test")))
    doc = event_types.with_openapi_parts(load(OPENAPI), replaced)
    assert set(doc["webhooks"]) == {
        "subscribed",
        "gifts.GIVEN",
        "vouchers.CREATED",
        "vouchers.USED",
    }
    subscribed = doc["components"]["schemas"]["SubscribedMessage"]
    assert subscribed["properties"]["entity_name"]["enum"] == ["gifts", "vouchers"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"events": {"CREATED": 1}}, "the description of CREATED must be a string"),
        ({"events": ["CREATED"], "description": 3}, "'description' must be a string"),
        ({"events": ["CREATED"], "entity_schema": []}, "'entity_schema' must be a JSON Schema"),
    ],
)
def test_bad_descriptions_or_schemas_are_refused(spec: dict[str, Any], message: str) -> None:
    """A replaced catalog's descriptions and schemas are checked when it is loaded."""
    with pytest.raises(catalog.CatalogError, match=message):
        catalog.parse({"vouchers": spec}, source="bad.json")
