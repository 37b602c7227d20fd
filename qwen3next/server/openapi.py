"""The OpenAPI schema: each route's documented responses, and FastAPI's schema less its 422s."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from . import protocol as P

_ERROR_DESCRIPTIONS = {400: "invalid request (the error's `param` names the field)", 401: "missing or wrong API key",
                       404: "unknown model or path", 413: "request body too large",
                       503: "the engine is not available"}


def documented(ok: type | None, chunk: type | None, *errors: int) -> dict:
    """OpenAPI `responses` of a route: its errors in OpenAI's error shape and, for a generation route, the 200 body and
    its `stream: true` form (server-sent events, each `data:` line one `chunk` as JSON, then `data: [DONE]`)."""
    out: dict = {code: {"model": P.ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in errors}
    if ok is not None:
        out[200] = {"model": ok, "description": f"the {ok.__name__}, or with `stream: true` a text/event-stream of "
                                              f"`data: <{chunk.__name__} JSON>` events ending with `data: [DONE]`",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return out


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 it documents for body validation: this server answers those with a 400 in
    OpenAI's error shape (documented on each route)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
