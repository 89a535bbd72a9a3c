"""No log call can crash on structlog's reserved names: a check of the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"}
LOG_METHODS |= {"log", "bind", "new", "adebug", "ainfo", "awarning", "aerror", "aexception"}


def test_no_log_call_passes_a_field_named_event() -> None:
    """No structlog call in our code passes ``event=`` (structlog's own positional name:
    such a call raises TypeError, even at a level that is filtered out)."""
    offenders = []
    for path in sorted([*ROOT.glob("dispatcher/*.py"), *ROOT.glob("tools/*.py"),
                        *ROOT.glob("bench/*.py")]):  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and any(k.arg == "event" for k in node.keywords)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_source_check_finds_an_offending_call() -> None:
    """The check above does see ``log.debug("x", event=...)`` (it can fail)."""
    tree = ast.parse('log.debug("event_outside_catalog", entity="stock", event="DELETED")')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert any(k.arg == "event" for c in calls for k in c.keywords)
