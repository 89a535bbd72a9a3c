"""What the tests of the operator's kit share: where its files are, Prometheus's binaries
(installed from Debian's ``prometheus`` package when missing, as ``.ci/run`` does), and
reading metric names out of PromQL, the dashboard, the rules and docs/operations.md.

Used by tests/unit/test_alert_rules.py (promtool, no service) and
tests/integration/test_prometheus.py (a real Prometheus scraping a daemon).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
OPERATIONS = ROOT / "docs" / "operations.md"
JOB = "webhook-dispatcher"  # the scrape job the rules and the dashboard select
RUNBOOK_BASE = (
    "https://github.com/webhook-dispatcher/webhook-dispatcher/blob/main/docs/operations.md#"
)
PACKAGE = "prometheus"  # Debian's package: /usr/bin/prometheus and /usr/bin/promtool


# --- the binaries -----------------------------------------------------------------------


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and Path("/usr/bin", name).is_file():
        found = f"/usr/bin/{name}"
    return found


@cache
def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``. When missing: under CI (which installs
    the package in .ci/run) the test fails; elsewhere it is installed with apt-get when
    running as root (as tools/stack.py installs PostgreSQL), else the test fails saying
    how to install it. Never a skip: a kit nobody checks is not a kit."""
    found = _find(name)
    if found is not None:
        return found
    how = f"apt-get install -y --no-install-recommends {PACKAGE}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} is missing: .ci/run installs Debian's {PACKAGE} package ({how})")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{name} is missing: install Debian's {PACKAGE} package (sudo {how})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o",
         "DPkg::Lock::Timeout=600", PACKAGE],
    ):  # fmt: skip
        done = subprocess.run(  # noqa: S603 - fixed commands
            command, env=env, capture_output=True, text=True, timeout=1200, check=False
        )
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` failed:\n{done.stdout}\n{done.stderr}")
    found = _find(name)
    if found is None:
        pytest.fail(f"{name} is still missing after installing {PACKAGE}")
    return found


def promtool(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool ARGS`` (60 s at most) and return what it did."""
    return subprocess.run(  # noqa: S603 - our own files
        [binary("promtool"), *map(str, args)],
        input=None if stdin is None else stdin.decode(),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# --- metric names in PromQL -------------------------------------------------------------

# Words of PromQL that are not series: binary and set operators, modifiers, literals.
# Functions and aggregations are recognised by the parenthesis that follows them.
_KEYWORDS = {
    "and", "or", "unless", "atan2", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w$:.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, read loosely: identifiers that are
    not functions (followed by ``(``), keywords, labels (inside ``{}`` and ``by (...)``),
    durations or Grafana variables."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*[A-Za-z_]\w*\s*\)\s*$", re.DOTALL)


def variable_expr(query: str) -> str:
    """The PromQL of a Grafana variable query ``label_values(<expr>, label)``."""
    match = _LABEL_VALUES.match(query)
    return match.group("expr") if match else query


def substitute(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, ready for Prometheus."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


# --- the files --------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside rows included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard: panel targets and variables."""
    found = [
        (f"panel {panel['title']!r} target {target.get('refId')}", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            found.append((f"variable {variable['name']}", variable_expr(text)))
    return found


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def documented_metrics() -> dict[str, str]:
    """name -> type of each row of the metrics table of docs/operations.md."""
    section = OPERATIONS.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_:][a-z0-9_:]*)[^`]*` \| (\w+) \|", section, re.MULTILINE)
    return dict(rows)


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown document."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors
