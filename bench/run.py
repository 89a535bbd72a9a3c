"""The dispatcher's benchmark: ``make bench`` (``BENCH_ARGS=--quick`` for a smoke run).

Runs against the local stack (``make stack``), with its own database, topics, consumer
group, TLS certificates and processes, all on 127.0.0.1 and all removed at the end:

1. ceiling: a bare aiohttp client on uvloop (``bench/ceiling.py``) POSTs N bodies of the
   same size to the receiver with the dispatcher's concurrency; its requests/s is the
   baseline. It runs three times (start, mid, end): each ratio uses the two runs around its
   scenario (``--only throughput`` runs start, throughput, latency, mid).
2. throughput: N events pre-produced, then ``dispatcher run`` started; deliveries/s from
   the first to the last receipt, dispatcher CPU per 1,000 deliveries, peak RSS.
3. latency: the same dispatcher, events produced at a fixed rate; event time -> receipt.
4. import: N item events of one import, pre-produced; entities/s and requests/s, and
   entities/s against 80 x the bare client's requests/s POSTing an 80-entity batch's body
   one at a time (the batch ceiling, run just before; ``--only import``).
5. info: the throughput scenario again with DISPATCHER_LOG_LEVEL=info (one log line per
   delivery), to price the canonical log line.
6. history: the throughput scenario four times, with the attempt log (the delivery
   history) off, on, on, off: deliveries/s on as a ratio to off, and the history's bytes
   on disk per attempt once the recorder caught up (``--only history`` runs it alone).
7. notices: N failure notices pre-produced on the notice topic, mailed to the stack's SMTP
   sink (``tools/smtp_sink.py``) with DISPATCHER_SMTP_CONNECTIONS 1, 4 (the default) and 8:
   mails/s from the first to the last stored mail (``--only notices`` runs it alone).
8. replay: a recovery job of mode replay over a range of a topic of its own holding
   200,000 events of other shops and 1,000 of one webhook's shop (``bench/replay.py``):
   events scanned/s, against a bare consumer reading the same range (``--only replay``).
9. memory: RSS of an idle, ready dispatcher with the run's subscriptions, then with
   100,000 of them, idle and after N deliveries spread over N of those shops; last of a
   full run, ``--million`` (1,000,000) subscriptions: time to ready, RSS, bytes per
   subscription (``--only memory`` runs both).
10. fairness: one endpoint serving 50 webhooks, 3 of them answering after 3 s, at 100
    events/s with the default per-endpoint limits (``bench/fairness.py``): the latency of
    the other 47, production to receipt (``--only fairness``).
11. processes: the throughput scenario with DISPATCHER_PROCESSES 1, 2, 2, 1: deliveries/s
    of two processes under the supervisor against one (``bench/processes.py``,
    ``--only processes``).

The receiver (``bench/receiver.py``) is a separate process; so are the dispatcher and the
ceiling client. Every figure is printed as a table and written to
``bench-results/<timestamp>.json``.
"""

from __future__ import annotations

import os
import sys

# Run as a script (``python bench/run.py``): make the ``bench`` package importable. No
# module of bench/ bears the name of a standard-library or installed module.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import asyncio
import contextlib
import math
import re
import shutil
import signal
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from bench import (
    fairness,
    figures,
    gctrace,
    infra,
    mails,
    processes,
    procstat,
    profiling,
    replay,
    report,
    workload,
)
from bench.infra import BenchError, Dispatcher, Receiver

DEFAULT_DATABASE_URL = "postgresql://dispatcher@127.0.0.1:55432/dispatcher"
DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_SMTP = "127.0.0.1:2525"  # the stack's SMTP sink
DEFAULT_MAIL_DIR = str(
    Path(os.environ.get("DISPATCHER_STACK_DIR", "") or infra.ROOT / ".stack") / "mail"
)
NOTICE_CONNECTIONS = (1, 4, 8)  # DISPATCHER_SMTP_CONNECTIONS of the notice runs (4: default)
IMPORT_BATCH_SIZE = 80  # DISPATCHER_IMPORT_BATCH_SIZE's default, set explicitly below
SETTLE_SECONDS = 2.0  # idle time before reading the RSS of a ready dispatcher
READY_TIMEOUT = 120.0
HISTORY_ROUNDS = ("off", "on", "on", "off")  # ABBA: a steady drift of the machine cancels out
RECORDER_CATCH_UP_TIMEOUT = 120.0  # seconds the recorder may take after the last delivery


@dataclass(frozen=True)
class Options:
    """What to run; ``--quick`` shrinks the counts, not the shape."""

    quick: bool = False
    events: int = 20_000
    shops: int = 10_000
    rate: float = 1_000.0
    latency_seconds: float = 15.0
    import_entities: int = 100_000
    subscriptions: int = 100_000
    million: int = 1_000_000
    info_events: int = 20_000
    history_events: int = 20_000
    notices: int = 10_000
    replay_others: int = 200_000
    replay_ours: int = 1_000
    fairness_seconds: float = 30.0
    max_in_flight: int = 256
    partitions: int = 4
    kafka: str = DEFAULT_KAFKA
    database_url: str = DEFAULT_DATABASE_URL
    smtp: str = DEFAULT_SMTP
    mail_dir: str = DEFAULT_MAIL_DIR
    results_dir: str = "bench-results"
    max_seconds: float = 600.0
    skip_info: bool = False
    profile: bool = False
    gc_trace: bool = False
    keep: bool = False
    show: str = ""
    only: str = ""  # one scenario alone (--only)


@dataclass
class Context:
    """What every scenario uses."""

    opts: Options
    tag: str
    work: Path
    tls: infra.Tls
    database_url: str
    topics: infra.Topics
    receiver: Receiver
    sampler: procstat.Sampler
    bulk: AIOKafkaProducer
    paced: AIOKafkaProducer
    session: aiohttp.ClientSession
    started: float = field(default_factory=time.monotonic)
    gc_traces: dict[str, dict[str, Any]] = field(default_factory=dict)  # dispatcher -> trace

    def say(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def settings(self, http_port: int, log_level: str) -> dict[str, str]:
        """The DISPATCHER_* environment of the run's dispatchers."""
        n = str(self.opts.max_in_flight)
        return {
            "DISPATCHER_KAFKA_BOOTSTRAP": self.opts.kafka,
            "DISPATCHER_DATABASE_URL": self.database_url,
            "DISPATCHER_HTTP_HOST": "127.0.0.1",
            "DISPATCHER_HTTP_PORT": str(http_port),
            "DISPATCHER_EVENT_TOPICS": self.topics.events,
            "DISPATCHER_CONSUMER_GROUP": self.topics.group,
            "DISPATCHER_RETRY_TOPIC": self.topics.retries,
            "DISPATCHER_NOTICE_TOPIC": self.topics.notices,
            "DISPATCHER_DEAD_LETTER_TOPIC": self.topics.dead_letters,
            "DISPATCHER_ATTEMPT_TOPIC": self.topics.attempts,
            "DISPATCHER_ALLOW_PRIVATE_TARGETS": "127.0.0.0/8",
            "DISPATCHER_TLS_CA_FILE": self.tls.ca_file,
            "DISPATCHER_LOG_LEVEL": log_level,
            "DISPATCHER_LOG_FORMAT": "json",
            "DISPATCHER_MAX_IN_FLIGHT": n,
            # every webhook points at the one receiver: one endpoint, so the per-endpoint
            # bound must not be lower than the global one
            "DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT": n,
            "DISPATCHER_IMPORT_BATCH_SIZE": str(IMPORT_BATCH_SIZE),
            "DISPATCHER_DRAIN_TIMEOUT_SECONDS": "10",
        }


# --- helpers ------------------------------------------------------------------------------


def wait_budget(items: int, per_second: float = 200.0) -> float:
    """Seconds to wait for ``items`` deliveries: generous, but bounded."""
    return max(60.0, items / per_second)


def per_thousand(cpu: float | None, count: int) -> float | None:
    return None if cpu is None or count <= 0 else round(cpu / count * 1000, 3)


def mb(mib: float | None) -> float | None:
    """MiB (what /proc reports, as KiB) to MB of 10**6 bytes."""
    return None if mib is None else round(mib * 1.048576, 1)


@contextlib.asynccontextmanager
async def dispatcher(
    ctx: Context,
    name: str,
    *,
    log_level: str = "warning",
    profile: bool = False,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Dispatcher]:
    """A dispatcher process, ready, whose CPU the sampler follows as 'dispatcher';
    ``env`` adds to (or replaces) the run's DISPATCHER_* settings."""
    port = infra.free_port()
    trace = ctx.work / f"dispatcher-{name}.gc.json" if ctx.opts.gc_trace else None
    async with infra.run_dispatcher(
        {**ctx.settings(port, log_level), **(env or {})},
        http_port=port,
        log_path=ctx.work / f"dispatcher-{name}.log",
        session=ctx.session,
        ready_timeout=READY_TIMEOUT,
        sampler=ctx.sampler,
        profile_to=ctx.work / f"dispatcher-{name}.prof" if profile else None,
        trace_to=trace,
        label=name,
    ) as running:
        ctx.say(f"dispatcher '{name}' ready in {running.ready_at - running.started_at:.1f} s")
        yield running
    loaded = gctrace.load(trace) if trace is not None else None
    if loaded is not None:
        ctx.gc_traces[name] = loaded


async def deliveries(
    ctx: Context, running: Dispatcher, phase: str, *, requests: int, entities: int = 0
) -> dict[str, Any]:
    """Wait for ``phase`` to arrive in full; rates and CPU between first and last receipt."""
    complete = await ctx.receiver.wait_for(
        phase,
        requests=requests,
        entities=entities,
        within=wait_budget(max(requests, entities // IMPORT_BATCH_SIZE)),
        watch=running.child,
    )
    stats = (await ctx.receiver.stats()).get(phase)
    if not stats or not stats["requests"]:
        raise BenchError(f"nothing arrived for {phase}\n{running.child.tail()}")
    window = ctx.sampler.window(stats["first_arrival"], stats["last_arrival"])
    cpu = window.cpu.get("dispatcher")
    return {
        "dispatcher_run": running.label,
        "first_arrival": stats["first_arrival"],
        "last_arrival": stats["last_arrival"],
        "complete": complete,
        "expected_requests": requests,
        "requests": stats["requests"],
        "entities": stats["entities"],
        "distinct_entities": stats["distinct_seq"],
        "span_s": stats["span_s"],
        "requests_per_s": stats["requests_per_s"],
        "entities_per_s": stats["entities_per_s"],
        "mean_body_bytes": stats["mean_body_bytes"],
        "dispatcher_cpu_s": cpu,
        "dispatcher_cpu_s_per_1000_requests": per_thousand(cpu, stats["requests"]),
        "dispatcher_cpu_s_per_1000_entities": per_thousand(cpu, stats["entities"]),
        "cores": window.cores(),
        "latency_ms": stats["latency_ms"],
    }


# --- scenarios ----------------------------------------------------------------------------


async def ceiling(
    ctx: Context, label: str, *, batch: int = 0, concurrency: int = 0, count: int = 0
) -> dict[str, Any]:
    """The bare aiohttp client against the same receiver: the baseline. With ``batch``,
    its bodies are those of an import batch of that many entities."""
    phase = f"ceiling_{label}"
    body = ctx.work / f"{phase}.json"
    if batch:
        make = workload.import_item(f"{ctx.tag}-{phase}", batch, phase=phase)
        body.write_bytes(workload.batch_body(make, phase, batch))
    else:
        body.write_bytes(workload.sample_body(workload.sale(phase, ctx.opts.shops), phase))
    count = count or ctx.opts.events
    concurrency = concurrency or ctx.opts.max_in_flight
    argv = [sys.executable, "-m", "bench.ceiling", "--url", ctx.receiver.url(phase)]
    argv += ["--body", str(body), "--count", str(count)]
    argv += ["--concurrency", str(concurrency), "--ca", ctx.tls.ca_file]
    child = await infra.spawn(phase, argv, log_path=ctx.work / f"{phase}.log", stdout_pipe=True)
    ctx.sampler.track("ceiling client", lambda: [child.pid])
    try:
        client = await infra.read_json_line(child, wait_budget(count))
        stats = (await ctx.receiver.stats())[phase]
        window = ctx.sampler.window(stats["first_arrival"], stats["last_arrival"])
    finally:
        ctx.sampler.untrack("ceiling client")
        await child.stop()
    if client["errors"]:
        raise BenchError(f"the ceiling client had {client['errors']} errors\n{child.tail()}")
    result = {
        "requests": client["requests"],
        "concurrency": concurrency,
        "loop": client.get("loop"),
        "client_requests_per_s": client["requests_per_s"],
        "requests_per_s": stats["requests_per_s"],  # first -> last receipt, like the rest
        "body_bytes": stats["mean_body_bytes"],
        "client_cpu_s_per_1000_requests": per_thousand(
            window.cpu.get("ceiling client"), client["requests"]
        ),
        "cores": window.cores(),
    }
    ctx.say(f"ceiling {label}: {result['requests_per_s']} requests/s")
    return result


async def batch_ceiling(ctx: Context) -> dict[str, Any]:
    """The import's baseline: the bare client POSTing bodies of an import batch's size
    one at a time, as one import's batches go out (in order, one after the other)."""
    count = max(200, ctx.opts.import_entities // IMPORT_BATCH_SIZE)
    return await ceiling(ctx, "batch", batch=IMPORT_BATCH_SIZE, concurrency=1, count=count)


async def throughput_and_latency(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pre-produced events drained as fast as possible, then a fixed offered load."""
    n = ctx.opts.events
    seconds = await workload.produce_bulk(
        ctx.bulk, ctx.topics.events, workload.sale("throughput", ctx.opts.shops), n
    )
    ctx.say(f"throughput: {n} events pre-produced in {seconds:.1f} s")
    async with dispatcher(ctx, "throughput", profile=ctx.opts.profile) as running:
        result = await deliveries(ctx, running, "throughput", requests=n)
        result.pop("latency_ms")  # time spent in the backlog: not a latency
        result["produce_s"] = round(seconds, 2)
        result["ready_s"] = round(running.ready_at - running.started_at, 2)
        ctx.say(f"throughput: {result['requests_per_s']} deliveries/s")
        latency_result = await latency(ctx, running)
        memory = running.memory_mib()
        result["peak_rss_mb"] = mb(memory.get("VmHWM"))
        result["rss_mb"] = mb(memory.get("VmRSS"))
    return result, latency_result


async def latency(ctx: Context, running: Dispatcher) -> dict[str, Any]:
    """Events produced at ``--rate``/s on a fixed schedule; event time -> receipt."""
    make = workload.sale("latency", ctx.opts.shops)
    paced = await workload.produce_paced(
        ctx.paced, ctx.topics.events, make, rate=ctx.opts.rate, seconds=ctx.opts.latency_seconds
    )
    result = await deliveries(ctx, running, "latency", requests=paced.sent)
    result.update(
        offered_rate=ctx.opts.rate,
        produced_rate=round(paced.rate, 1),
        producer_max_behind_schedule_ms=paced.max_behind_ms,
    )
    lat = result["latency_ms"] or {}
    ctx.say(f"latency at {paced.rate:.0f}/s: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms")
    return result


async def imports(ctx: Context) -> dict[str, Any]:
    """One import of N item events for one shop, pre-produced, batched by the dispatcher."""
    n = ctx.opts.import_entities
    make = workload.import_item(f"{ctx.tag}-import", n)
    seconds = await workload.produce_bulk(ctx.bulk, ctx.topics.events, make, n)
    ctx.say(f"import: {n} item events pre-produced in {seconds:.1f} s")
    expected = math.ceil(n / IMPORT_BATCH_SIZE)
    profile = ctx.opts.profile and ctx.opts.only == "import"
    async with dispatcher(ctx, "import", profile=profile) as running:
        result = await deliveries(ctx, running, "import", requests=expected, entities=n)
        result.pop("latency_ms")
        result["peak_rss_mb"] = mb(running.memory_mib().get("VmHWM"))
    result["produce_s"] = round(seconds, 2)
    ctx.say(f"import: {result['entities_per_s']} entities/s, {result['requests']} requests")
    return result


async def info_level(ctx: Context) -> dict[str, Any]:
    """The throughput scenario with DISPATCHER_LOG_LEVEL=info: the canonical log lines."""
    n = ctx.opts.info_events
    make = workload.sale("throughput_info", ctx.opts.shops)
    await workload.produce_bulk(ctx.bulk, ctx.topics.events, make, n)
    async with dispatcher(ctx, "info", log_level="info") as running:
        result = await deliveries(ctx, running, "throughput_info", requests=n)
        result.pop("latency_ms")
        result["peak_rss_mb"] = mb(running.memory_mib().get("VmHWM"))
        log_path = running.child.log_path
    lines, size = count_lines(log_path, b'"event":"delivery"')
    result["delivery_log_lines"] = lines
    result["log_bytes_per_delivery"] = round(size / lines) if lines else None
    ctx.say(f"info level: {result['requests_per_s']} deliveries/s, {lines} delivery lines")
    return result


def count_lines(path: Path, marker: bytes) -> tuple[int, int]:
    """(lines containing ``marker``, their total size in bytes) of a log file."""
    lines = size = 0
    with path.open("rb") as log:
        for line in log:
            if marker in line:
                lines += 1
                size += len(line)
    return lines, size


async def history(ctx: Context) -> dict[str, Any]:
    """The throughput scenario with the attempt log off, on, on, off (a fresh dispatcher
    and N new events each time): deliveries/s with and without the delivery history, and
    what it costs on disk. The 'on' runs have an attempt topic of their own and start on
    an emptied table, so the rows counted and measured are theirs alone; each waits for
    its recorder to write every attempt before it stops."""
    n = ctx.opts.history_events
    empty = await history_storage(ctx.database_url, truncate=True)
    runs: list[dict[str, Any]] = []
    recorded = 0
    for i, mode in enumerate(HISTORY_ROUNDS, 1):
        phase = f"history_{mode}_{i}"
        await workload.produce_bulk(
            ctx.bulk, ctx.topics.events, workload.sale(phase, ctx.opts.shops), n
        )
        env = {"DISPATCHER_ATTEMPT_LOG": mode, "DISPATCHER_ATTEMPT_TOPIC": ctx.topics.history}
        async with dispatcher(ctx, phase, env=env) as running:
            result = await deliveries(ctx, running, phase, requests=n)
            result.pop("latency_ms")
            result["attempt_log"] = mode
            result["peak_rss_mb"] = mb(running.memory_mib().get("VmHWM"))
            if mode == "on":
                recorded += n
                result["recorder_catch_up_s"] = await wait_recorded(
                    ctx, running, recorded, after=result["last_arrival"]
                )
        runs.append(result)
        caught = result.get("recorder_catch_up_s")
        extra = "" if caught is None else f", history written {caught:.1f} s after the last"
        ctx.say(f"history {mode} ({i}/4): {result['requests_per_s']} deliveries/s{extra}")
    stored = await history_storage(ctx.database_url)
    return {
        "events_per_run": n,
        "runs": runs,
        "expected_rows": recorded,
        "rows": stored["rows"],
        "distinct_notifications": stored["distinct_notifications"],
        "bytes": stored["bytes"] - empty["bytes"],
        "empty_bytes": empty["bytes"],
        "partitions": stored["partitions"],
    }


async def notices(ctx: Context) -> dict[str, Any]:
    """N notices pre-produced, then a fresh dispatcher mailing them to the SMTP sink, once
    per DISPATCHER_SMTP_CONNECTIONS of :data:`NOTICE_CONNECTIONS`. The sink's files of
    this run are read as they appear (arrival = the file's mtime) and deleted at the end."""
    n = ctx.opts.notices
    host, _, port = ctx.opts.smtp.rpartition(":")
    sink = procstat.listener_pid(int(port))
    if sink is not None:
        ctx.sampler.track("smtp sink", lambda: [sink])
    maildir = mails.MailDir(Path(ctx.opts.mail_dir), marker=f"@{ctx.tag}.")
    domain = f"{ctx.tag}.example.com"
    runs: list[dict[str, Any]] = []
    try:
        for connections in NOTICE_CONNECTIONS:
            phase = f"notices_{connections}"
            make = workload.notice(phase, domain, ctx.opts.shops)
            await workload.produce_bulk(ctx.bulk, ctx.topics.notices, make, n)
            env = {
                "DISPATCHER_SMTP_HOST": host,
                "DISPATCHER_SMTP_PORT": port,
                "DISPATCHER_SMTP_CONNECTIONS": str(connections),
            }
            async with dispatcher(ctx, phase, env=env) as running:
                result = await mailed(ctx, running, maildir, phase, n)
            result["smtp_connections"] = connections
            runs.append(result)
            ctx.say(f"notices, {connections} connections: {result['mails_per_s']} mails/s")
    finally:
        removed = maildir.remove()
        if sink is not None:
            ctx.sampler.untrack("smtp sink")
    return {"notices_per_run": n, "runs": runs, "mail_files_removed": removed}


async def mailed(
    ctx: Context, running: Dispatcher, maildir: mails.MailDir, phase: str, count: int
) -> dict[str, Any]:
    """Wait until the dispatcher has mailed ``count`` notices (its /metrics, so that the
    driver reads no mail meanwhile), then read the sink's new files: rates and CPU
    between the first and the last stored mail of ``phase``."""
    url = f"http://127.0.0.1:{running.http_port}/metrics"
    deadline = time.monotonic() + wait_budget(count, per_second=50.0)
    while time.monotonic() < deadline:
        async with ctx.session.get(url) as response:
            text = await response.text()
        done = sum(
            float(m)
            for m in re.findall(r"^webhook_notices_(?:sent|rejected)_total (\S+)$", text, re.M)
        )
        if done >= count:
            break
        if not running.child.alive():
            raise BenchError(f"the dispatcher exited during {phase}\n{running.child.tail()}")
        await asyncio.sleep(0.5)  # polling interval
    to = f"bench-{phase}@"
    got = [m for m in maildir.scan() if m.to.startswith(to)]
    if len(got) < 2:
        raise BenchError(f"{len(got)} mails of {phase} arrived\n{running.child.tail()}")
    first, last = min(m.arrived for m in got), max(m.arrived for m in got)
    window = ctx.sampler.window(first, last)
    cpu = window.cpu.get("dispatcher")
    ids = [i for m in got for i in m.notice_ids]
    return {
        "dispatcher_run": running.label,
        "first_arrival": first,
        "last_arrival": last,
        "expected": count,
        "mails": len(got),
        "distinct_notices": len(set(ids)),
        "span_s": round(last - first, 3),
        "mails_per_s": round(len(got) / (last - first), 1) if last > first else None,
        "dispatcher_cpu_s": cpu,
        "dispatcher_cpu_s_per_1000_mails": per_thousand(cpu, len(got)),
        "cores": window.cores(),
    }


HISTORY_SIZE = """
SELECT count(*) AS partitions, coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint AS bytes
FROM pg_inherits i WHERE i.inhparent = 'webhook_attempts'::regclass
"""


async def history_storage(database_url: str, *, truncate: bool = False) -> dict[str, int]:
    """The delivery history's rows and bytes on disk (every partition, with its indexes
    and TOAST); ``truncate`` empties it first (the rows of earlier scenarios)."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        if truncate:
            await conn.execute("TRUNCATE webhook_attempts, webhook_health")
        size = await conn.fetchrow(HISTORY_SIZE)
        rows = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT notification_uuid) AS distinct_notifications "
            "FROM webhook_attempts"
        )
    finally:
        await conn.close()
    assert size is not None
    assert rows is not None
    return {**dict(size), **dict(rows)}


async def wait_recorded(ctx: Context, running: Dispatcher, rows: int, *, after: float) -> float:
    """Poll until the history holds ``rows`` attempts; seconds from ``after`` (the last
    delivery, ``time.time()``) until it did."""
    conn = await asyncpg.connect(ctx.database_url, timeout=10)
    try:
        deadline = time.monotonic() + RECORDER_CATCH_UP_TIMEOUT
        while (count := await conn.fetchval("SELECT count(*) FROM webhook_attempts")) < rows:
            if not running.child.alive():
                raise BenchError(
                    f"the dispatcher exited before its history was written\n{running.child.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the recorder wrote {count} of {rows} attempts within "
                    f"{RECORDER_CATCH_UP_TIMEOUT:g} s of the last delivery\n{running.child.tail()}"
                )
            await asyncio.sleep(0.1)  # polling interval
        return round(max(0.0, time.time() - after), 2)
    finally:
        await conn.close()


async def memory(ctx: Context) -> dict[str, Any]:
    """RSS of a ready, idle dispatcher with the run's subscriptions, then with 100k of
    them, idle and after a burst of deliveries spread over as many shops as it has."""
    result: dict[str, Any] = {}
    async with dispatcher(ctx, "memory-baseline") as running:
        result["baseline"] = await idle_memory(ctx, running)
    sale_shops = await top_up_subscriptions(ctx)
    async with dispatcher(ctx, "memory-full") as running:
        result["full"] = await idle_memory(ctx, running)
        result["full_under_load"] = await loaded_memory(ctx, running, sale_shops)
    base, full = result["baseline"], result["full"]
    extra = full["subscriptions"] - base["subscriptions"]
    if extra > 0 and full["rss_mb"] is not None and base["rss_mb"] is not None:
        result["bytes_per_subscription"] = round((full["rss_mb"] - base["rss_mb"]) * 1e6 / extra)
    return result


async def idle_memory(ctx: Context, running: Dispatcher) -> dict[str, Any]:
    """VmRSS and VmHWM of a dispatcher that just became ready and has nothing to do."""
    count = await workload.count_webhooks(ctx.database_url)
    await asyncio.sleep(SETTLE_SECONDS)  # let start-up garbage go before reading
    mem = running.memory_mib()
    ctx.say(f"memory with {count} subscriptions: {mb(mem.get('VmRSS'))} MB RSS")
    return {
        "subscriptions": count,
        "ready_s": round(running.ready_at - running.started_at, 2),
        "rss_mb": mb(mem.get("VmRSS")),
        "peak_rss_mb": mb(mem.get("VmHWM")),
    }


async def loaded_memory(ctx: Context, running: Dispatcher, shops: int) -> dict[str, Any]:
    """``--events`` events over ``shops`` shops, produced while it runs; then VmHWM."""
    n = ctx.opts.events
    make = workload.sale("memory_load", shops)
    await workload.produce_bulk(ctx.bulk, ctx.topics.events, make, n)
    result = await deliveries(ctx, running, "memory_load", requests=n)
    mem = running.memory_mib()
    ctx.say(f"memory after {n} deliveries: {mb(mem.get('VmHWM'))} MB peak RSS")
    return {
        "dispatcher_run": result["dispatcher_run"],
        "first_arrival": result["first_arrival"],
        "last_arrival": result["last_arrival"],
        "deliveries": result["requests"],
        "cores": result["cores"],
        "distinct_shops": min(n, shops),
        "requests_per_s": result["requests_per_s"],
        "rss_mb": mb(mem.get("VmRSS")),
        "peak_rss_mb": mb(mem.get("VmHWM")),
    }


async def million(ctx: Context, base: dict[str, Any]) -> dict[str, Any]:
    """The large load: webhooks topped up to ``--million``, then a fresh dispatcher: time
    from start to ready (the cache loaded), RSS idle, and bytes per subscription above
    ``base`` (the memory scenario's idle dispatcher with the run's 10,001 webhooks)."""
    have = await workload.count_webhooks(ctx.database_url)
    missing = max(0, ctx.opts.million - have)
    start = time.perf_counter()
    chunk = 100_000  # rows built and copied at a time: the driver stays small
    for low in range(0, missing, chunk):
        high = min(low + chunk, missing)
        await workload.insert_webhooks(
            ctx.database_url,
            (f"bench-million-{i:07d}" for i in range(low, high)),  # shops with no events
            entity_name="sales",
            event_type="CLOSED",
            url_of=ctx.receiver.url,
        )
    ctx.say(f"million: {missing} more webhooks inserted in {time.perf_counter() - start:.1f} s")
    async with dispatcher(ctx, "memory-million") as running:
        result = await idle_memory(ctx, running)
    extra = result["subscriptions"] - base["subscriptions"]
    if extra > 0 and result["rss_mb"] is not None and base["rss_mb"] is not None:
        per = (result["rss_mb"] - base["rss_mb"]) * 1e6 / extra
        result["bytes_per_subscription"] = round(per)
    result["baseline"] = base
    return result


async def top_up_subscriptions(ctx: Context) -> int:
    """Add sales/CLOSED webhooks of new shops up to ``--subscriptions`` webhooks in all;
    the number of shops with a sales webhook (shop indices 0 to that number - 1)."""
    have = await workload.count_webhooks(ctx.database_url)
    missing = max(0, ctx.opts.subscriptions - have)
    if missing:
        start = time.perf_counter()
        first = ctx.opts.shops
        shops = (workload.shop(i) for i in range(first, first + missing))
        url_of = ctx.receiver.url
        await workload.insert_webhooks(
            ctx.database_url, shops, entity_name="sales", event_type="CLOSED", url_of=url_of
        )
        took = time.perf_counter() - start
        ctx.say(f"memory: {missing} more webhooks inserted in {took:.1f} s")
    return ctx.opts.shops + missing


# --- set-up -------------------------------------------------------------------------------


async def migrate(ctx_work: Path, database_url: str) -> None:
    """``dispatcher migrate`` on the fresh database (so webhooks can be inserted first)."""
    argv = infra.dispatcher_argv("migrate")
    env = infra.dispatcher_env({"DISPATCHER_DATABASE_URL": database_url})
    child = await infra.spawn("migrate", argv, log_path=ctx_work / "migrate.log", env=env)
    try:
        code = await asyncio.wait_for(child.process.wait(), 60)
    except TimeoutError:
        raise BenchError(f"dispatcher migrate took over 60 s\n{child.tail()}") from None
    finally:
        await child.stop()
    if code != 0:
        raise BenchError(f"dispatcher migrate failed ({code})\n{child.tail()}")


async def subscriptions(ctx: Context) -> dict[str, Any]:
    """One sales/CLOSED webhook per shop, and the import shop's items/CREATED one."""
    start = time.perf_counter()
    shops = (workload.shop(i) for i in range(ctx.opts.shops))
    url_of = ctx.receiver.url
    count = await workload.insert_webhooks(
        ctx.database_url, shops, entity_name="sales", event_type="CLOSED", url_of=url_of
    )
    count += await workload.insert_webhooks(
        ctx.database_url,
        [workload.IMPORT_SHOP],
        entity_name="items",
        event_type="CREATED",
        url_of=url_of,
    )
    ctx.say(f"{count} webhooks inserted in {time.perf_counter() - start:.1f} s")
    return {"webhooks": count, "shops": ctx.opts.shops + 1}


def track_stack(ctx: Context) -> dict[str, int | None]:
    """Follow the CPU of the Kafka broker, PostgreSQL, the receiver and this process."""
    kafka_port = int(ctx.opts.kafka.split(",")[0].rpartition(":")[2] or 9092)
    pg_port = urllib.parse.urlsplit(ctx.opts.database_url).port or 5432
    kafka, postmaster = procstat.listener_pid(kafka_port), procstat.listener_pid(pg_port)
    if kafka is not None:
        ctx.sampler.track("kafka", lambda: [kafka])
    if postmaster is not None:
        ctx.sampler.track("postgres", procstat.Family(postmaster))
    receiver_pid, me = ctx.receiver.child.pid, os.getpid()
    ctx.sampler.track("receiver", lambda: [receiver_pid])
    ctx.sampler.track("bench driver", lambda: [me])
    return {"kafka": kafka, "postgres": postmaster}


# --- the run ------------------------------------------------------------------------------


async def bench(opts: Options, work: Path, results: dict[str, Any]) -> None:
    """Set everything up, run the scenarios, tear everything down; fills ``results``."""
    tag = f"bench-{uuid.uuid4().hex[:10]}"
    results["meta"]["tag"] = tag
    async with contextlib.AsyncExitStack() as stack:
        tls = infra.make_tls(work)
        db_name = tag.replace("-", "_")
        database_url = await stack.enter_async_context(
            infra.fresh_database(opts.database_url, db_name)
        )
        topics = await stack.enter_async_context(
            infra.fresh_topics(opts.kafka, tag, opts.partitions)
        )
        sampler = await stack.enter_async_context(procstat.Sampler(interval=0.2))
        receiver = await stack.enter_async_context(infra.run_receiver(tls, work))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        bulk = await stack.enter_async_context(_producer(opts.kafka, linger_ms=20))
        paced = await stack.enter_async_context(_producer(opts.kafka, linger_ms=0))
        ctx = Context(
            opts, tag, work, tls, database_url, topics, receiver, sampler, bulk, paced, session
        )
        await migrate(work, database_url)
        pids = track_stack(ctx)
        meta = results["meta"]
        meta["machine"] = report.machine()
        meta["versions"] = report.versions(pids["kafka"], await infra.server_version(database_url))
        meta["git"] = report.git_state(infra.ROOT)
        meta["dispatcher_settings"] = ctx.settings(0, "warning")
        meta["subscriptions"] = await subscriptions(ctx)
        await run_scenarios(ctx, results)


async def run_scenarios(ctx: Context, results: dict[str, Any]) -> None:
    """The scenarios, in order; each result is stored as soon as it is known."""
    if ctx.opts.only == "history":
        results["history"] = await history(ctx)
        return
    if ctx.opts.only == "notices":
        results["notices"] = await notices(ctx)
        return
    if ctx.opts.only == "fairness":
        results["fairness"] = await fairness.fairness(ctx, dispatcher, deliveries)
        return
    if ctx.opts.only == "replay":
        results["replay"] = await replay.replay(ctx)
        return
    if ctx.opts.only == "processes":
        results["processes"] = await processes.processes(ctx, dispatcher, deliveries)
        return
    if ctx.opts.only == "memory":
        results["memory"] = await memory(ctx)
        results["memory_1m"] = await million(ctx, results["memory"]["baseline"])
        return
    runs = results["ceiling"] = {"runs": {}}
    if ctx.opts.only == "import":
        runs["runs"]["mid"] = await ceiling(ctx, "mid")
        results["ceiling_batch"] = await batch_ceiling(ctx)
        results["import"] = await imports(ctx)
        runs["runs"]["end"] = await ceiling(ctx, "end")
        if ctx.opts.profile:
            results["profile"] = profiling.summarize(ctx.work / "dispatcher-import.prof")
        return
    runs["runs"]["start"] = await ceiling(ctx, "start")
    results["throughput"], results["latency"] = await throughput_and_latency(ctx)
    runs["runs"]["mid"] = await ceiling(ctx, "mid")
    if ctx.opts.only == "throughput":
        if ctx.opts.profile:
            results["profile"] = profiling.summarize(ctx.work / "dispatcher-throughput.prof")
        return
    results["ceiling_batch"] = await batch_ceiling(ctx)
    results["import"] = await imports(ctx)
    if not ctx.opts.skip_info:
        results["throughput_info"] = await info_level(ctx)
    runs["runs"]["end"] = await ceiling(ctx, "end")
    results["history"] = await history(ctx)
    results["notices"] = await notices(ctx)
    results["replay"] = await replay.replay(ctx)
    results["memory"] = await memory(ctx)
    results["fairness"] = await fairness.fairness(ctx, dispatcher, deliveries)
    results["processes"] = await processes.processes(ctx, dispatcher, deliveries)
    # last: every later dispatcher would load the million subscriptions
    results["memory_1m"] = await million(ctx, results["memory"]["baseline"])
    if ctx.gc_traces:
        attach_gc(ctx.gc_traces, results)
    if ctx.opts.profile:
        results["profile"] = profiling.summarize(ctx.work / "dispatcher-throughput.prof")


def attach_gc(traces: dict[str, dict[str, Any]], results: dict[str, Any]) -> None:
    """Add GC pauses and loop lags, between first and last receipt, to each scenario."""
    scenarios = [results.get(n) for n in ("throughput", "latency", "import", "throughput_info")]
    scenarios += results.get("history", {}).get("runs", [])
    scenarios += results.get("notices", {}).get("runs", [])
    scenarios.append(results.get("memory", {}).get("full_under_load"))
    for scenario in scenarios:
        trace = traces.get(scenario.get("dispatcher_run", "")) if scenario else None
        if scenario and trace:
            start, end = scenario["first_arrival"], scenario["last_arrival"]
            scenario["gc"] = gctrace.summary(trace, start, end)


@contextlib.asynccontextmanager
async def _producer(bootstrap: str, *, linger_ms: int) -> AsyncIterator[AIOKafkaProducer]:
    kafka = workload.producer(bootstrap, linger_ms=linger_ms)
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


# --- command line -------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> Options:
    """Options from the command line (``--quick`` changes the defaults of the counts)."""
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    p.add_argument("--events", type=int, help="throughput events (default 20000; quick 3000)")
    p.add_argument("--shops", type=int, default=10_000, help="shops, one sales webhook each")
    p.add_argument(
        "--rate", type=float, default=1_000.0, help="offered events/s of the latency run"
    )
    p.add_argument("--latency-seconds", type=float, help="latency run length (15; quick 5)")
    p.add_argument("--import-entities", type=int, help="import size (100000; quick 10000)")
    p.add_argument("--subscriptions", type=int, default=100_000, help="webhooks of the memory run")
    p.add_argument(
        "--max-in-flight", type=int, default=256, help="dispatcher and ceiling concurrency"
    )
    p.add_argument("--partitions", type=int, default=4, help="partitions of the events topic")
    p.add_argument("--kafka", default=DEFAULT_KAFKA, help="Kafka bootstrap host:port")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="admin URL of PostgreSQL")
    p.add_argument("--smtp", default=DEFAULT_SMTP, help="host:port of the SMTP sink")
    p.add_argument(
        "--mail-dir", default=DEFAULT_MAIL_DIR, help="where that sink stores mails (.eml files)"
    )
    p.add_argument("--notices", type=int, help="notices of each notice run (10000; quick 2000)")
    p.add_argument(
        "--replay-others",
        type=int,
        help="other shops' events of the replay range (200000; quick 20000)",
    )
    p.add_argument("--results-dir", default="bench-results", help="where the JSON goes")
    p.add_argument("--max-seconds", type=float, default=600.0, help="hard limit of the whole run")
    p.add_argument("--skip-info", action="store_true", help="skip the info-log-level run")
    p.add_argument(
        "--history-events", type=int, help="events of each history run (default 20000; quick 3000)"
    )
    p.add_argument(
        "--only",
        choices=(
            "throughput",
            "import",
            "memory",
            "history",
            "notices",
            "replay",
            "fairness",
            "processes",
        ),
        default="",
        help="run one scenario alone (throughput: the ceiling, throughput and latency, the "
        "ceiling again; import: the ceilings around one import; memory: RSS with 100,000 "
        "subscriptions, then the load of --million; history: attempt log off/on/on/off, "
        "storage per attempt; notices: mails/s to the SMTP sink; replay: a replay job's scan "
        "rate; fairness: 3 slow webhooks among 50 on one endpoint; processes: deliveries/s "
        "with DISPATCHER_PROCESSES 1, 2, 2, 1)",
    )
    p.add_argument(
        "--million",
        type=int,
        help="subscriptions of the large load (default 1000000; quick 300000)",
    )
    p.add_argument(
        "--fairness-seconds", type=float, help="length of the fairness run (30; quick 10)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the throughput dispatcher under cProfile (its figures are then not comparable)",
    )
    p.add_argument(
        "--gc-trace",
        action="store_true",
        help="run the dispatchers through bench/gctrace.py: GC pauses and loop lag per scenario",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, certs)")
    p.add_argument("--show", metavar="JSON", default="", help="print the table of a saved run")
    a = p.parse_args(argv)
    if a.profile and a.gc_trace:
        p.error("--profile and --gc-trace each wrap the dispatcher: choose one")
    events = a.events or (3_000 if a.quick else 20_000)
    return Options(
        quick=a.quick,
        events=events,
        shops=a.shops,
        rate=a.rate,
        latency_seconds=a.latency_seconds or (5.0 if a.quick else 15.0),
        import_entities=a.import_entities or (10_000 if a.quick else 100_000),
        subscriptions=a.subscriptions,
        million=a.million or (300_000 if a.quick else 1_000_000),
        info_events=events,
        history_events=a.history_events or (3_000 if a.quick else 20_000),
        notices=a.notices or (2_000 if a.quick else 10_000),
        replay_others=a.replay_others or (20_000 if a.quick else 200_000),
        fairness_seconds=a.fairness_seconds or (10.0 if a.quick else 30.0),
        max_in_flight=a.max_in_flight,
        partitions=a.partitions,
        kafka=a.kafka,
        database_url=a.database_url,
        smtp=a.smtp,
        mail_dir=a.mail_dir,
        results_dir=a.results_dir,
        max_seconds=a.max_seconds,
        skip_info=a.skip_info,
        profile=a.profile,
        gc_trace=a.gc_trace,
        keep=a.keep,
        show=a.show,
        only=a.only,
    )


async def _main(opts: Options, work: Path, results: dict[str, Any]) -> None:
    """:func:`bench` under the overall deadline; SIGTERM cancels it (and cleans up)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    deadline = asyncio.timeout(opts.max_seconds)
    try:
        async with deadline:
            await bench(opts, work, results)
    except TimeoutError:
        if deadline.expired():
            raise BenchError(f"over --max-seconds ({opts.max_seconds:g} s)") from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    if opts.show:
        return show(Path(opts.show))
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    results: dict[str, Any] = {"meta": {"options": asdict(opts)}}
    meta = results["meta"]
    meta["started_at"] = workload.iso_millis(started)
    try:
        asyncio.run(_main(opts, work, results))
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as exc:
        meta["error"] = _reason(exc)
        path = report.write_json(infra.ROOT / opts.results_dir, results)
        print(f"bench: failed: {meta['error']}\nlogs kept in {work}", file=sys.stderr)
        print(f"partial results: {path}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError) else 1
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    meta["duration_s"] = round(time.time() - started, 1)
    figures.derive(results)
    try:
        print_results(results)
    finally:  # the figures are kept even if the table cannot be printed
        path = report.write_json(infra.ROOT / opts.results_dir, results)
        print(f"\nresults: {path}  (run took {meta['duration_s']:.0f} s)")
    return 0


def print_results(results: dict[str, Any]) -> None:
    """The table, the noisy windows, and the profile summary if there is one."""
    print(report.table(figures.rows(results)))
    for name, cores in results["noisy"].items():
        print(f"noisy: other processes used {cores:.2f} cores during '{name}'")
    if results.get("profile"):
        print("\n" + profiling.text(results["profile"]))


def show(path: Path) -> int:
    """``--show``: print the table of a run saved as JSON."""
    try:
        results = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"bench: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    if "error" in results.get("meta", {}):
        print(f"bench: that run failed: {results['meta']['error']}", file=sys.stderr)
        return 1
    figures.derive(results)
    print_results(results)
    return 0


def _reason(exc: BaseException) -> str:
    """One line (or a child's log tail) saying why the run stopped."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError: a step of the run timed out"
    if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
        return "interrupted"
    if isinstance(exc, BenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
