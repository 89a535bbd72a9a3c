"""The dead-letter topic: records we cannot handle, kept with the reason.

A record goes there unchanged (same key, value and headers) plus two headers: the
reason (``dispatcher-dead-letter-reason``: why the event breaks the contract, or
``internal: ...`` when our own code failed on it) and where it came from
(``dispatcher-dead-letter-source``: ``topic/partition/offset``). Each dead letter is
acked by Kafka before the source offset commits.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from dispatcher import durable

log = structlog.get_logger(__name__)

REASON_HEADER = "dispatcher-dead-letter-reason"
SOURCE_HEADER = "dispatcher-dead-letter-source"
MAX_REASON = 500  # characters of a reason kept in the header


def where(record: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    """A record's coordinates, as log fields."""
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


class DeadLetters:
    """Produces records to the dead-letter topic."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def send(self, record: ConsumerRecord[Any, Any], reason: str) -> None:
        """Dead-letter ``record`` with ``reason``; retried while Kafka is unreachable."""
        reason = reason[:MAX_REASON]
        log.warning("record_dead_lettered", reason=reason, **where(record))
        headers = [
            *(record.headers or ()),
            (REASON_HEADER, reason.encode("utf-8")),
            (SOURCE_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        await durable.send(
            self._producer, self._topic, record.value, key=record.key, headers=headers
        )
