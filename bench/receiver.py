"""The benchmark's webhook endpoint: an HTTPS server answering 200 at once.

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
import collections
import contextlib
import math
import os
import signal
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
import uvloop

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
    """What arrived, and the answers of the routes."""

    def __init__(self) -> None:
        self.phases: dict[str, Phase] = {}

    def hook(self, tail: str, body: bytes) -> tuple[float, int]:
        """Record one POST /hook/<tail>: (seconds to wait before answering, status)."""
        arrival = time.time()
        phase, entities = _parse(body)
        record = self.phases.get(phase)
        if record is None:
            record = self.phases[phase] = Phase()
        record.add(arrival, len(body), entities)
        delay = 0.0
        if tail.startswith(SLEEP):  # a slow handler: /hook/sleep-<ms>/..., recorded at once
            delay = int(tail[len(SLEEP) :].partition("/")[0]) / 1000
        return delay, (500 if tail.startswith(FAIL) else 200)

    def get(self, path: str, query: dict[str, list[str]]) -> bytes | None:
        """The JSON of GET /count, /stats or /samples?phase=P; None for another path."""
        if path == "/count":
            return orjson.dumps({n: [p.requests, p.entities] for n, p in self.phases.items()})
        if path == "/stats":
            return orjson.dumps({name: p.summary() for name, p in self.phases.items()})
        if path == "/samples":  # [[arrival, latency_s], ...] of one phase, for diagnosis
            phase = self.phases.get(query.get("phase", [""])[0])
            pairs = list(zip(phase.arrivals, phase.latencies, strict=True)) if phase else []
            return orjson.dumps(pairs)
        return None


def _parse(body: bytes) -> tuple[str, list[Any]]:
    """(phase, entities) of a notification body; ('unknown', []) if it is not one."""
    try:
        data = orjson.loads(body)
        entities = data["entities"]
        phase = entities[0].get("phase", UNKNOWN)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return UNKNOWN, []
    return (phase if isinstance(phase, str) else UNKNOWN), entities


_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 500: b"Server Error"}
_FAILED = b"upstream database unavailable"


class Server(asyncio.Protocol):
    """One HTTP/1.1 connection: requests parsed by httptools, answered in order.

    A plain protocol rather than aiohttp's server: the receiver shares the machine with
    the dispatcher and the ceiling client it measures, and this costs about a third of
    the CPU per request, so that more of the machine goes to what is measured.
    """

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._keep_alive = True
        # answers not yet written, in request order (None: a slow one, not ready yet)
        self._queue: collections.deque[list[bytes | None]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1")
        method = self._parser.get_method()
        if method == b"POST" and path.startswith("/hook/"):
            delay, status = self._recorder.hook(path[len("/hook/") :], b"".join(self._body))
            answer = _answer(status, _FAILED if status == 500 else b"", "text/plain")
            if delay > 0 or self._queue:
                slot: list[bytes | None] = [None]
                self._queue.append(slot)
                asyncio.get_running_loop().call_later(delay, self._ready, slot, answer)
                return
            self._write(answer)
            return
        if method == b"GET":
            query = urllib.parse.parse_qs((url.query or b"").decode("latin-1"))
            body = self._recorder.get(path, query)
            if body is not None:
                self._write(_answer(200, body, "application/json"))
                return
            self._write(_answer(404, b"", "text/plain"))
            return
        self._write(_answer(405, b"", "text/plain"))

    def _ready(self, slot: list[bytes | None], answer: bytes) -> None:
        """A delayed answer: written once every answer before it is (HTTP/1.1 order)."""
        slot[0] = answer
        while self._queue and self._queue[0][0] is not None:
            ready = self._queue.popleft()[0]
            assert ready is not None
            self._write(ready)

    def _write(self, answer: bytes) -> None:
        if self._transport is None:
            return
        self._transport.write(answer)
        if not self._keep_alive:
            self._transport.close()


def _answer(status: int, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status].decode()}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


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
    recorder = Recorder()
    servers: list[asyncio.Server] = []
    watcher = asyncio.create_task(_watch_parent(os.getppid(), stop))
    try:
        context = tls_context(cert_file)
        for n in range(ports):
            at = port + n if port else 0
            server = await loop.create_server(
                lambda: Server(recorder), host, at, ssl=context, backlog=1024
            )
            servers.append(server)
        bound = [server.sockets[0].getsockname()[1] for server in servers]
        print(orjson.dumps({"port": bound[0], "ports": bound}).decode(), flush=True)
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        for server in servers:
            server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cert", required=True, help="PEM file: private key + cert chain")
    parser.add_argument("--ports", type=int, default=1, help="listen on this many ports")
    args = parser.parse_args(argv)
    # on uvloop, like the dispatcher and the ceiling client: the receiver shares the
    # machine with what it measures, so the less CPU it takes the more they get
    uvloop.run(serve(args.host, args.port, args.cert, ports=args.ports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
