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

import hashlib
import math
import time
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


_NAMESPACE_BYTES = NAMESPACE.bytes


def notification_uuid(event_id: str, webhook_id: uuid.UUID) -> str:
    """The stable id of the notification of ``event_id`` to ``webhook_id``: the uuid5 of
    ``"<event id, lower case>/<webhook id>"`` in :data:`NAMESPACE`, computed as
    :func:`uuid.uuid5` does without building UUID objects (once per delivery).

    >>> w = uuid.UUID("00000000-0000-4000-8000-000000000001")
    >>> notification_uuid("ABC", w) == str(uuid.uuid5(NAMESPACE, f"abc/{w}"))
    True
    """
    name = f"{event_id.lower()}/{webhook_id}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def iso_millis(moment: datetime) -> str:
    """``2022-02-22T11:13:04.892Z``: UTC, millisecond precision, as the platform sends."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def iso_millis_at(unix: float) -> str:
    """:func:`iso_millis` of a Unix time (as ``datetime.fromtimestamp(unix, UTC)``), the
    seconds formatted once per second rather than once per request.

    >>> iso_millis_at(1645528384.8926)
    '2022-02-22T11:13:04.892Z'
    """
    global _second
    fraction, seconds = math.modf(unix)  # rounded as datetime.fromtimestamp rounds
    micros, whole = round(fraction * 1e6), int(seconds)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{micros // 1000:03d}Z"


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

    def body(self, n_retry: int, sent_at: datetime | float) -> bytes:
        """The JSON body of one attempt; ``time`` is when this request is sent (a datetime,
        or Unix seconds)."""
        sent = iso_millis_at(sent_at) if isinstance(sent_at, float) else iso_millis(sent_at)
        return orjson.dumps(
            {
                "type": self.type,
                "entity_name": self.entity_name,
                "time": sent,
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
