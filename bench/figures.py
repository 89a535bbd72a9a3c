"""The figures of a run: ratios against the ceiling, verdicts on the targets, the table.

Everything here works on the results dict that ``bench/run.py`` fills (and writes as
JSON), so a saved run can be re-derived and re-printed.
"""

from __future__ import annotations

from typing import Any

from bench import processes, report

TARGET_RATIO = 0.8  # dispatcher deliveries/s over the bare client's requests/s (issue 16)
TARGET_P99_MS = 20.0  # at 1,000 events/s (issue 16)
TARGET_RSS_MB = 300.0  # with 100,000 subscriptions
# import entities/s over (batch size x the bare client's requests/s with a batch's body)
TARGET_IMPORT_RATIO = 0.8
IMPORT_BATCH = 80  # entities per import batch (DISPATCHER_IMPORT_BATCH_SIZE of the run)
TARGET_MILLION_READY_S = 15.0  # 1,000,000 subscriptions loaded within
TARGET_MILLION_MB = 1500.0  # and held in
TARGET_HISTORY_RATIO = 0.9  # deliveries/s with the attempt log on over the same with it off
TARGET_MAILS_PER_S = 500.0  # failure mails to the stack's SMTP sink, default connections
DEFAULT_SMTP_CONNECTIONS = 4  # DISPATCHER_SMTP_CONNECTIONS's default


NOISE_CORES = 0.25  # CPU of untracked processes above which a scenario is flagged noisy


def noise(results: dict[str, Any]) -> dict[str, float]:
    """Scenarios during which untracked processes (other users) used > NOISE_CORES."""
    runs = results.get("ceiling", {}).get("runs", {})
    windows = {f"ceiling {k}": v for k, v in runs.items()}
    windows.update({n: results[n] for n in ("throughput", "latency", "import") if n in results})
    if "throughput_info" in results:
        windows["info log level"] = results["throughput_info"]
    for i, run in enumerate(results.get("history", {}).get("runs", []), 1):
        windows[f"history {run['attempt_log']} ({i})"] = run
    for run in results.get("notices", {}).get("runs", []):
        windows[f"notices, {run['smtp_connections']} connections"] = run
    if "full_under_load" in results.get("memory", {}):
        windows["memory burst"] = results["memory"]["full_under_load"]
    if "fairness" in results:
        windows["fairness"] = results["fairness"]
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
    that drifts during the run (other users, CPU steal) moves both sides of a ratio. A run
    of one scenario alone (``--only``) has only that scenario's figures."""
    if "history" in results:
        _derive_history(results["history"])
    targets: dict[str, Any] = {}
    if "ceiling" in results:
        _derive_ceiling(results, targets)
    _derive_memory(results, targets)
    results["noisy"] = noise(results)
    if "history" in results:
        ratio = results["history"]["ratio_on_off"]
        targets["history_ratio"] = _verdict(ratio, TARGET_HISTORY_RATIO, ">=")
    if "notices" in results:
        _derive_notices(results["notices"])
        default = results["notices"].get("default_mails_per_s")
        targets["mails_per_s"] = _verdict(default, TARGET_MAILS_PER_S, ">=")
    results["targets"] = targets


def _derive_notices(n: dict[str, Any]) -> None:
    """Each run's mails/s as a ratio to the one-connection run's; the default's rate."""
    runs = n["runs"]
    one = next((r["mails_per_s"] for r in runs if r["smtp_connections"] == 1), None)
    for run in runs:
        rate = run["mails_per_s"]
        run["ratio_to_one_connection"] = round(rate / one, 2) if one and rate else None
    default = [r for r in runs if r["smtp_connections"] == DEFAULT_SMTP_CONNECTIONS]
    n["default_mails_per_s"] = default[0]["mails_per_s"] if default else None


def _derive_history(h: dict[str, Any]) -> None:
    """On/off ratios (of the means, and of each adjacent pair) and bytes per attempt."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for run in h["runs"]:
        rates[run["attempt_log"]].append(run["requests_per_s"])
        if run["dispatcher_cpu_s_per_1000_requests"] is not None:
            cpu[run["attempt_log"]].append(run["dispatcher_cpu_s_per_1000_requests"])
    h["requests_per_s"] = {k: round(_mean(v), 1) for k, v in rates.items()}
    h["dispatcher_cpu_s_per_1000_requests"] = {
        k: round(_mean(v), 3) if v else None for k, v in cpu.items()
    }
    h["ratio_on_off"] = round(_mean(rates["on"]) / _mean(rates["off"]), 3)
    # ABBA: the first 'on' against the first 'off', the second against the second
    pairs = zip(rates["on"], rates["off"], strict=True)
    h["pair_ratios"] = [round(on / off, 3) for on, off in pairs]
    rows = h["rows"]
    h["bytes_per_attempt"] = round(h["bytes"] / rows, 1) if rows else None
    h["bytes_per_million_attempts"] = round(h["bytes"] / rows * 1e6) if rows else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _derive_ceiling(results: dict[str, Any], targets: dict[str, Any]) -> None:
    ceiling = results["ceiling"]
    rates = {label: run["requests_per_s"] for label, run in ceiling["runs"].items()}
    mean = sum(rates.values()) / len(rates)
    ceiling["requests_per_s"] = round(mean, 1)
    ceiling["spread"] = round((max(rates.values()) - min(rates.values())) / mean, 3)
    for name, (before, after) in BRACKETS.items():
        if name in results and before in rates and after in rates:
            scenario = results[name]
            base = (rates[before] + rates[after]) / 2
            scenario["ceiling_baseline"] = round(base, 1)
            scenario["ratio_to_ceiling"] = round(scenario["requests_per_s"] / base, 3)
            scenario["entities_ratio_to_ceiling"] = round(scenario["entities_per_s"] / base, 3)
    if "throughput" in results:
        targets["throughput_ratio"] = _verdict(
            results["throughput"].get("ratio_to_ceiling"), TARGET_RATIO, ">="
        )
    if "latency" in results:
        lat = results["latency"]["latency_ms"] or {}
        targets["latency_p99_ms"] = _verdict(lat.get("p99"), TARGET_P99_MS, "<=")
    batch = results.get("ceiling_batch")
    if batch is not None and "import" in results:
        imp = results["import"]
        imp["batch_ceiling_entities_per_s"] = round(batch["requests_per_s"] * IMPORT_BATCH, 1)
        imp["ratio_to_batch_ceiling"] = round(
            imp["entities_per_s"] / imp["batch_ceiling_entities_per_s"], 3
        )
        targets["import_ratio"] = _verdict(imp["ratio_to_batch_ceiling"], TARGET_IMPORT_RATIO, ">=")


def _derive_memory(results: dict[str, Any], targets: dict[str, Any]) -> None:
    if "memory" in results:
        full = results["memory"]["full"]
        targets["rss_100k_mb"] = _verdict(full["rss_mb"], TARGET_RSS_MB, "<=")
        targets["peak_rss_100k_mb"] = _verdict(
            results["memory"]["full_under_load"]["peak_rss_mb"], TARGET_RSS_MB, "<="
        )
    if "memory_1m" in results:
        big = results["memory_1m"]
        targets["million_ready_s"] = _verdict(big["ready_s"], TARGET_MILLION_READY_S, "<=")
        targets["million_rss_mb"] = _verdict(big["rss_mb"], TARGET_MILLION_MB, "<=")


def _verdict(value: float | None, target: float, op: str) -> dict[str, Any]:
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"value": value, "target": f"{op} {target:g}", "met": met}


def rows(results: dict[str, Any]) -> list[report.Row]:
    """The table of a run."""
    out: list[report.Row] = []
    if "ceiling" in results:
        out += _ceiling_rows(results["ceiling"])
    if "throughput" in results:
        out += _throughput_rows("throughput", results["throughput"], results["targets"])
    if "latency" in results:
        out += _latency_rows(results["latency"], results["targets"])
    if "import" in results:
        out += _import_rows(results["import"], results.get("ceiling_batch"), results["targets"])
    if "throughput_info" in results:
        out += _throughput_rows("info log level", results["throughput_info"], None)
    if "history" in results:
        out += _history_rows(results["history"], results["targets"])
    if "notices" in results:
        out += _notice_rows(results["notices"], results["targets"])
    if "replay" in results:
        out += _replay_rows(results["replay"])
    if "memory" in results:
        out += _memory_rows(results["memory"], results["targets"])
    if "memory_1m" in results:
        out += _million_rows(results["memory_1m"], results["targets"])
    if "fairness" in results:
        out += _fairness_rows(results["fairness"])
    if "processes" in results:
        out += processes.rows(results["processes"])
    return out


FAIRNESS_P99_MS = 1000.0  # the healthy webhooks' p99, production to receipt (issue 18)


def _fairness_rows(f: dict[str, Any]) -> list[report.Row]:
    lat = f.get("latency_ms") or {}
    p99 = lat.get("p99")
    met = None if p99 is None else p99 < FAIRNESS_P99_MS
    d = f.get("deferrals", {})
    why = ", ".join(f"{k} {_n(v)}" for k, v in sorted(d.items()) if k != "all" and v)
    return [
        R("fairness", "webhooks on one endpoint; slow ones (answer after ms)",
          f"{f['webhooks']}; {f['slow_webhooks']} ({_n(f['slow_answer_ms'])})"),
        R("fairness", "offered / produced events/s", f"{_n(f['offered_rate'])} / "
          f"{_n(f['produced_rate'])}"),
        R("fairness", "healthy deliveries (distinct / expected)",
          f"{_n(f['distinct_entities'])} / {_n(f['expected_requests'])}"),
        R("fairness", "healthy p50 / p90 ms (production -> receipt)",
          f"{_n(lat.get('p50'))} / {_n(lat.get('p90'))}"),
        R("fairness", "healthy p99 ms", _n(p99), f"< {FAIRNESS_P99_MS:,.0f}", met),
        R("fairness", "healthy p99.9 / max ms", f"{_n(lat.get('p99.9'))} / {_n(lat.get('max'))}"),
        R("fairness", "slow webhooks: deliveries received / events produced",
          f"{_n(f['slow_received'])} / {_n(f['slow_produced'])}"),
        R("fairness", "attempts deferred (by reason)", f"{_n(d.get('all', 0))} ({why or 'none'})"),
        R("fairness", "cores: " + _core_names(f["cores"]), _cores(f["cores"])),
    ]  # fmt: skip


REPLAY_TARGET = 50_000  # events scanned per second (issue 13)


def _replay_rows(r: dict[str, Any]) -> list[report.Row]:
    job, bare = r["job"], r["bare"]
    rate = r["scanned_per_s"]
    met = None if rate is None else rate >= REPLAY_TARGET
    return [
        R(
            "replay",
            "events in range (of the webhook's shop)",
            f"{_n(r['events'])} ({_n(r['ours'])})",
        ),
        R(
            "replay",
            "job: scanned / matched / delivered",
            f"{_n(job['scanned'])} / {_n(job['matched'])} / {_n(job['delivered'])}",
        ),
        R("replay", "job: events scanned/s (start->end)", _n(rate), f">= {REPLAY_TARGET:,}", met),
        R("replay", "bare consumer: records/s, same range", _n(bare["records_per_s"])),
        R("replay", "ratio job / bare consumer", _n(r["ratio_to_bare"])),
        R("replay", "dispatcher CPU s during the job", _n(job["dispatcher_cpu_s"])),
    ]


def _notice_rows(n: dict[str, Any], targets: dict[str, Any]) -> list[report.Row]:
    t = targets["mails_per_s"]
    out: list[report.Row] = []
    for r in n["runs"]:
        c = r["smtp_connections"]
        name = f"notices ({c} conn.)"
        rate = R(name, "mails/s (first->last stored mail)", _n(r["mails_per_s"]))
        if c == DEFAULT_SMTP_CONNECTIONS:
            rate = R(
                name,
                "mails/s (first->last stored mail)",
                _n(r["mails_per_s"]),
                t["target"],
                t["met"],
            )
        out += [
            R(
                name,
                "mails (distinct notices / expected)",
                f"{_n(r['mails'])} ({_n(r['distinct_notices'])} / {_n(r['expected'])})",
            ),
            rate,
            R(name, "ratio to 1 connection", _n(r["ratio_to_one_connection"])),
            R(name, "dispatcher CPU s / 1000 mails", _n(r["dispatcher_cpu_s_per_1000_mails"])),
            R(name, "cores: " + _core_names(r["cores"]), _cores(r["cores"])),
            *_gc_rows(name, r),
        ]
    return out


def _history_rows(h: dict[str, Any], targets: dict[str, Any]) -> list[report.Row]:
    t = targets["history_ratio"]
    runs = h["runs"]
    order = "/".join(run["attempt_log"] for run in runs)
    rates, cpu = h["requests_per_s"], h["dispatcher_cpu_s_per_1000_requests"]
    return [
        R(
            "history",
            f"distinct deliveries of each run, {order} (expected)",
            " / ".join(_n(r["distinct_entities"]) for r in runs) + f" ({_n(h['events_per_run'])})",
        ),
        R(
            "history",
            f"deliveries/s, attempt log {order}",
            " / ".join(_n(r["requests_per_s"]) for r in runs),
        ),
        R("history", "deliveries/s: mean on / mean off", f"{_n(rates['on'])} / {_n(rates['off'])}"),
        R(
            "history",
            "ratio on / off (means)",
            _n(h["ratio_on_off"]),
            t["target"],
            t["met"],
        ),
        R("history", "ratio on / off (1st pair, 2nd pair)", ", ".join(map(_n, h["pair_ratios"]))),
        R(
            "history",
            "dispatcher CPU s / 1000 deliveries: on / off",
            f"{_n(cpu['on'])} / {_n(cpu['off'])}",
        ),
        *(
            R(
                "history",
                f"cores ({r['attempt_log']} {i}): " + _core_names(r["cores"]),
                _cores(r["cores"]),
            )
            for i, r in enumerate(runs, 1)
        ),
        R(
            "history",
            "history written: s after the last delivery (on runs)",
            " / ".join(_n(r["recorder_catch_up_s"]) for r in runs if "recorder_catch_up_s" in r),
        ),
        R(
            "history",
            "attempt rows (distinct notifications / expected)",
            f"{_n(h['rows'])} ({_n(h['distinct_notifications'])} / {_n(h['expected_rows'])})",
        ),
        R(
            "history",
            f"bytes on disk ({h['partitions']} partitions, indexes, TOAST)",
            _n(h["bytes"]),
        ),
        R(
            "history",
            "bytes per attempt; MB per million attempts",
            f"{_n(h['bytes_per_attempt'])}; {_n(_mb(h['bytes_per_million_attempts']))}",
        ),
    ]


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


R = report.Row


CEILING_RUNS = ("start", "mid", "end")


def _ceiling_rows(c: dict[str, Any]) -> list[report.Row]:
    runs = {label: c["runs"][label] for label in CEILING_RUNS if label in c["runs"]}
    first, start = next(iter(runs.items()))
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
        R("ceiling", f"cores ({first}): " + _core_names(start["cores"]), _cores(start["cores"])),
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


def _million_rows(r: dict[str, Any], targets: dict[str, Any]) -> list[report.Row]:
    t, m = targets["million_ready_s"], targets["million_rss_mb"]
    subs = f"{_n(r['subscriptions'])} subs"
    return [
        R("memory", f"{subs}: ready in s", _n(r["ready_s"]), t["target"], t["met"]),
        R("memory", f"{subs}: RSS MB idle", _n(r["rss_mb"]), m["target"], m["met"]),
        R("memory", f"{subs}: bytes per subscription", _n(r.get("bytes_per_subscription"))),
    ]


def _import_rows(
    r: dict[str, Any], batch: dict[str, Any] | None, targets: dict[str, Any]
) -> list[report.Row]:
    out: list[report.Row] = []
    if batch is not None:
        t = targets["import_ratio"]
        out = [
            R(
                "import",
                f"bare client, {IMPORT_BATCH}-entity bodies one at a time: requests/s (x80)",
                f"{_n(batch['requests_per_s'])} ({_n(r['batch_ceiling_entities_per_s'])})",
            ),
            R(
                "import",
                "entities/s; ratio to 80 x that",
                f"{_n(r['entities_per_s'])}; {_n(r['ratio_to_batch_ceiling'])}",
                t["target"],
                t["met"],
            ),
        ]
    return [
        *out,
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
    "smtp sink": "smtp",
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
