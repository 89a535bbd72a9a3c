"""What the endpoint gate costs per attempt, apart from everything else (docs/benchmarks.md).

Run: ``.venv/bin/python -m bench.gate_cost``. Prints the best of 15 rounds, each of 50,000
attempts of 10,000 webhooks at one endpoint, 128 under way: ``EndpointGate.enter`` plus
``leave`` (the loop's own cost subtracted), and, for comparison, what the gate replaced
(an ``asyncio.Semaphore`` of the endpoint and its duration bookkeeping).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from typing import Any

from dispatcher.endpoint_gate import EndpointGate, Limits

ATTEMPTS = 50_000
ROUNDS = 15
IN_FLIGHT = 128
KEYS = [uuid.uuid4().int for _ in range(10_000)]  # webhook ids, as Attempts keys them


def _loop_only() -> float:
    live: deque[Any] = deque()
    start = time.perf_counter()
    for i in range(ATTEMPTS):
        live.append((KEYS[i % len(KEYS)], time.monotonic()))
        if len(live) >= IN_FLIGHT:
            live.popleft()
            time.monotonic()
    return (time.perf_counter() - start) / ATTEMPTS


def _gate() -> float:
    gate = EndpointGate(Limits(2, 256, 0.25), lambda _ticket: None)
    live: deque[Any] = deque()
    start = time.perf_counter()
    for i in range(ATTEMPTS):
        live.append(gate.enter(KEYS[i % len(KEYS)], time.monotonic()))
        if len(live) >= IN_FLIGHT:
            gate.leave(live.popleft(), time.monotonic(), took=0.004)
    return (time.perf_counter() - start) / ATTEMPTS


async def _semaphore() -> float:
    semaphore = asyncio.Semaphore(256)
    starts: list[float] = []
    typical = 0.0
    start = time.perf_counter()
    for _ in range(ATTEMPTS):
        async with semaphore:
            began = time.monotonic()
            starts.append(began)
            starts.remove(began)
            typical += 0.2 * ((time.monotonic() - began) - typical)
    return (time.perf_counter() - start) / ATTEMPTS


def main() -> None:
    loop_only = min(_loop_only() for _ in range(ROUNDS))
    gate = min(_gate() for _ in range(ROUNDS)) - loop_only
    semaphore = min(asyncio.run(_semaphore()) for _ in range(ROUNDS))
    print(f"gate enter + leave: {gate * 1e6:.2f} us per attempt")
    print(f"semaphore + bookkeeping (before the gate): {semaphore * 1e6:.2f} us per attempt")


if __name__ == "__main__":
    main()
