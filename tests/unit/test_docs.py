"""The documents agree with the code: the README's settings table, the metrics of
docs/operations.md and the schemas of the OpenAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from dispatcher.metrics import Metrics
from dispatcher.settings import documentation

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_in_the_readme() -> None:
    """The README's configuration table lists every setting with its default."""
    readme = (ROOT / "README.md").read_text()
    for name, default, _doc in documentation():
        assert f"| `{name}` | `{default}` |" in readme, name


def test_every_registered_metric_is_documented() -> None:
    """docs/operations.md lists each metric the code registers."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    names = {m.name for m in Metrics().registry.collect()}
    counters = {"webhook_deliveries", "webhook_events_consumed"}
    assert counters <= names
    for name in names:
        assert f"`{name}" in doc, name


def test_openapi_schemas_are_valid_json_schemas() -> None:
    """Every schema of the document is a valid JSON Schema 2020-12 and the version matches."""
    from dispatcher import __version__

    doc: dict[str, Any] = orjson.loads((ROOT / "schemas" / "openapi.json").read_bytes())
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == __version__
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for response in doc["components"]["responses"].values():
        Draft202012Validator.check_schema(response["content"]["application/json"]["schema"])
