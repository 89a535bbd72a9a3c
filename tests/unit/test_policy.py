"""The retry policy and the delay tiers: pure decisions, no services."""

from __future__ import annotations

import pytest

from dispatcher.policy import (
    MAX_RETRY_AFTER,
    DelayTiers,
    GiveUp,
    Retry,
    RetryPolicy,
    clamp_retry_after,
)

NOW = 1_800_000_000.0


def policy(*, max_retries: int = 3, retry_delay: float = 900.0) -> RetryPolicy:
    tiers = DelayTiers.for_settings("webhook-retries", retry_delay=retry_delay)
    return RetryPolicy(max_retries=max_retries, retry_delay=retry_delay, tiers=tiers)


def test_the_configured_retry_delay_is_a_tier_of_its_own() -> None:
    """Whatever the retry delay, it is a tier, so ordinary retries are on time."""
    for delay in (2.0, 30.0, 900.0, 7200.0, 100_000.0):
        tiers = DelayTiers.for_settings("r", retry_delay=delay)
        assert tiers.for_wait(delay).seconds == delay
        assert [t.seconds for t in tiers] == sorted(t.seconds for t in tiers)
        assert len({t.topic for t in tiers}) == len(tiers.tiers)


def test_tier_topics_are_named_after_the_retry_topic() -> None:
    """The tiers of a 2 s retry delay (as in the tests) and of the 900 s default."""
    assert DelayTiers.for_settings("webhook-retries", retry_delay=2).topics == (
        "webhook-retries-2s", "webhook-retries-30s", "webhook-retries-1h", "webhook-retries-6h",
    )  # fmt: skip
    assert DelayTiers.for_settings("x", retry_delay=900).topics == (
        "x-30s", "x-15m", "x-1h", "x-6h",
    )  # fmt: skip


def test_a_failed_attempt_is_retried_after_the_retry_delay_until_the_limit() -> None:
    """nRetry 0..2 fail: retry at now + delay on the delay's tier; nRetry 3 fails: give up."""
    p = policy()
    for n in range(3):
        decision = p.after_failure(n, retry_after=None, now=NOW)
        assert isinstance(decision, Retry)
        assert (decision.n_retry, decision.due, decision.tier.name) == (n + 1, NOW + 900, "15m")
    assert p.after_failure(3, retry_after=None, now=NOW) == GiveUp(3)
    assert p.after_failure(0, retry_after=None, now=NOW) != GiveUp(0)
    assert policy(max_retries=0).after_failure(0, retry_after=None, now=NOW) == GiveUp(0)


@pytest.mark.parametrize(
    ("retry_after", "wait", "tier"),
    [
        (None, 900.0, "15m"),
        (60.0, 900.0, "15m"),  # shorter than the retry delay: the delay wins
        (1000.0, 1000.0, "15m"),  # the longest tier not longer than the wait
        (7200.0, 7200.0, "1h"),
        (86_400.0, 86_400.0, "6h"),
        (1e12, MAX_RETRY_AFTER, "6h"),  # clamped to a day
        (-5.0, 900.0, "15m"),
    ],
)
def test_retry_after_is_honoured_and_clamped(
    retry_after: float | None, wait: float, tier: str
) -> None:
    """An endpoint's Retry-After lengthens the wait (clamped to 24 h), never shortens it."""
    decision = policy().after_failure(0, retry_after=retry_after, now=NOW)
    assert isinstance(decision, Retry)
    assert decision.due == NOW + wait and decision.tier.name == tier


def test_a_deferral_keeps_its_attempt_number_and_goes_to_the_shortest_tier() -> None:
    """A deferred attempt is not a failure: same nRetry, shortest tier."""
    assert policy().deferral(2, now=NOW) == Retry(2, NOW + 30, policy().tiers.shortest)
    short = policy(retry_delay=2)
    assert short.deferral(0, now=NOW).tier.name == "2s"


def test_a_released_record_is_attempted_when_due_or_requeued_for_what_remains() -> None:
    """Released by its tier: due now (within half a second) is attempted; else the longest
    tier not longer than the rest, and at last the shortest (rounding up)."""
    p = policy()
    assert p.released(NOW + 0.4, now=NOW) is None
    assert p.released(NOW - 100, now=NOW) is None
    remaining = [p.released(NOW + r, now=NOW) for r in (100.0, 20.0, 5000.0, 80_000.0)]
    assert [t.name if t else None for t in remaining] == ["30s", "30s", "1h", "6h"]


def test_a_wait_is_honoured_to_within_the_shortest_tier() -> None:
    """Following the tiers hop by hop, every wait from 1 s to a day ends within the
    shortest tier after it was due, never before, in a bounded number of re-queues."""
    p = policy()
    waits = (1.0, 29.0, 31.0, 100.0, 901.0, 1000.0, 3599.0, 7300.0, 21_599.0, 50_000.0, 86_400.0)
    for wait in waits:
        due, now, tier = NOW + wait, NOW, p.tiers.for_wait(wait)
        hops = 0
        while True:
            now += tier.seconds  # released by its tier
            onward = p.released(due, now=now)
            if onward is None:
                break
            tier, hops = onward, hops + 1
        assert due - 0.5 <= now <= due + p.tiers.shortest.seconds, wait
        assert hops <= 40, wait  # the worst (a wait just under a day): 40 re-queues


def test_hostile_retry_after_values_are_clamped() -> None:
    """NaN, negative and absurd values become 0 or a day."""
    assert clamp_retry_after(float("nan")) == 0.0
    assert clamp_retry_after(float("inf")) == MAX_RETRY_AFTER
    assert clamp_retry_after(-1.0) == 0.0
