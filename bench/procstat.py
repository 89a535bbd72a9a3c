"""CPU and memory of processes, read from /proc (Linux only, no extra dependency).

A :class:`Sampler` polls the CPU time of named process groups (the dispatcher, the
receiver, the Kafka broker, PostgreSQL, ...) and of the whole machine a few times a
second, so that the CPU spent by each between two wall-clock moments -- e.g. the first
and the last delivery seen by the receiver -- can be read afterwards by interpolation.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, or None when it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        lines = (_PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, over all cores.

    Busy is what this machine's processes ran; stolen is what the hypervisor gave to
    other guests while this one wanted to run (a noisy-neighbour indicator)."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks[:3]) + sum(ticks[5:7])
    return busy / CLOCK_TICKS, ticks[7] / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. the backends of a PostgreSQL postmaster)."""
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (any address), or None if not found."""
    inodes = set(_listening_inodes(port))
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _holds_socket(entry, wanted):
            return int(entry.name)
    return None


def _listening_inodes(port: int) -> Iterator[str]:
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == _LISTEN and int(cols[1].rpartition(":")[2], 16) == port:
                yield cols[9]


def _holds_socket(proc_dir: Path, wanted: set[str]) -> bool:
    with contextlib.suppress(OSError):
        for fd in (proc_dir / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in wanted:
                    return True
    return False


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ('' when gone)."""
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


PidSource = Callable[[], Iterable[int]]


class Family:
    """A :data:`PidSource`: a process and its direct children, re-listed every few seconds
    (listing children reads every /proc/<pid>/stat, too costly for every sample)."""

    def __init__(self, pid: int, refresh: float = 2.0) -> None:
        self._pid = pid
        self._refresh = refresh
        self._pids: list[int] = []
        self._listed = -math.inf

    def __call__(self) -> list[int]:
        now = time.monotonic()
        if now - self._listed >= self._refresh:
            self._pids = [self._pid, *children(self._pid)]
            self._listed = now
        return self._pids


@dataclass
class _Series:
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def at(self, moment: float) -> float | None:
        """The value at ``moment``, interpolated linearly; None outside the samples."""
        if not self.times or moment < self.times[0] or moment > self.times[-1]:
            return None
        i = bisect.bisect_left(self.times, moment)
        if self.times[i] == moment or i == 0:
            return self.values[i]
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (moment - t0) / (t1 - t0)


@dataclass
class Window:
    """CPU spent between two wall-clock moments, per process group and by the machine."""

    seconds: float
    cpu: dict[str, float]  # group -> CPU seconds
    machine_busy: float  # CPU seconds, all processes, all cores
    steal: float = 0.0  # CPU seconds the hypervisor took away

    @property
    def other(self) -> float:
        """CPU seconds of processes the sampler does not track (noise, other users)."""
        return max(0.0, self.machine_busy - sum(self.cpu.values()))

    def cores(self) -> dict[str, float]:
        """Average cores used by each group over the window, ``other`` included."""
        span = max(self.seconds, 1e-9)
        shares = {name: round(cpu / span, 3) for name, cpu in self.cpu.items()}
        shares["other"] = round(self.other / span, 3)
        shares["machine"] = round(self.machine_busy / span, 3)
        shares["steal"] = round(self.steal / span, 3)
        return shares


class Sampler:
    """Samples CPU time of named process groups every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1) -> None:
        self._interval = interval
        self._groups: dict[str, PidSource] = {}
        self._series: dict[str, _Series] = {}
        self._seen: dict[str, dict[int, float]] = {}  # group -> pid -> last CPU seconds
        self._task: asyncio.Task[None] | None = None

    def track(self, name: str, pids: PidSource) -> None:
        """Sample group ``name`` from now on (a new series: old samples are dropped)."""
        self._groups[name] = pids
        self._series[name] = _Series()
        self._seen[name] = {}
        self.sample()

    def untrack(self, name: str) -> None:
        self._groups.pop(name, None)

    def sample(self) -> None:
        """Take one sample now (also called by the background task)."""
        now = time.time()
        busy, steal = machine_cpu()
        for name, total in (("machine", busy), ("steal", steal)):
            self._series.setdefault(name, _Series())
            self._append(name, now, total)
        for name, source in list(self._groups.items()):
            seen = self._seen[name]
            for pid in source():
                value = cpu_seconds(pid)
                if value is not None:
                    seen[pid] = value
            # processes that exited keep their last reading: the sum never goes down
            self._append(name, now, sum(seen.values()))

    def _append(self, name: str, now: float, value: float) -> None:
        series = self._series[name]
        series.times.append(now)
        series.values.append(value)

    def window(self, start: float, end: float) -> Window:
        """CPU per tracked group between ``start`` and ``end`` (time.time() values)."""
        self.sample()
        cpu: dict[str, float] = {}
        for name in self._groups:
            spent = self._spent(name, start, end)
            if spent is not None:
                cpu[name] = round(spent, 3)
        busy = self._spent("machine", start, end) or 0.0
        steal = self._spent("steal", start, end) or 0.0
        return Window(end - start, cpu, round(busy, 3), round(steal, 3))

    def _spent(self, name: str, start: float, end: float) -> float | None:
        series = self._series.get(name)
        if series is None:
            return None
        first, last = series.at(start), series.at(end)
        if first is None or last is None:
            return None
        return last - first

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval)  # a sampling timer, not coordination

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop(), name="cpu-sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
