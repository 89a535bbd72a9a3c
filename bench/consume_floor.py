"""What one import entity costs before the dispatcher does anything with it
(docs/benchmarks.md, the import target of issue 16).

Run (with the stack up): ``.venv/bin/python -m bench.consume_floor``. Produces N import
events (``bench.workload.import_item``, 200,000 by default) to a topic of its own, then
reads them back three times with a bare aiokafka consumer on uvloop, two ways in turn:
``getmany`` alone, and ``getmany`` plus :func:`dispatcher.events.decode` of each value.
Prints microseconds of CPU per record and records per second for each read; the topic is deleted
at the end. Set against the import target (entities/s >= 0.8 x 80 x the batch ceiling),
it says how much of the budget per entity consuming and decoding alone take.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import workload
from bench.run import DEFAULT_KAFKA
from dispatcher import events

ROUNDS = 3


async def _read(kafka: str, topic: str, count: int, work: Callable[[bytes], object] | None) -> str:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        read = 0
        started: tuple[float, float] | None = None  # from the first answer: no connect time
        while read < count:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=500)
            if started is None and fetched:
                started = time.process_time(), time.perf_counter()
            for records in fetched.values():
                read += len(records)
                if work is not None:
                    for record in records:
                        work(record.value)
        assert started is not None
        cpu, wall = time.process_time() - started[0], time.perf_counter() - started[1]
    finally:
        await consumer.stop()
    return f"{1e6 * cpu / count:6.2f} µs of CPU per record, {count / wall:9,.0f} records/s"


async def main(kafka: str, count: int) -> None:
    topic = f"bench-floor-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        producer = AIOKafkaProducer(bootstrap_servers=kafka, linger_ms=5)
        await producer.start()
        try:
            await workload.produce_bulk(producer, topic, workload.import_item(topic, count), count)
        finally:
            await producer.stop()
        for _ in range(ROUNDS):
            print(f"getmany          {await _read(kafka, topic, count, None)}", flush=True)
            print(f"getmany + decode {await _read(kafka, topic, count, events.decode)}", flush=True)
    finally:
        await admin.delete_topics([topic])
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kafka", default=DEFAULT_KAFKA, help="Kafka bootstrap host:port")
    parser.add_argument("--count", type=int, default=200_000, help="import events to read")
    args = parser.parse_args()
    uvloop.run(main(args.kafka, args.count))
