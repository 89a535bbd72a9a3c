"""The Kafka topics the daemon needs, created when missing.

Internal topics (the delay tiers, the notice and dead-letter topics) get as many
partitions as the first event topic, so retries scale out like events. An event topic
that does not exist yet is created too (with a warning: producers usually own it), with
``MISSING_EVENT_TOPIC_PARTITIONS`` partitions, so a first ``make run`` just works. The
replication factor is 3, or the number of brokers if fewer. The single delay topic of
versions before the tiers (``DISPATCHER_RETRY_TOPIC`` itself) is not created: where it
exists, the retry consumer drains it into the tiers.
"""

from __future__ import annotations

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dispatcher import kafka
from dispatcher.errors import KafkaUnavailable
from dispatcher.policy import DelayTiers
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

MISSING_EVENT_TOPIC_PARTITIONS = 6
TOPIC_ALREADY_EXISTS = 36  # Kafka's error code: a concurrent daemon was first


def internal_topics(s: Settings) -> list[str]:
    tiers = DelayTiers.for_settings(s.retry_topic, retry_delay=s.retry_delay_seconds)
    history = [s.attempt_topic] if s.attempt_log else []
    return [*tiers.topics, s.notice_topic, s.dead_letter_topic, *history]


async def ensure_topics(s: Settings) -> None:
    """Create the topics this daemon needs that are missing."""
    admin = kafka.admin(s)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
        replicas = min(3, brokers)
        missing_events = [t for t in s.event_topics if t not in existing]
        if missing_events:
            log.warning("event_topics_missing", topics=missing_events, creating=True)
            await _create(admin, missing_events, MISSING_EVENT_TOPIC_PARTITIONS, replicas)
        described = await admin.describe_topics([s.event_topics[0]])
        partitions = max(1, len(described[0].get("partitions", [])))
        missing = [t for t in internal_topics(s) if t not in existing]
        await _create(admin, missing, partitions, replicas)
    finally:
        await admin.close()


async def _create(
    admin: AIOKafkaAdminClient, topics: list[str], partitions: int, replicas: int
) -> None:
    if not topics:
        return
    response = await admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=replicas) for t in topics]
    )
    for topic, code, *message in response.topic_errors:
        if code not in (0, TOPIC_ALREADY_EXISTS):
            raise KafkaUnavailable(
                f"cannot create Kafka topic {topic}: error {code} {message}; check the "
                "broker log and the dispatcher's ACLs, or create the topic by hand"
            )
    log.info("topics_created", topics=topics, partitions=partitions, replicas=replicas)
