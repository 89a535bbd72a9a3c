"""The notification envelope POSTed to webhooks, and its identity across retries.

::

    {"type": "CLOSED", "entity_name": "sales", "time": "2022-02-22T11:13:04.892Z",
     "notification_uuid": "...", "environment_id": "shop-1", "client_id": "app",
     "from_user": "user@example.com", "entities": [{...}], "nRetry": 0}

``notification_uuid`` is derived from (event id, webhook id), so a re-delivery after a
crash, and every retry, carries the same one: receivers dedupe on it. A ``DELETED``
notification carries only the ``id`` and ``uuid`` of its entities, whatever the event
held. The ``SUBSCRIBED`` test message of a new webhook (:func:`subscribed_body`) is no
notification of an event: it has only five of these fields.

Both are published as JSON Schemas (``dispatcher.event_types``,
``schemas/notification.schema.json``); a test checks these bodies against them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from dispatcher.events import Event

# Fixed namespace of uuid5 notification ids; changing it would break receivers' dedupe.
NAMESPACE = uuid.UUID("5b0c3e7a-9d1f-4c51-8a8e-2f4f0f6f9c11")
DELETED = "DELETED"
DELETED_FIELDS = ("id", "uuid")  # all that a DELETED notification carries of an entity


def notification_uuid(event_id: str, webhook_id: uuid.UUID) -> str:
    """The stable id of the notification of ``event_id`` to ``webhook_id``."""
    return str(uuid.uuid5(NAMESPACE, f"{event_id.lower()}/{webhook_id}"))


def iso_millis(moment: datetime) -> str:
    """``2022-02-22T11:13:04.892Z``: UTC, millisecond precision, as the platform sends."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscribed_body(
    entity_name: str, environment_id: str, client_id: str, sent_at: datetime
) -> bytes:
    """The documented ``SUBSCRIBED`` test message POSTed to a URL before it is subscribed."""
    return orjson.dumps(
        {
            "type": "SUBSCRIBED",
            "entity_name": entity_name,
            "time": iso_millis(sent_at),
            "environment_id": environment_id,
            "client_id": client_id,
        }
    )


@dataclass(frozen=True, slots=True)
class Notification:
    """What is sent to one webhook for one event (or one import batch)."""

    notification_uuid: str
    webhook_id: uuid.UUID
    type: str
    entity_name: str
    environment_id: str
    client_id: str
    from_user: str | None
    entities: tuple[dict[str, Any], ...]

    @classmethod
    def for_event(
        cls,
        event: Event,
        webhook_id: uuid.UUID,
        entities: tuple[dict[str, Any], ...] | None = None,
    ) -> Notification:
        """The notification of ``event`` to a webhook; ``entities`` replaces the event's
        one entity for an import batch (whose first event ``event`` is)."""
        if entities is None:
            entities = (event.entity,)
        if event.event_type == DELETED:
            entities = tuple({k: e[k] for k in DELETED_FIELDS if k in e} for e in entities)
        return cls(
            notification_uuid=notification_uuid(event.event_id, webhook_id),
            webhook_id=webhook_id,
            type=event.event_type,
            entity_name=event.entity_name,
            environment_id=event.environment_id,
            client_id=event.client_id,
            from_user=event.from_user,
            entities=entities,
        )

    def body(self, n_retry: int, sent_at: datetime) -> bytes:
        """The JSON body of one attempt; ``time`` is when this request is sent."""
        return orjson.dumps(
            {
                "type": self.type,
                "entity_name": self.entity_name,
                "time": iso_millis(sent_at),
                "notification_uuid": self.notification_uuid,
                "environment_id": self.environment_id,
                "client_id": self.client_id,
                "from_user": self.from_user,
                "entities": self.entities,
                "nRetry": n_retry,
            }
        )

    def to_json(self) -> dict[str, Any]:
        """The fields kept in a retry record."""
        return {
            "notification_uuid": self.notification_uuid,
            "webhook_id": str(self.webhook_id),
            "type": self.type,
            "entity_name": self.entity_name,
            "environment_id": self.environment_id,
            "client_id": self.client_id,
            "from_user": self.from_user,
            "entities": list(self.entities),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notification:
        """Inverse of :meth:`to_json`; raises KeyError/TypeError/ValueError if malformed."""
        entities = data["entities"]
        if not isinstance(entities, list) or not all(isinstance(e, dict) for e in entities):
            raise TypeError("'entities' must be a list of objects")
        from_user = data.get("from_user")
        return cls(
            notification_uuid=str(uuid.UUID(data["notification_uuid"])),
            webhook_id=uuid.UUID(data["webhook_id"]),
            type=_str(data, "type"),
            entity_name=_str(data, "entity_name"),
            environment_id=_str(data, "environment_id"),
            client_id=_str(data, "client_id"),
            from_user=from_user if isinstance(from_user, str) else None,
            entities=tuple(entities),
        )


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string")
    return value
