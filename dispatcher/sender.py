"""Delivery attempts: bounded, signed, logged, and handed to retry when they fail.

Two bounds apply to every attempt: a global one (``DISPATCHER_MAX_IN_FLIGHT``) and one per
endpoint (``DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT``, keyed by scheme, host and port), so a
slow or hanging endpoint holds at most its own slots while other shops' events flow.
Each attempt writes one canonical log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import structlog

from dispatcher import signing
from dispatcher.delivery import HttpClient, Outcome, parse_url
from dispatcher.metrics import Metrics
from dispatcher.notification import Notification
from dispatcher.store import Webhook

log = structlog.get_logger("dispatcher.delivery")

Clock = Callable[[], float]  # Unix seconds, like time.time
QUEUE_FACTOR = 8  # per endpoint: attempts under way or waiting, in in-flight bounds
SLOW_SECONDS = 1.0  # an endpoint whose attempts take longer may have attempts deferred


class FailureHandler(Protocol):
    """Makes a failed attempt durable (retry record, notice) before its offset commits."""

    async def failed(
        self,
        webhook: Webhook,
        notification: Notification,
        n_retry: int,
        body: bytes,
        outcome: Outcome,
    ) -> None: ...

    async def deferred(self, webhook: Webhook, notification: Notification, n_retry: int) -> None:
        """Schedule the same attempt again later, without counting it as a failure."""


class _EndpointGate:
    """One endpoint's bound, and how slow it has been lately."""

    __slots__ = ("semaphore", "starts", "typical", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0  # attempts under way or waiting
        self.starts: list[float] = []  # monotonic start of each attempt under way
        self.typical = 0.0  # moving average of attempt durations, seconds

    def slow(self, now: float) -> bool:
        """Attempts take (or have been taking) longer than SLOW_SECONDS."""
        oldest = min(self.starts, default=now)
        return max(self.typical, now - oldest) > SLOW_SECONDS

    def finished(self, started: float, now: float) -> None:
        self.starts.remove(started)
        self.typical += 0.2 * ((now - started) - self.typical)


class Sender:
    """Runs attempts within the bounds, and reports failures to a :class:`FailureHandler`."""

    def __init__(
        self,
        http: HttpClient,
        failures: FailureHandler,
        *,
        max_in_flight: int,
        max_in_flight_per_endpoint: int,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._http = http
        self._metrics = metrics
        self._failures = failures
        self._global = asyncio.Semaphore(max_in_flight)
        self._per_endpoint = max_in_flight_per_endpoint
        self._gates: dict[str, _EndpointGate] = {}
        self._clock = clock
        self._keys: dict[str, bytes] = {}
        self.in_flight = 0

    async def deliver(self, webhook: Webhook, notification: Notification, n_retry: int) -> Outcome:
        """One attempt; a failure is handed to the failure handler before this returns.

        A slow endpoint (attempts taking over ``SLOW_SECONDS``) that already has
        ``QUEUE_FACTOR`` times its in-flight bound under way or waiting gets no more: the
        attempt is deferred to the delay topic, so the consumer keeps its slots for other
        endpoints. A fast endpoint with a burst queued is not deferred.
        """
        endpoint = _endpoint(webhook.url)
        gate = self._gates.get(endpoint)
        if gate is None:
            gate = self._gates[endpoint] = _EndpointGate(self._per_endpoint)
        if gate.users >= self._per_endpoint * QUEUE_FACTOR and gate.slow(time.monotonic()):
            return await self._defer(webhook, notification, n_retry, gate.users)
        gate.users += 1
        try:
            async with gate.semaphore, self._global:
                self.in_flight += 1
                started = time.monotonic()
                gate.starts.append(started)
                try:
                    body, outcome = await self._attempt(webhook, notification, n_retry)
                finally:
                    self.in_flight -= 1
                    gate.finished(started, time.monotonic())
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[endpoint]
        _log_attempt(webhook, notification, n_retry, outcome)
        if self._metrics is not None:
            self._metrics.observe(outcome.label, outcome.duration_ms)
        if not outcome.ok:
            await self._failures.failed(webhook, notification, n_retry, body, outcome)
        return outcome

    async def _defer(
        self, webhook: Webhook, notification: Notification, n_retry: int, waiting: int
    ) -> Outcome:
        outcome = Outcome(
            None, "deferred", f"{waiting} deliveries already under way or waiting", 0.0
        )
        _log_attempt(webhook, notification, n_retry, outcome)
        if self._metrics is not None:
            self._metrics.deliveries.labels("deferred").inc()
        await self._failures.deferred(webhook, notification, n_retry)
        return outcome

    async def _attempt(
        self, webhook: Webhook, notification: Notification, n_retry: int
    ) -> tuple[bytes, Outcome]:
        now = self._clock()
        body = notification.body(n_retry, datetime.fromtimestamp(now, UTC))
        key = self._keys.get(webhook.secret)
        if key is None:
            key = self._keys[webhook.secret] = signing.secret_key(webhook.secret)
            if len(self._keys) > 100_000:  # bounded: secrets of deleted webhooks go away
                self._keys.clear()
        headers = signing.headers(key, notification.notification_uuid, int(now), body)
        return body, await self._http.post(webhook.url, body, headers)


@functools.lru_cache(maxsize=65_536)
def _endpoint(url: str) -> str:
    parsed = parse_url(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _log_attempt(
    webhook: Webhook, notification: Notification, n_retry: int, outcome: Outcome
) -> None:
    if outcome.ok and not log.is_enabled_for(logging.INFO):
        return  # at warning level a delivery's line is not written: skip building it
    fields = {
        "webhook_id": str(webhook.id),
        "notification_uuid": notification.notification_uuid,
        "environment_id": webhook.environment_id,
        "entity_name": notification.entity_name,
        "event_type": notification.type,
        "n_retry": n_retry,
        "entities": len(notification.entities),
        "status": outcome.status,
        "duration_ms": outcome.duration_ms,
    }
    if outcome.ok:
        log.info("delivery", outcome="delivered", **fields)
    elif outcome.error_kind == "deferred":
        log.info("delivery", outcome="deferred", reason=outcome.detail, **fields)
    else:
        log.warning(
            "delivery",
            outcome="failed",
            error_kind=outcome.error_kind,
            error=outcome.detail,
            **fields,
        )
