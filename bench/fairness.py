"""The fairness scenario: one endpoint serving 50 webhooks, 3 of them answering after 3 s.

Every webhook of the benchmark points at the one receiver, so all 50 share one endpoint
(scheme, host and port). The dispatcher runs with the default per-endpoint limits
(``DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT=8``, min 2, a share of 0.25), and sales are
produced at 100/s on a fixed schedule (``workload.produce_paced``) for 30 s (10 s with
``--quick``), round robin over the 50 shops. The URLs of the 3 slow shops make the
receiver wait 3 s before it answers (``/hook/sleep-3000/<shop>``); it records every arrival
at once. Figures: the latency of the 47 healthy webhooks' deliveries, production to
receipt (target: p99 under 1 s), what reached the slow ones, and the dispatcher's
deferrals by reason (from its ``/metrics``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from bench import workload
from bench.infra import Dispatcher

if TYPE_CHECKING:
    from bench.run import Context

SHOPS = 50
SLOW = 3  # of them
SLOW_MS = 3000  # how long the slow ones' handler takes
RATE = 100.0  # events/s over all the shops
PHASE, SLOW_PHASE = "fairness", "fairness_slow"
TARGET_P99_MS = 1000.0  # the healthy webhooks', production to receipt

Start = Callable[..., AbstractAsyncContextManager[Dispatcher]]  # run.dispatcher
Measure = Callable[..., Awaitable[dict[str, Any]]]  # run.deliveries


async def fairness(ctx: Context, start: Start, measure: Measure) -> dict[str, Any]:
    """Run the scenario; ``start`` and ``measure`` are bench/run.py's ``dispatcher`` and
    ``deliveries``."""
    shops = [f"bench-fair-{ctx.tag[-6:]}-{i:02d}" for i in range(SHOPS)]
    slow = set(shops[:SLOW])

    def url_of(shop: str) -> str:
        return ctx.receiver.url(f"sleep-{SLOW_MS}/{shop}" if shop in slow else shop)

    await workload.insert_webhooks(
        ctx.database_url, shops, entity_name="sales", event_type="CLOSED", url_of=url_of
    )
    make = workload.sales_of(shops, lambda shop: SLOW_PHASE if shop in slow else PHASE)
    env = {
        "DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT": "8",  # the defaults, not the run's 256
        "DISPATCHER_DRAIN_TIMEOUT_SECONDS": "1",  # the slow ones' queue: handed off at once
    }
    seconds = ctx.opts.fairness_seconds
    async with start(ctx, "fairness", env=env) as running:
        paced = await workload.produce_paced(
            ctx.paced, ctx.topics.events, make, rate=RATE, seconds=seconds
        )
        healthy = sum(1 for i in range(paced.sent) if shops[i % SHOPS] not in slow)
        result = await measure(ctx, running, PHASE, requests=healthy)
        result["deferrals"] = await deferrals(ctx, running)
        slow_stats = (await ctx.receiver.stats()).get(SLOW_PHASE) or {}
    result.update(
        webhooks=SHOPS,
        slow_webhooks=SLOW,
        slow_answer_ms=SLOW_MS,
        offered_rate=RATE,
        produced_rate=round(paced.rate, 1),
        seconds=seconds,
        slow_produced=paced.sent - healthy,
        slow_received=slow_stats.get("requests", 0),
    )
    lat = result["latency_ms"] or {}
    ctx.say(f"fairness: healthy p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms")
    return result


async def deferrals(ctx: Context, running: Dispatcher) -> dict[str, float]:
    """``webhook_deferrals_total`` by reason (and all deferred deliveries) from /metrics."""
    url = f"http://127.0.0.1:{running.http_port}/metrics"
    async with ctx.session.get(url) as response:
        text = await response.text()
    pattern = r'^webhook_deferrals_total\{reason="(?P<reason>\w+)"\} (?P<value>\S+)$'
    out = {m["reason"]: float(m["value"]) for m in re.finditer(pattern, text, re.M)}
    total = re.search(r'^webhook_deliveries_total\{outcome="deferred"\} (\S+)$', text, re.M)
    out["all"] = float(total.group(1)) if total else 0.0
    return out
