"""The ceiling: a bare aiohttp client POSTing the same bodies to the same receiver.

Run as its own process (``python -m bench.ceiling ...``) so that it has a core of its
own, like the dispatcher. It keeps ``--concurrency`` requests in flight over one
connection pool (the dispatcher's ``DISPATCHER_MAX_IN_FLIGHT``), sends ``--count``
copies of the body in ``--body`` with headers shaped like the dispatcher's, and prints
one JSON line: requests, errors, seconds, requests/s. Nothing else happens per request
(no Kafka, no signing, no bookkeeping): it is what this machine can do over HTTPS. It runs
on uvloop, like the dispatcher by default (``--loop asyncio`` for the standard loop), so
that the ratio of the two compares the same event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import uvloop

# Same header set as a real delivery (values of the same size, no HMAC computed).
HEADERS = {
    "Content-Type": "application/json",
    "webhook-id": "00000000-0000-5000-8000-000000000000",
    "webhook-timestamp": "1700000000",
    "webhook-signature": "v1," + "A" * 43 + "=",
}


@dataclass
class Tally:
    """Requests handed out and their outcomes."""

    remaining: int
    ok: int = 0
    errors: int = 0


async def _worker(session: aiohttp.ClientSession, url: str, body: bytes, tally: Tally) -> None:
    while tally.remaining > 0:
        tally.remaining -= 1
        try:
            async with session.post(url, data=body, headers=HEADERS) as response:
                await response.read()
                if response.status == 200:
                    tally.ok += 1
                else:
                    tally.errors += 1
        except (aiohttp.ClientError, OSError, TimeoutError):
            tally.errors += 1


async def blast(
    url: str, body: bytes, count: int, concurrency: int, ca_file: str
) -> dict[str, float]:
    """POST ``body`` ``count`` times with ``concurrency`` requests in flight."""
    context = ssl.create_default_context(cafile=ca_file)
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    tally = Tally(remaining=count)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        start = time.perf_counter()
        workers = [_worker(session, url, body, tally) for _ in range(concurrency)]
        await asyncio.gather(*workers)
        seconds = time.perf_counter() - start
    return {
        "requests": tally.ok,
        "errors": tally.errors,
        "seconds": round(seconds, 3),
        "requests_per_s": round(tally.ok / seconds, 1) if seconds > 0 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bare aiohttp client: the HTTPS ceiling.")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="file holding the body to POST")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--ca", required=True, help="CA bundle (PEM) of the receiver")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    body = Path(args.body).read_bytes()
    factory = uvloop.new_event_loop if args.loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(blast(args.url, body, args.count, args.concurrency, args.ca))
    print(orjson.dumps({**result, "loop": args.loop}).decode(), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
