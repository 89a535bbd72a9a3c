"""Reading the cProfile dump of a dispatcher run (``bench/run.py --profile``).

cProfile slows the daemon down (its figures are not comparable with a normal run) but
tells where the time goes: own time grouped by area (aiohttp, asyncio, aiokafka, each
dispatcher module, ...), the dispatcher's functions by cumulative time, and the functions
with the most own time. Coroutines count one call per resumption.
"""

from __future__ import annotations

import pstats
from collections import Counter
from pathlib import Path
from typing import Any

_SITE = "site-packages/"
_PACKAGE = "/dispatcher/"


def area(file: str, func: str) -> str:
    """Where a profiled function lives: a package, a dispatcher module, or the stdlib."""
    if _SITE in file:
        return file.split(_SITE, 1)[1].split("/", 1)[0]
    if _PACKAGE in file:
        return "dispatcher/" + file.rsplit("/", 1)[1]
    if file == "~":  # C functions: name the object they belong to
        if "_ssl." in func or "SSL" in func:
            return "ssl (C)"
        if "select" in func or "socket" in func:
            return "sockets (C)"
        return "builtins (C)"
    if "/asyncio/" in file:
        return "asyncio"
    return "stdlib/" + file.rsplit("/", 1)[-1]


def summarize(path: Path, limit: int = 25) -> dict[str, Any]:
    """Own time by area, dispatcher functions by cumulative time, top own-time functions."""
    if not path.exists():
        return {}
    entries: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    by_area: Counter[str] = Counter()
    functions = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in entries.items():
        by_area[area(file, func)] += tottime
        functions.append((func, file, line, calls, tottime, cumtime))
    total = sum(by_area.values()) or 1.0
    own = sorted(functions, key=lambda f: f[4], reverse=True)[:limit]
    ours = [f for f in functions if _PACKAGE in f[1] and not f[0].startswith("<")]
    ours.sort(key=lambda f: f[5], reverse=True)
    return {
        "total_s": round(total, 3),
        "own_time_by_area": {k: round(v / total, 4) for k, v in by_area.most_common(limit)},
        "dispatcher_by_cumulative": [_row(f) for f in ours[:limit]],
        "top_own_time": [_row(f) for f in own],
    }


def _row(f: tuple[str, str, int, int, float, float]) -> dict[str, Any]:
    func, file, line, calls, tottime, cumtime = f
    where = file.split(_SITE, 1)[-1] if _SITE in file else file.rsplit("/", 2)[-2:]
    shown = "/".join(where) if isinstance(where, list) else where
    return {
        "function": f"{func} ({shown}:{line})",
        "calls": calls,
        "own_s": round(tottime, 3),
        "cumulative_s": round(cumtime, 3),
    }


def text(summary: dict[str, Any], lines: int = 15) -> str:
    """A short plain-text rendering of :func:`summarize`'s result."""
    if not summary:
        return "profile: no cProfile dump was written"
    out = [f"profile of the throughput dispatcher ({summary['total_s']:.1f} s profiled)"]
    out.append("  own time by area:")
    for name, share in list(summary["own_time_by_area"].items())[:lines]:
        out.append(f"    {share * 100:5.1f}%  {name}")
    out.append("  dispatcher functions by cumulative time (s):")
    for row in summary["dispatcher_by_cumulative"][:lines]:
        out.append(f"    {row['cumulative_s']:7.3f}  {row['calls']:>8}  {row['function']}")
    return "\n".join(out)
