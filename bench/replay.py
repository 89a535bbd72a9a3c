"""The replay scenario: how fast a recovery job of mode ``replay`` scans the event log.

A topic of its own holds ``others`` events of other shops and ``ours`` events of one shop
with a webhook, interleaved (200,000 and 1,000 by default, the figures of the issue). A
dispatcher with ``--role retry`` (no event consumer, so no live deliveries) runs one
replay job over that range; the figure is the job's events scanned per second, from its
start to its end, sends to the receiver included. The baseline, measured in the same
run: a bare aiokafka consumer reading the same range without decoding anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import infra, workload

if TYPE_CHECKING:
    from bench.run import Context

REPLAY_SHOP = "bench-replay-shop"
JOB_TIMEOUT = 300.0  # seconds the job may take


def mixed(phase: str, others: int, ours: int) -> workload.MakeMessage:
    """Sales of ``others`` other shops, with one of ours every ``others / ours``."""
    every = max(1, (others + ours) // max(1, ours))

    def make(seq: int, now: float) -> workload.Message:
        env = REPLAY_SHOP if seq % every == 0 else f"bench-replay-other-{seq % 5000:04d}"
        entity = {
            "id": seq, "uuid": str(uuid.uuid4()), "phase": phase, "seq": seq,
            "produced_at": now, "number": f"T{seq:08d}", "final_amount": 23.4,
            "currency": "EUR",
            "lines": [{"item_id": 101, "name": "Espresso", "quantity": 2, "unit_price": 1.8}],
        }  # fmt: skip
        event = {
            "event_id": str(uuid.uuid4()), "entity_name": "sales", "event_type": "CLOSED",
            "environment_id": env, "client_id": workload.CLIENT_ID, "from_user": None,
            "time": workload.iso_millis(now), "entity": entity, "import_id": None,
            "import_end": False,
        }  # fmt: skip
        return env.encode(), orjson.dumps(event)

    return make


@contextlib.asynccontextmanager
async def _topic(bootstrap: str, name: str, partitions: int) -> AsyncIterator[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        yield name
    finally:
        with contextlib.suppress(Exception):
            await admin.delete_topics([name])
        await admin.close()


async def bare_scan(bootstrap: str, topic: str, since_ms: int, until_ms: int) -> dict[str, Any]:
    """A bare consumer reading the range (records counted, nothing decoded)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )  # fmt: skip
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            parts = (await consumer._client.fetch_all_metadata()).partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        starts = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        ends = await consumer.offsets_for_times(dict.fromkeys(tps, until_ms))
        now = await consumer.end_offsets(tps)
        bounds = {tp: (_offset(starts[tp], now[tp]), _offset(ends[tp], now[tp])) for tp in tps}
        consumer.assign(tps)
        for tp, (start, _) in bounds.items():
            consumer.seek(tp, start)
        todo = {tp for tp, (start, end) in bounds.items() if start < end}
        count = 0
        began = time.perf_counter()
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                end = bounds[tp][1]
                count += sum(1 for r in records if r.offset < end)
                if records and records[-1].offset >= end - 1:
                    todo.discard(tp)
        took = time.perf_counter() - began
    finally:
        await consumer.stop()
    return {"records": count, "seconds": round(took, 3), "records_per_s": round(count / took)}


def _offset(found: Any, end: int) -> int:
    """The offset ``offsets_for_times`` found, or the end when no record is that recent."""
    return int(found.offset) if found is not None else end


async def replay(ctx: Context) -> dict[str, Any]:
    others, ours = ctx.opts.replay_others, ctx.opts.replay_ours
    name = f"{ctx.tag}-replay-events"
    async with _topic(ctx.opts.kafka, name, ctx.opts.partitions) as topic:
        await workload.insert_webhooks(
            ctx.database_url, [REPLAY_SHOP], entity_name="sales", event_type="CLOSED",
            url_of=ctx.receiver.url,
        )  # fmt: skip
        since = datetime.now(UTC)
        produce_s = await workload.produce_bulk(
            ctx.bulk, topic, mixed("replay", others, ours), others + ours
        )
        until = datetime.now(UTC)
        ctx.say(f"replay: {others + ours} events produced in {produce_s:.1f} s")
        since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000) + 1
        bare = await bare_scan(ctx.opts.kafka, topic, since_ms, until_ms)
        ctx.say(f"replay: a bare consumer read the range at {bare['records_per_s']} records/s")
        job = await _run_job(ctx, topic, since, until)
    rate = round(job["scanned"] / job["seconds"]) if job["seconds"] else None
    ctx.say(f"replay: the job scanned {rate} events/s ({job['sent']} sent)")
    return {
        "events": others + ours,
        "ours": ours,
        "job": job,
        "scanned_per_s": rate,
        "bare": bare,
        "ratio_to_bare": round(rate / bare["records_per_s"], 3) if rate else None,
    }


async def _run_job(ctx: Context, topic: str, since: datetime, until: datetime) -> dict[str, Any]:
    port = infra.free_port()
    settings = {**ctx.settings(port, "warning"), "DISPATCHER_EVENT_TOPICS": topic}
    argv = infra.dispatcher_argv()
    child = await infra.spawn(
        "dispatcher", [*argv, "--role", "retry"], log_path=ctx.work / "dispatcher-replay.log",
        env=infra.dispatcher_env(settings),
    )  # fmt: skip
    ctx.sampler.track("dispatcher", lambda: [child.pid])
    running = infra.Dispatcher(child, port, time.time(), label="replay")
    pool = await asyncpg.create_pool(ctx.database_url, min_size=1, max_size=2)
    try:
        await running.wait_ready(ctx.session, 60)
        webhook_id = await pool.fetchval(
            "SELECT id FROM webhooks WHERE environment_id = $1", REPLAY_SHOP
        )
        job_id = await pool.fetchval(
            "INSERT INTO webhook_recoveries (id, webhook_id, environment_id, mode, since, until)"
            " VALUES ($1, $2, $3, 'replay', $4, $5) RETURNING id",
            uuid.uuid4(), webhook_id, REPLAY_SHOP, since, until,
        )  # fmt: skip
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            row = await pool.fetchrow(
                "SELECT state, scanned, matched, sent, delivered, failed, started_at, "
                "finished_at, error FROM webhook_recoveries WHERE id = $1",
                job_id,
            )
            assert row is not None
            if row["state"] not in ("queued", "running"):
                break
            if time.monotonic() > deadline or not child.alive():
                raise infra.BenchError(f"the replay job did not finish\n{child.tail()}")
            await asyncio.sleep(0.2)  # polling the job's row
        seconds = (row["finished_at"] - row["started_at"]).total_seconds()
        window = ctx.sampler.window(row["started_at"].timestamp(), row["finished_at"].timestamp())
        return {
            "state": row["state"], "error": row["error"], "scanned": row["scanned"],
            "matched": row["matched"], "sent": row["sent"], "delivered": row["delivered"],
            "seconds": round(seconds, 3), "dispatcher_cpu_s": window.cpu.get("dispatcher"),
        }  # fmt: skip
    finally:
        await pool.close()
        ctx.sampler.untrack("dispatcher")
        await child.stop(grace=30)
