"""Producing records that must not be lost: retried with backoff until Kafka acks them.

Used for what stands between a failed attempt and its commit (retry records, notices,
dead letters): while Kafka is unreachable the work waits and the source offset stays
uncommitted, so a stop in the meantime loses nothing; the record is consumed again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from dispatcher.backoff import Backoff
from dispatcher.logs import Outage

# One per topic: while Kafka refuses its records, one line when it starts, a summary now
# and then, one when a record is acked again (not one line per record per retry).
_failing: dict[str, Outage] = {}

Headers = Sequence[tuple[str, bytes]]


async def send(
    producer: AIOKafkaProducer,
    topic: str,
    value: bytes | None,
    *,
    key: bytes | None = None,
    headers: Headers | None = None,
    backoff_cap: float = 30.0,
) -> None:
    """Produce one record and wait for its ack, retrying outages with backoff.

    Errors that waiting cannot cure (a record too large, a topic not authorised) raise.
    """
    backoff = Backoff(cap=backoff_cap)
    while True:
        try:
            ack = await producer.send(topic, value, key=key, headers=list(headers or ()))
            await ack
        except KafkaError as exc:
            if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                raise  # e.g. a record too large: waiting will not make it fit
            outage = _failing.get(topic)
            if outage is None:
                outage = _failing[topic] = Outage(
                    "produce_failed", "produce_still_failing", "produce_recovered", topic=topic
                )
            outage.failed(repr(exc))
            await asyncio.sleep(backoff.next())  # backoff while Kafka is unreachable
        else:
            if topic in _failing:
                _failing.pop(topic).recovered()
            return
