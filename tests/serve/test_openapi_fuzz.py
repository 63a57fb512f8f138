"""Fuzz of the HTTP API from its own OpenAPI schema (/openapi.json of the running app).

Request bodies are generated from the schema's request-body declarations with hypothesis:
valid ones (the schema's types, bounds, enums and required fields), and invalid ones (a
field replaced by any JSON value, an unknown field, a required field dropped, or any JSON
at all). Whatever comes, the server must answer 200 or a 4xx with a JSON error, never a
5xx, and still serve a good request afterwards.

Cost is kept small by narrowing a few knobs of the valid bodies (steps, tokens, n, sizes)
to cheap values; out-of-range values of those knobs still come through the invalid bodies.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bagel_ray.serve.schemas import png_base64

EXAMPLES = 60
SMALL_PNG = Image.new("RGB", (20, 12), (10, 200, 30))
DATA_URL = f"data:image/png;base64,{png_base64(SMALL_PNG)}"
# Cheap values for the knobs that set the cost of a valid request.
CHEAP = {
    "num_inference_steps": st.integers(1, 3),
    "max_tokens": st.integers(1, 6),
    "max_think_tokens": st.integers(1, 6),
    "n": st.integers(1, 2),
    "size": st.one_of(st.sampled_from(["16x16", "32x48", "128x128", "48x40", "144x16", "0x0", "16"]), st.text(max_size=12)),
    "model": st.one_of(st.just("bagel"), st.text(max_size=10)),
    "url": st.one_of(st.just(DATA_URL), st.text(max_size=40), st.just("http://127.0.0.1:1/x.png")),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


class SchemaStrategies:
    """Hypothesis strategies for the JSON-schema subset that pydantic and FastAPI emit."""

    def __init__(self, spec: dict) -> None:
        self.components = spec["components"]["schemas"]

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.components[schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    def valid(self, schema: dict, name: str | None = None) -> st.SearchStrategy:
        if name in CHEAP:
            return CHEAP[name]
        schema = self.resolve(schema)
        if "anyOf" in schema:
            return st.one_of(*(self.valid(s, name) for s in schema["anyOf"]))
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            if "prefixItems" in schema:
                return st.tuples(*(self.valid(s) for s in schema["prefixItems"])).map(list)
            return st.lists(self.valid(schema.get("items", {})), min_size=schema.get("minItems", 0),
                            max_size=min(schema.get("maxItems", 3), 3))
        if kind == "string":
            return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 30), 30))
        if kind == "integer":
            lo, hi = schema.get("minimum"), schema.get("maximum")
            if "exclusiveMinimum" in schema:
                lo = schema["exclusiveMinimum"] + 1
            if "exclusiveMaximum" in schema:
                hi = schema["exclusiveMaximum"] - 1
            return st.integers(lo, hi)
        if kind == "number":
            return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum", schema.get("exclusiveMaximum")),
                             exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema, allow_nan=False)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return JSON_VALUES

    def _object(self, schema: dict) -> st.SearchStrategy:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: self.valid(v, k) for k, v in props.items() if k in required},
            optional={k: self.valid(v, k) for k, v in props.items() if k not in required},
        )

    def any_body(self, schema: dict) -> st.SearchStrategy:
        """Valid bodies, and invalid ones made from them."""
        valid = self.valid(schema)
        names = list(self.resolve(schema).get("properties", {}))
        required = list(self.resolve(schema).get("required", []))

        @st.composite
        def broken(draw) -> Any:
            body = dict(draw(valid))
            how = draw(st.sampled_from(["replace", "unknown", "drop", "anything"]))
            if how == "replace":
                body[draw(st.sampled_from(names))] = draw(JSON_VALUES)
            elif how == "unknown":
                body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in names))] = draw(JSON_VALUES)
            elif how == "drop" and required:
                body.pop(draw(st.sampled_from(required)), None)
            else:
                return draw(JSON_VALUES)
            return body

        return st.one_of(valid, broken())


@pytest.fixture(scope="module")
def spec(serve_app) -> dict:
    resp = requests.get(serve_app.url + "/openapi.json", timeout=30)
    assert resp.status_code == 200
    return resp.json()


def body_schema(spec: dict, path: str, media_type: str) -> dict:
    return spec["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"]


def check_answer(resp: requests.Response) -> None:
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
        # a valid `"stream": true` chat: JSON chunks, no server error in-band, then [DONE]
        events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", resp.text[-500:]
        for event in map(json.loads, events[:-1]):
            assert event.get("object") == "chat.completion.chunk" or event["error"]["type"] != "server_error", event
        return
    payload = resp.json()
    if resp.status_code != 200:
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error"


def test_every_post_route_declares_its_body(spec):
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"}
    for path, op in posts.items():
        content = op["requestBody"]["content"]
        (schema,) = (c["schema"] for c in content.values())
        assert schema["$ref"].rsplit("/", 1)[-1] in spec["components"]["schemas"], path
        assert "422" in op["responses"] and "503" in op["responses"]


def test_a_streamed_chat_is_checked_as_its_events(serve_app):
    """The body the fuzz once drew (hypothesis also draws constants from the code it loaded,
    so what it draws changes with the code): a valid streamed chat, 200 with SSE events."""
    resp = requests.post(serve_app.url + "/v1/chat/completions", timeout=120,
                         json={"messages": [{"role": "user", "content": ""}], "stream": True, "max_tokens": 2})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    check_answer(resp)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations"])
def test_fuzz_json_routes(serve_app, spec, path):
    strategies = SchemaStrategies(spec)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(strategies.any_body(body_schema(spec, path, "application/json")))
    def send(body):
        data = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes
        check_answer(requests.post(serve_app.url + path, data=data, headers={"content-type": "application/json"}, timeout=120))

    send()
    ok = requests.post(serve_app.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=120)
    assert ok.status_code == 200, ok.text


def test_fuzz_edit_form(serve_app, spec):
    strategies = SchemaStrategies(spec)
    schema = body_schema(spec, "/v1/images/edits", "multipart/form-data")
    png = io.BytesIO()
    SMALL_PNG.save(png, format="PNG")
    images = st.one_of(st.just(png.getvalue()), st.binary(max_size=64))

    def field(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else value if isinstance(value, str) else json.dumps(value)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(strategies.any_body(schema), images)
    def send(body, image):
        files = {"image": ("in.png", image, "image/png")} if isinstance(body, dict) and body.pop("image", None) is not None else None
        data = {k: field(v) for k, v in body.items()} if isinstance(body, dict) else {"body": field(body)}
        check_answer(requests.post(serve_app.url + "/v1/images/edits", data=data, files=files, timeout=120))

    send()
    resp = requests.post(serve_app.url + "/v1/images/edits", files={"image": ("in.png", png.getvalue(), "image/png")},
                         data={"prompt": "x", "num_inference_steps": "2"}, timeout=120)
    assert resp.status_code == 200, resp.text


def test_get_routes(serve_app, spec):
    gets = [path for path, ops in spec["paths"].items() if "get" in ops]
    assert {"/health", "/v1/models"} <= set(gets)
    for path in gets:
        path = path.replace("{model_id}", serve_app.args["model_name"])  # the one path parameter: the served model
        resp = requests.get(serve_app.url + path, timeout=30)
        assert resp.status_code == 200, (path, resp.text)
