"""The processes scenario: deliveries/s of ``dispatcher run --processes 1`` and ``2``.

A fresh dispatcher, once ready (with 2, both children have their partitions), gets N sale
events produced in bulk on the run's 4-partition event topic and drains them;
deliveries/s from the first to the last receipt. Run ABBA over ``DISPATCHER_PROCESSES``
1, 2, 2, 1 (``ROUNDS``) in the same run, so that a steady drift of the machine cancels
out. With 2, the supervisor starts two children in the run's consumer group, two
partitions each. Figures: each round's deliveries/s and cores (the supervisor and its
children together), the mean of each setting and their ratio (target: 2 processes at
least 1.3 times one, on 2 cores). ``--only processes`` runs it alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from bench import procstat, report, workload
from bench.infra import Dispatcher

if TYPE_CHECKING:
    from bench.run import Context

ROUNDS = (1, 2, 2, 1)  # DISPATCHER_PROCESSES of each round: ABBA
TARGET_RATIO = 1.3  # 2 processes' deliveries/s over 1 process's (issue 16)
GROUP = "dispatcher processes"  # the sampler's group: the supervisor and its children

Start = Callable[..., AbstractAsyncContextManager[Dispatcher]]  # run.dispatcher
Measure = Callable[..., Awaitable[dict[str, Any]]]  # run.deliveries


async def processes(ctx: Context, start: Start, measure: Measure) -> dict[str, Any]:
    """Run the rounds; ``start`` and ``measure`` are bench/run.py's ``dispatcher`` and
    ``deliveries``."""
    n = ctx.opts.events
    runs: list[dict[str, Any]] = []
    for i, count in enumerate(ROUNDS, 1):
        phase = f"processes_{count}_{i}"
        async with start(ctx, phase, env={"DISPATCHER_PROCESSES": str(count)}) as running:
            # Ready: every child has its partitions (a backlog produced before would be
            # drained by the first child alone while the second joins the group).
            ctx.sampler.track(GROUP, procstat.Family(running.pid, refresh=0.5))
            try:
                await workload.produce_bulk(
                    ctx.bulk, ctx.topics.events, workload.sale(phase, ctx.opts.shops), n
                )
                result = await measure(ctx, running, phase, requests=n)
            finally:
                ctx.sampler.untrack(GROUP)
        result.pop("latency_ms")  # time spent in the backlog: not a latency
        result["processes"] = count
        runs.append(result)
        ctx.say(f"processes {count} (round {i}): {result['requests_per_s']} deliveries/s")
    mean = {  # keyed by strings, as the results' JSON has them
        str(count): round(
            statistics.mean(r["requests_per_s"] for r in runs if r["processes"] == count)
        )
        for count in sorted(set(ROUNDS))
    }
    ratio = round(mean["2"] / mean["1"], 2) if mean.get("1") else None
    ctx.say(f"processes: 2 vs 1 = {ratio}x ({mean['2']} / {mean['1']} deliveries/s)")
    return {"events": n, "runs": runs, "mean_requests_per_s": mean, "ratio_2_to_1": ratio}


def rows(p: dict[str, Any]) -> list[report.Row]:
    """The scenario's lines of the table."""
    out = [
        report.Row(
            "processes",
            f"round {i}: --processes {r['processes']} deliveries/s (cores)",
            f"{r['requests_per_s']:,.0f} ({_cores(r)})",
        )
        for i, r in enumerate(p["runs"], 1)
    ]
    ratio = p["ratio_2_to_1"]
    out.append(
        report.Row(
            "processes",
            "--processes 2 / 1, mean deliveries/s",
            f"{ratio}x ({p['mean_requests_per_s']['2']:,} / {p['mean_requests_per_s']['1']:,})",
            f">= {TARGET_RATIO}x",
            None if ratio is None else ratio >= TARGET_RATIO,
        )
    )
    return out


def _cores(r: dict[str, Any]) -> str:
    cores = r.get("cores") or {}
    value = cores.get(GROUP, cores.get("dispatcher"))
    return "?" if value is None else f"{value:.2f}"
