"""Rewrite the settings tables of README.md and docs/operations.md from the code.

Run: .venv/bin/python tools/settings_table.py  (tests fail when a table is stale)
"""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher.settings import documentation

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def table() -> str:
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    rows += [f"| `{name}` | `{default}` | {doc} |" for name, default, doc in documentation()]
    return "\n".join(rows)


def main() -> None:
    block = f"{START}\n{table()}\n{END}"
    for path in (ROOT / "README.md", ROOT / "docs" / "operations.md"):
        text = path.read_text()
        if START in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END), block, text, flags=re.S)
        else:  # first run: replace the table that starts with the header row
            text = re.sub(
                r"\| Variable \| Default \| What it does \|\n(\|.*\|\n)+", block + "\n", text
            )
        path.write_text(text)
        print(f"rewrote the settings table of {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
