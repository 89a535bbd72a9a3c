"""The benchmark's output: the machine it ran on, a table, and a JSON file."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from bench import procstat

PACKAGES = (
    "webhook-dispatcher",
    "aiohttp",
    "aiokafka",
    "asyncpg",
    "orjson",
    "msgspec",
    "structlog",
)


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, its value, and the target it answers (if any)."""

    scenario: str
    figure: str
    value: str
    target: str = ""
    met: bool | None = None


def machine() -> dict[str, Any]:
    """nproc, memory, CPU model, kernel and load of this machine."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def versions(kafka_pid: int | None, postgres: str) -> dict[str, str]:
    """Python, the packages that matter, Kafka (from the broker's class path), PostgreSQL."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    found = re.search(r"kafka[-_](\d+\.\d+\.\d+)", procstat.cmdline(kafka_pid or 0))
    out["kafka"] = found.group(1) if found else "unknown"
    out["postgresql"] = postgres
    return out


def git_state(root: Path) -> dict[str, Any]:
    """The commit benchmarked and whether the work tree had changes."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
                ["git", *args],  # noqa: S607 - git from PATH
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table."""
    header = Row("scenario", "figure", "value", "target", None)
    cells = [_cells(r) for r in (header, *rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cells(row: Row) -> list[str]:
    verdict = {None: "", True: "met", False: "MISSED"}[row.met]
    if row.figure == "figure":
        verdict = "verdict"
    return [row.scenario, row.figure, row.value, row.target, verdict]


def write_json(directory: Path, results: dict[str, Any]) -> Path:
    """Write ``results`` to ``directory/<UTC timestamp>.json``; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json")
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return path
