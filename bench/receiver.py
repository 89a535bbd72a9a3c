"""The benchmark's webhook endpoint: an HTTPS aiohttp server answering 200 at once.

Run as its own process (``python -m bench.receiver --cert server.pem``); it prints one
JSON line ``{"port": N, "ports": [N, ...]}`` on stdout once it listens (on ``--ports K``
ports: each a distinct endpoint for the dispatcher), and stops on SIGTERM or SIGINT, or
when its parent process goes away.

For every POST it records the arrival time (``time.time()``) and, from the body's first
entity, the ``phase`` and ``produced_at`` the benchmark put there, then answers (after
``<ms>`` milliseconds for a path ``/hook/sleep-<ms>/...``: a slow handler; 500 for a path
``/hook/fail/...``: a failing one), so that:

- ``GET /count`` answers ``{phase: [requests, entities]}`` (cheap, for polling);
- ``GET /stats`` answers per phase: requests, entities, distinct ``seq`` values, first
  and last arrival, the arrival rate, and latency percentiles of ``arrival - produced_at``;
- ``GET /samples?phase=P`` answers every ``[arrival, latency]`` pair of a phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

UNKNOWN = "unknown"
SLEEP = "sleep-"  # /hook/sleep-<ms>/...: answer after <ms> milliseconds
FAIL = "fail/"  # /hook/fail/...: answer 500
PARENT_POLL_SECONDS = 1.0


@dataclass
class Phase:
    """What arrived for one phase of the benchmark."""

    requests: int = 0
    entities: int = 0
    first: float = math.inf
    last: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, first entity per request
    arrivals: list[float] = field(default_factory=list)  # of the requests with a latency
    seqs: set[int] = field(default_factory=set)
    bytes: int = 0

    def add(self, arrival: float, size: int, entities: list[Any]) -> None:
        self.requests += 1
        self.entities += len(entities)
        self.bytes += size
        self.first = min(self.first, arrival)
        self.last = max(self.last, arrival)
        for entity in entities:
            seq = entity.get("seq") if isinstance(entity, dict) else None
            if isinstance(seq, int):
                self.seqs.add(seq)
        head = entities[0] if entities and isinstance(entities[0], dict) else {}
        produced = head.get("produced_at")
        if isinstance(produced, int | float):
            self.latencies.append(arrival - produced)
            self.arrivals.append(arrival)

    def summary(self) -> dict[str, Any]:
        span = self.last - self.first if self.requests > 1 else 0.0
        return {
            "requests": self.requests,
            "entities": self.entities,
            "distinct_seq": len(self.seqs),
            "first_arrival": self.first if self.requests else None,
            "last_arrival": self.last if self.requests else None,
            "span_s": round(span, 4),
            "requests_per_s": round(self.requests / span, 1) if span > 0 else None,
            "entities_per_s": round(self.entities / span, 1) if span > 0 else None,
            "mean_body_bytes": round(self.bytes / self.requests) if self.requests else 0,
            "latency_ms": latency_summary(self.latencies),
        }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(latencies: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/p99.9/max/mean in milliseconds, or None without samples."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    out = {f"p{q:g}": percentile(ordered, q) for q in (50, 90, 99, 99.9)}
    out["max"] = ordered[-1]
    out["min"] = ordered[0]
    out["mean"] = sum(ordered) / len(ordered)
    return {k: round(v * 1000, 2) for k, v in out.items()}


class Recorder:
    """Request handlers and what they recorded."""

    def __init__(self) -> None:
        self.phases: dict[str, Phase] = {}

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrival = time.time()
        phase, entities = _parse(body)
        record = self.phases.get(phase)
        if record is None:
            record = self.phases[phase] = Phase()
        record.add(arrival, len(body), entities)
        tail = request.match_info["tail"]
        if tail.startswith(SLEEP):  # a slow handler: /hook/sleep-<ms>/..., recorded at once
            await asyncio.sleep(int(tail[len(SLEEP) :].partition("/")[0]) / 1000)
        if tail.startswith(FAIL):
            return web.Response(status=500, text="upstream database unavailable")
        return web.Response(status=200)

    async def count(self, _request: web.Request) -> web.Response:
        counts = {name: [p.requests, p.entities] for name, p in self.phases.items()}
        return web.Response(body=orjson.dumps(counts), content_type="application/json")

    async def samples(self, request: web.Request) -> web.Response:
        """``[[arrival, latency_s], ...]`` of one phase (``?phase=``), for diagnosis."""
        phase = self.phases.get(request.query.get("phase", ""))
        pairs = list(zip(phase.arrivals, phase.latencies, strict=True)) if phase else []
        return web.Response(body=orjson.dumps(pairs), content_type="application/json")

    async def stats(self, _request: web.Request) -> web.Response:
        summary = {name: p.summary() for name, p in self.phases.items()}
        return web.Response(body=orjson.dumps(summary), content_type="application/json")


def _parse(body: bytes) -> tuple[str, list[Any]]:
    """(phase, entities) of a notification body; ('unknown', []) if it is not one."""
    try:
        data = orjson.loads(body)
        entities = data["entities"]
        phase = entities[0].get("phase", UNKNOWN)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return UNKNOWN, []
    return (phase if isinstance(phase, str) else UNKNOWN), entities


def app(recorder: Recorder) -> web.Application:
    application = web.Application(client_max_size=64 * 1024 * 1024)
    application.router.add_post("/hook/{tail:.*}", recorder.hook)
    application.router.add_get("/count", recorder.count)
    application.router.add_get("/stats", recorder.stats)
    application.router.add_get("/samples", recorder.samples)
    return application


def tls_context(cert_file: str) -> ssl.SSLContext:
    """A server context from one PEM file holding the private key and the chain."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file)
    return context


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Set ``stop`` when the parent process is gone (the benchmark was killed)."""
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
            return
        await asyncio.sleep(PARENT_POLL_SECONDS)  # a liveness poll, not coordination


async def serve(host: str, port: int, cert_file: str, *, ports: int = 1) -> None:
    """Serve (on ``ports`` ports from ``port``, or free ones) until SIGTERM/SIGINT or the
    parent's death."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app(Recorder()), access_log=None, shutdown_timeout=1)
    await runner.setup()
    watcher = asyncio.create_task(_watch_parent(os.getppid(), stop))
    try:
        context = tls_context(cert_file)
        for n in range(ports):
            at = port + n if port else 0
            site = web.TCPSite(runner, host, at, ssl_context=context, backlog=1024)
            await site.start()
        bound = [address[1] for address in runner.addresses]
        print(orjson.dumps({"port": bound[0], "ports": bound}).decode(), flush=True)
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cert", required=True, help="PEM file: private key + cert chain")
    parser.add_argument("--ports", type=int, default=1, help="listen on this many ports")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.cert, ports=args.ports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
