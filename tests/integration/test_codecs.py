"""Compressed batches: every codec Kafka producers use is delivered, and a batch the
consumer cannot decode holds only its own partition, visibly, until an operator skips it.

Events come from Kafka's own Java console producer (the stack's jars) and from aiokafka.
A batch is made undecodable for real by hiding a codec from aiokafka
(``aiokafka.codec.has_snappy``, which its record readers consult before decompressing).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiokafka.codec
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import UnsupportedCodecError
from structlog.testing import capture_logs

from dispatcher.consumer import Consumer
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings
from dispatcher.store import Principal
from tests.integration.support import KAFKA, WAIT, Receiver, World, get_json, make_event
from tools.stack import Config, Kafka

NewTopic = Callable[..., Awaitable[str]]

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
JAVA_TIMEOUT = 120.0  # seconds for one console producer: a JVM start, a send, a close
CONSOLE_PRODUCER = "kafka.tools.ConsoleProducer"
KEY_SEPARATOR = "\t"


# --- Kafka's Java console producer ------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_java() -> Kafka:
    """The stack's Kafka jars, checked to hold the console producer and every codec.

    A missing Java or jar fails the test (CI installs both): it never skips.
    """
    if shutil.which("java") is None:
        pytest.fail("java is not on PATH: these tests need Java 17+ (`make stack` names it)")
    kafka = Kafka(Config.from_env())
    jars = kafka.cfg.kafka_jars
    core = sorted(jars.glob("kafka_2.13-*.jar"))
    if not core:
        pytest.fail(f"no kafka_2.13 jar in {jars}: run `make stack` to fetch Kafka")
    with zipfile.ZipFile(core[0]) as jar:
        if CONSOLE_PRODUCER.replace(".", "/") + ".class" not in jar.namelist():
            pytest.fail(f"{core[0]} has no {CONSOLE_PRODUCER}")
    for library in ("snappy-java", "lz4-java", "zstd-jni"):  # kafka-clients' codecs
        if not any(jars.glob(f"{library}-*.jar")):
            pytest.fail(f"no {library} jar in {jars}: the Java producer cannot compress")
    return kafka


async def console_produce(kafka: Kafka, topic: str, codec: str, *events: dict[str, Any]) -> None:
    """Produce ``events`` with Kafka's console producer, compressed with ``codec`` and
    keyed by environment_id as the contract says (one JVM; fails on error or timeout)."""
    command = kafka.java(
        CONSOLE_PRODUCER,
        "--bootstrap-server", KAFKA,
        "--topic", topic,
        "--compression-codec", codec,
        "--request-required-acks", "all",
        "--property", "parse.key=true",
        "--property", f"key.separator={KEY_SEPARATOR}",
    )  # fmt: skip
    lines = b"".join(
        e["environment_id"].encode() + KEY_SEPARATOR.encode() + orjson.dumps(e) + b"\n"
        for e in events
    )
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(JAVA_TIMEOUT):
            output, _ = await proc.communicate(lines)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the console producer ({codec}) did not finish within {JAVA_TIMEOUT:.0f}s")
    text = output.decode(errors="replace")
    if proc.returncode != 0 or " ERROR " in text:
        tail = "\n".join(text.splitlines()[-30:])
        pytest.fail(f"the console producer ({codec}) failed (exit {proc.returncode}):\n{tail}")


# --- helpers ----------------------------------------------------------------------------


async def aiokafka_produce(topic: str, codec: str, *events: dict[str, Any], **where: Any) -> None:
    """Produce ``events`` with an aiokafka producer compressing with ``codec``."""
    producer = AIOKafkaProducer(
        bootstrap_servers=KAFKA, acks="all", compression_type=None if codec == "none" else codec
    )
    await producer.start()
    try:
        for event in events:
            key = event["environment_id"].encode()
            await producer.send(topic, orjson.dumps(event), key=key, **where)
        await producer.flush()  # one batch per codec
    finally:
        await producer.stop()


def codec_events(shop: Principal, per_codec: int) -> dict[str, list[dict[str, Any]]]:
    """Events telling which codec carried them (in their entity)."""
    return {
        codec: [make_event(shop, entity={"id": i, "codec": codec}) for i in range(per_codec)]
        for codec in CODECS
    }


def received(receiver: Receiver) -> list[tuple[str, int]]:
    """(codec, id) of each entity the receiver got, sorted."""
    return sorted((e["codec"], e["id"]) for r in receiver.requests for e in r.json()["entities"])


@pytest.fixture
def hidden_codecs(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Makes aiokafka believe a codec's library is missing (until the test ends)."""

    def hide(*codecs: str) -> None:
        for codec in codecs:
            monkeypatch.setattr(aiokafka.codec, f"has_{codec}", lambda: False)

    return hide


async def batch_codecs(topic: str, records: int) -> set[str]:
    """The compression codecs of ``topic``'s batches (partition 0, ``records`` records).

    Read once per codec with that codec hidden: reading fails only if a batch uses it.
    """
    found = set()
    tp = TopicPartition(topic, 0)
    for codec in CODECS[1:]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(aiokafka.codec, f"has_{codec}", lambda: False)
            consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
            await consumer.start()
            try:
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                got, failure = 0, ""
                async with asyncio.timeout(WAIT):
                    while got < records and not failure:
                        try:
                            batch = await consumer.getmany(tp, timeout_ms=500)
                        except UnsupportedCodecError as exc:
                            failure = str(exc)
                        else:
                            got += sum(len(r) for r in batch.values())
            finally:
                await consumer.stop()
        if failure:
            assert codec in failure
            found.add(codec)
    return found


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` (state of another task) until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.02)  # polling another task's state under a deadline


# --- every codec is delivered -----------------------------------------------------------


async def test_java_console_producer_events_in_every_codec_are_delivered(
    world: World, kafka_java: Kafka
) -> None:
    """Events sent by Kafka's Java console producer in each codec are all delivered."""
    receiver, topic = world.receiver, world.topic
    await world.subscribe()
    running = await world.start()
    events = codec_events(world.shop, per_codec=2)

    await asyncio.gather(
        *(console_produce(kafka_java, topic, codec, *batch) for codec, batch in events.items())
    )
    await receiver.wait_for(len(CODECS) * 2)
    assert received(receiver) == sorted((c, i) for c in CODECS for i in range(2))
    await running.stop()
    registry = running.daemon.metrics.registry
    undecodable = {"consumer": "dispatch", "topic": topic}
    assert registry.get_sample_value("webhook_undecodable_batches_total", undecodable) is None
    assert await batch_codecs(topic, len(CODECS) * 2) == set(CODECS[1:])


async def test_aiokafka_producer_events_in_every_codec_are_delivered(world: World) -> None:
    """Events sent by aiokafka producers in each codec are all delivered."""
    receiver, topic = world.receiver, world.topic
    await world.subscribe()
    running = await world.start()
    events = codec_events(world.shop, per_codec=3)

    await asyncio.gather(
        *(aiokafka_produce(topic, codec, *batch) for codec, batch in events.items())
    )
    await receiver.wait_for(len(CODECS) * 3)
    assert received(receiver) == sorted((c, i) for c in CODECS for i in range(3))
    await running.stop()
    assert await batch_codecs(topic, len(CODECS) * 3) == set(CODECS[1:])


# --- a batch that cannot be decoded -----------------------------------------------------


async def test_undecodable_batch_holds_its_partition_until_the_operator_skips_it(
    world: World, hidden_codecs: Callable[..., None]
) -> None:
    """An undecodable batch stops its partition, not the daemon, is logged once with where
    it is and counted, fails /readyz; with the skip setting it is skipped and logged."""
    shop, receiver, topic = world.shop, world.receiver, world.topic
    await world.subscribe()
    first, lost, after = (make_event(shop, entity={"id": i}) for i in range(3))
    await aiokafka_produce(topic, "gzip", first)  # offset 0
    await aiokafka_produce(topic, "snappy", lost)  # offset 1
    await aiokafka_produce(topic, "gzip", after)  # offset 2
    hidden_codecs("snappy")

    with capture_logs() as logs:
        running = await world.start()
        await receiver.wait_for(1)  # the record before the batch, same fetch
        worker = running.daemon.workers[0]
        tp = TopicPartition(topic, 0)
        await wait_until(
            lambda: tp in worker.undecodable.stuck and worker.undecodable.stuck[tp].attempts >= 3,
            "the batch was tried three times",
        )
        status, ready = await get_json(running.base_url + "/readyz")
        health, _ = await get_json(running.base_url + "/healthz")
        registry = running.daemon.metrics.registry
        met = registry.get_sample_value(
            "webhook_undecodable_batches_total", {"consumer": "dispatch", "topic": topic}
        )
        lag = registry.get_sample_value(
            "webhook_consumer_lag", {"consumer": "dispatch", "topic": topic, "partition": "0"}
        )
        await running.stop()

    assert [r.json()["entities"] for r in receiver.requests] == [[{"id": 0}]]
    assert not running.task.exception()  # stopped when told to, not by the batch
    assert health == 200
    assert status == 503
    assert ready["checks"]["decoding"].startswith(f"undecodable batch: {topic}[0] at offset 1: ")
    assert "snappy" in ready["checks"]["decoding"]
    assert met == 1
    assert lag == 2  # the batch and the event behind it
    (line,) = [entry for entry in logs if entry["event"].startswith("undecodable_batch")]
    assert line["event"] == "undecodable_batch"
    assert line["log_level"] == "error"
    assert (line["topic"], line["partition"], line["offset"], line["last_offset"]) == (
        topic, 0, 1, 1,
    )  # fmt: skip
    assert "snappy" in line["error"]
    assert "DISPATCHER_SKIP_UNDECODABLE_BATCHES=true" in line["to_skip"]

    # The operator gives the batch up: the same group goes on past it.
    with capture_logs() as logs:
        running = await world.start(replace(world.settings, skip_undecodable_batches=True))
        await receiver.wait_for(2)
        status, ready = await get_json(running.base_url + "/readyz")
        registry = running.daemon.metrics.registry
        skipped = registry.get_sample_value(
            "webhook_undecodable_offsets_skipped_total", {"consumer": "dispatch", "topic": topic}
        )

    assert [r.json()["entities"] for r in receiver.requests] == [[{"id": 0}], [{"id": 2}]]
    assert (status, ready["checks"]["decoding"]) == (200, "ok")
    assert skipped == 1
    (line,) = [entry for entry in logs if entry["event"].startswith("undecodable_batch")]
    assert line["event"] == "undecodable_batch_skipped"
    assert line["log_level"] == "error"
    assert (line["topic"], line["partition"], line["offset"], line["last_offset"]) == (
        topic, 0, 1, 1,
    )  # fmt: skip


@pytest.fixture
async def two_partitions(new_topic: NewTopic) -> AsyncIterator[tuple[str, Consumer]]:
    """A two-partition topic and a worker subscribed to it (not running its loop)."""
    topic = await new_topic("events", partitions=2)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA,
        group_id=f"group-{uuid.uuid4().hex[:10]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    settings = Settings.from_env({"DISPATCHER_DRAIN_TIMEOUT_SECONDS": "1"})
    worker = Consumer(consumer, settings=settings, metrics=Metrics(), max_pending=100)
    consumer.subscribe([topic], listener=worker.listener())
    await consumer.start()
    yield topic, worker
    await consumer.stop()


async def test_a_fetch_failing_at_an_undecodable_batch_loses_no_record_taken_before(
    two_partitions: tuple[str, Consumer], hidden_codecs: Callable[..., None]
) -> None:
    """Records a failing fetch took before the bad batch, of its partition or another, are
    returned once each."""
    topic, worker = two_partitions
    bad, other = TopicPartition(topic, 1), TopicPartition(topic, 0)
    event = {"environment_id": "shop"}
    await aiokafka_produce(topic, "gzip", event, partition=1)  # offset 0: before the batch
    await aiokafka_produce(topic, "snappy", event, partition=1)  # offset 1
    hidden_codecs("snappy")
    got: dict[int, list[int]] = {0: [], 1: []}

    def take(fetched: dict[TopicPartition, list[Any]]) -> None:
        for tp, records in fetched.items():
            got[tp.partition].extend(r.offset for r in records)

    async with asyncio.timeout(WAIT):
        while bad not in worker.undecodable.stuck:
            take(await worker._fetch())
    assert got == {0: [], 1: [0]}
    assert bad in worker.consumer.paused()

    # aiokafka drains its buffered fetches in arrival order: have the other partition's
    # records arrive first, then the batch again, so that one fetch takes the former
    # (moving that partition's position past them) and then fails at the latter.
    await aiokafka_produce(topic, "gzip", *[event] * 5, partition=0)
    buffered = worker.consumer._fetcher._records
    await wait_until(lambda: other in buffered, "partition 0 fetched")
    worker.consumer.resume(bad)
    await wait_until(lambda: bad in buffered, "the batch fetched again")
    assert list(buffered) == [other, bad]
    take(await worker._fetch())

    assert got == {0: [0, 1, 2, 3, 4], 1: [0]}
    assert worker.undecodable.stuck[bad].attempts == 2
    assert worker.undecodable.reasons() == [
        f"{topic}[1] at offset 1: UnsupportedCodecError: "
        "Libraries for snappy compression codec not found"
    ]
