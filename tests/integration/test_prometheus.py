"""A real Prometheus scraping a running daemon: what docs/operations.md, the alerting rules
and the Grafana dashboard say about the metrics is what a Prometheus server gets.

Prometheus (Debian's ``prometheus`` package: tests/promkit.py installs it when missing, as
.ci/run does) runs on a free port of loopback, on deploy/prometheus/prometheus.yml with its
target pointed at the daemon, a 1 s scrape and evaluation interval and the rules of
deploy/prometheus/alerts.yml loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.integration.support import WAIT, World, free_port, make_event
from tests.promkit import (
    ALERTS,
    EXAMPLE_CONFIG,
    JOB,
    alert_rules,
    binary,
    dashboard_exprs,
    documented_metrics,
    load_dashboard,
    metric_names,
    panels,
    substitute,
)

DELIVERIES = 12  # events delivered
FAILURES = 3  # events whose endpoint fails
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")
# Series Prometheus makes itself for the job: the scrape's health and the rules' alerts.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
NEVER = "0001-01-01T00:00:00Z"  # lastEvaluation of a rule not evaluated yet


@dataclass
class Prometheus:
    """A Prometheus server started by this test, and its HTTP API."""

    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    async def api(self, path: str, params: Any = None) -> Any:
        """GET /api/v1/<path>: its ``data``, failing the test on an error answer."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v1/{path}", params=params) as response,
        ):
            body = orjson.loads(await response.read())
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now."""
        data = await self.api("query", {"query": expr})
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The value of a one-sample ``expr`` (None while it has no sample)."""
        result = await self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    async def wait_value(self, expr: str, expected: float) -> None:
        """Poll until ``expr`` is ``expected``; fail after WAIT seconds."""
        got = None
        try:
            async with asyncio.timeout(WAIT):
                while (got := await self.value(expr)) != expected:
                    await asyncio.sleep(0.2)  # polling Prometheus with a deadline
        except TimeoutError:
            pytest.fail(f"{expr} is {got}, not {expected}, after {WAIT}s")

    async def wait_result(self, expr: str) -> None:
        """Poll until ``expr`` has a result; fail after WAIT seconds."""
        try:
            async with asyncio.timeout(WAIT):
                while not await self.query(expr):
                    await asyncio.sleep(0.2)  # polling Prometheus with a deadline
        except TimeoutError:
            pytest.fail(f"{expr} has no result after {WAIT}s")

    async def series_names(self) -> set[str]:
        """The metric names of the series scraped from the daemon's job."""
        names: list[str] = await self.api(
            "label/__name__/values", [("match[]", f'{{job="{JOB}"}}')]
        )
        return set(names)

    async def metadata(self) -> dict[str, str]:
        """name -> type of every metric the daemon's scrapes described (``# TYPE``), with
        or without a sample yet."""
        data: dict[str, list[dict[str, str]]] = await self.api("metadata")
        return {name: entries[0]["type"] for name, entries in data.items()}


StartPrometheus = Callable[[int], Awaitable[Prometheus]]


def scrape_config(port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, scraping the daemon on ``port`` every second.
    The /readyz probe job is left out: it needs a blackbox exporter."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}  # fmt: skip
    assert config["rule_files"] == [ALERTS.name]
    config["rule_files"] = [str(ALERTS)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    labels = job["static_configs"][0]["labels"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """Starts Prometheus servers scraping a daemon's port (ready when it returns); stops
    them after the test."""
    executable = binary("prometheus")
    started: list[Prometheus] = []

    async def start(port: int) -> Prometheus:
        home = tmp_path / f"prometheus-{len(started)}"
        home.mkdir()
        config = home / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(port)))
        listen = f"127.0.0.1:{free_port()}"
        log_path = home / "prometheus.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen(  # noqa: S603 - the package's binary, our arguments
                [
                    executable,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={home / 'data'}",
                    f"--web.listen-address={listen}",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        server = Prometheus(f"http://{listen}", popen, log_path)
        started.append(server)
        async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
            while True:
                assert popen.poll() is None, log_path.read_text()
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{server.url}/-/ready") as response:
                        if response.status == 200:
                            return server
                await asyncio.sleep(0.1)  # polling readiness with a deadline

    yield start
    for server in started:
        server.popen.terminate()
        try:
            await asyncio.to_thread(server.popen.wait, 10)
        except subprocess.TimeoutExpired:
            server.popen.kill()
            await asyncio.to_thread(server.popen.wait)


async def delivery_run(world: World, prometheus: StartPrometheus) -> Prometheus:
    """A daemon delivering DELIVERIES events, and failing FAILURES (their endpoint answers
    500: retries scheduled on a delay tier, notices mailed), under a Prometheus's eye,
    once it counted them all."""
    await world.subscribe()
    other_shop = await world.new_shop()
    await world.subscribe(await world.receivers(status=500), shop=other_shop)
    running = await world.start()
    assert running.daemon.http_port is not None
    server = await prometheus(running.daemon.http_port)
    # scraped once before the events, so that rate() sees them come
    await server.wait_value(f'sum(webhook_events_consumed_total{{job="{JOB}"}})', 0)
    await world.produce(
        *[make_event(world.shop) for _ in range(DELIVERIES)],
        *[make_event(other_shop) for _ in range(FAILURES)],
    )
    await world.receiver.wait_for(DELIVERIES)
    for outcome, count in (("200", DELIVERIES), ("5xx", FAILURES)):
        await server.wait_value(
            f'sum(webhook_deliveries_total{{job="{JOB}", outcome="{outcome}"}})', count
        )
    await server.wait_value("sum(webhook_retries_scheduled_total)", FAILURES)
    return server


async def test_prometheus_scrapes_the_deliveries_and_every_documented_metric(
    world: World, prometheus: StartPrometheus
) -> None:
    """After a delivery run, Prometheus has the deliveries counted, the latency histogram
    filled, and every metric of docs/operations.md's table, with its type; and the daemon
    exports nothing the table does not list."""
    server = await delivery_run(world, prometheus)
    attempts = DELIVERIES + FAILURES
    assert await server.value("sum(webhook_events_consumed_total)") == attempts
    assert await server.value("sum(webhook_delivery_duration_seconds_count)") == attempts
    assert (
        await server.value('sum(webhook_delivery_duration_seconds_bucket{le="+Inf"})') == attempts
    )
    assert (await server.value("sum(webhook_delivery_duration_seconds_sum)") or 0) > 0
    median = await server.value(
        "histogram_quantile(0.5, sum by (le) (webhook_delivery_duration_seconds_bucket))"
    )
    assert median is not None and 0 < median < 30 and not math.isnan(median)
    (target,) = (await server.api("targets"))["activeTargets"]
    assert target["health"] == "up" and target["labels"]["role"] == "all", target

    series = await server.series_names()
    described = await server.metadata()
    documented = documented_metrics()
    for name, kind in documented.items():
        # a labelled metric has series once it has children; its # TYPE line is always there
        assert described.get(name) == kind, f"{name}: {described.get(name)}, not {kind}"
        names = {name + s for s in HISTOGRAM_SERIES} if kind == "histogram" else {name}
        if name in series or names & series:
            assert names <= series, name
    # everything that is always there has its series
    unlabelled = {name for name in documented if not name.startswith("webhook_consumer_lag")}
    sampled = {n for n in unlabelled if n in series or f"{n}_count" in series}
    assert {"webhook_events_consumed_total", "webhook_deliveries_total",
            "webhook_delivery_duration_seconds", "process_cpu_seconds_total",
            "process_resident_memory_bytes", "process_start_time_seconds"} <= sampled  # fmt: skip

    # the reverse: what the daemon exports is documented (Prometheus's own series and
    # prometheus_client's _created gauges aside)
    own = set(described) - {n for n in described if n.endswith("_created")}
    assert own - set(documented) == set(), "exported, not in docs/operations.md"

    def base(name: str) -> str:
        for suffix in HISTOGRAM_SERIES:
            if documented.get(name.removesuffix(suffix)) == "histogram":
                return name.removesuffix(suffix)
        return name

    extra = {
        base(n)
        for n in series - PROMETHEUS_OWN
        if not n.startswith("scrape_") and not n.endswith("_created")
    } - set(documented)
    assert extra == set(), "series not in docs/operations.md"


async def test_dashboard_and_rules_query_only_what_the_daemon_exports(
    world: World, prometheus: StartPrometheus
) -> None:
    """Every query of deploy/grafana/dashboard.json and every rule of alerts.yml names
    only metrics the daemon's scrape has, and Prometheus evaluates each; the main panels
    show data; the rules evaluate without error and, the daemon being healthy, none is
    pending or firing."""
    server = await delivery_run(world, prometheus)
    exported = await server.series_names() | set(await server.metadata())

    dashboard = load_dashboard()
    for where, expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names and names <= exported, f"{where}: {sorted(names - exported)} not scraped"
        await server.query(substitute(expr))  # fails the test on a PromQL error
    for rule in alert_rules():
        names = metric_names(rule["expr"]) - {"probe_success"}  # the blackbox exporter's
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not scraped"

    # rate() over a 1 m window needs two samples (of the event count, one before the
    # events; of the deliveries' series, born with the first one), and the retry tier's
    # lag comes with the retry consumer's fetch: wait for them
    for expr in (
        "sum(rate(webhook_events_consumed_total[1m])) > 0",
        'count_over_time(webhook_deliveries_total{outcome="5xx"}[1m]) >= 2',
        'count_over_time(webhook_consumer_lag{consumer="retries"}[1m]) >= 2',
        "count_over_time(webhook_delay_records_total[1m]) >= 2",
    ):
        await server.wait_result(expr)
    showing = {
        "Delivery outcomes", "Events consumed and deliveries attempted",
        "Delivery time quantiles", "Consumer lag per topic", "Retry backlog by tier",
        "Records queued by tier and kind", "Failures by outcome", "Failure notices",
        "Recorder lag", "CPU", "Memory", "Up and restarts",
    }  # fmt: skip
    by_title = {panel["title"]: panel for panel in panels(dashboard)}
    assert showing <= set(by_title)
    for title in sorted(showing):
        results = [await server.query(substitute(t["expr"])) for t in by_title[title]["targets"]]
        assert any(results), f"panel {title!r} shows nothing"

    # the rules: loaded, evaluated without error, quiet on a healthy daemon
    expected = {rule["alert"] for rule in alert_rules()}
    async with asyncio.timeout(WAIT):
        while True:
            groups = (await server.api("rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if {r["name"] for r in rules} == expected and all(
                r["lastEvaluation"] != NEVER for r in rules
            ):
                break
            await asyncio.sleep(0.2)  # polling Prometheus with a deadline
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", rule
