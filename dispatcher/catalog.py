"""The entity catalog: which (entity_name, event_type) pairs exist, and how imports go out.

The catalog is data (``catalog.json`` in this package). Operators extend or replace it with
``DISPATCHER_CATALOG_FILE``, a JSON object of the same shape::

    {"sales": {"events": ["CREATED", "CLOSED"]},
     "items": {"events": ["CREATED"], "imports": "batch"},
     "stock_movements": {"events": ["CREATED"], "imports": "skip"}}

``imports`` says what happens to events of an import: ``single`` (default, one
notification each), ``batch`` (grouped, up to the batch size) or ``skip`` (not sent).

What integrators are told about each pair is data too, all optional: ``description`` of
the entity, ``events`` as an object mapping each event type to what it means (instead of
a list), ``deprecated`` (what to use instead) and ``entity_schema``, the JSON Schema of
one element of a notification's ``entities`` (on every event but ``DELETED``, which
carries only ``id`` and ``uuid``); without one, an entity is only known to have an
``id``. ``dispatcher.event_types`` turns these into the JSON Schema of each notification.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import orjson

from dispatcher.errors import ConfigurationError

ImportPolicy = Literal["single", "batch", "skip"]
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_EVENT = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class CatalogError(ConfigurationError, ValueError):
    """The catalog file is unreadable or not of the documented shape; fix what the message names."""


@dataclass(frozen=True, slots=True)
class Entity:
    """One entity of the catalog."""

    name: str
    events: frozenset[str]
    imports: ImportPolicy = "single"
    description: str = ""
    deprecated: str = ""  # what to use instead; empty when the entity is not deprecated
    event_descriptions: Mapping[str, str] = field(default_factory=dict, hash=False)
    # JSON Schema of one element of ``entities`` (but on DELETED); None: only ``id`` is known
    entity_schema: Mapping[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The entities that can be subscribed to, by name."""

    entities: Mapping[str, Entity]

    def allows(self, entity_name: str, event_type: str) -> bool:
        """Whether the pair exists; ``event_type`` must already be upper case."""
        entity = self.entities.get(entity_name)
        return entity is not None and event_type in entity.events

    def import_policy(self, entity_name: str) -> ImportPolicy:
        entity = self.entities.get(entity_name)
        return entity.imports if entity else "single"

    def describe(self) -> dict[str, list[str]]:
        """{entity: sorted events}, for error messages and the API."""
        return {name: sorted(e.events) for name, e in sorted(self.entities.items())}


def parse(data: object, *, source: str = "catalog") -> Catalog:
    """Validate decoded JSON and build the catalog."""
    if not isinstance(data, dict) or not data:
        raise CatalogError(f"{source}: expected a non-empty JSON object of entities")
    entities = {}
    for name, spec in data.items():
        where = f"{source}: entity {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise CatalogError(f"{where}: names are lower case letters, digits and _")
        if not isinstance(spec, dict):
            raise CatalogError(f"{where}: expected an object with 'events'")
        events = spec.get("events")
        if not isinstance(events, list | dict) or not events:
            raise CatalogError(
                f"{where}: 'events' must be a non-empty list, or an object of descriptions"
            )
        described: dict[str, str] = {}
        for event in events:
            if not isinstance(event, str) or not _EVENT.match(event.upper()):
                raise CatalogError(f"{where}: bad event type {event!r}")
            text = events[event] if isinstance(events, dict) else ""
            if not isinstance(text, str):
                raise CatalogError(f"{where}: the description of {event} must be a string")
            described[event.upper()] = text
        imports = spec.get("imports", "single")
        if imports not in ("single", "batch", "skip"):
            raise CatalogError(f"{where}: 'imports' must be single, batch or skip")
        for key in ("description", "deprecated"):
            if not isinstance(spec.get(key, ""), str):
                raise CatalogError(f"{where}: '{key}' must be a string")
        schema = spec.get("entity_schema")
        if schema is not None and not isinstance(schema, dict):
            raise CatalogError(f"{where}: 'entity_schema' must be a JSON Schema (an object)")
        entities[name] = Entity(
            name,
            frozenset(described),
            imports,
            description=spec.get("description", ""),
            deprecated=spec.get("deprecated", ""),
            event_descriptions={e: text for e, text in described.items() if text},
            entity_schema=schema,
        )
    return Catalog(entities)


def load(path: str = "") -> Catalog:
    """The catalog of ``path``, or the built-in one when ``path`` is empty."""
    if path:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog file {path}: {exc.strerror}") from None
        source = path
    else:
        raw = resources.files("dispatcher").joinpath("catalog.json").read_bytes()
        source = "built-in catalog"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CatalogError(f"{source}: not valid JSON: {exc}") from None
    return parse(data, source=source)
