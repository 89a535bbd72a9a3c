"""The event catalog served by a real daemon: ``GET /event-types`` answers the catalog's
pairs with the schemas of the OpenAPI document's ``webhooks``, with no token, and follows
a catalog an operator replaced."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from dispatcher import catalog
from tests.integration.support import (
    ROOT,
    World,
    get_json,
    make_event,
    schema_errors,
)

OPENAPI = ROOT / "schemas" / "openapi.json"


def openapi_validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator of ``#/components/schemas/<name>`` of the OpenAPI document."""
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return Draft202012Validator(root)


def webhook_schema(doc: dict[str, Any], key: str) -> Any:
    """The request body schema of the document's webhook ``key``."""
    return doc["webhooks"][key]["post"]["requestBody"]["content"]["application/json"]["schema"]


def pairs(the_catalog: catalog.Catalog) -> list[tuple[str, str]]:
    return sorted((n, ev) for n, e in the_catalog.entities.items() for ev in e.events)


async def test_event_types_match_the_catalog_and_the_openapi_webhooks(world: World) -> None:
    """GET /event-types, with no token, lists every pair of the catalog once, each valid
    against the document's EventType and with the schema of the document's webhook."""
    running = await world.start()
    status, listed = await get_json(running.base_url + "/event-types")
    assert status == 200
    doc = orjson.loads(OPENAPI.read_bytes())
    openapi_validator(doc, "EventTypeList").validate(listed)
    assert [(t["entity_name"], t["event_type"]) for t in listed] == pairs(catalog.load())
    status, served_doc = await get_json(running.base_url + "/openapi.json")
    assert (status, served_doc) == (200, doc)
    assert set(doc["webhooks"]) == {"subscribed"} | {
        f"{t['entity_name']}.{t['event_type']}" for t in listed
    }
    for t in listed:
        key = f"{t['entity_name']}.{t['event_type']}"
        schema = t["schema"]
        assert schema.pop("$schema") == "https://json-schema.org/draft/2020-12/schema"
        assert schema == webhook_schema(doc, key), key
        assert doc["webhooks"][key]["post"]["description"] == t["description"]
    by_pair = {(t["entity_name"], t["event_type"]): t for t in listed}
    assert by_pair["items", "CREATED"]["import"] == "batch"
    assert by_pair["stock_movements", "CREATED"]["import"] == "skip"
    assert by_pair["sales", "CLOSED"]["import"] == "single"
    assert by_pair["orders", "CLOSED"]["description"].startswith("Deprecated (use sales).")


async def test_one_event_type_is_served_in_any_case(world: World) -> None:
    """GET /event-types/sales/closed answers the sales CLOSED entry of the list."""
    running = await world.start()
    _, listed = await get_json(running.base_url + "/event-types")
    status, one = await get_json(running.base_url + "/event-types/sales/closed")
    assert status == 200
    openapi_validator(orjson.loads(OPENAPI.read_bytes()), "EventType").validate(one)
    assert [one] == [
        t for t in listed if (t["entity_name"], t["event_type"]) == ("sales", "CLOSED")
    ]


async def test_an_unknown_pair_is_a_json_404(world: World) -> None:
    """An entity without that event, or an unknown entity, is the API's JSON 404."""
    running = await world.start()
    doc = orjson.loads(OPENAPI.read_bytes())
    operation = doc["paths"]["/event-types/{entity_name}/{event_type}"]["get"]
    schema = operation["responses"]["404"]["content"]["application/json"]["schema"]
    error = Draft202012Validator({**schema, "components": doc["components"]})
    for path in ("stock/DELETED", "widgets/CREATED"):
        status, body = await get_json(f"{running.base_url}/event-types/{path}")
        assert status == 404, path
        error.validate(body)
        assert body["error"]["type"] == "not_found"
        assert "GET /event-types lists them" in body["error"]["message"]


async def test_a_replaced_catalog_is_what_is_served(world: World, tmp_path: Path) -> None:
    """With DISPATCHER_CATALOG_FILE, /event-types and the served OpenAPI webhooks list that
    catalog's pairs, an entity without a schema being only known to have an id."""
    path = tmp_path / "catalog.json"
    path.write_bytes(
        orjson.dumps(
            {
                "vouchers": {"events": {"USED": "A voucher was used."}, "imports": "batch"},
                "sales": {"events": ["CLOSED"]},
            }
        )
    )
    running = await world.start(replace(world.settings, catalog_file=str(path)))
    _, listed = await get_json(running.base_url + "/event-types")
    assert [(t["entity_name"], t["event_type"]) for t in listed] == [
        ("sales", "CLOSED"),
        ("vouchers", "USED"),
    ]
    used = listed[1]
    assert used["description"].startswith("A voucher was used.")
    assert used["schema"]["properties"]["entities"]["items"]["required"] == ["id"]
    _, doc = await get_json(running.base_url + "/openapi.json")
    assert set(doc["webhooks"]) == {"subscribed", "sales.CLOSED", "vouchers.USED"}
    assert {**webhook_schema(doc, "vouchers.USED"), "$schema": used["schema"]["$schema"]} == (
        used["schema"]
    )


async def test_the_receiver_refuses_a_body_the_schema_does_not_allow(world: World) -> None:
    """The test receivers' check catches a real delivery with a field more or less."""
    await world.subscribe()
    await world.start()
    await world.produce(make_event(world.shop))
    [got] = await world.receiver.wait_for(1)
    assert schema_errors(got.body) == []
    sent = got.json()
    extra = orjson.dumps({**sent, "webhook_id": "x"})
    assert any("webhook_id" in e for e in schema_errors(extra))
    missing = orjson.dumps({k: v for k, v in sent.items() if k != "nRetry"})
    assert any("nRetry" in e for e in schema_errors(missing))
    assert schema_errors(orjson.dumps({**sent, "entity_name": "widgets"})) == [
        "no published schema for 'widgets.CLOSED'"
    ]
