"""Run the dispatcher with its garbage-collector pauses and event-loop lag recorded.

``python -m bench.gctrace OUT.json run`` is ``dispatcher run`` plus two observers that
touch no dispatcher code: a ``gc.callbacks`` hook timing every collection, and an event
loop (through the loop policy) running a 10 ms timer that notes how late it fires. At
exit, ``OUT.json`` holds every generation-1/2 collection (wall time, duration, objects
collected), the count and total time of generation-0 ones, and every lag above 20 ms.
``bench/run.py --gc-trace`` uses it to tell GC pauses from CPU starvation.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

import orjson

TICK = 0.010  # seconds between two lag probes
LAG_NOTED = 0.020  # lags above this are recorded


class Tracer:
    """Collects GC pauses and loop lags in memory; :meth:`write` dumps them."""

    def __init__(self) -> None:
        self.collections: list[tuple[float, int, float, int]] = []  # time, gen, ms, collected
        self.young = [0, 0.0]  # generation-0 collections: count, total ms
        self.lags: list[tuple[float, float]] = []  # time, ms
        self._started = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = (time.perf_counter() - self._started) * 1000
        if info["generation"] == 0:
            self.young[0] += 1
            self.young[1] += took
        else:
            self.collections.append(
                (time.time(), info["generation"], round(took, 2), info["collected"])
            )

    def probe(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """The lag probe: note how late it runs, then schedule itself again."""
        now = loop.time()
        if now - due > LAG_NOTED:
            self.lags.append((time.time(), round((now - due) * 1000, 2)))
        loop.call_at(now + TICK, self.probe, loop, now + TICK)

    def write(self, path: str) -> None:
        data = {
            "collections": self.collections,
            "young": {"count": self.young[0], "total_ms": round(self.young[1], 1)},
            "lags": self.lags,
        }
        Path(path).write_bytes(orjson.dumps(data))


def summary(trace: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """GC pauses and loop lags of a trace between two ``time.time()`` moments."""
    inside = [c for c in trace["collections"] if start <= c[0] <= end]
    gen2 = [c[2] for c in inside if c[1] == 2]
    gen1 = [c[2] for c in inside if c[1] == 1]
    lags = [lag for moment, lag in trace["lags"] if start <= moment <= end]
    return {
        "gen2_collections": len(gen2),
        "gen2_max_ms": max(gen2, default=0.0),
        "gen2_total_ms": round(sum(gen2), 1),
        "gen1_collections": len(gen1),
        "gen1_max_ms": max(gen1, default=0.0),
        "loop_lags_over_20ms": len(lags),
        "loop_lag_max_ms": max(lags, default=0.0),
    }


def load(path: Path) -> dict[str, Any] | None:
    """A trace written by :meth:`Tracer.write`, or None if there is none."""
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data


class _Policy(asyncio.DefaultEventLoopPolicy):
    """Every new event loop starts with the tracer's lag probe."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self._tracer = tracer

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.call_soon(self._tracer.probe, loop, loop.time())
        return loop


def main(argv: list[str]) -> int:
    """``OUT.json`` then the dispatcher's own arguments."""
    if len(argv) < 2:
        print("usage: python -m bench.gctrace OUT.json run [--role ...]", file=sys.stderr)
        return 2
    tracer = Tracer()
    gc.callbacks.append(tracer.on_gc)
    asyncio.set_event_loop_policy(_Policy(tracer))
    from dispatcher.cli import main as dispatcher_main

    try:
        return dispatcher_main(argv[1:])
    finally:
        tracer.write(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
