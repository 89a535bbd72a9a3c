"""Prometheus metrics, served at ``GET /metrics``.

Hot-path figures (delivery outcomes and latency) are instruments updated as deliveries
happen; everything that is state (events consumed, dead letters, retries, notices,
cached subscriptions, lag, re-sync age) is read from the components when scraped, so
the hot path pays nothing for it. Labels are bounded: outcome classes, reasons, topics
and partitions, never a URL or a shop id. Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dispatcher.daemon import Daemon

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The registry of one daemon and its hot-path instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "webhook_deliveries",
            "Delivery attempts by outcome: 200, 3xx/4xx/5xx (other statuses), timeout, "
            "connection, tls, blocked.",
            ["outcome"],
            registry=self.registry,
        )
        self._by_label: dict[str, Any] = {}
        self.delivery_seconds = Histogram(
            "webhook_delivery_duration_seconds",
            "Time from the start of a delivery attempt's POST to its outcome.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, label: str, duration_ms: float) -> None:
        child = self._by_label.get(label)
        if child is None:  # labels() takes a lock and builds a key: once per label
            child = self._by_label[label] = self.deliveries.labels(label)
        child.inc()
        self.delivery_seconds.observe(duration_ms / 1000)

    def watch(self, daemon: Daemon) -> None:
        """Expose the daemon's state through a collector read at scrape time."""
        self.registry.register(_StateCollector(daemon))


class _StateCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self._daemon
        yield from _events(d)
        yield from _retries(d)
        yield from _notices(d)
        yield from _undecodable(d)
        yield _gauge(
            "webhook_deliveries_in_flight",
            "Delivery attempts under way now.",
            d.sender.in_flight if d.sender else 0,
        )
        yield _gauge(
            "webhook_subscriptions_cached", "Webhooks in the subscription cache.", len(d.cache)
        )
        synced = d.cache.synced_at
        yield _gauge(
            "webhook_cache_resync_age_seconds",
            "Seconds since the subscription cache was last loaded in full (-1: never).",
            -1.0 if synced is None else time.monotonic() - synced,
        )
        yield _gauge(
            "webhook_import_batches_open", "Import batches waiting to be sent.",
            len(d.batcher) if d.batcher else 0,
        )  # fmt: skip
        yield _gauge(
            "webhook_cache_current",
            "1 while the subscription cache is known to be current (listening and loaded); "
            "0 while it is loading or its database connection is lost (consumers pause).",
            1.0 if d.cache.current.is_set() else 0.0,
        )
        paused = GaugeMetricFamily(
            "webhook_consumer_paused",
            "1 while a consumer is paused because the subscription cache is not current.",
            labels=["consumer"],
        )
        errors = CounterMetricFamily(
            "webhook_record_errors",
            "Records whose handling raised an unexpected error (a bug): each was logged "
            "with its traceback and sent to the dead-letter topic, reason 'internal: ...'.",
            labels=["consumer"],
        )
        for worker in d.workers:
            paused.add_metric([worker.name], 0.0 if worker.paused_reason is None else 1.0)
            errors.add_metric([worker.name], worker.record_errors)
        yield paused
        yield errors
        lag = GaugeMetricFamily(
            "webhook_consumer_lag",
            "Records behind the end of each assigned partition, per consumer.",
            labels=["consumer", "topic", "partition"],
        )
        for worker in d.workers:
            for tp, behind in worker.lag.items():
                lag.add_metric([worker.name, tp.topic, str(tp.partition)], behind)
        yield lag


def _events(d: Daemon) -> Iterator[Metric]:
    counts = d.event_counts()
    consumed = CounterMetricFamily(
        "webhook_events_consumed", "Event records read from the event topics."
    )
    consumed.add_metric([], counts.get("consumed", 0))
    yield consumed
    handled = CounterMetricFamily(
        "webhook_events_skipped",
        "Events not sent, by reason: unmatched (no webhook), outside_catalog, "
        "import_skipped (movements of imports).",
        labels=["reason"],
    )
    for reason in ("unmatched", "outside_catalog", "import_skipped"):
        handled.add_metric([reason], counts.get(reason, 0))
    yield handled
    dead = CounterMetricFamily(
        "webhook_dead_letters",
        "Malformed events sent to the dead-letter topic, by reason: json, shape, field.",
        labels=["reason"],
    )
    for reason in ("json", "shape", "field"):
        dead.add_metric([reason], counts.get(f"dead_letter_{reason}", 0))
    yield dead


def _retries(d: Daemon) -> Iterator[Metric]:
    s = d.scheduler
    yield _counter(
        "webhook_retries_scheduled", "Failed attempts scheduled for a retry.",
        s.scheduled if s else 0,
    )  # fmt: skip
    yield _counter(
        "webhook_retries_exhausted",
        "Notifications whose last retry failed: the retry limit was reached.",
        s.exhausted if s else 0,
    )
    yield _counter(
        "webhook_retries_dropped",
        "Pending retries dropped because their webhook was deleted.",
        d.retry_worker.dropped if d.retry_worker else 0,
    )


def _notices(d: Daemon) -> Iterator[Metric]:
    n = d.notice_worker
    yield _counter("webhook_notices_sent", "Failure notices mailed.", n.sent if n else 0)
    yield _counter(
        "webhook_notices_rejected",
        "Notices the SMTP server refused for good (5xx, e.g. no such mailbox): not retried.",
        n.rejected if n else 0,
    )
    yield _counter(
        "webhook_notices_failed",
        "Failed SMTP sends of notices (each is tried again until it goes through).",
        n.failed if n else 0,
    )


def _undecodable(d: Daemon) -> Iterator[Metric]:
    batches = CounterMetricFamily(
        "webhook_undecodable_batches",
        "Kafka record batches that could not be decoded (unsupported codec, bad CRC, "
        "corrupt data), per consumer and topic: each stops its partition, or is skipped "
        "with DISPATCHER_SKIP_UNDECODABLE_BATCHES.",
        labels=["consumer", "topic"],
    )
    skipped = CounterMetricFamily(
        "webhook_undecodable_offsets_skipped",
        "Offsets skipped with the undecodable batches holding them "
        "(DISPATCHER_SKIP_UNDECODABLE_BATCHES): their records are lost.",
        labels=["consumer", "topic"],
    )
    for worker in d.workers:
        state = worker.undecodable
        for topic, count in state.batches.items():
            batches.add_metric([worker.name, topic], count)
        for topic, count in state.skipped.items():
            skipped.add_metric([worker.name, topic], count)
    yield batches
    yield skipped


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
