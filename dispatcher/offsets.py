"""Which offset of a partition may be committed, when records finish out of order.

Records of a partition are handed out in offset order but finish in any order (a slow
endpoint, a batch still open). The committable offset is one past the highest offset
below which every record has finished: committing it never skips unfinished work.

    >>> t = PartitionOffsets()
    >>> t.add(5); t.add(6); t.add(7)
    >>> t.done(6); t.committable() is None
    True
    >>> t.done(5); t.committable()
    7
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Offsets handed out and finished, for one partition. Pure bookkeeping."""

    __slots__ = ("_done", "_last", "_last_committed", "_pending", "_safe")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # handed out, in order
        self._done: set[int] = set()  # finished, not yet at the head
        self._safe: int | None = None  # one past the last offset finished in order
        self._last_committed: int | None = None
        self._last: int | None = None  # the last offset handed out

    def add(self, offset: int) -> None:
        """An offset was handed out; offsets must grow."""
        if self._last is not None and offset <= self._last:
            raise ValueError(f"offset {offset} after {self._last}")
        self._pending.append(offset)
        self._last = offset

    def done(self, offset: int) -> None:
        """An offset finished (delivered, dead-lettered, handed to retry or skipped)."""
        self._done.add(offset)
        pending, done = self._pending, self._done
        while pending and pending[0] in done:
            head = pending.popleft()
            done.discard(head)
            self._safe = head + 1

    def committable(self) -> int | None:
        """The offset to commit now, or None if nothing new finished in order."""
        if self._safe is None or self._safe == self._last_committed:
            return None
        return self._safe

    def committed(self, offset: int) -> None:
        self._last_committed = offset

    @property
    def last_committed(self) -> int | None:
        """The offset last committed (as told by :meth:`committed`), or None."""
        return self._last_committed

    @property
    def in_flight(self) -> int:
        """Offsets handed out and not yet finished in order."""
        return len(self._pending)

    @property
    def last(self) -> int | None:
        """The last offset handed out (finished or not), or None."""
        return self._last
