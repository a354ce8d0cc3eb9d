"""The OpenAPI document against the routes it describes: no network, no database."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import limits
from bridge.api.http import PUBLIC_PATHS, RECORDING_PATHS, ROUTES, route_scopes
from bridge.api.openapi import document
from bridge.blocklist import Blocklist
from bridge.crypto import NumberVault
from bridge.errors import InvalidInput, OrderHasOpenSession
from tests.unit.memory_keys import MemoryKeyStore
from bridge.requests import REQUESTS
from bridge.terms import Terms
from bridge.tokens import ENV_SCOPES, SCOPES

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _openapi_path(path: str) -> str:
    """aiohttp `{name}` or `{name:regex}` placeholders, as OpenAPI writes them."""
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", r"{\1}", path)


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document()


def test_every_route_is_documented_and_every_operation_is_a_route(doc):
    routes = [(method, _openapi_path(path)) for method, path, _handler in ROUTES]
    assert len(routes) == len(set(routes)), "a route is registered twice"
    documented = [(method, path) for method, path, _op in _operations(doc)]
    assert sorted(documented) == sorted(routes)


def test_path_parameters_match_the_placeholders(doc):
    for method, path, operation in _operations(doc):
        item = doc["paths"][path]
        declared = {
            p["name"]
            for p in (_resolve(doc, p["$ref"]) if "$ref" in p else p
                      for p in [*item.get("parameters", []), *operation.get("parameters", [])])
            if p["in"] == "path"
        }
        assert declared == set(re.findall(r"\{([^}]+)\}", path)), f"{method} {path}"


def test_every_ref_resolves(doc):
    refs = set(_refs(doc))
    assert refs, "the document uses no $ref at all"
    for ref in refs:
        _resolve(doc, ref)


def test_operation_ids_are_unique(doc):
    ids = [op["operationId"] for _m, _p, op in _operations(doc)]
    assert all(ids)
    assert len(ids) == len(set(ids))


def test_every_operation_has_summary_description_and_known_tags(doc):
    tags = {t["name"] for t in doc["tags"]}
    for method, path, op in _operations(doc):
        assert op.get("summary") and op.get("description"), f"{method} {path}"
        assert op.get("tags") and set(op["tags"]) <= tags, f"{method} {path}"


def test_protected_operations_document_401_and_public_ones_need_no_token(doc):
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"
    }
    for method, path, op in _operations(doc):
        if path in PUBLIC_PATHS:
            assert op.get("security") == [], f"{method} {path} should be public"
        else:
            # Every other operation needs one scope, its security requirement (which the API enforces).
            [requirement] = op.get("security", [{}])
            assert list(requirement) == ["bearer"] and len(requirement["bearer"]) == 1, f"{method} {path}"
            assert requirement["bearer"][0] in SCOPES, f"{method} {path}"
            assert {"401", "403", "429"} <= set(op["responses"]), f"{method} {path}"
            assert f"Scope: `{requirement['bearer'][0]}`" in op["description"], f"{method} {path}"
        assert "500" in op["responses"], f"{method} {path} documents no 500"


def test_every_route_but_the_public_ones_needs_a_scope_and_every_scope_is_needed_somewhere():
    scopes = route_scopes()
    assert set(scopes) == {(m, p) for m, p, _h in ROUTES if p not in PUBLIC_PATHS}
    assert set(scopes.values()) == set(SCOPES)
    # MB_API_TOKEN keeps reaching what it reached, and still never a recording.
    assert {s for (_m, p), s in scopes.items() if p not in RECORDING_PATHS} == ENV_SCOPES


def test_error_responses_use_the_error_schema(doc):
    for method, path, op in _operations(doc):
        for status, response in op["responses"].items():
            if path == "/healthz" or int(status) < 400:
                continue
            if "$ref" in response:
                response = _resolve(doc, response["$ref"])
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, f"{method} {path} {status}"


def test_the_document_round_trips_through_json(doc):
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] == "maskbridge"


def test_request_bodies_are_the_models_the_handlers_parse_with(doc):
    """One definition: the document's request schemas are the models' own, and every term of
    bridge.terms is a property of the open request and of the session (the call, for the
    terms it keeps)."""
    schemas = doc["components"]["schemas"]
    for name, model in REQUESTS.items():
        expected = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        documented = {k: v for k, v in schemas[name].items()}
        if name == "ImportPoolNumbersRequest":
            documented["properties"] = {**documented["properties"], "numbers": {
                k: v for k, v in documented["properties"]["numbers"].items() if k != "items"}}
            expected["properties"]["numbers"].pop("items", None)
        assert documented == expected, name
    for name in Terms.names():
        assert name in schemas["OpenSessionRequest"]["properties"] and name in schemas["Session"]["required"]
    assert set(Terms.on_call_row_names()) <= set(schemas["Call"]["required"])
    limit = doc["components"]["parameters"]["Limit"]["schema"]
    assert (limit["maximum"], limit["default"]) == (limits.MAX_PAGE, limits.DEFAULT_PAGE)


def _examples(doc: dict[str, Any], response: dict[str, Any]) -> list[dict[str, Any]]:
    if "$ref" in response:
        response = _resolve(doc, response["$ref"])
    return [e["value"]["error"] for e in response["content"]["application/json"].get("examples", {}).values()]


def test_operations_with_a_body_document_400_and_413_body_too_large(doc):
    assert "request_entity_too_large" not in json.dumps(doc)
    for method, path, op in _operations(doc):
        if "requestBody" not in op:
            assert "413" not in op["responses"], f"{method} {path} reads no body"
            continue
        assert {"400", "413"} <= set(op["responses"]), f"{method} {path}"
        assert [e["code"] for e in _examples(doc, op["responses"]["400"])] == ["invalid_json"], f"{method} {path}"
        assert {e["code"] for e in _examples(doc, op["responses"]["413"])} == {"body_too_large"}, f"{method} {path}"


def test_unauthorized_documents_the_www_authenticate_header(doc):
    for name in ("Unauthorized", "RecordingUnauthorized"):
        headers = doc["components"]["responses"][name]["headers"]
        assert headers["WWW-Authenticate"]["schema"]["const"] == 'Bearer realm="maskbridge"'


def test_recording_routes_are_the_documented_recording_paths(doc):
    assert set(RECORDING_PATHS) == {p for _m, p, op in _operations(doc) if "recordings" in op["tags"]}
    for _m, path, op in _operations(doc):
        if path in RECORDING_PATHS:  # never a scope of MB_API_TOKEN
            assert op["security"][0]["bearer"][0] in {"recordings:read", "audit:read"}, path
    assert "record" in doc["components"]["schemas"]["Session"]["required"]
    access = doc["components"]["schemas"]["RecordingAccess"]["properties"]
    for column in ("actor", "action", "result"):
        assert set(access[column]["enum"]) == _last_check(column), column


def test_reassigning_the_courier_answers_200_or_201_and_names_the_number_field(doc):
    op = doc["paths"]["/v1/sessions/{session_id}/participants"]["post"]
    assert {"200", "201", "404", "409"} <= set(op["responses"])
    fields = {e.get("details", {}).get("field") for e in _examples(doc, op["responses"]["422"])}
    assert "number" in fields and "courier_number" not in fields
    codes = {e["code"] for e in _examples(doc, op["responses"]["409"])}
    assert codes == {"session_ended", "pool_exhausted", "contention"}


def test_opening_documents_order_has_open_session(doc):
    op = doc["paths"]["/v1/sessions"]["post"]
    conflict = next(e for e in _examples(doc, op["responses"]["409"]) if e["code"] == "order_has_open_session")
    # Only the session: never which party differs (that would tell whether a number is in the order).
    assert set(conflict["details"]) == {"session_id"}
    assert conflict["message"] == OrderHasOpenSession.message
    details = doc["components"]["schemas"]["ErrorDetails"]["properties"]
    assert "session_id" in details and "order_has_open_session" not in details["field"]["description"]


def test_pool_number_entries_take_only_number_region_language_and_mode(doc):
    entry = doc["components"]["schemas"]["PoolNumberEntry"]
    assert entry["additionalProperties"] is False
    assert set(entry["properties"]) == {"number", "region", "language", "mode"} and entry["required"] == ["number"]
    assert set(entry["properties"]["mode"]["enum"]) == set(limits.MODES) | {None}


def test_modes_and_order_codes_are_the_ones_the_database_and_the_services_allow(doc):
    schemas = doc["components"]["schemas"]
    assert set(schemas["PoolNumber"]["properties"]["mode"]["enum"]) == _last_check("mode")
    assert set(schemas["Session"]["properties"]["mode"]["enum"]) == set(limits.MODES) == _last_check("mode")
    assert set(schemas["Call"]["properties"]["state"]["enum"]) == _last_check("state")
    sql = "\n".join(path.read_text() for path in sorted((Path(__file__).parents[2] / "sql").glob("*.sql")))
    pattern = schemas["Session"]["properties"]["order_code"]["pattern"]
    assert f"order_code ~ '{pattern}'" in sql
    assert _not_null(schemas["OpenSessionRequest"]["properties"]["order_code"])["pattern"] == pattern
    assert schemas["UpdatePoolNumberRequest"]["required"] == ["mode"]


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a nullable property's value (pydantic writes `anyOf: [value, null]`)."""
    return next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), schema)


def _last_check(column: str) -> set[str]:
    """The values of the last `CHECK (column IN (...))` of the migrations, in order."""
    sql = "\n".join(path.read_text() for path in sorted((Path(__file__).parents[2] / "sql").glob("*.sql")))
    found = re.findall(rf"CHECK \({column} IN \(([^)]*)\)", sql)
    assert found, f"no CHECK on {column} in sql/"
    return set(re.findall(r"'([^']*)'", found[-1]))


def test_call_outcomes_and_cut_reasons_are_the_ones_the_database_allows(doc):
    call = doc["components"]["schemas"]["Call"]
    assert {"outcome", "cut_reason"} <= set(call["required"])
    for column in ("outcome", "cut_reason", "hangup_by"):
        assert set(call["properties"][column]["enum"]) == _last_check(column) | {None}, column


def test_blocking_takes_only_number_reason_and_ttl_and_answers_200_or_201(doc):
    request = doc["components"]["schemas"]["BlockNumberRequest"]
    assert request["additionalProperties"] is False
    assert set(request["properties"]) == {"number", "reason", "ttl_seconds"} and request["required"] == ["number"]
    assert request["properties"]["ttl_seconds"]["anyOf"][0]["type"] == "integer"
    entry = doc["components"]["schemas"]["BlockedNumber"]
    assert "expires_at" in entry["required"] and "null" in entry["properties"]["expires_at"]["type"]
    op = doc["paths"]["/v1/blocklist"]["post"]
    assert {"200", "201", "400", "413", "422"} <= set(op["responses"])
    fields = {e.get("details", {}).get("field") for e in _examples(doc, op["responses"]["422"])}
    assert {"number", "reason"} <= fields
    delete = doc["paths"]["/v1/blocklist/{entry_id}"]["delete"]
    assert [e["code"] for e in _examples(doc, delete["responses"]["404"])] == ["block_not_found"]
    assert "block_not_found" in doc["components"]["schemas"]["Error"]["description"]


class _Refused(Exception):
    pass


class _Repo:
    async def add(self, entry_id: Any, idx: bytes, enc: bytes, reason: str | None, ttl_seconds: int | None) -> Any:
        raise _Refused  # the reason got past the checks


@pytest.mark.parametrize(
    "reason",
    ["", "abusive calls", "é" * 500, "x" * 500, "x" * 501, "tab\there", "line\nbreak", "nul\x00", "\x1f", "del\x7f",
     "trailing line break\n", "\u2028 line separator"],
)
async def test_the_documented_reason_is_the_one_the_blocklist_takes(doc, reason):
    schema = _not_null(doc["components"]["schemas"]["BlockNumberRequest"]["properties"]["reason"])
    pattern = schema["pattern"]
    assert pattern.startswith("^") and pattern.endswith("$")
    # fullmatch: Python's `$` would also match before a final line break, ECMA-262's does not
    documented = len(reason) <= schema["maxLength"] and re.fullmatch(pattern[1:-1], reason) is not None
    blocklist = Blocklist(SimpleNamespace(blocklist=_Repo()), NumberVault("k" * 64, MemoryKeyStore()))  # type: ignore[arg-type]
    with pytest.raises((_Refused, InvalidInput)) as raised:
        await blocklist.add("+79161234567", reason)
    assert (raised.type is _Refused) == documented, repr(reason)
    if raised.type is InvalidInput:
        assert raised.value.details == {"field": "reason"}
