"""What happens after a failed attempt: the retry policy and the delay tiers. Pure logic.

The delay topics are tiers: each holds records of one delay only, so that within a
topic due order is offset order and a consumer waiting at a partition's head never
holds back a record that is due sooner. The tiers are a short one for deferrals (the
shorter of 30 s and the retry delay), 30 s, the retry delay itself
(``DISPATCHER_RETRY_DELAY_SECONDS``, so ordinary retries are on time to the second), 1 h
and 6 h; their topics are named after ``DISPATCHER_RETRY_TOPIC``::

    >>> tiers = DelayTiers.for_settings("webhook-retries", retry_delay=900)
    >>> [t.topic for t in tiers]
    ['webhook-retries-30s', 'webhook-retries-15m', 'webhook-retries-1h', 'webhook-retries-6h']

A wait goes to the longest tier not longer than it (or the shortest): when that tier
releases the record and it is not due yet, it is queued again for what remains, so a
long ``Retry-After`` is honoured to within the shortest tier::

    >>> [tiers.for_wait(w).seconds for w in (5, 900, 1000, 7200, 86400)]
    [30.0, 900.0, 900.0, 3600.0, 21600.0]

:class:`RetryPolicy` is the one owner of the decision "this attempt failed: what now?"::

    >>> policy = RetryPolicy(max_retries=3, retry_delay=900, tiers=tiers)
    >>> policy.after_failure(0, retry_after=None, now=1000.0)
    Retry(n_retry=1, due=1900.0, tier=Tier(seconds=900.0, topic='webhook-retries-15m'))
    >>> policy.after_failure(3, retry_after=None, now=1000.0)
    GiveUp(n_retry=3)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_RETRY_AFTER = 86_400.0  # seconds: a longer Retry-After is taken as a day
DEFER_SECONDS = 30.0  # a deferred attempt (saturated endpoint) is tried again this soon
LONG_TIERS = (3600.0, 21600.0)  # seconds: for long Retry-After values
DUE_SLACK = 0.5  # seconds: a record released this close to its due time is attempted


@dataclass(frozen=True, slots=True)
class Tier:
    """One delay topic: every record on it waits ``seconds`` from when it was queued."""

    seconds: float
    topic: str

    @property
    def name(self) -> str:
        """``30s``, ``15m``, ``1h``: a bounded label for logs and metrics."""
        return tier_name(self.seconds)


def tier_name(seconds: float) -> str:
    """A short label for a delay: ``30s``, ``15m``, ``1h``, ``500ms``.

    >>> [tier_name(s) for s in (2, 30, 90, 900, 3600, 5400, 0.5)]
    ['2s', '30s', '90s', '15m', '1h', '90m', '500ms']
    """
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    if whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole % 60 == 0 and whole > 60:
        return f"{whole // 60}m"
    return f"{whole}s"


@dataclass(frozen=True, slots=True)
class DelayTiers:
    """The delay tiers, shortest first."""

    tiers: tuple[Tier, ...]

    @classmethod
    def for_settings(cls, base_topic: str, *, retry_delay: float) -> DelayTiers:
        delays = sorted({min(DEFER_SECONDS, retry_delay), DEFER_SECONDS, retry_delay, *LONG_TIERS})
        return cls(tuple(Tier(float(d), f"{base_topic}-{tier_name(d)}") for d in delays))

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    @property
    def shortest(self) -> Tier:
        return self.tiers[0]

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(t.topic for t in self.tiers)

    def for_wait(self, seconds: float) -> Tier:
        """The longest tier not longer than ``seconds``; the shortest for a shorter wait."""
        chosen = self.tiers[0]
        for tier in self.tiers:
            if tier.seconds <= seconds:
                chosen = tier
        return chosen

    def of_topic(self, topic: str) -> Tier | None:
        """The tier of a topic; None for another (the pre-tier delay topic, a tier of an
        older configuration): its records are never held, only moved or attempted."""
        for tier in self.tiers:
            if tier.topic == topic:
                return tier
        return None


@dataclass(frozen=True, slots=True)
class Retry:
    """Attempt again: attempt number ``n_retry`` at ``due`` (Unix seconds), via ``tier``."""

    n_retry: int
    due: float
    tier: Tier


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The retry limit is reached: attempt ``n_retry`` was the last."""

    n_retry: int


Decision = Retry | GiveUp


def clamp_retry_after(seconds: float | None) -> float:
    """An endpoint's ``Retry-After`` as a wait we honour: [0, MAX_RETRY_AFTER].

    >>> [clamp_retry_after(s) for s in (None, -5, 120, 1e12)]
    [0.0, 0.0, 120.0, 86400.0]
    """
    if seconds is None or seconds != seconds:
        return 0.0
    return min(max(0.0, float(seconds)), MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Decides, from the attempt number, what the endpoint asked and the time, what
    follows a failed attempt; and where a deferred or released record goes."""

    max_retries: int
    retry_delay: float
    tiers: DelayTiers

    def after_failure(self, n_retry: int, *, retry_after: float | None, now: float) -> Decision:
        """Attempt ``n_retry`` failed (its endpoint asked to wait ``retry_after``)."""
        if n_retry >= self.max_retries:
            return GiveUp(n_retry)
        wait = max(self.retry_delay, clamp_retry_after(retry_after))
        return Retry(n_retry + 1, now + wait, self.tiers.for_wait(wait))

    def deferral(self, n_retry: int, *, now: float, until: float | None = None) -> Retry:
        """The same attempt again later, not counted as a failure: the shortest tier, or,
        when the endpoint asked to wait until ``until`` (later than that tier), due then.

        >>> policy = RetryPolicy(3, 900, DelayTiers.for_settings("r", retry_delay=900))
        >>> [(r.due, r.tier.name) for r in (policy.deferral(0, now=0), policy.deferral(
        ...     0, now=0, until=10), policy.deferral(0, now=0, until=4000))]
        [(30.0, '30s'), (30.0, '30s'), (4000, '1h')]
        """
        tier = self.tiers.shortest
        if until is None or until - now <= tier.seconds:
            return Retry(n_retry, now + tier.seconds, tier)
        return Retry(n_retry, until, self.tiers.for_wait(until - now))

    def released(self, due: float, *, now: float) -> Tier | None:
        """A record released by its tier (or read from a topic that is not a tier):
        None when it is due now, else the tier to queue it on for what remains."""
        remaining = due - now
        if remaining <= DUE_SLACK:
            return None
        return self.tiers.for_wait(remaining)
