"""Structured-output fields -> the engine's GuidedDecoding, with the field the client used.

OpenAI's `response_format` (`json_object`, `json_schema` with `strict`, `text`), vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one per request.
"""

from __future__ import annotations

import json
from typing import Any

from runtime.structured import GuidedDecoding
from serving.errors import bad_request

_VLLM_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json_object"}


def guided_decoding(data) -> tuple[GuidedDecoding | None, str | None]:
    """(what the output must match, the request field that said so), or (None, None)."""
    found: list[tuple[GuidedDecoding, str]] = []
    if data.response_format is not None:
        guided = _response_format(data.response_format)
        if guided is not None:
            found.append((guided, "response_format"))
    if data.structured_outputs is not None:
        found.append((_structured_outputs(data.structured_outputs), "structured_outputs"))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(data, name)
        if value is not None:
            found.append((_guided(kind, value, name), name))
    if data.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported: JSON output is compact",
                          "guided_whitespace_pattern", "unsupported_parameter")
    if len(found) > 1:
        raise bad_request(f"give one of {', '.join(p for _, p in found)}, not several", found[1][1])
    return found[0] if found else (None, None)


def _response_format(value: dict[str, Any]) -> GuidedDecoding | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with a schema", "response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})  # OpenAI: an absent schema is any object
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON object",
                              "response_format.json_schema.schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request("response_format.json_schema.strict must be true or false",
                              "response_format.json_schema.strict")
        return GuidedDecoding("json", json.dumps(schema), strict=bool(strict) if strict is not None else True)
    raise bad_request(f"response_format.type must be text, json_object or json_schema, not {str(kind)[:40]!r}",
                      "response_format.type")


def _structured_outputs(value: dict[str, Any]) -> GuidedDecoding:
    given = [k for k, v in value.items() if v is not None and v is not False]
    unknown = [k for k in given if k not in _VLLM_KINDS]
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0][:40]} is not supported "
                          f"(supported: {', '.join(_VLLM_KINDS)})", f"structured_outputs.{unknown[0][:40]}",
                          "unsupported_parameter")
    if len(given) != 1:
        raise bad_request("structured_outputs must name exactly one of json, regex, choice, grammar, json_object",
                          "structured_outputs")
    kind = given[0]
    if kind == "json_object":
        return GuidedDecoding("json_object")
    return _guided(_VLLM_KINDS[kind], value[kind], f"structured_outputs.{kind}")


def _guided(kind: str, value, param: str) -> GuidedDecoding:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_request(f"{param} is not valid JSON", param) from None
        if not isinstance(value, dict):
            raise bad_request(f"{param} must be a JSON schema object", param)
        return GuidedDecoding("json", json.dumps(value))
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise bad_request(f"{param} must be a non-empty list of non-empty strings", param)
        return GuidedDecoding("choice", json.dumps(value))
    if not (isinstance(value, str) and value):
        raise bad_request(f"{param} must be a non-empty string", param)
    return GuidedDecoding(kind, value)
