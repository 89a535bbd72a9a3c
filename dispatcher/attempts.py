"""Delivery attempts: bounded, signed, logged, and what follows a failed one.

Two bounds apply to every attempt: a global one (``DISPATCHER_MAX_IN_FLIGHT``) and one per
endpoint (scheme, host and port), so a slow or hanging endpoint holds at most its own
slots while other shops' events flow. Within an endpoint, its
:class:`~dispatcher.endpoint_gate.EndpointGate` shares the slots between the webhooks
there (a share each, round robin, a limit that adapts to the endpoint's answers), so one
shop's slow handler does not hold up the other shops the same integrator serves; a
``Retry-After`` of a 429 or 503 holds back that webhook alone. Each attempt writes one
canonical log line.

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
from dispatcher.endpoint_gate import (
    DEFERRED,
    RETRY_AFTER,
    WAITING,
    EndpointGate,
    Limits,
    Ticket,
)
from dispatcher.history import AttemptLog, Trigger
from dispatcher.metrics import Metrics
from dispatcher.notices import Failure, Notice
from dispatcher.notification import Notification
from dispatcher.policy import Decision, GiveUp, Retry, RetryPolicy
from dispatcher.store import Webhook

log = structlog.get_logger("dispatcher.delivery")

Clock = Callable[[], float]  # Unix seconds, like time.time
HANDED_OFF = "shutting down: handed to the delay topic"
HAND_OFF = "hand_off"  # the deferral reason label of HANDED_OFF
OVERLOAD = frozenset({429, 503})  # answers that shrink the endpoint's limit (and Retry-After)
MAX_IDLE_GATES = 10_000  # gates kept while idle, for the limit they learnt; then swept
MAX_HOLDS = 10_000  # webhooks held back by a Retry-After; past it, the expired are swept


@dataclass(frozen=True, slots=True)
class Deferred:
    """The attempt was not made: it is queued on a delay tier (the shortest, or the one of
    its endpoint's Retry-After), unmailed."""

    reason: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """No attempt: the webhook is disabled. Counted, not sent, not retried."""

    reason: str


DISABLED = Skipped("webhook disabled")


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
        min_in_flight_per_endpoint: int = 2,
        webhook_share: float = 0.25,
    ) -> None:
        """The per-endpoint limit adapts between ``min_in_flight_per_endpoint`` and
        ``max_in_flight_per_endpoint``; one webhook holds at most ``webhook_share`` of it."""
        self._http = http
        self._log = attempt_log
        self._policy = policy
        self._delays = delays
        self._producer = producer
        self._notice_topic = notice_topic
        self._metrics = metrics
        self._global = asyncio.Semaphore(max_in_flight)
        lowest = max(1, min(min_in_flight_per_endpoint, max_in_flight_per_endpoint))
        self._limits = Limits(lowest, max_in_flight_per_endpoint, webhook_share)
        self._gates: dict[str, EndpointGate] = {}
        self._holds: dict[Any, float] = {}  # webhook id -> until (clock) its endpoint asked
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
        *,
        follow_up: bool = True,
    ) -> Outcome | Deferred | Skipped:
        """One attempt; what follows a failure is durable before this returns, its
        attempt record (when the history is on) is queued (durable before the caller's
        offset commits: see :meth:`durable`).

        Without ``follow_up`` (a resend or a recovery job's attempt) a failure has no
        retry and no mail, the attempt waits for a slot rather than being deferred, and a
        shutdown's hand-off leaves it to its job (it is :class:`Deferred`, not queued).
        A disabled webhook gets no attempt but those.

        The attempt waits for its turn at its endpoint's gate
        (:mod:`dispatcher.endpoint_gate`). A webhook whose attempts are slow and that has a
        backlog there (or whose endpoint is crowded) has the attempt deferred to the delay
        topic, so the consumer keeps its slots for other webhooks; so has a webhook whose
        endpoint asked it to wait (``Retry-After`` on a 429 or 503) until then. A fast
        webhook with a burst queued is not deferred. After :meth:`hand_off`, attempts
        waiting or under way are deferred too.
        """
        if not follow_up:
            if self._handing_off:
                return Deferred(HANDED_OFF)
        elif webhook.disabled_at is not None:
            self._metrics.disabled_skipped.inc()
            return DISABLED
        elif self._handing_off:
            return await self._defer(webhook, notification, n_retry, HANDED_OFF)
        if follow_up and self._holds:
            until = self._held_until(webhook)
            if until is not None:
                wait = f"the endpoint asked this webhook to wait until {_iso(until)} (Retry-After)"
                return await self._defer(
                    webhook, notification, n_retry, wait, cause=RETRY_AFTER, until=until
                )
        endpoint = _endpoint(webhook.url)
        gate = self._gates.get(endpoint)
        if gate is None:
            gate = self._new_gate(endpoint)
        # Keyed by the id's int: a UUID's own hash is a Python call, four times an attempt.
        ticket = gate.enter(webhook.id.int, time.monotonic(), deferrable=follow_up)
        if ticket.state == DEFERRED:
            return await self._defer(
                webhook, notification, n_retry, ticket.reason, cause=ticket.cause
            )
        task = asyncio.current_task() if follow_up else None  # hand_off cancels these
        if task is not None:
            self._attempts.add(task)
        try:
            made = await self._in_turn(gate, ticket, webhook, notification, n_retry)
        except asyncio.CancelledError:
            if not self._handing_off or task is None:
                raise
            task.uncancel()  # cancelled by hand_off: the attempt goes to the delay topic
            return await self._defer(webhook, notification, n_retry, HANDED_OFF)
        finally:
            if task is not None:
                self._attempts.discard(task)
            if gate.users == 0 and not gate.adapted and self._gates.get(endpoint) is gate:
                del self._gates[endpoint]
        if made is None:  # turned away while it waited: its endpoint asked it to wait
            until = self._holds.get(webhook.id)
            return await self._defer(
                webhook, notification, n_retry, ticket.reason, cause=ticket.cause, until=until
            )
        at, body, outcome = made
        _log_attempt(webhook, notification, n_retry, outcome)
        self._metrics.observe(outcome.label, outcome.duration_ms)
        if self._log is not None:
            self._log.add_attempt(
                notification, webhook.environment_id, n_retry,
                at=at, body=body, outcome=outcome, trigger=trigger,
            )  # fmt: skip
        if not outcome.ok and follow_up:
            failure = Failure(n_retry, self._clock(), body, outcome)
            await self._failed(webhook, notification, failure)
        return outcome

    async def durable(self) -> None:
        """Return once the attempt records of every attempt made so far are acked: a
        consumer awaits it before it commits (see :class:`~dispatcher.history.AttemptLog`)."""
        if self._log is not None:
            await self._log.flushed()

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

    async def _in_turn(
        self,
        gate: EndpointGate,
        ticket: Ticket,
        webhook: Webhook,
        notification: Notification,
        n_retry: int,
    ) -> tuple[float, bytes, Outcome] | None:
        """Wait for the ticket's turn at the gate, then attempt: (when, body, outcome), or
        None when the webhook was turned away meanwhile (a Retry-After of its endpoint)."""
        took: float | None = None  # how long the endpoint took to answer (or time out)
        overloaded = False
        label = ""
        try:
            if ticket.state == WAITING:
                ticket.waker = asyncio.get_running_loop().create_future()
                await ticket.waker  # set by _wake
                if ticket.state == DEFERRED:
                    return None
            async with self._global:
                self._metrics.in_flight.inc()
                at = self._clock()
                try:
                    body, outcome = await self._attempt(webhook, notification, n_retry, at)
                finally:
                    self._metrics.in_flight.dec()
            status = outcome.status
            if status is not None or outcome.error_kind == "timeout":
                took, label = outcome.duration_ms / 1000, outcome.label
                overloaded = status is None or status in OVERLOAD
                if overloaded and outcome.retry_after:
                    self._hold(gate, webhook, at + outcome.retry_after)
            return at, body, outcome
        finally:
            limit = gate.limit
            gate.leave(ticket, time.monotonic(), took=took, overloaded=overloaded)
            if gate.limit < limit:  # at most once a second per endpoint
                log.info(
                    "endpoint_limit_lowered",
                    endpoint=_endpoint(webhook.url),
                    limit=int(gate.limit),
                    webhook_id=str(webhook.id),
                    cause=label,
                )

    def _new_gate(self, endpoint: str) -> EndpointGate:
        if len(self._gates) >= MAX_IDLE_GATES:  # forget what idle endpoints taught us
            for key in [k for k, g in self._gates.items() if g.users == 0]:
                del self._gates[key]
        gate = self._gates[endpoint] = EndpointGate(self._limits, _wake)
        return gate

    def _hold(self, gate: EndpointGate, webhook: Webhook, until: float) -> None:
        """The endpoint asked this webhook to wait until ``until``: its attempts waiting at
        the gate, and those that arrive before then, are deferred until then."""
        if len(self._holds) >= MAX_HOLDS:
            now = self._clock()
            for key in [k for k, u in self._holds.items() if u <= now]:
                del self._holds[key]
        self._holds[webhook.id] = max(until, self._holds.get(webhook.id, until))
        wait = f"the endpoint asked this webhook to wait until {_iso(until)} (Retry-After)"
        gate.turn_away(webhook.id.int, RETRY_AFTER, wait)

    def _held_until(self, webhook: Webhook) -> float | None:
        """Until when the webhook's endpoint asked it to wait, if it still must."""
        until = self._holds.get(webhook.id)
        if until is not None and until <= self._clock():
            del self._holds[webhook.id]
            return None
        return until

    async def _defer(
        self,
        webhook: Webhook,
        notification: Notification,
        n_retry: int,
        reason: str,
        *,
        cause: str = HAND_OFF,
        until: float | None = None,
    ) -> Deferred:
        """Queue the attempt on the delay topic, unmade and unmailed: due on the shortest
        tier, or at ``until`` (a Retry-After) when that is later. ``cause`` is the
        bounded label of ``reason`` (``webhook_deferrals_total``)."""
        _log_deferred(webhook, notification, n_retry, reason)
        self._metrics.deferred(cause)
        now = self._clock()
        retry = self._policy.deferral(n_retry, now=now, until=until)
        await self._delays.put(
            notification, retry, last_failure=f"deferred: {reason}", now=now, kind="deferral"
        )
        return Deferred(reason)

    async def _attempt(
        self, webhook: Webhook, notification: Notification, n_retry: int, now: float
    ) -> tuple[bytes, Outcome]:
        body = notification.body(n_retry, float(now))
        # The current secret, and during a rotation's grace period the previous one too.
        secrets = webhook.signing_secrets(now)
        key: bytes | list[bytes]
        if len(secrets) == 1:
            key = self._key(secrets[0])
        else:
            key = [self._key(secret) for secret in secrets]
        headers = signing.headers(key, notification.notification_uuid, int(now), body)
        return body, await self._http.post(webhook.url, body, headers)

    def _key(self, secret: str) -> bytes:
        """The HMAC key of a secret, decoded once."""
        key = self._keys.get(secret)
        if key is None:
            if len(self._keys) >= 100_000:  # bounded: secrets of deleted webhooks go away
                self._keys.clear()
            key = self._keys[secret] = signing.secret_key(secret)
        return key


def _wake(ticket: Ticket) -> None:
    """The gate's callback: a waiting ticket may start (or was turned away)."""
    waker = ticket.waker
    if waker is not None and not waker.done():
        waker.set_result(None)


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


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
