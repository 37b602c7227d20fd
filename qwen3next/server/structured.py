"""The output constraint a request asks for: OpenAI's `response_format`, or vLLM's `structured_outputs` object and
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields (one of them per request)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..engine.sampling import StructuredOutputsParams
from . import protocol as P
from .errors import APIError

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass
class RequestConstraint:
    params: StructuredOutputsParams | None = None
    field: str | None = None  # the request field it came from, for errors
    answer_schema: dict | None = None  # the JSON the reply must be (json_object / json_schema), for tool grammars


def request_constraint(req: P.SamplingRequest) -> RequestConstraint:
    """The constraint of a request (400 naming the field when it is malformed or when several are given)."""
    given = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        given.append("response_format")
    if req.structured_outputs is not None:
        given.append("structured_outputs")
    given += [name for name in _GUIDED if getattr(req, name) is not None]
    if len(given) > 1:
        raise APIError(400, f"give one output constraint, got {', '.join(given)}", given[1])
    if not given:
        return RequestConstraint()
    field = given[0]
    try:
        if field == "response_format":
            if rf.type == "json_object":
                schema = {"type": "object"}
            elif rf.json_schema is None:
                raise APIError(400, "response_format: type 'json_schema' needs a json_schema object with a name "
                                    "and a schema", "response_format")
            else:
                schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {"type": "object"}
            return RequestConstraint(StructuredOutputsParams(json=schema), field, schema)
        if field == "structured_outputs":
            params = StructuredOutputsParams.parse(req.structured_outputs)
            return RequestConstraint(params, field, params.json if params.kind == "json" else None)
        params = StructuredOutputsParams(**{_GUIDED[field]: getattr(req, field)})
        return RequestConstraint(params, field, params.json if params.kind == "json" else None)
    except ValueError as e:
        raise APIError(400, relabel(str(e), field), field) from None


def relabel(message: str, field: str) -> str:
    """An engine message about `structured_outputs[.kind]` told in the request's own field's name."""
    if field != "structured_outputs":
        message = re.sub(r"^structured_outputs(\.\w+)?:?\s*", "", message)
    return message if message.startswith(field) else f"{field}: {message}"
