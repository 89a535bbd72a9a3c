"""Delivery attempts: bounded, signed, logged, and what follows a failed one.

Two bounds apply to every attempt: a global one (``DISPATCHER_MAX_IN_FLIGHT``) and one per
endpoint (``DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT``, keyed by scheme, host and port), so a
slow or hanging endpoint holds at most its own slots while other shops' events flow.
Each attempt writes one canonical log line.

:class:`Attempts` orchestrates: the HTTP client (:mod:`dispatcher.client`) sends and
returns an :class:`~dispatcher.client.Outcome`; for a failed one the retry policy
(:mod:`dispatcher.policy`) decides what follows, and the next attempt (on a delay tier)
and the notice (on the notice topic) are acked by Kafka before :meth:`Attempts.make`
returns, so before the caller's offset may commit. An attempt not made (its endpoint is
saturated, or a shutdown ran out of drain time) is :class:`Deferred`, not an outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from dispatcher import durable, signing
from dispatcher.client import HttpClient, Outcome, parse_url
from dispatcher.delays import DelayQueue
from dispatcher.history import AttemptLog, AttemptRecord, Trigger
from dispatcher.metrics import Metrics
from dispatcher.notices import Failure, Notice
from dispatcher.notification import Notification
from dispatcher.policy import Decision, GiveUp, Retry, RetryPolicy
from dispatcher.store import Webhook

log = structlog.get_logger("dispatcher.delivery")

Clock = Callable[[], float]  # Unix seconds, like time.time
QUEUE_FACTOR = 8  # per endpoint: attempts under way or waiting, in in-flight bounds
SLOW_SECONDS = 1.0  # an endpoint whose attempts take longer may have attempts deferred
HANDED_OFF = "shutting down: handed to the delay topic"


@dataclass(frozen=True, slots=True)
class Deferred:
    """The attempt was not made: it is queued on the shortest delay tier, unmailed."""

    reason: str


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


class Attempts:
    """Makes attempts within the bounds and carries out the retry policy's decisions."""

    def __init__(
        self,
        http: HttpClient,
        policy: RetryPolicy,
        delays: DelayQueue,
        producer: AIOKafkaProducer,
        *,
        notice_topic: str,
        max_in_flight: int,
        max_in_flight_per_endpoint: int,
        clock: Clock,
        metrics: Metrics,
        attempt_log: AttemptLog | None = None,
    ) -> None:
        self._http = http
        self._log = attempt_log
        self._policy = policy
        self._delays = delays
        self._producer = producer
        self._notice_topic = notice_topic
        self._metrics = metrics
        self._global = asyncio.Semaphore(max_in_flight)
        self._per_endpoint = max_in_flight_per_endpoint
        self._gates: dict[str, _EndpointGate] = {}
        self._clock = clock
        self._keys: dict[str, bytes] = {}
        self._attempts: set[asyncio.Task[Any]] = set()  # tasks with an attempt waiting or under way
        self._handing_off = False

    async def make(
        self,
        webhook: Webhook,
        notification: Notification,
        n_retry: int,
        trigger: Trigger = "scheduled",
    ) -> Outcome | Deferred:
        """One attempt; its attempt record (when the history is on) and what follows a
        failure are durable before this returns.

        A slow endpoint (attempts taking over ``SLOW_SECONDS``) that already has
        ``QUEUE_FACTOR`` times its in-flight bound under way or waiting gets no more: the
        attempt is deferred to the delay topic, so the consumer keeps its slots for other
        endpoints. A fast endpoint with a burst queued is not deferred. After
        :meth:`hand_off`, attempts waiting or under way are deferred too.
        """
        if self._handing_off:
            return await self._defer(webhook, notification, n_retry, HANDED_OFF)
        endpoint = _endpoint(webhook.url)
        gate = self._gates.get(endpoint)
        if gate is None:
            gate = self._gates[endpoint] = _EndpointGate(self._per_endpoint)
        if gate.users >= self._per_endpoint * QUEUE_FACTOR and gate.slow(time.monotonic()):
            waiting = f"{gate.users} deliveries already under way or waiting"
            return await self._defer(webhook, notification, n_retry, waiting)
        task = asyncio.current_task()
        if task is not None:
            self._attempts.add(task)
        gate.users += 1
        try:
            async with gate.semaphore, self._global:
                self._metrics.in_flight.inc()
                started = time.monotonic()
                gate.starts.append(started)
                at = self._clock()
                try:
                    body, outcome = await self._attempt(webhook, notification, n_retry, at)
                finally:
                    self._metrics.in_flight.dec()
                    gate.finished(started, time.monotonic())
        except asyncio.CancelledError:
            if not self._handing_off or task is None:
                raise
            task.uncancel()  # cancelled by hand_off: the attempt goes to the delay topic
            return await self._defer(webhook, notification, n_retry, HANDED_OFF)
        finally:
            if task is not None:
                self._attempts.discard(task)
            gate.users -= 1
            if gate.users == 0:
                del self._gates[endpoint]
        _log_attempt(webhook, notification, n_retry, outcome)
        self._metrics.observe(outcome.label, outcome.duration_ms)
        if self._log is not None:
            record = AttemptRecord.of(
                notification, webhook.environment_id, n_retry,
                at=at, body=body, outcome=outcome, trigger=trigger,
            )  # fmt: skip
            await self._log.record(record)
        if not outcome.ok:
            failure = Failure(n_retry, self._clock(), body, outcome)
            await self._failed(webhook, notification, failure)
        return outcome

    def hand_off(self) -> None:
        """Shutting down and out of drain time: every attempt waiting for a slot or under
        way is given up and deferred to the delay topic (no mail), and so is every later
        one, so that the consumers can commit every offset. An attempt given up while its
        POST was under way had no answer yet: the endpoint gets it again later."""
        if self._handing_off:
            return
        self._handing_off = True
        log.warning("deliveries_handed_off", attempts=len(self._attempts))
        for task in list(self._attempts):
            task.cancel()

    async def _failed(self, webhook: Webhook, notification: Notification, failure: Failure) -> None:
        """Carry out the policy's decision: the next attempt on its tier, then the notice."""
        outcome = failure.outcome
        decision: Decision = self._policy.after_failure(
            failure.n_retry, retry_after=outcome.retry_after, now=failure.at
        )
        if isinstance(decision, Retry):
            try:
                await self._delays.put(
                    notification, decision, last_failure=outcome.detail, now=failure.at,
                    kind="retry",
                )  # fmt: skip
            except KafkaError as exc:  # not an outage: the record can never be produced
                log.error(
                    "retry_not_scheduled",
                    webhook_id=str(webhook.id),
                    notification_uuid=notification.notification_uuid,
                    error=repr(exc),
                )
                decision = GiveUp(failure.n_retry)
            else:
                self._metrics.retries_scheduled.inc()
        notice = Notice.for_failure(
            webhook, notification, failure, decision, max_retries=self._policy.max_retries
        )
        # Acked by all in-sync replicas (like the retry record) before the source offset
        # may commit.
        key = str(webhook.id).encode()
        await durable.send(self._producer, self._notice_topic, notice.encode(), key=key)
        if isinstance(decision, GiveUp):
            self._metrics.retries_exhausted.inc()
            log.warning(
                "retries_exhausted",
                webhook_id=str(webhook.id),
                notification_uuid=notification.notification_uuid,
                n_retry=failure.n_retry,
            )

    async def _defer(
        self, webhook: Webhook, notification: Notification, n_retry: int, reason: str
    ) -> Deferred:
        _log_deferred(webhook, notification, n_retry, reason)
        self._metrics.deferred()
        now = self._clock()
        retry = self._policy.deferral(n_retry, now=now)
        await self._delays.put(
            notification, retry, last_failure=f"deferred: {reason}", now=now, kind="deferral"
        )
        return Deferred(reason)

    async def _attempt(
        self, webhook: Webhook, notification: Notification, n_retry: int, now: float
    ) -> tuple[bytes, Outcome]:
        body = notification.body(n_retry, datetime.fromtimestamp(now, UTC))
        # The current secret, and during a rotation's grace period the previous one too.
        keys = []
        for secret in webhook.signing_secrets(now):
            key = self._keys.get(secret)
            if key is None:
                if len(self._keys) >= 100_000:  # bounded: secrets of deleted webhooks go away
                    self._keys.clear()
                key = self._keys[secret] = signing.secret_key(secret)
            keys.append(key)
        headers = signing.headers(keys, notification.notification_uuid, int(now), body)
        return body, await self._http.post(webhook.url, body, headers)


@functools.lru_cache(maxsize=65_536)
def _endpoint(url: str) -> str:
    parsed = parse_url(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _fields(webhook: Webhook, notification: Notification, n_retry: int) -> dict[str, Any]:
    return {
        "webhook_id": str(webhook.id),
        "notification_uuid": notification.notification_uuid,
        "environment_id": webhook.environment_id,
        "entity_name": notification.entity_name,
        "event_type": notification.type,
        "n_retry": n_retry,
        "entities": len(notification.entities),
    }


def _log_attempt(
    webhook: Webhook, notification: Notification, n_retry: int, outcome: Outcome
) -> None:
    if outcome.ok and not log.is_enabled_for(logging.INFO):
        return  # at warning level a delivery's line is not written: skip building it
    fields = _fields(webhook, notification, n_retry)
    fields["status"] = outcome.status
    fields["duration_ms"] = outcome.duration_ms
    if outcome.ok:
        log.info("delivery", outcome="delivered", **fields)
    else:
        log.warning(
            "delivery",
            outcome="failed",
            error_kind=outcome.error_kind,
            error=outcome.detail,
            **fields,
        )


def _log_deferred(webhook: Webhook, notification: Notification, n_retry: int, reason: str) -> None:
    log.info(
        "delivery", outcome="deferred", reason=reason, **_fields(webhook, notification, n_retry)
    )
