"""The entity catalog: the built-in pairs and import policies, and a replacement file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher import catalog


def test_builtin_catalog_has_the_domain_pairs() -> None:
    """The built-in catalog allows the documented pairs and import policies."""
    c = catalog.load()
    assert c.allows("sales", "CLOSED")
    assert not c.allows("items", "CLOSED")
    assert c.import_policy("items") == "batch"
    assert c.import_policy("stock_movements") == "skip"
    assert c.import_policy("sales") == "single"


def test_operators_can_replace_the_catalog(tmp_path: Path) -> None:
    """A catalog file adds entities; a malformed one is refused with the file's name."""
    good = tmp_path / "catalog.json"
    good.write_text('{"vouchers": {"events": ["created", "USED"], "imports": "batch"}}')
    assert catalog.load(str(good)).allows("vouchers", "USED")
    bad = tmp_path / "bad.json"
    bad.write_text('{"vouchers": {"events": []}}')
    with pytest.raises(catalog.CatalogError, match=r"bad\.json: entity 'vouchers'"):
        catalog.load(str(bad))
