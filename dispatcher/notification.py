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
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
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


# An entity of a notification: the producer's JSON text as it came (spliced into the
# body by orjson), or Python objects (a retry record's, an example's).
Entity = dict[str, Any] | orjson.Fragment


class Notification(msgspec.Struct, frozen=True):
    """What is sent to one webhook for one event (or one import batch). A frozen msgspec
    Struct, as :class:`~dispatcher.events.Event` is: one is made per delivery."""

    notification_uuid: str
    webhook_id: uuid.UUID
    type: str
    entity_name: str
    environment_id: str
    client_id: str
    from_user: str | None
    entities: tuple[Entity, ...]
    ids: tuple[str, ...] | None = None  # the entities' ids; None: read from the entities

    @property
    def entity_ids(self) -> tuple[str, ...]:
        """The ids of the entities, as text (for the delivery history)."""
        if self.ids is not None:
            return self.ids
        return tuple(str(e.get("id")) for e in self.entities if isinstance(e, dict))

    @classmethod
    def for_event(
        cls, event: Event, webhook_id: uuid.UUID, batch: Sequence[Event] | None = None
    ) -> Notification:
        """The notification of ``event`` to a webhook; for an import, that of ``batch``
        (the events of one batch, ``event`` the first), with one entity of each."""
        events = (event,) if batch is None else batch
        entities: tuple[Entity, ...]
        if event.event_type == DELETED:
            entities = tuple(
                {k: e[k] for k in DELETED_FIELDS if k in e} for e in (b.entity for b in events)
            )
        elif batch is None:
            entities = (orjson.Fragment(event.entity_json),)
        else:
            entities = tuple(orjson.Fragment(b.entity_json) for b in events)
        return cls(
            notification_uuid=notification_uuid(event.event_id, webhook_id),
            webhook_id=webhook_id,
            type=event.event_type,
            entity_name=event.entity_name,
            environment_id=event.environment_id,
            client_id=event.client_id,
            from_user=event.from_user,
            entities=entities,
            ids=(event.entity_id,) if batch is None else tuple(b.entity_id for b in events),
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


class WireNotification(msgspec.Struct):
    """:meth:`Notification.to_json`'s shape, read back (a retry record's): the entities
    stay the JSON text they were written as, so a retry sends them as the first attempt
    did (a number no double holds included)."""

    notification_uuid: uuid.UUID
    webhook_id: uuid.UUID
    type: str
    entity_name: str
    environment_id: str
    client_id: str
    entities: list[msgspec.Raw]
    from_user: Any = None

    def notification(self) -> Notification:
        """The notification; TypeError if an entity is not an object."""
        texts = [bytes(e) for e in self.entities]
        if not all(t.startswith(b"{") for t in texts):
            raise TypeError("'entities' must be a list of objects")
        return Notification(
            notification_uuid=str(self.notification_uuid),
            webhook_id=self.webhook_id,
            type=self.type,
            entity_name=self.entity_name,
            environment_id=self.environment_id,
            client_id=self.client_id,
            from_user=self.from_user if isinstance(self.from_user, str) else None,
            entities=tuple(orjson.Fragment(t) for t in texts),
            ids=tuple(str(_any_id.decode(t).id) for t in texts),
        )


class _AnyId(msgspec.Struct):
    id: Any = None


_any_id = msgspec.json.Decoder(_AnyId)
