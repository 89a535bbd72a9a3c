"""Offset bookkeeping: a commit never passes work that is still unfinished."""

from __future__ import annotations

import pytest

from dispatcher.offsets import PartitionOffsets


def test_commit_offset_never_passes_unfinished_work() -> None:
    """Out-of-order completion commits only past the lowest unfinished offset."""
    t = PartitionOffsets()
    for offset in (10, 11, 12, 13):
        t.add(offset)
    t.done(12)
    assert t.committable() is None
    t.done(10)
    assert t.committable() == 11
    t.committed(11)
    assert t.committable() is None
    t.done(11)
    assert t.committable() == 13
    t.done(13)
    assert t.committable() == 14
    assert t.in_flight == 0


def test_offsets_must_grow() -> None:
    """Handing out an offset twice is a bug and is refused."""
    t = PartitionOffsets()
    t.add(3)
    with pytest.raises(ValueError, match="offset 3 after 3"):
        t.add(3)
