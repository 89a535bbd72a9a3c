"""The soak: ``make soak`` (``SOAK_MINUTES=3`` to shorten; ``--help`` for the load).

A bounded run of the real daemon (``dispatcher run``) under the mixed load an operator
meets, scaled to this 2-core machine: shops with two sales webhooks each (``CREATED`` and
``CLOSED``) spread over the ports of one HTTPS receiver process (each port an endpoint), a
paced stream of sales events, an import of items every two minutes, a share of webhooks
answering 500 (retried every ``--retry-delay`` seconds and mailed at each failure) and a
share answering after 3 s, webhooks created and deleted through the HTTP API all along.

Every ``--period`` minutes of the run it reports: events produced and healthy deliveries
per second, their p50/p99 latency (production to receipt), failed attempts and mails per
second, the delay of each mail after its failed attempt, import batches, creates and
deletes, the dispatcher's RSS and open FDs, and the committed lag of the dispatch and
notice consumer groups as Kafka holds it (end offsets minus the groups' committed
offsets) next to what ``webhook_consumer_lag`` said. At the end: deliveries against
expectations, duplicates, mails against failed attempts, and the dispatcher's error lines.

Like ``bench/run.py`` it makes its own database, topics, groups, certificates and an SMTP
sink of its own (``tools/smtp_sink.py`` on a free port, its mails in the work directory),
and removes them at the end. The table is printed and the figures written to
``bench-results/soak/<timestamp>.json``.
"""

from __future__ import annotations

import os
import sys

# Run as a script (``python bench/soak.py``): make the ``bench`` package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import asyncio
import contextlib
import math
import random
import re
import shutil
import signal
import socket
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bench import infra, mails, procstat, report, workload
from bench.infra import BenchError, Dispatcher, Receiver
from bench.receiver import latency_summary

DEFAULT_DATABASE_URL = "postgresql://dispatcher@127.0.0.1:55432/dispatcher"
DEFAULT_KAFKA = "127.0.0.1:9092"
EVENT_TYPES = ("CREATED", "CLOSED")  # the two sales webhooks of each shop
SAMPLE_SECONDS = 5.0  # RSS, FDs and lags are sampled this often
READY_TIMEOUT = 120.0
DRAIN_TIMEOUT = 120.0  # seconds after the load stops for the healthy backlog to arrive
CLIENT_ID = workload.CLIENT_ID


@dataclass(frozen=True)
class Options:
    """The load; the defaults are the issue's soak, scaled where this machine needs it."""

    minutes: float = 10.0
    period_minutes: float = 5.0
    shops: int = 500
    ports: int = 10
    rate: float = 300.0
    import_every_s: float = 120.0
    import_items: int = 2_000
    failing: float = 0.05
    slow: float = 0.01
    slow_ms: int = 3_000
    changes_per_minute: float = 5.0
    retry_delay_s: float = 30.0
    volatile_share: float = 0.1
    partitions: int = 4
    seed: int = 18
    kafka: str = DEFAULT_KAFKA
    database_url: str = DEFAULT_DATABASE_URL
    results_dir: str = "bench-results"
    keep: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """One webhook events are produced for."""

    shop: str
    event_type: str
    kind: str  # ok, fail (answers 500), slow (answers after --slow-ms)
    stable: bool  # never deleted during the run
    webhook_id: str = ""

    @property
    def phase(self) -> str:
        """What the receiver files its requests under."""
        if self.kind != "ok":
            return self.kind
        return "healthy" if self.stable else "volatile"


@dataclass
class Load:
    """What the load did, as the driver saw it."""

    database_url: str
    live: list[Target]
    tokens: dict[str, str]  # shop -> API token, for the shops whose webhooks change
    produced: Counter[str] = field(default_factory=Counter)  # phase -> events
    per_second: Counter[int] = field(default_factory=Counter)  # Unix second -> events
    seq: int = 0
    imports: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)  # creates and deletes
    samples: list[dict[str, Any]] = field(default_factory=list)
    mails: list[mails.Mail] = field(default_factory=list)


# --- set-up ---------------------------------------------------------------------------------


def plan(opts: Options, receiver: Receiver) -> tuple[list[Target], dict[tuple[str, str], str]]:
    """The webhooks of the run and their URLs: two per shop, each on one of the ports;
    kinds drawn with ``--seed``; the last ``--volatile-share`` of the shops' healthy
    webhooks are the ones deleted during the run."""
    rng = random.Random(opts.seed)  # noqa: S311 - a reproducible draw, not a secret
    targets: list[Target] = []
    urls: dict[tuple[str, str], str] = {}
    first_volatile = int(opts.shops * (1 - opts.volatile_share))
    for i in range(opts.shops):
        shop = f"soak-shop-{i:05d}"
        for j, event_type in enumerate(EVENT_TYPES):
            draw = rng.random()
            kind = (
                "fail"
                if draw < opts.failing
                else "slow"
                if draw < opts.failing + opts.slow
                else "ok"
            )
            port = receiver.ports[(2 * i + j) % len(receiver.ports)]
            prefix = {"ok": "", "fail": "fail/", "slow": f"sleep-{opts.slow_ms}/"}[kind]
            urls[(shop, event_type)] = receiver.url(f"{prefix}{shop}/{event_type}", port=port)
            stable = kind != "ok" or i < first_volatile
            targets.append(Target(shop, event_type, kind, stable))
    return targets, urls


async def subscribe(
    database_url: str, targets: list[Target], urls: dict[tuple[str, str], str]
) -> list[Target]:
    """COPY the webhooks (and the import shop's) into the database; the targets with ids."""
    for event_type in EVENT_TYPES:
        shops = [t.shop for t in targets if t.event_type == event_type]
        by_shop = {shop: url for (shop, et), url in urls.items() if et == event_type}
        await workload.insert_webhooks(
            database_url,
            shops,
            entity_name="sales",
            event_type=event_type,
            url_of=by_shop.__getitem__,
        )
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT id, environment_id, event_type FROM webhooks")
    finally:
        await conn.close()
    ids = {(r["environment_id"], r["event_type"]): str(r["id"]) for r in rows}
    return [
        Target(t.shop, t.event_type, t.kind, t.stable, ids[(t.shop, t.event_type)]) for t in targets
    ]


async def issue_tokens(database_url: str, shops: Sequence[str]) -> dict[str, str]:
    """An API token for each shop (as ``dispatcher token issue`` makes them)."""
    from dispatcher import db
    from dispatcher.store import Store

    pool = await db.create_pool(database_url, max_size=2)
    try:
        store = Store(pool)
        return {shop: (await store.issue_token(shop, CLIENT_ID))[1] for shop in shops}
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def smtp_sink(work: Path) -> AsyncIterator[tuple[int, Path]]:
    """``tools/smtp_sink.py`` on a free port, storing mails in ``work/mail``."""
    port, directory = infra.free_port(), work / "mail"
    argv = [sys.executable, str(infra.ROOT / "tools" / "smtp_sink.py"), "--port", str(port)]
    argv += ["--mail-dir", str(directory)]
    child = await infra.spawn("smtp sink", argv, log_path=work / "smtp-sink.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or not child.alive():
                raise BenchError(f"the SMTP sink did not start\n{child.tail()}")
            await asyncio.sleep(0.1)  # polling its port
        yield port, directory
    finally:
        await child.stop(grace=5)


# --- the load -------------------------------------------------------------------------------


def sale(target: Target, seq: int, now: float) -> workload.Message:
    """A sales event of ``target``'s type for its shop, carrying what the receiver needs."""
    entity = {
        "id": seq,
        "uuid": str(uuid.uuid4()),
        "phase": target.phase,
        "seq": seq,
        "produced_at": now,
        "number": f"T{seq:08d}",
        "final_amount": 23.4,
        "currency": "EUR",
        "lines": [
            {"item_id": 101, "name": "Espresso", "quantity": 2, "unit_price": 1.8},
            {"item_id": 303, "name": "Club sandwich", "quantity": 1, "unit_price": 17.6},
        ],
    }
    event = {
        "event_id": str(uuid.uuid4()),
        "entity_name": "sales",
        "event_type": target.event_type,
        "environment_id": target.shop,
        "client_id": CLIENT_ID,
        "from_user": "cashier@example.com",
        "time": workload.iso_millis(now),
        "entity": entity,
        "import_id": None,
        "import_end": False,
    }
    return target.shop.encode(), orjson.dumps(event)


async def produce(
    load: Load, kafka: AIOKafkaProducer, topic: str, *, rate: float, until: float
) -> None:
    """Sales events at ``rate``/s, round robin over the live webhooks, until ``until``
    (loop time); in 10 s chunks on a fixed schedule (``workload.produce_paced``)."""
    loop = asyncio.get_running_loop()

    def make(n: int, now: float) -> workload.Message:
        seq = load.seq
        load.seq += 1
        target = load.live[seq % len(load.live)]
        load.produced[target.phase] += 1
        load.per_second[int(now)] += 1
        return sale(target, seq, now)

    while (left := until - loop.time()) > 0.05:
        await workload.produce_paced(kafka, topic, make, rate=rate, seconds=min(10.0, left))


async def imports(
    load: Load, kafka: AIOKafkaProducer, topic: str, opts: Options, *, until: float
) -> None:
    """An import of ``--import-items`` items every ``--import-every`` seconds, the first
    a quarter of that after the start."""
    loop = asyncio.get_running_loop()
    at = loop.time() + opts.import_every_s / 4
    n = 0
    while at < until:
        await asyncio.sleep(max(0.0, at - loop.time()))  # the import schedule
        phase = f"import-{n}"
        import_id = f"soak-import-{n}-{uuid.uuid4().hex[:6]}"
        make = workload.import_item(import_id, opts.import_items, phase=phase)
        started = time.time()
        seconds = await workload.produce_bulk(kafka, topic, make, opts.import_items)
        load.imports.append({"phase": phase, "at": started, "produce_s": round(seconds, 2)})
        n += 1
        at += opts.import_every_s


async def churn(
    load: Load, session: aiohttp.ClientSession, api: str, receiver: Receiver, opts: Options,
    *, until: float,
) -> None:  # fmt: skip
    """Creates and deletes through the HTTP API, ``--changes-per-minute`` of each,
    alternating. A create makes a new shop (token in the database, as ``dispatcher token
    issue`` would) with a healthy sales/CLOSED webhook; a delete removes a volatile one."""
    loop = asyncio.get_running_loop()
    rng = random.Random(opts.seed + 1)  # noqa: S311 - a reproducible draw, not a secret
    step = 60.0 / (2 * opts.changes_per_minute)
    at, n = loop.time() + step, 0
    while at < until:
        await asyncio.sleep(max(0.0, at - loop.time()))  # the churn schedule
        started = time.time()
        if n % 2 == 0:
            shop = f"soak-new-{n // 2:05d}"
            load.tokens.update(await issue_tokens(load.database_url, [shop]))
            token = load.tokens[shop]
            port = receiver.ports[n % len(receiver.ports)]
            body = {
                "url": receiver.url(f"{shop}/CLOSED", port=port),
                "entity_name": "sales",
                "event_type": "CLOSED",
                "email": f"ops@{shop}.example.com",
            }
            status, answer = await _call(session, "POST", f"{api}/webhooks", token, body)
            if status == 201:
                load.live.append(Target(shop, "CLOSED", "ok", False, str(answer["id"])))
            load.changes.append({"op": "create", "at": started, "status": status})
        else:
            volatile = [t for t in load.live if not t.stable]
            if volatile:
                target = rng.choice(volatile)
                token = load.tokens[target.shop]
                url = f"{api}/webhooks/{target.webhook_id}"
                status, _ = await _call(session, "DELETE", url, token, None)
                if status == 204:
                    load.live.remove(target)
                load.changes.append({"op": "delete", "at": started, "status": status})
        n += 1
        at += step


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, token: str, body: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, url, json=body, headers=headers) as response:
        text = await response.read()
        return response.status, (orjson.loads(text) if text else None)


# --- what is measured during the run -------------------------------------------------------


async def sample(
    load: Load, running: Dispatcher, session: aiohttp.ClientSession, kafka: KafkaLag,
    *, until: float,
) -> None:  # fmt: skip
    """Every SAMPLE_SECONDS: RSS, FDs, the lag metric per consumer, Kafka's committed lag."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        with contextlib.suppress(aiohttp.ClientError, KafkaError, OSError, TimeoutError):
            load.samples.append(await one_sample(running, session, kafka))
        await asyncio.sleep(SAMPLE_SECONDS)  # the sampling timer


async def one_sample(
    running: Dispatcher, session: aiohttp.ClientSession, kafka: KafkaLag
) -> dict[str, Any]:
    """RSS, open FDs, ``webhook_consumer_lag`` summed per consumer, and Kafka's lags."""
    memory = procstat.memory_kib(running.pid)
    try:
        fds: int | None = len(os.listdir(f"/proc/{running.pid}/fd"))
    except OSError:
        fds = None
    async with session.get(f"http://127.0.0.1:{running.http_port}/metrics") as response:
        text = await response.text()
    metric: Counter[str] = Counter()
    for labels, value in re.findall(r"^webhook_consumer_lag\{(.*)\} (\S+)$", text, re.M):
        consumer = dict(re.findall(r'(\w+)="([^"]*)"', labels))["consumer"]
        metric[consumer] += int(float(value))
    return {
        "at": time.time(),
        "rss_mb": round(memory.get("VmRSS", 0) / 1024, 1),
        "fds": fds,
        "lag_metric": dict(metric),
        "lag_kafka": await kafka.lags(),
    }


class KafkaLag:
    """Committed lag as Kafka holds it: end offsets minus each group's committed offsets."""

    def __init__(self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer) -> None:
        self._admin = admin
        self._consumer = consumer
        self.groups: dict[str, list[TopicPartition]] = {}  # name -> its partitions
        self._group_ids: dict[str, str] = {}  # name -> consumer group

    def watch(self, name: str, group: str, topic: str, partitions: int) -> None:
        self.groups[name] = [TopicPartition(topic, p) for p in range(partitions)]
        self._group_ids[name] = group

    async def lags(self) -> dict[str, int]:
        tps = [tp for parts in self.groups.values() for tp in parts]
        ends = await self._consumer.end_offsets(tps)
        out = {}
        for name, parts in self.groups.items():
            committed = await self._admin.list_consumer_group_offsets(self._group_ids[name])
            out[name] = sum(
                ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in parts
            )
        return out


async def watch_mails(load: Load, maildir: mails.MailDir, *, until: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        load.mails += maildir.scan()
        await asyncio.sleep(1.0)  # the sink's directory is read this often


# --- the run --------------------------------------------------------------------------------


async def soak(opts: Options, work: Path, results: dict[str, Any]) -> None:
    tag = f"soak-{uuid.uuid4().hex[:10]}"
    results["meta"]["tag"] = tag
    async with contextlib.AsyncExitStack() as stack:
        tls = infra.make_tls(work)
        database_url = await stack.enter_async_context(
            infra.fresh_database(opts.database_url, tag.replace("-", "_"))
        )
        topics = await stack.enter_async_context(
            infra.fresh_topics(opts.kafka, tag, opts.partitions)
        )
        sampler = await stack.enter_async_context(procstat.Sampler(interval=0.5))
        receiver = await stack.enter_async_context(infra.run_receiver(tls, work, ports=opts.ports))
        smtp_port, mail_dir = await stack.enter_async_context(smtp_sink(work))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        kafka = workload.producer(opts.kafka, linger_ms=5)
        await kafka.start()
        stack.push_async_callback(kafka.stop)
        admin = AIOKafkaAdminClient(bootstrap_servers=opts.kafka)
        await admin.start()
        stack.push_async_callback(admin.close)
        ends = AIOKafkaConsumer(bootstrap_servers=opts.kafka)
        await ends.start()
        stack.push_async_callback(ends.stop)
        await _migrate(work, database_url)

        planned, urls = plan(opts, receiver)
        targets = await subscribe(database_url, planned, urls)
        await workload.insert_webhooks(
            database_url, [workload.IMPORT_SHOP], entity_name="items", event_type="CREATED",
            url_of=lambda _shop: receiver.url("import", port=receiver.ports[0]),
        )  # fmt: skip
        volatile_shops = sorted({t.shop for t in targets if not t.stable})
        tokens = await issue_tokens(database_url, volatile_shops)
        load = Load(database_url, list(targets), tokens)
        kinds = Counter(t.kind for t in targets)
        results["meta"]["webhooks"] = {
            **kinds,
            "volatile": len(targets) - sum(t.stable for t in targets),
        }
        print(f"soak {tag}: {len(targets)} webhooks ({dict(kinds)}), {opts.ports} ports",
              file=sys.stderr)  # fmt: skip

        port = infra.free_port()
        settings = {
            "DISPATCHER_KAFKA_BOOTSTRAP": opts.kafka,
            "DISPATCHER_DATABASE_URL": database_url,
            "DISPATCHER_HTTP_PORT": str(port),
            "DISPATCHER_EVENT_TOPICS": topics.events,
            "DISPATCHER_CONSUMER_GROUP": topics.group,
            "DISPATCHER_RETRY_TOPIC": topics.retries,
            "DISPATCHER_NOTICE_TOPIC": topics.notices,
            "DISPATCHER_DEAD_LETTER_TOPIC": topics.dead_letters,
            "DISPATCHER_ATTEMPT_TOPIC": topics.attempts,
            "DISPATCHER_ALLOW_PRIVATE_TARGETS": "127.0.0.0/8",
            "DISPATCHER_TLS_CA_FILE": tls.ca_file,
            "DISPATCHER_SMTP_HOST": "127.0.0.1",
            "DISPATCHER_SMTP_PORT": str(smtp_port),
            "DISPATCHER_RETRY_DELAY_SECONDS": str(opts.retry_delay_s),
            "DISPATCHER_LOG_LEVEL": "warning",
            # drain and hand-off fit the 30 s the benchmark's processes get to stop
            "DISPATCHER_DRAIN_TIMEOUT_SECONDS": "10",
            "DISPATCHER_LOG_FORMAT": "json",
        }
        results["meta"]["dispatcher_settings"] = settings
        lag = KafkaLag(admin, ends)
        lag.watch("dispatch", topics.group, topics.events, opts.partitions)
        lag.watch("notices", f"{topics.group}-notices", topics.notices, opts.partitions)
        async with infra.run_dispatcher(
            settings, http_port=port, log_path=work / "dispatcher.log", session=session,
            ready_timeout=READY_TIMEOUT, sampler=sampler,
        ) as running:  # fmt: skip
            log_path = running.child.log_path
            await run_load(opts, load, running, receiver, session, kafka, topics, lag, mail_dir)
            results["periods"], results["summary"] = await measure(
                opts, load, receiver, sampler, log_path
            )
            results["samples"] = load.samples
        results["summary"]["dispatcher_exit"] = running.child.process.returncode


async def run_load(
    opts: Options, load: Load, running: Dispatcher, receiver: Receiver,
    session: aiohttp.ClientSession, kafka: AIOKafkaProducer, topics: infra.Topics,
    lag: KafkaLag, mail_dir: Path,
) -> None:  # fmt: skip
    """The load for ``--minutes``, then until the healthy backlog arrived (bounded) and
    every failed attempt seen was mailed."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    load_until = start + opts.minutes * 60
    watch_until = load_until + DRAIN_TIMEOUT
    api = f"http://127.0.0.1:{running.http_port}"
    maildir = mails.MailDir(mail_dir, marker="")
    load.samples.append({"started_at": time.time()})
    async with asyncio.TaskGroup() as group:
        watchers = [
            group.create_task(sample(load, running, session, lag, until=watch_until)),
            group.create_task(watch_mails(load, maildir, until=watch_until)),
        ]
        await asyncio.gather(
            produce(load, kafka, topics.events, rate=opts.rate, until=load_until),
            imports(load, kafka, topics.events, opts, until=load_until),
            churn(load, session, api, receiver, opts, until=load_until),
            progress(load, receiver, start, load_until),
        )
        load.samples.append({"load_stopped_at": time.time()})
        await drained(load, receiver, running, until=watch_until)
        for task in watchers:
            task.cancel()
    load.mails += maildir.scan()


async def progress(load: Load, receiver: Receiver, start: float, until: float) -> None:
    """A line on stderr every minute."""
    loop = asyncio.get_running_loop()
    while loop.time() < until - 1:
        await asyncio.sleep(min(60.0, until - loop.time()))  # the progress timer
        counts = await receiver.counts()
        healthy = counts.get("healthy", (0, 0))[0]
        minutes = (loop.time() - start) / 60
        print(
            f"[{minutes:4.1f} min] produced {load.seq:,}, healthy delivered {healthy:,}, "
            f"failed attempts {counts.get('fail', (0, 0))[0]:,}, mails {len(load.mails):,}",
            file=sys.stderr,
            flush=True,
        )


async def drained(load: Load, receiver: Receiver, running: Dispatcher, *, until: float) -> None:
    """Wait until every healthy event arrived and each failed attempt seen was mailed."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        counts = await receiver.counts()
        stats = (await receiver.stats()).get("healthy", {})
        healthy_done = stats.get("distinct_seq", 0) >= load.produced["healthy"]
        mailed = len(load.mails) >= counts.get("fail", (0, 0))[0]
        if healthy_done and mailed:
            return
        if not running.child.alive():
            raise BenchError(f"the dispatcher exited\n{running.child.tail()}")
        await asyncio.sleep(1.0)  # polling the receiver


async def _migrate(work: Path, database_url: str) -> None:
    argv = infra.dispatcher_argv("migrate")
    env = infra.dispatcher_env({"DISPATCHER_DATABASE_URL": database_url})
    child = await infra.spawn("migrate", argv, log_path=work / "migrate.log", env=env)
    code = await asyncio.wait_for(child.process.wait(), 60)
    await child.stop()
    if code != 0:
        raise BenchError(f"dispatcher migrate failed ({code})\n{child.tail()}")


# --- the figures ----------------------------------------------------------------------------


async def measure(
    opts: Options, load: Load, receiver: Receiver, sampler: procstat.Sampler, log_path: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per period and overall figures from what the receiver, the sink, the samples and
    the dispatcher's log recorded."""
    stats = await receiver.stats()
    healthy = await receiver.samples("healthy")
    failed = [a for a, _ in await receiver.samples("fail")]
    start = next(s["started_at"] for s in load.samples if "started_at" in s)
    stopped = next(s["load_stopped_at"] for s in load.samples if "load_stopped_at" in s)
    samples = [s for s in load.samples if "rss_mb" in s]
    period = opts.period_minutes * 60
    count = max(1, math.ceil((stopped - start - 1.0) / period))  # no stub of a period
    periods = []
    for p in range(count):
        t0, t1 = start + p * period, min(start + (p + 1) * period, stopped)
        span = t1 - t0
        lat = latency_summary([lat for at, lat in healthy if t0 <= at < t1]) or {}
        delays = sorted(
            m.arrived - m.failed_at for m in load.mails if t0 <= m.arrived < t1 and m.failed_at
        )
        window = [s for s in samples if t0 <= s["at"] < t1 + SAMPLE_SECONDS / 2]
        cores = sampler.window(t0, t1).cores()
        imports = [i for i in load.imports if t0 <= i["at"] < t1]
        periods.append(
            {
                "from_min": round((t0 - start) / 60, 2),
                "to_min": round((t1 - start) / 60, 2),
                "healthy_per_s": _rate(sum(t0 <= a < t1 for a, _ in healthy), span),
                "produced_per_s": _rate(
                    sum(n for second, n in load.per_second.items() if t0 <= second < t1), span
                ),
                "p50_ms": lat.get("p50"),
                "p99_ms": lat.get("p99"),
                "max_ms": lat.get("max"),
                "failed_per_s": _rate(sum(t0 <= a < t1 for a in failed), span),
                "mails_per_s": _rate(sum(t0 <= m.arrived < t1 for m in load.mails), span),
                "mail_delay_p50_s": _pct(delays, 50),
                "mail_delay_p99_s": _pct(delays, 99),
                "mail_delay_max_s": delays[-1] if delays else None,
                "imports": len(imports),
                "import_requests": sum(
                    stats.get(i["phase"], {}).get("requests", 0) for i in imports
                ),
                "creates": sum(c["op"] == "create" and t0 <= c["at"] < t1 for c in load.changes),
                "deletes": sum(c["op"] == "delete" and t0 <= c["at"] < t1 for c in load.changes),
                "rss_mb": window[-1]["rss_mb"] if window else None,
                "fds_min_max": [min(s["fds"] for s in window), max(s["fds"] for s in window)]
                if window and all(s["fds"] is not None for s in window)
                else None,
                "lag_dispatch_max": _max(window, "lag_kafka", "dispatch"),
                "lag_dispatch_metric_max": _max(window, "lag_metric", "dispatch"),
                "lag_notices_max": _max(window, "lag_kafka", "notices"),
                "lag_notices_metric_max": _max(window, "lag_metric", "notices"),
                "dispatcher_cores": cores.get("dispatcher"),
                "other_cores": cores.get("other"),
            }
        )
    return periods, summary(opts, load, stats, log_path, samples)


def summary(
    opts: Options, load: Load, stats: dict[str, Any], log_path: Path,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """Deliveries against expectations over the whole run, and the dispatcher's log."""
    healthy, fail = stats.get("healthy", {}), stats.get("fail", {})
    lines: Counter[str] = Counter()
    for raw in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            line = orjson.loads(raw)
            if isinstance(line, dict) and line.get("level") == "error":
                lines[str(line.get("event"))] += 1
    imports = [stats.get(i["phase"], {}) for i in load.imports]
    batches = math.ceil(opts.import_items / 80)
    notice_ids = Counter(i for m in load.mails for i in m.notice_ids)
    matched = [
        (s["lag_metric"].get(name, 0), s["lag_kafka"].get(name, 0))
        for s in samples
        for name in ("dispatch", "notices")
    ]
    return {
        "minutes": opts.minutes,
        "events_produced": load.seq,
        "produced_by_phase": dict(load.produced),
        "healthy_expected": load.produced["healthy"],
        "healthy_distinct": healthy.get("distinct_seq", 0),
        "healthy_requests": healthy.get("requests", 0),
        "healthy_duplicates": healthy.get("requests", 0) - healthy.get("distinct_seq", 0),
        "healthy_latency_ms": healthy.get("latency_ms"),
        "failing_events": fail.get("distinct_seq", 0),
        "failed_attempts": fail.get("requests", 0),
        "mails": len(load.mails),
        "mails_duplicate_notices": sum(n - 1 for n in notice_ids.values() if n > 1),
        "slow_deliveries": stats.get("slow", {}).get("requests", 0),
        "imports": len(load.imports),
        "import_requests_expected": len(load.imports) * batches,
        "import_requests": sum(i.get("requests", 0) for i in imports),
        "import_entities": sum(i.get("entities", 0) for i in imports),
        "creates_ok": sum(c["op"] == "create" and c["status"] == 201 for c in load.changes),
        "deletes_ok": sum(c["op"] == "delete" and c["status"] == 204 for c in load.changes),
        "changes_failed": sum(c["status"] not in (201, 204) for c in load.changes),
        "rss_mb_first_last": [samples[0]["rss_mb"], samples[-1]["rss_mb"]] if samples else None,
        "error_lines": dict(lines),
        "lag_samples_metric_vs_kafka": len(matched),
        "lag_metric_below_kafka_by_over_1000": sum(m < k - 1000 for m, k in matched),
    }


def _rate(count: float, span: float) -> float | None:
    return round(count / span, 1) if span > 0 else None


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1], 2)


def _max(samples: list[dict[str, Any]], key: str, name: str) -> int | None:
    values = [s[key].get(name) for s in samples if s[key].get(name) is not None]
    return max(values) if values else None


COLUMNS = (  # (heading, key or keys joined by /)
    ("minutes", ("from_min", "to_min")),
    ("events/s", ("produced_per_s",)),
    ("healthy/s", ("healthy_per_s",)),
    ("p50 / p99 ms", ("p50_ms", "p99_ms")),
    ("failed/s", ("failed_per_s",)),
    ("mails/s", ("mails_per_s",)),
    ("mail delay p50 / p99 / max s", ("mail_delay_p50_s", "mail_delay_p99_s", "mail_delay_max_s")),
    ("imports (requests)", ("imports", "import_requests")),
    ("creates / deletes", ("creates", "deletes")),
    ("RSS MB", ("rss_mb",)),
    ("FDs", ("fds_min_max",)),
    ("dispatch lag max: Kafka / metric", ("lag_dispatch_max", "lag_dispatch_metric_max")),
    ("notice lag max: Kafka / metric", ("lag_notices_max", "lag_notices_metric_max")),
    ("cores: dispatcher / other", ("dispatcher_cores", "other_cores")),
)


def table(periods: list[dict[str, Any]]) -> str:
    """One line per period."""

    def cell(period: dict[str, Any], keys: tuple[str, ...]) -> str:
        if keys == ("imports", "import_requests"):
            return f"{period['imports']} ({period['import_requests']})"
        if keys == ("from_min", "to_min"):
            return f"{period['from_min']:g}-{period['to_min']:g}"
        values = [period[k] for k in keys]
        return " / ".join(_fmt(v) for v in values)

    rows = [[h for h, _ in COLUMNS]] + [[cell(p, k) for _, k in COLUMNS] for p in periods]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summary_text(s: dict[str, Any]) -> str:
    lat = s["healthy_latency_ms"] or {}
    return "\n".join(
        [
            f"events produced: {s['events_produced']:,} ({s['produced_by_phase']})",
            f"healthy: {s['healthy_distinct']:,} of {s['healthy_expected']:,} delivered, "
            f"{s['healthy_duplicates']} duplicates; p50 {lat.get('p50')} ms, "
            f"p99 {lat.get('p99')} ms, max {lat.get('max')} ms",
            f"failing: {s['failing_events']:,} events, {s['failed_attempts']:,} failed "
            f"attempts, {s['mails']:,} mails ({s['mails_duplicate_notices']} duplicate notices)",
            f"slow webhooks: {s['slow_deliveries']:,} deliveries",
            f"imports: {s['imports']}, {s['import_requests']} requests "
            f"(expected {s['import_requests_expected']}), {s['import_entities']:,} entities",
            f"API: {s['creates_ok']} creates, {s['deletes_ok']} deletes, "
            f"{s['changes_failed']} failed",
            f"RSS first/last sample MB: {s['rss_mb_first_last']}; error lines: "
            f"{s['error_lines'] or 'none'}",
            f"lag samples where the metric read over 1,000 below Kafka's committed lag: "
            f"{s['lag_metric_below_kafka_by_over_1000']} of {s['lag_samples_metric_vs_kafka']}",
        ]
    )


# --- command line ---------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.splitlines()[0])
    default_minutes = float(os.environ.get("SOAK_MINUTES") or 10)
    p.add_argument(
        "--minutes",
        type=float,
        default=default_minutes,
        help="length of the load (SOAK_MINUTES, default 10)",
    )
    p.add_argument(
        "--period",
        type=float,
        default=5.0,
        dest="period_minutes",
        help="minutes per line of the table (5)",
    )
    p.add_argument("--shops", type=int, default=500, help="shops, two sales webhooks each")
    p.add_argument("--ports", type=int, default=10, help="receiver ports (endpoints)")
    p.add_argument("--rate", type=float, default=300.0, help="sales events per second")
    p.add_argument(
        "--import-every",
        type=float,
        default=120.0,
        dest="import_every_s",
        help="seconds between two imports",
    )
    p.add_argument("--import-items", type=int, default=2_000, help="items of each import")
    p.add_argument("--failing", type=float, default=0.05, help="share of webhooks answering 500")
    p.add_argument("--slow", type=float, default=0.01, help="share answering after --slow-ms")
    p.add_argument("--slow-ms", type=int, default=3_000, help="answer time of the slow ones")
    p.add_argument(
        "--changes-per-minute",
        type=float,
        default=5.0,
        help="webhook creates per minute, and as many deletes",
    )
    p.add_argument(
        "--retry-delay",
        type=float,
        default=30.0,
        dest="retry_delay_s",
        help="DISPATCHER_RETRY_DELAY_SECONDS of the dispatcher",
    )
    p.add_argument("--partitions", type=int, default=4, help="partitions of each topic")
    p.add_argument("--kafka", default=DEFAULT_KAFKA)
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="admin URL of PostgreSQL")
    p.add_argument("--results-dir", default="bench-results")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, mails)")
    a = p.parse_args(argv)  # fmt: skip
    return Options(
        minutes=a.minutes, period_minutes=a.period_minutes, shops=a.shops, ports=a.ports,
        rate=a.rate, import_every_s=a.import_every_s, import_items=a.import_items,
        failing=a.failing, slow=a.slow, slow_ms=a.slow_ms,
        changes_per_minute=a.changes_per_minute, retry_delay_s=a.retry_delay_s,
        partitions=a.partitions, kafka=a.kafka, database_url=a.database_url,
        results_dir=a.results_dir, keep=a.keep,
    )  # fmt: skip


async def _main(opts: Options, work: Path, results: dict[str, Any]) -> None:
    """:func:`soak` under a hard deadline; SIGTERM cancels it (and cleans up)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with asyncio.timeout(opts.minutes * 60 + DRAIN_TIMEOUT + 300):
        await soak(opts, work, results)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="dispatcher-soak-"))
    results: dict[str, Any] = {"meta": {"options": asdict(opts), "started_at": time.time()}}
    results["meta"]["machine"] = report.machine()
    results["meta"]["git"] = report.git_state(infra.ROOT)
    try:
        asyncio.run(_main(opts, work, results))
    except (Exception, KeyboardInterrupt, asyncio.CancelledError) as exc:
        results["meta"]["error"] = _reason(exc)
        traceback.print_exception(exc, file=sys.stderr)
        path = report.write_json(infra.ROOT / opts.results_dir / "soak", results)
        print(f"soak: failed: {results['meta']['error']}\nlogs kept in {work}", file=sys.stderr)
        print(f"partial results: {path}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError) else 1
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results["periods"]))
    print()
    print(summary_text(results["summary"]))
    path = report.write_json(infra.ROOT / opts.results_dir / "soak", results)
    print(f"\nresults: {path}")
    return 0


def _reason(exc: BaseException) -> str:
    """One line per error (the errors of a task group each)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    if isinstance(exc, BenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
