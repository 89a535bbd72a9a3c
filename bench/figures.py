"""The figures of a run: ratios against the ceiling, verdicts on the targets, the table.

Everything here works on the results dict that ``bench/run.py`` fills (and writes as
JSON), so a saved run can be re-derived and re-printed.
"""

from __future__ import annotations

from typing import Any

from bench import report

TARGET_RATIO = 0.5  # dispatcher deliveries/s over the bare client's requests/s
TARGET_P99_MS = 50.0  # at 1,000 events/s
TARGET_RSS_MB = 300.0  # with 100,000 subscriptions


NOISE_CORES = 0.25  # CPU of untracked processes above which a scenario is flagged noisy


def noise(results: dict[str, Any]) -> dict[str, float]:
    """Scenarios during which untracked processes (other users) used > NOISE_CORES."""
    windows = {f"ceiling {k}": v for k, v in results["ceiling"]["runs"].items()}
    windows.update({n: results[n] for n in ("throughput", "latency", "import") if n in results})
    if "throughput_info" in results:
        windows["info log level"] = results["throughput_info"]
    if "full_under_load" in results["memory"]:
        windows["memory burst"] = results["memory"]["full_under_load"]
    others = {name: w.get("cores", {}).get("other", 0.0) for name, w in windows.items()}
    return {name: cores for name, cores in others.items() if cores > NOISE_CORES}


BRACKETS = {  # scenario -> the ceiling runs just before and just after it
    "throughput": ("start", "mid"),
    "import": ("mid", "end"),
    "throughput_info": ("mid", "end"),
}


def derive(results: dict[str, Any]) -> None:
    """Ratios against the ceiling and the verdicts on the targets, added to ``results``.

    A scenario's baseline is the mean of the two ceiling runs around it, so a machine
    that drifts during the run (other users, CPU steal) moves both sides of a ratio."""
    ceiling = results["ceiling"]
    rates = {label: run["requests_per_s"] for label, run in ceiling["runs"].items()}
    mean = sum(rates.values()) / len(rates)
    ceiling["requests_per_s"] = round(mean, 1)
    ceiling["spread"] = round((max(rates.values()) - min(rates.values())) / mean, 3)
    for name, (before, after) in BRACKETS.items():
        if name in results:
            scenario = results[name]
            base = (rates[before] + rates[after]) / 2
            scenario["ceiling_baseline"] = round(base, 1)
            scenario["ratio_to_ceiling"] = round(scenario["requests_per_s"] / base, 3)
            scenario["entities_ratio_to_ceiling"] = round(scenario["entities_per_s"] / base, 3)
    results["noisy"] = noise(results)
    lat = results["latency"]["latency_ms"] or {}
    full = results["memory"]["full"]
    results["targets"] = {
        "throughput_ratio": _verdict(results["throughput"]["ratio_to_ceiling"], TARGET_RATIO, ">="),
        "latency_p99_ms": _verdict(lat.get("p99"), TARGET_P99_MS, "<="),
        "rss_100k_mb": _verdict(full["rss_mb"], TARGET_RSS_MB, "<="),
        "peak_rss_100k_mb": _verdict(
            results["memory"]["full_under_load"]["peak_rss_mb"], TARGET_RSS_MB, "<="
        ),
    }


def _verdict(value: float | None, target: float, op: str) -> dict[str, Any]:
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"value": value, "target": f"{op} {target:g}", "met": met}


def rows(results: dict[str, Any]) -> list[report.Row]:
    """The table of a run."""
    out = _ceiling_rows(results["ceiling"])
    out += _throughput_rows("throughput", results["throughput"], results["targets"])
    out += _latency_rows(results["latency"], results["targets"])
    out += _import_rows(results["import"])
    if "throughput_info" in results:
        out += _throughput_rows("info log level", results["throughput_info"], None)
    out += _memory_rows(results["memory"], results["targets"])
    return out


R = report.Row


CEILING_RUNS = ("start", "mid", "end")


def _ceiling_rows(c: dict[str, Any]) -> list[report.Row]:
    runs = {label: c["runs"][label] for label in CEILING_RUNS if label in c["runs"]}
    start = runs["start"]
    labels = "/".join(runs)
    return [
        R(
            "ceiling",
            f"bare aiohttp requests/s: {labels}",
            " / ".join(_n(run["requests_per_s"]) for run in runs.values()),
        ),
        R(
            "ceiling",
            "mean; spread (max-min)/mean",
            f"{_n(c['requests_per_s'])}; {_pct(c['spread'])}",
        ),
        R(
            "ceiling",
            f"client CPU s / 1000 requests: {labels}",
            " / ".join(_n(run["client_cpu_s_per_1000_requests"]) for run in runs.values()),
        ),
        R("ceiling", "cores (start): " + _core_names(start["cores"]), _cores(start["cores"])),
    ]


def _throughput_rows(
    name: str, r: dict[str, Any], targets: dict[str, Any] | None
) -> list[report.Row]:
    t: dict[str, Any] = targets["throughput_ratio"] if targets else {"target": "", "met": None}
    out = [
        R(
            name,
            "deliveries (distinct / expected)",
            f"{_n(r['distinct_entities'])} / {_n(r['expected_requests'])}",
        ),
        R(name, "deliveries/s (first->last receipt)", _n(r["requests_per_s"])),
        R(name, "ceiling around it (mean of 2 runs)", _n(r["ceiling_baseline"])),
        R(name, "ratio to ceiling", _n(r["ratio_to_ceiling"]), t["target"], t["met"]),
        R(name, "dispatcher CPU s / 1000 deliveries", _n(r["dispatcher_cpu_s_per_1000_requests"])),
        R(name, "peak RSS (VmHWM) MB", _n(r["peak_rss_mb"])),
        R(name, "cores: " + _core_names(r["cores"]), _cores(r["cores"])),
    ]
    out += _gc_rows(name, r)
    if "delivery_log_lines" in r:
        out.append(
            R(
                name,
                "'delivery' log lines (bytes each)",
                f"{_n(r['delivery_log_lines'])} ({_n(r['log_bytes_per_delivery'])})",
            )
        )
    return out


def _latency_rows(r: dict[str, Any], targets: dict[str, Any]) -> list[report.Row]:
    lat = r["latency_ms"] or {}
    t = targets["latency_p99_ms"]
    return [
        R(
            "latency",
            "offered / produced events/s",
            f"{_n(r['offered_rate'])} / {_n(r['produced_rate'])}",
        ),
        R(
            "latency",
            "deliveries (distinct / expected)",
            f"{_n(r['distinct_entities'])} / {_n(r['expected_requests'])}",
        ),
        R("latency", "p50 ms (event time -> receipt)", _n(lat.get("p50"))),
        R("latency", "p99 ms", _n(lat.get("p99")), t["target"], t["met"]),
        R("latency", "p99.9 / max ms", f"{_n(lat.get('p99.9'))} / {_n(lat.get('max'))}"),
        R(
            "latency",
            "dispatcher CPU s / 1000 deliveries",
            _n(r["dispatcher_cpu_s_per_1000_requests"]),
        ),
        R("latency", "cores: " + _core_names(r["cores"]), _cores(r["cores"])),
        *_gc_rows("latency", r),
    ]


def _gc_rows(name: str, r: dict[str, Any]) -> list[report.Row]:
    """GC pauses and loop lags (``--gc-trace`` runs only)."""
    g = r.get("gc")
    if not g:
        return []
    return [
        R(
            name,
            "GC gen2 pauses: count / max / total ms",
            f"{g['gen2_collections']} / {_n(g['gen2_max_ms'])} / {_n(g['gen2_total_ms'])}",
        ),
        R(
            name,
            "loop lags > 20 ms: count / max ms",
            f"{g['loop_lags_over_20ms']} / {_n(g['loop_lag_max_ms'])}",
        ),
    ]


def _import_rows(r: dict[str, Any]) -> list[report.Row]:
    return [
        R(
            "import",
            "entities (distinct / produced)",
            f"{_n(r['distinct_entities'])} / {_n(r['entities'])}",
        ),
        R("import", "requests (expected)", f"{_n(r['requests'])} ({_n(r['expected_requests'])})"),
        R(
            "import",
            "entities/s; ratio to ceiling",
            f"{_n(r['entities_per_s'])}; {_n(r['entities_ratio_to_ceiling'])}",
        ),
        R(
            "import",
            "requests/s; ratio to ceiling",
            f"{_n(r['requests_per_s'])}; {_n(r['ratio_to_ceiling'])}",
        ),
        R("import", "mean body bytes", _n(r["mean_body_bytes"])),
        R(
            "import",
            "dispatcher CPU s / 1000 entities",
            _n(r["dispatcher_cpu_s_per_1000_entities"]),
        ),
        R("import", "cores: " + _core_names(r["cores"]), _cores(r["cores"])),
        *_gc_rows("import", r),
    ]


def _memory_rows(r: dict[str, Any], targets: dict[str, Any]) -> list[report.Row]:
    base, full, load = r["baseline"], r["full"], r["full_under_load"]
    t, p = targets["rss_100k_mb"], targets["peak_rss_100k_mb"]
    subs = f"{_n(full['subscriptions'])} subs"
    return [
        R(
            "memory",
            f"{_n(base['subscriptions'])} subs: RSS MB (ready in s)",
            f"{_n(base['rss_mb'])} ({_n(base['ready_s'])})",
        ),
        R(
            "memory",
            f"{subs}: RSS MB (ready in s)",
            f"{_n(full['rss_mb'])} ({_n(full['ready_s'])})",
            t["target"],
            t["met"],
        ),
        R(
            "memory",
            f"{subs}: peak RSS MB after {_n(load['deliveries'])} deliveries",
            _n(load["peak_rss_mb"]),
            p["target"],
            p["met"],
        ),
        R("memory", f"{subs}: deliveries/s of that burst", _n(load["requests_per_s"])),
        *_gc_rows("memory", load),
        R("memory", "bytes per extra subscription", _n(r.get("bytes_per_subscription"))),
    ]


CORE_GROUPS = {  # sampler group -> short name in the table
    "ceiling client": "client",
    "dispatcher": "dispatcher",
    "receiver": "receiver",
    "kafka": "kafka",
    "postgres": "postgres",
    "bench driver": "driver",
    "other": "other",
    "steal": "steal",
}


def _core_names(cores: dict[str, float]) -> str:
    return "/".join(short for name, short in CORE_GROUPS.items() if name in cores)


def _cores(cores: dict[str, float]) -> str:
    return "/".join(f"{cores[name]:.2f}" for name in CORE_GROUPS if name in cores)


def _n(value: float | None) -> str:
    """A number for the table: 3 decimals below 10, 1 below 1000, none above."""
    if value is None:
        return "n/a"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"
