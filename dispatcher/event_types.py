"""The published event catalog: every subscribable (entity, event) pair with the JSON
Schema of its notification's body, built from the catalog and nothing else.

The catalog (``catalog.json``, or ``DISPATCHER_CATALOG_FILE``) lists the pairs and holds
what integrators are told about them; this module turns it into:

- :func:`event_types`: one :class:`EventType` per pair, whose ``schema`` is self-contained
  (no ``$ref``): served by ``GET /event-types`` and listed by ``dispatcher catalog``;
- :func:`document`: ``schemas/notification.schema.json``, the same schemas composed from
  their parts (the envelope, ``SUBSCRIBED``, one item schema per entity and the one of
  ``DELETED`` entities), for people and validators;
- :func:`openapi_parts`: the ``webhooks`` section of the OpenAPI document and the
  components it uses, one webhook per pair plus ``subscribed``.

``tools/publish_schemas.py`` writes the last two for the built-in catalog; tests check
that the checked-in files are what this module builds, so the catalog and its schemas
cannot disagree. The envelope is strict (every field required, no other allowed): a
field added to ``Notification.body`` without its schema fails the tests. An entity's
items allow fields the schema does not name, as the platform's models are open.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from dispatcher.catalog import Catalog, Entity, ImportPolicy
from dispatcher.notification import DELETED, Notification

Schema = dict[str, Any]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
DOCUMENT_ID = "https://github.com/webhook-dispatcher/schemas/notification.schema.json"
SUBSCRIBED = "SUBSCRIBED"

_ISO_MS = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_ID: Schema = {
    "type": ["integer", "string"],
    "minLength": 1,
    "description": "The entity's primary key.",
}
_ENTITY_UUID: Schema = {"type": "string", "description": "Its UUID, where the model has one."}
_TIME: Schema = {
    "type": "string",
    "pattern": _ISO_MS,
    "description": "When this request was sent: UTC, milliseconds. Each attempt has its own.",
}
_BATCH_NOTE = " In an import, up to DISPATCHER_IMPORT_BATCH_SIZE (80) entities per notification."
_SKIP_NOTE = " Not sent for an import."
_DELETED_ITEM: Schema = {
    "type": "object",
    "description": "A deleted entity: only its id, and its uuid where the model has one.",
    "required": ["id"],
    "properties": {"id": _ID, "uuid": _ENTITY_UUID},
    "additionalProperties": False,
}


@dataclass(frozen=True, slots=True)
class EventType:
    """One subscribable pair, as ``GET /event-types`` answers it."""

    entity_name: str
    event_type: str
    description: str
    imports: ImportPolicy
    schema: Schema  # the JSON Schema of the notification's body, self-contained

    @property
    def key(self) -> str:
        """``sales.CLOSED``: its name in the OpenAPI ``webhooks`` and the document's $defs."""
        return f"{self.entity_name}.{self.event_type}"

    def to_json(self) -> dict[str, Any]:
        return {
            "entity_name": self.entity_name,
            "event_type": self.event_type,
            "description": self.description,
            "import": self.imports,
            "schema": self.schema,
        }


def event_types(catalog: Catalog) -> list[EventType]:
    """Every pair of ``catalog``, by entity then event type."""
    return [
        EventType(
            entity.name,
            event,
            describe(entity, event),
            entity.imports,
            {"$schema": DIALECT, **notification_schema(entity, event)},
        )
        for entity in _entities(catalog)
        for event in sorted(entity.events)
    ]


def example(t: EventType) -> dict[str, Any]:
    """A notification of the pair as its webhook receives it, with placeholder values its
    schema allows (the portal's event catalog shows it next to the schema)."""
    item = t.schema["properties"]["entities"]["items"]
    entity = _example_value(item, "entity")
    note = Notification(
        "6f0d1c3e-2b4a-4c5d-8e9f-0a1b2c3d4e5f", uuid.UUID(int=0), t.event_type,
        t.entity_name, "shop-1", "app-client-id", "user@example.com", (entity,),
    )  # fmt: skip
    body: dict[str, Any] = orjson.loads(note.body(0, datetime(2026, 1, 1, 10, 0, tzinfo=UTC)))
    return body


def _example_value(schema: Schema, name: str) -> Any:
    """A value that ``schema`` (of a property called ``name``) allows, for a reader."""
    if "const" in schema:
        return schema["const"]
    for key in ("examples", "enum"):
        if schema.get(key):
            return schema[key][0]
    if "type" not in schema and "properties" not in schema:
        return None  # any value: the catalog does not say which
    kinds = schema.get("type", "object")
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if k != "null"] or ["null"]
    kind = kinds[0]
    if kind == "object":
        props = schema.get("properties", {})
        return {key: _example_value(sub, key) for key, sub in props.items()}
    if kind == "array":
        items = schema.get("items")
        return [_example_value(items, name)] if isinstance(items, dict) else []
    if kind == "integer":
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "number":
        return max(float(schema.get("minimum", 12.5)), 12.5)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _example_string(schema, name)


def _example_string(schema: Schema, name: str) -> str:
    fmt = schema.get("format")
    if fmt == "uuid" or name == "uuid" or name.endswith("_uuid"):
        return "0b6e8f3a-5d2c-4e1f-9a7b-3c4d5e6f7a8b"
    if fmt == "date-time" or name.endswith("_at"):
        return "2026-01-01T10:00:00.000Z"
    if fmt == "date" or name == "date":
        return "2026-01-01"
    if fmt == "email":
        return "user@example.com"
    return "…"


def describe(entity: Entity, event: str) -> str:
    """What the pair means for an integrator, in a sentence or three."""
    text = entity.event_descriptions.get(event) or f"{entity.name} {event}."
    if event == DELETED:
        text += " Entities carry only id and uuid."
    if entity.imports == "batch":
        text += _BATCH_NOTE
    elif entity.imports == "skip":
        text += _SKIP_NOTE
    if entity.deprecated:
        text = f"Deprecated ({entity.deprecated}). {text}"
    return text


def item_schema(entity: Entity, event: str) -> Schema:
    """The JSON Schema of one element of ``entities`` in a notification of the pair."""
    return copy.deepcopy(_DELETED_ITEM) if event == DELETED else entity_schema(entity)


def entity_schema(entity: Entity) -> Schema:
    """The JSON Schema of the entity in notifications of every event but ``DELETED``: the
    catalog's, or, when it has none, one saying only that there is an ``id``."""
    if entity.entity_schema is not None:
        return copy.deepcopy(dict(entity.entity_schema))
    return {
        "type": "object",
        "description": f"The {entity.name} entity in the platform's public API model. Only "
        "id is guaranteed; the other fields are as the platform sends them.",
        "required": ["id"],
        "properties": {"id": _ID, "uuid": _ENTITY_UUID},
        "additionalProperties": True,
    }


def _envelope_properties() -> dict[str, Schema]:
    """The nine fields of every notification, in the order ``Notification.body`` writes."""
    return {
        "type": {
            "type": "string",
            "pattern": "^[A-Z][A-Z0-9_]{0,63}$",
            "description": "The event type.",
        },
        "entity_name": {
            "type": "string",
            "pattern": "^[a-z][a-z0-9_]{0,63}$",
            "description": "The entity.",
        },
        "time": _TIME,
        "notification_uuid": {
            "type": "string",
            "format": "uuid",
            "pattern": _UUID,
            "description": "Stable across retries and re-deliveries: dedupe on it. Also the "
            "webhook-id header.",
        },
        "environment_id": {"type": "string", "minLength": 1, "description": "The shop."},
        "client_id": {
            "type": "string",
            "description": "Client id of the app that caused the event; empty when unknown.",
        },
        "from_user": {
            "type": ["string", "null"],
            "description": "Email of the user who caused the event, or null.",
        },
        "entities": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object"},
            "description": "The entity, or up to DISPATCHER_IMPORT_BATCH_SIZE (80) of them "
            "in a batch of an import.",
        },
        "nRetry": {
            "type": "integer",
            "minimum": 0,
            "description": "0 on the first attempt, then 1, 2, ... on each retry.",
        },
    }


def envelope_schema() -> Schema:
    """What every notification is, whatever its pair."""
    properties = _envelope_properties()
    return {
        "type": "object",
        "description": "What every notification of an event carries. No other field is sent.",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def _pair_properties(entity: Entity, event: str) -> dict[str, Schema]:
    """What a pair's notification narrows in the envelope (``entities`` without items)."""
    entities: Schema = {}
    if entity.imports != "batch":
        entities["maxItems"] = 1
    return {
        "type": {"const": event},
        "entity_name": {"const": entity.name},
        "entities": entities,
    }


def notification_schema(entity: Entity, event: str) -> Schema:
    """The self-contained JSON Schema of the body of a notification of the pair."""
    properties = _envelope_properties()
    for name, narrowed in _pair_properties(entity, event).items():
        wide = {k: v for k, v in properties[name].items() if k != "pattern"}
        properties[name] = {**wide, **narrowed}
    entities = properties["entities"]
    entities["items"] = item_schema(entity, event)
    if "maxItems" in entities:
        entities["description"] = "The entity: always one."
    return {
        "title": f"{entity.name} {event}",
        "description": describe(entity, event),
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


def subscribed_schema(catalog: Catalog) -> Schema:
    """The JSON Schema of the ``SUBSCRIBED`` test message of a new webhook."""
    return {
        "title": "SUBSCRIBED",
        "description": "The test message POSTed to a URL before it is subscribed; the "
        "webhook is kept only if the endpoint answers exactly 200. It is signed with the "
        "secret the webhook will have; its webhook-id is a fresh UUID.",
        "type": "object",
        "required": ["type", "entity_name", "time", "environment_id", "client_id"],
        "properties": {
            "type": {"const": SUBSCRIBED},
            "entity_name": {
                "enum": [e.name for e in _entities(catalog)],
                "description": "The entity subscribed to.",
            },
            "time": {**_TIME, "description": "When the message was sent, UTC, milliseconds."},
            "environment_id": {"type": "string", "description": "The shop."},
            "client_id": {"type": "string", "description": "Client id of the shop's token."},
        },
        "additionalProperties": False,
    }


def document(catalog: Catalog) -> Schema:
    """``schemas/notification.schema.json``: any body POSTed to a webhook, composed from
    the envelope, the ``SUBSCRIBED`` message and one item schema per entity."""
    defs: dict[str, Schema] = {
        "envelope": envelope_schema(),
        "subscribed": subscribed_schema(catalog),
        "deleted_entity": copy.deepcopy(_DELETED_ITEM),
    }
    for entity in _entities(catalog):
        defs[f"entity.{entity.name}"] = entity_schema(entity)
    pairs = []
    for entity in _entities(catalog):
        item = f"entity.{entity.name}"
        for event in sorted(entity.events):
            narrowed = _pair_properties(entity, event)
            ref = "deleted_entity" if event == DELETED else item
            narrowed["entities"] = {**narrowed["entities"], "items": {"$ref": f"#/$defs/{ref}"}}
            key = f"{entity.name}.{event}"
            defs[key] = {
                "title": f"{entity.name} {event}",
                "description": describe(entity, event),
                "$ref": "#/$defs/envelope",
                "properties": narrowed,
            }
            pairs.append({"$ref": f"#/$defs/{key}"})
    return {
        "$schema": DIALECT,
        "$id": DOCUMENT_ID,
        "title": "Webhook notification",
        "description": "Every body the dispatcher POSTs to a webhook: the SUBSCRIBED test "
        "message, or the notification of one (entity_name, type) pair of the catalog, "
        "$defs['<entity_name>.<type>']. GET /event-types serves each pair's schema on its "
        "own, self-contained. Generated from the catalog by tools/publish_schemas.py.",
        "oneOf": [{"$ref": "#/$defs/subscribed"}, *pairs],
        "$defs": defs,
    }


# --- the OpenAPI document ---------------------------------------------------------------

_HEADERS: dict[str, Schema] = {
    "WebhookId": {
        "name": "webhook-id",
        "in": "header",
        "required": True,
        "description": "The message id: the notification_uuid of a notification, the same "
        "on every attempt; a fresh UUID for SUBSCRIBED.",
        "schema": {"type": "string"},
    },
    "WebhookTimestamp": {
        "name": "webhook-timestamp",
        "in": "header",
        "required": True,
        "description": "Unix seconds.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "WebhookSignature": {
        "name": "webhook-signature",
        "in": "header",
        "required": True,
        "description": 'v1,<base64 HMAC-SHA256 of "id.timestamp.body">. Notifications sent '
        "during a secret rotation's grace period carry several such signatures, "
        "space-separated, the new secret's first; a Standard Webhooks verifier accepts the "
        "message when any matches.",
        "schema": {"type": "string", "pattern": "^v1,"},
    },
}
_PARAMETERS = [{"$ref": f"#/components/parameters/{name}"} for name in _HEADERS]
_FAILURE = (
    "Any other answer (other 2xx and redirects included), a timeout or a connection error "
    "is a failure: it is mailed to the webhook's email and the notification is sent again "
    "later with nRetry + 1, up to DISPATCHER_MAX_RETRIES (3) times."
)


def openapi_parts(catalog: Catalog) -> tuple[dict[str, Any], dict[str, Any]]:
    """The OpenAPI ``webhooks`` section, and the components it uses by section
    (``{"schemas": {...}, "parameters": {...}}``), for ``catalog``."""
    webhooks: dict[str, Any] = {
        "subscribed": {
            "post": {
                "operationId": "subscribed",
                "summary": "The test message sent to a URL before subscribing it",
                "description": "Signed with the Standard Webhooks scheme, keyed by the "
                "`secret` the webhook will have. The endpoint must answer exactly HTTP 200.",
                "parameters": copy.deepcopy(_PARAMETERS),
                "requestBody": _body({"$ref": "#/components/schemas/SubscribedMessage"}),
                "responses": {"200": {"description": "Accepted: the webhook is saved."}},
            }
        }
    }
    for t in event_types(catalog):
        schema = {k: v for k, v in t.schema.items() if k != "$schema"}
        webhooks[t.key] = {
            "post": {
                "operationId": _operation_id(t),
                "summary": f"{t.entity_name} {t.event_type}",
                "description": t.description,
                "parameters": copy.deepcopy(_PARAMETERS),
                "requestBody": _body(schema),
                "responses": {"200": {"description": f"Delivered. {_FAILURE}"}},
            }
        }
    components = {
        "schemas": {"SubscribedMessage": subscribed_schema(catalog)},
        "parameters": copy.deepcopy(_HEADERS),
    }
    return webhooks, components


def with_openapi_parts(doc: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """``doc`` (the OpenAPI document) with the webhooks and components of ``catalog``."""
    webhooks, components = openapi_parts(catalog)
    out = {**doc, "webhooks": webhooks, "components": dict(doc.get("components", {}))}
    for section, entries in components.items():
        out["components"][section] = {**out["components"].get(section, {}), **entries}
    return out


def _body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _operation_id(t: EventType) -> str:
    words = [*t.entity_name.split("_"), t.event_type.lower()]
    return words[0] + "".join(w.capitalize() for w in words[1:])


def _entities(catalog: Catalog) -> Iterable[Entity]:
    return (catalog.entities[name] for name in sorted(catalog.entities))
