"""Exponential backoff between attempts at something that is down (Kafka, PostgreSQL, SMTP).

>>> b = Backoff(first=0.5, cap=2.0)
>>> [b.next() for _ in range(4)]
[0.5, 1.0, 2.0, 2.0]
>>> b.reset(); b.next()
0.5
"""

from __future__ import annotations


class Backoff:
    """Delays that double from ``first`` up to ``cap``; :meth:`reset` after a success."""

    __slots__ = ("_cap", "_first", "_next")

    def __init__(self, *, first: float = 0.5, cap: float = 30.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        """The delay to wait now; the following one doubles."""
        delay = self._next
        self._next = min(delay * 2, self._cap)
        return delay

    def reset(self) -> None:
        self._next = self._first
