"""Write the published JSON Schemas of the notifications from the built-in catalog:
schemas/notification.schema.json, and the ``webhooks`` of the OpenAPI document
(dispatcher/openapi.json) with the components they use. Nothing else of the document
changes.

Run: .venv/bin/python tools/publish_schemas.py  (tests fail when either is stale)
"""

from __future__ import annotations

import json
from pathlib import Path

from dispatcher import catalog, event_types

ROOT = Path(__file__).resolve().parent.parent
NOTIFICATION = ROOT / "schemas" / "notification.schema.json"
OPENAPI = ROOT / "dispatcher" / "openapi.json"


def _dump(data: object) -> str:
    return json.dumps(data, indent=2) + "\n"  # the layout of both files


def main() -> None:
    built_in = catalog.load()
    NOTIFICATION.write_text(_dump(event_types.document(built_in)))
    print(f"wrote {NOTIFICATION.relative_to(ROOT)}")
    doc = json.loads(OPENAPI.read_text())
    OPENAPI.write_text(_dump(event_types.with_openapi_parts(doc, built_in)))
    print(f"rewrote the webhooks of {OPENAPI.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
