"""Which attempt may go to an endpoint now: fair between its webhooks, adaptive. Pure logic.

Many webhooks (shops) often share one endpoint (scheme, host and port): an integrator
serves them all from one host. One :class:`EndpointGate` per endpoint decides when each
attempt may start, so that one shop's slow handler does not take the others' turns:

- **Adaptive limit.** At most ``limit`` attempts are under way at once. It starts at
  ``highest`` (``DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT``), is halved (at most once per
  ``CALM_SECONDS``, never below ``lowest``) when an attempt times out or is answered 429 or
  503, and grows back by one per ``limit`` answers that came within ``FAST_SECONDS``
  (additive increase, multiplicative decrease). Slow answers and other failures change
  nothing: a slow shop is not the endpoint's overload.
- **A share per webhook.** One webhook holds at most ``share`` of the limit (at least one
  slot) while others want slots, and a webhook with an attempt under way never takes the
  endpoint's last free slot, which stays for a webhook with none. So ``k`` slow webhooks
  hold at most ``k * share`` slots and the other webhooks keep the rest (always one while
  that is below the limit). A webhook whose answers are fast (``typical`` within
  ``FAST_SECONDS``) may borrow free slots past its share while no other webhook below
  its share waits: a webhook alone on its endpoint gets the whole limit, and a slot it
  borrowed is free again within its fast answer.
- **Round robin.** Attempts that must wait are queued per webhook; a freed slot goes to
  the next webhook in turn that may take it, oldest attempt first within a webhook.
- **Deferral per webhook.** A webhook whose attempts are slow (they take, or have been
  taking, over ``SLOW_SECONDS``) and that already has ``QUEUE_FACTOR`` times its share
  under way or waiting is turned away: its new attempts are deferred (the caller queues
  them on the delay topic), so its backlog holds no consumer slot. While the endpoint as a
  whole has ``QUEUE_FACTOR`` times ``highest`` under way or waiting, so is a webhook whose
  attempts are slow, or have waited over ``SLOW_SECONDS`` for slots that others hold. A
  fast webhook waiting behind its own burst is not turned away.

Times are monotonic seconds passed in by the caller. A queued :class:`Ticket` is handed
to the gate's ``wake`` callback when it may start (or was turned away by
:meth:`EndpointGate.turn_away`); the caller waits for that and reports the end of every
ticket it was given with :meth:`EndpointGate.leave`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final

QUEUE_FACTOR: Final = 8  # in shares (or in highest limits, for the endpoint): waiting bound
SLOW_SECONDS: Final = 1.0  # attempts taking or waiting longer than this are slow
FAST_SECONDS: Final = 1.0  # an answer within this lets the limit grow
DECREASE: Final = 0.5  # the limit's factor on a timeout, 429 or 503
CALM_SECONDS: Final = 1.0  # the limit shrinks at most this often

# Ticket states.
WAITING: Final = 0
RUNNING: Final = 1
DEFERRED: Final = 2  # turned away: the caller defers the attempt
DONE: Final = 3

# Why a ticket was turned away: bounded labels (metrics), with a sentence for the logs.
WEBHOOK_BACKLOG: Final = "webhook_backlog"
ENDPOINT_BACKLOG: Final = "endpoint_backlog"
RETRY_AFTER: Final = "retry_after"


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of every endpoint's gate, from the settings.

    >>> Limits(lowest=2, highest=8, share=0.25).cap(8), Limits(2, 8, 0.25).cap(3)
    (2, 1)
    """

    lowest: int  # DISPATCHER_MIN_IN_FLIGHT_PER_ENDPOINT
    highest: int  # DISPATCHER_MAX_IN_FLIGHT_PER_ENDPOINT
    share: float  # DISPATCHER_WEBHOOK_SHARE_OF_ENDPOINT, in (0, 1]

    def __post_init__(self) -> None:
        if not 1 <= self.lowest <= self.highest or not 0 < self.share <= 1:
            raise ValueError(f"endpoint limits out of bounds: {self!r}")

    def cap(self, limit: int) -> int:
        """The most slots one webhook may hold under an endpoint limit of ``limit``."""
        return max(1, int(limit * self.share))


class Ticket:
    """One attempt's place at the gate. ``waker`` is the caller's (a future, say)."""

    __slots__ = ("cause", "deferrable", "lane", "reason", "since", "state", "waker")

    def __init__(self, lane: _Lane, now: float, deferrable: bool = True) -> None:
        self.lane = lane
        self.state: int = WAITING
        self.deferrable = deferrable  # False: waits for its turn whatever happens
        self.since = now  # when it started waiting, then when it started running
        self.cause = ""  # when DEFERRED: a bounded label (WEBHOOK_BACKLOG, ...)
        self.reason = ""  # when DEFERRED: a sentence for the logs and the delay record
        self.waker: Any = None


class _Lane:
    """One webhook's attempts at the endpoint: those under way and those waiting."""

    __slots__ = ("key", "ringed", "running", "starts", "typical", "users", "waiting")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.running = 0
        self.users = 0  # running + waiting
        self.waiting: deque[Ticket] = deque()
        self.starts: list[float] = []  # start of each attempt under way, oldest first
        self.typical = -1.0  # moving average of its attempts' durations; -1: none yet
        self.ringed = False  # in the gate's round-robin ring

    def slow(self, now: float) -> bool:
        """Its attempts take (or have been taking) longer than SLOW_SECONDS."""
        oldest = self.starts[0] if self.starts else now
        return max(self.typical, now - oldest) > SLOW_SECONDS

    def starved(self, now: float, cap: int) -> bool:
        """Its oldest waiting attempt has waited over SLOW_SECONDS though the webhook is
        below its share: others hold the endpoint's slots (not its own burst)."""
        return (
            self.running < cap and bool(self.waiting) and now - self.waiting[0].since > SLOW_SECONDS
        )


class EndpointGate:
    """The admission of one endpoint's attempts (see the module's docstring)."""

    __slots__ = (
        "_calm_until", "_cap", "_lanes", "_limits", "_ring", "_wake", "limit", "running", "users",
    )  # fmt: skip

    def __init__(self, limits: Limits, wake: Callable[[Ticket], None]) -> None:
        self._limits = limits
        self._wake = wake
        self.limit = float(limits.highest)  # adaptive, in [lowest, highest]
        self._cap = limits.cap(limits.highest)  # of the limit now
        self.running = 0
        self.users = 0  # attempts under way or waiting
        self._lanes: dict[Hashable, _Lane] = {}
        self._ring: deque[_Lane] = deque()  # webhooks with attempts waiting, in turn
        self._calm_until = float("-inf")

    @property
    def cap(self) -> int:
        """The most slots one webhook may hold now."""
        return self._cap

    @property
    def adapted(self) -> bool:
        """The limit is below its highest: the gate has learnt something worth keeping."""
        return self.limit < self._limits.highest

    def waiting(self, key: Hashable) -> int:
        """Attempts of webhook ``key`` waiting for a slot."""
        lane = self._lanes.get(key)
        return len(lane.waiting) if lane is not None else 0

    def enter(self, key: Hashable, now: float, *, deferrable: bool = True) -> Ticket:
        """An attempt of webhook ``key`` arrives: RUNNING (start it), WAITING (wait for
        ``wake``) or DEFERRED (turned away: not counted, nothing to leave). One that is not
        ``deferrable`` (a manual resend) is never turned away."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        elif deferrable:
            turned = self._turned_away(lane, now)
            if turned is not None:
                return turned
        ticket = Ticket(lane, now, deferrable)
        lane.users += 1
        self.users += 1
        if not lane.waiting and self._may_start(lane, now):
            self._start(ticket, now)
        else:
            lane.waiting.append(ticket)
            if not lane.ringed:
                lane.ringed = True
                self._ring.append(lane)
        return ticket

    def leave(
        self, ticket: Ticket, now: float, *, took: float | None = None, overloaded: bool = False
    ) -> None:
        """A ticket's attempt is over (or was given up while it waited). ``took``: how long
        the endpoint took to answer or time out (None when it did neither: a connection
        error, an attempt given up); ``overloaded``: it timed out, or answered 429 or 503."""
        state = ticket.state
        if state >= DEFERRED:  # DEFERRED or DONE: nothing held
            return
        ticket.state = DONE
        lane = ticket.lane
        if state == RUNNING:
            lane.running -= 1
            self.running -= 1
            lane.starts.remove(ticket.since)
            if took is not None:
                self._adapt(lane, took, now, overloaded=overloaded)
        else:
            lane.waiting.remove(ticket)
        self._forget(lane)
        if self._ring:
            self._grant(now)

    def turn_away(self, key: Hashable, cause: str, reason: str) -> int:
        """Defer every deferrable attempt of webhook ``key`` still waiting (its endpoint
        asked it to wait: ``Retry-After``); each goes to ``wake`` as DEFERRED. How many."""
        lane = self._lanes.get(key)
        if lane is None or not lane.waiting:
            return 0
        tickets = [t for t in lane.waiting if t.deferrable]
        if len(tickets) == len(lane.waiting):
            lane.waiting.clear()
        else:
            lane.waiting = deque(t for t in lane.waiting if not t.deferrable)
        for ticket in tickets:
            ticket.state = DEFERRED
            ticket.cause, ticket.reason = cause, reason
        self._forget(lane, len(tickets))
        for ticket in tickets:
            self._wake(ticket)
        return len(tickets)

    # --- inside -------------------------------------------------------------------------

    def _turned_away(self, lane: _Lane, now: float) -> Ticket | None:
        """A deferred ticket if the attempt must not wait here (see the module)."""
        cap = self._cap
        if lane.users >= cap * QUEUE_FACTOR and lane.slow(now):
            why = f"{lane.users} deliveries of this webhook already under way or waiting"
            return _deferred(lane, now, WEBHOOK_BACKLOG, f"{why}, and they are slow")
        if self.users >= self._limits.highest * QUEUE_FACTOR and (
            lane.slow(now) or lane.starved(now, cap)
        ):
            why = f"{self.users} deliveries to this endpoint already under way or waiting"
            return _deferred(lane, now, ENDPOINT_BACKLOG, f"{why}, and this webhook's are slow")
        return None

    def _may_start(self, lane: _Lane, now: float) -> bool:
        free = int(self.limit) - self.running
        if free <= 0:
            return False
        if lane.running == 0:
            return True
        if free == 1:
            return False  # the last free slot stays for a webhook with none under way
        if lane.running < self._cap:
            return True
        return self._may_borrow(lane, now)

    def _may_borrow(self, lane: _Lane, now: float) -> bool:
        """Past its share, a webhook may use slots nobody else asks for: only if its
        answers are fast (a slot it takes is soon free again) and no other webhook below
        its share is waiting. So a webhook alone on its endpoint, or a recovery job, gets
        the whole limit, and a slow one never more than its share."""
        if not 0 <= lane.typical <= FAST_SECONDS or lane.slow(now):
            return False
        cap = self._cap
        return not any(
            other is not lane and other.waiting and other.running < cap for other in self._ring
        )

    def _start(self, ticket: Ticket, now: float) -> None:
        ticket.state = RUNNING
        ticket.since = now
        lane = ticket.lane
        lane.running += 1
        lane.starts.append(now)
        self.running += 1

    def _forget(self, lane: _Lane, count: int = 1) -> None:
        lane.users -= count
        self.users -= count
        if lane.users == 0:  # then no ticket of it is left to come back
            del self._lanes[lane.key]  # still in the ring, maybe: skipped there (no waiters)

    def _adapt(self, lane: _Lane, took: float, now: float, *, overloaded: bool) -> None:
        lane.typical = took if lane.typical < 0 else lane.typical + 0.2 * (took - lane.typical)
        limits = self._limits
        if overloaded:
            if now >= self._calm_until and self.limit > limits.lowest:
                self.limit = max(float(limits.lowest), self.limit * DECREASE)
                self._calm_until = now + CALM_SECONDS
                self._cap = limits.cap(int(self.limit))
        elif took <= FAST_SECONDS and self.limit < limits.highest:
            self.limit = min(float(limits.highest), self.limit + 1.0 / self.limit)
            self._cap = limits.cap(int(self.limit))

    def _grant(self, now: float) -> None:
        """Start waiting attempts while slots are free, one webhook after the other."""
        while self.running < int(self.limit):
            lane = self._next(now)
            if lane is None:
                return
            ticket = lane.waiting.popleft()
            self._start(ticket, now)
            if lane.waiting:
                self._ring.append(lane)  # to the back: the others' turn first
            else:
                lane.ringed = False
            self._wake(ticket)

    def _next(self, now: float) -> _Lane | None:
        """The next webhook in turn that may start an attempt now (taken off the ring),
        or None. Each webhook of the ring is looked at once at most."""
        ring = self._ring
        for _ in range(len(ring)):
            lane = ring.popleft()
            if not lane.waiting:
                lane.ringed = False
                continue
            if self._may_start(lane, now):
                return lane
            ring.append(lane)
        return None


def _deferred(lane: _Lane, now: float, cause: str, reason: str) -> Ticket:
    ticket = Ticket(lane, now)
    ticket.state = DEFERRED
    ticket.cause, ticket.reason = cause, reason
    return ticket
