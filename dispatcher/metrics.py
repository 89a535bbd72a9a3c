"""Prometheus metrics, served at ``GET /metrics``.

One :class:`Metrics` per process holds every instrument, typed; the components that
know a figure update it as it changes (pushed: no component's state is read at scrape
time). Labels are bounded: outcome classes, reasons, consumers, topics and partitions,
never a URL or a shop id. Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SKIP_REASONS = ("unmatched", "outside_catalog", "import_skipped", "webhook_disabled")
# Every label value known in advance starts at 0, so that rate() and increase() see the
# first increment (a series born at 1 has no earlier sample to compare it with).
OUTCOMES = ("200", "1xx", "3xx", "4xx", "5xx", "timeout", "connection", "tls", "blocked")
CONSUMERS = ("dispatch", "retries", "notices", "recorder")
# Why an attempt was deferred (dispatcher.endpoint_gate, dispatcher.attempts).
DEFERRAL_REASONS = ("webhook_backlog", "endpoint_backlog", "retry_after", "hand_off")
# Why a record of the delay tiers was dropped unattempted (dispatcher.retry_consumer).
RETRY_DROP_REASONS = (
    "webhook_deleted_before_first_attempt",
    "webhook_deleted_before_retry",
    "malformed_record",
)
DEAD_LETTER_REASONS = ("json", "shape", "field", "internal")


class Metrics:
    """The registry of one process and its instruments."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # --- events ------------------------------------------------------------------
        self.events_consumed = Counter(
            "webhook_events_consumed", "Event records read from the event topics.", registry=r
        )
        self.events_skipped = Counter(
            "webhook_events_skipped",
            "Events not sent, by reason: unmatched (no webhook), outside_catalog, "
            "import_skipped (movements of imports), webhook_disabled (attempts of a disabled "
            "webhook).",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "webhook_dead_letters",
            "Records sent to the dead-letter topic, by reason: json, shape, field (the event "
            "breaks the contract), internal (our code failed on it).",
            ["reason"],
            registry=r,
        )
        for reason in SKIP_REASONS:
            self.events_skipped.labels(reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        self.disabled_skipped = self.events_skipped.labels("webhook_disabled")
        # --- attempts ----------------------------------------------------------------
        self.deliveries = Counter(
            "webhook_deliveries",
            "Delivery attempts by outcome: 200, 3xx/4xx/5xx (other statuses), timeout, "
            "connection, tls, blocked; deferred: not attempted (endpoint saturated, or a "
            "shutdown's hand-off), queued on the delay topic.",
            ["outcome"],
            registry=r,
        )
        self._by_outcome: dict[str, Any] = {o: self.deliveries.labels(o) for o in OUTCOMES}
        self.deliveries.labels("deferred")
        self.deferrals = Counter(
            "webhook_deferrals",
            "Attempts deferred to the delay topic unmade (no mail, nRetry unchanged), by "
            "reason: webhook_backlog (this webhook's attempts are slow and it has a backlog "
            "at its endpoint), endpoint_backlog (slow, and its endpoint is crowded), "
            "retry_after (its endpoint asked it to wait), hand_off (a shutdown's).",
            ["reason"],
            registry=r,
        )
        self._deferrals = {reason: self.deferrals.labels(reason) for reason in DEFERRAL_REASONS}
        self.delivery_seconds = Histogram(
            "webhook_delivery_duration_seconds",
            "Time from the start of a delivery attempt's POST to its outcome.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "webhook_deliveries_in_flight", "Delivery attempts under way now.", registry=r
        )
        # --- retries -----------------------------------------------------------------
        self.retries_scheduled = Counter(
            "webhook_retries_scheduled", "Failed attempts scheduled for a retry.", registry=r
        )
        self.retries_exhausted = Counter(
            "webhook_retries_exhausted",
            "Notifications whose last retry failed: the retry limit was reached.",
            registry=r,
        )
        self.retries_dropped = Counter(
            "webhook_retries_dropped",
            "Records of the delay tiers dropped unattempted, by reason: "
            "webhook_deleted_before_first_attempt (a deferred first attempt: the event was "
            "never sent), webhook_deleted_before_retry (a retry of a failed attempt), "
            "malformed_record (a record that cannot be decoded).",
            ["reason"],
            registry=r,
        )
        for reason in RETRY_DROP_REASONS:
            self.retries_dropped.labels(reason)
        self.delay_records = Counter(
            "webhook_delay_records",
            "Records queued on the delay topics, by tier and kind: retry (after a failed "
            "attempt), deferral (not attempted), requeue (released by its tier before due).",
            ["tier", "kind"],
            registry=r,
        )
        # --- notices -----------------------------------------------------------------
        self.notices_sent = Counter("webhook_notices_sent", "Failure notices mailed.", registry=r)
        self.notices_rejected = Counter(
            "webhook_notices_rejected",
            "Notices the SMTP server refused for good (5xx, e.g. no such mailbox): not retried.",
            registry=r,
        )
        self.notices_failed = Counter(
            "webhook_notices_failed",
            "Failed SMTP sends of notices (each is tried again until it goes through).",
            registry=r,
        )
        # --- delivery history ----------------------------------------------------------
        self.attempts_recorded = Counter(
            "webhook_attempts_recorded",
            "Attempt records written to PostgreSQL by the recorder (the delivery history).",
            registry=r,
        )
        self.attempt_record_lag = Gauge(
            "webhook_attempt_record_lag_seconds",
            "Seconds between the newest attempt of the recorder's last write and that write: "
            "how far the delivery history is behind.",
            registry=r,
        )
        self.recorder_errors = Counter(
            "webhook_recorder_errors",
            "Failed writes of attempt records (each batch is tried again until it is written).",
            registry=r,
        )
        # --- cache -------------------------------------------------------------------
        self.subscriptions_cached = Gauge(
            "webhook_subscriptions_cached", "Webhooks in the subscription cache.", registry=r
        )
        self.cache_current = Gauge(
            "webhook_cache_current",
            "1 while the subscription cache is known to be current (listening and loaded); "
            "0 while it is loading or its database connection is lost (consumers pause).",
            registry=r,
        )
        self._resynced_at: float | None = None
        self.cache_resync_age = Gauge(
            "webhook_cache_resync_age_seconds",
            "Seconds since the subscription cache was last loaded in full (-1: never).",
            registry=r,
        )
        self.cache_resync_age.set_function(self._resync_age)
        self.import_batches_open = Gauge(
            "webhook_import_batches_open", "Import batches waiting to be sent.", registry=r
        )
        # --- consumers ---------------------------------------------------------------
        self.consumer_lag = Gauge(
            "webhook_consumer_lag",
            "Records waiting on each assigned partition, per consumer: the end offset minus "
            "the committed offset (records in flight count).",
            ["consumer", "topic", "partition"],
            registry=r,
        )
        self.events_held = Gauge(
            "webhook_events_held",
            "Events no webhook matched, held until the subscription cache is known to be "
            "current (a few ms normally; while its database connection is lost, until it "
            "is back): only then are they dropped as unmatched.",
            registry=r,
        )
        self.record_errors = Counter(
            "webhook_record_errors",
            "Records whose handling raised an unexpected error (a bug): each was logged "
            "with its traceback and sent to the dead-letter topic, reason 'internal: ...'.",
            ["consumer"],
            registry=r,
        )
        for consumer in CONSUMERS:
            self.record_errors.labels(consumer)
        self.undecodable_batches = Counter(
            "webhook_undecodable_batches",
            "Kafka record batches that could not be decoded (unsupported codec, bad CRC, "
            "corrupt data), per consumer and topic: each stops its partition, or is skipped "
            "with DISPATCHER_SKIP_UNDECODABLE_BATCHES.",
            ["consumer", "topic"],
            registry=r,
        )
        self.undecodable_skipped = Counter(
            "webhook_undecodable_offsets_skipped",
            "Offsets skipped past undecodable batches (DISPATCHER_SKIP_UNDECODABLE_BATCHES): "
            "their records were never delivered.",
            ["consumer", "topic"],
            registry=r,
        )
        from prometheus_client import PlatformCollector, ProcessCollector  # process_*, python_info

        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def observe(self, outcome: str, duration_ms: float) -> None:
        """One attempt's outcome label ("200", "5xx", "timeout", ...) and duration."""
        child = self._by_outcome.get(outcome)
        if child is None:  # labels() takes a lock and builds a key: once per label
            child = self._by_outcome[outcome] = self.deliveries.labels(outcome)
        child.inc()
        self.delivery_seconds.observe(duration_ms / 1000)

    def deferred(self, reason: str) -> None:
        """An attempt deferred unmade, for ``reason`` (one of DEFERRAL_REASONS)."""
        self.deliveries.labels("deferred").inc()
        self._deferrals[reason].inc()

    def cache_resynced(self) -> None:
        self._resynced_at = time.monotonic()

    def _resync_age(self) -> float:
        at = self._resynced_at
        return -1.0 if at is None else time.monotonic() - at
