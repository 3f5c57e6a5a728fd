"""Render a Hugging Face chat template to the prompt string, as transformers'
`apply_chat_template(..., tokenize=False)` does.

Chat templates come from the checkpoint, so they are untrusted code: they run in jinja2's
immutable sandbox. The environment matches transformers' (see
transformers/utils/chat_template_utils.py) so the same template gives byte-identical prompts.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

# Older names for a message's reasoning; transformers copies them to `reasoning_content` (the
# name templates read) and to `thinking` (the name gpt-oss templates read).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template could not be compiled or rendered, or it called raise_exception()."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **extra: Any,
) -> str:
    """`special_tokens` maps names such as "bos_token" to their text; `extra` overrides them."""
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    for name, value in (("tools", tools), ("documents", documents)):
        if value is not None and not all(isinstance(item, Mapping) for item in value):
            raise ChatTemplateError(f"{name} must be a list of dicts (JSON schemas for tools)")
    variables = {**(special_tokens or {}), **extra}
    try:
        return compile_chat_template(template).render(
            messages=[_normalize_message(m) for m in messages],
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template text; a server renders the same template for every request."""
    try:
        return _ENVIRONMENT.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
    # OpenAI clients send `"content": null` or `"tool_calls": null`; templates handle a missing
    # key but print "None" for a null one, so transformers drops them.
    out = {key: value for key, value in message.items() if value is not None}
    reasoning = next((out[key] for key in _REASONING_FIELDS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's built-in tojson sorts keys and HTML-escapes <, >, & and '; templates are written
    # against transformers' version, which does neither and keeps non-ASCII text as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, which could reach Python internals."""

    def __init__(*args, **kwargs):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_attribute_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_attribute_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attribute_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks.

    transformers uses it to find the assistant tokens; for serving it only has to parse, and it
    renders its body unchanged.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


def _make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env


_ENVIRONMENT = _make_environment()
