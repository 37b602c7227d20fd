"""Errors in OpenAI's schema ({"error": {"message", "type", "param", "code"}}): the exception routes raise, the
error bodies, and the app's exception handlers (request validation errors become a 400 naming the field)."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P

logger = logging.getLogger("qwen3next.server")


class APIError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = P.ErrorInfo(message=message, type=_error_type(status), param=param, code=code)
    return P.ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def unencodable_field(value: Any, path: str = "") -> str | None:
    """The path (`messages[1].content`) of the first string in a parsed request that is not valid Unicode text (a lone
    UTF-16 surrogate such as "\ud800", which JSON can spell but no tokenizer can encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        bad = unencodable_field(v, sub)
        if bad is not None:
            return bad
    return None


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_path(loc: tuple | list) -> str | None:
    """`messages[0].role` from a pydantic error location; union-branch tags ('str', 'list[int]', class names)
    are not fields and are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TYPE_TAGS:
            out += ("." if out else "") + part
    return out or None


def _validation_response(errors: list[dict]) -> JSONResponse:
    if not errors:
        return error_response(400, "invalid request")
    # A union field reports one error per branch; a validator's own message (value_error) says the most.
    e = next((x for x in errors if x.get("type") == "value_error"), errors[0])
    kind = e.get("type", "")
    loc = list(e.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error")
        return error_response(400, "malformed JSON in the request body" + (f": {detail}" if detail else ""),
                               code="invalid_json")
    param = _param_path(loc)
    if param is None:
        if kind == "missing":
            return error_response(400, "a JSON request body is required")
        return error_response(400, f"the request body must be a JSON object ({e.get('msg', '')})")
    msg = e.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return error_response(400, f"{param}: {msg}", param=param)


def leading_name(message: str) -> str | None:
    m = re.match(r"([a-z_]+)\b", message)
    return m.group(1) if m else None


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's error shape (a request validation error with a 400, not a 422)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_response(list(e.errors()))

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, e: ValidationError) -> JSONResponse:
        return _validation_response(list(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=e.headers)  # e.g. a 405's Allow

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal server error: {type(e).__name__}", code="internal_error")
