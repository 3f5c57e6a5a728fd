"""Per-tenant guardrail policy from configuration, and the registry that builds guardrails from it.

A policy is a dict (or a JSON/TOML file of one):

    {"default": {"guardrails": [{"name": "pii"}, {"name": "jailbreak", "threshold": 0.6}]},
     "tenants": {
        "acme":  {"extends": "default",
                  "guardrails": [{"name": "toxicity", "kind": "classifier", "threshold": 0.8,
                                  "options": {"url": "http://guard:8080/classify"}}]},
        "lab":   {"guardrails": []}}}

Each guardrail entry: `name` (reported, unique in a tenant's list), `kind` (a built-in, a
registered plugin, or `module:attribute`; default: the name), `input` / `output` (the action
when it finds something: block, redact, flag, or off to skip that stage; default: what the
guardrail itself decides), `threshold`, and `options` for the guardrail's constructor.
A tenant without an entry gets `default`; `extends: "default"` adds its own entries to the
default's (an entry with the same name replaces the default's).
"""

from __future__ import annotations

import importlib
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.guardrails.base import Guardrail

STAGE_ACTIONS = ("block", "redact", "flag", "off")


@dataclass(frozen=True, slots=True)
class GuardrailSpec:
    name: str
    kind: str | None = None
    input: str | None = None
    output: str | None = None
    threshold: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for stage in ("input", "output"):
            action = getattr(self, stage)
            if action is not None and action not in STAGE_ACTIONS:
                raise ValueError(f"guardrail {self.name!r}: {stage}={action!r} must be one of "
                                 f"{', '.join(STAGE_ACTIONS)}")

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any] | str) -> GuardrailSpec:
        if isinstance(entry, str):
            return cls(entry)
        unknown = set(entry) - {"name", "kind", "input", "output", "threshold", "options"}
        if unknown or "name" not in entry:
            raise ValueError(f"guardrail entry {dict(entry)!r}: needs 'name'; unknown keys {sorted(unknown)}")
        return cls(entry["name"], entry.get("kind"), entry.get("input"), entry.get("output"),
                   entry.get("threshold"), dict(entry.get("options") or {}))


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    guardrails: tuple[GuardrailSpec, ...] = ()
    input_roles: tuple[str, ...] | None = None  # chat roles whose messages are checked; None: all
    stream_overlap: int | None = None  # characters held back while streaming; None: the guardrails' need

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], base: TenantPolicy | None = None) -> TenantPolicy:
        unknown = set(entry) - {"guardrails", "extends", "input_roles", "stream_overlap"}
        if unknown:
            raise ValueError(f"unknown tenant policy keys {sorted(unknown)}")
        specs = tuple(GuardrailSpec.from_dict(e) for e in entry.get("guardrails", ()))
        extends = entry.get("extends")
        if extends not in (None, "default"):
            raise ValueError(f"extends={extends!r}: only 'default' can be extended")
        if extends and base is not None:
            own = {s.name for s in specs}
            specs = tuple(s for s in base.guardrails if s.name not in own) + specs
        names = [s.name for s in specs]
        if len(names) != len(set(names)):
            raise ValueError(f"guardrail names repeat in a tenant's policy: {names}")
        inherited = base if extends and base is not None else None
        roles = entry.get("input_roles", inherited.input_roles if inherited else None)
        overlap = entry.get("stream_overlap", inherited.stream_overlap if inherited else None)
        return cls(specs, tuple(roles) if roles is not None else None, overlap)


@dataclass(frozen=True, slots=True)
class GuardrailPolicy:
    default: TenantPolicy = TenantPolicy()
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuardrailPolicy:
        unknown = set(data) - {"default", "tenants"}
        if unknown:
            raise ValueError(f"unknown guardrail policy keys {sorted(unknown)}; expected default, tenants")
        default = TenantPolicy.from_dict(data.get("default", {}))
        tenants = {name: TenantPolicy.from_dict(entry, default) for name, entry in data.get("tenants", {}).items()}
        return cls(default, tenants)

    @classmethod
    def from_file(cls, path: str | Path) -> GuardrailPolicy:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"guardrail policy {path}: {e}") from None

    def for_tenant(self, tenant: str | None) -> TenantPolicy:
        return self.tenants.get(tenant or "", self.default)


# -- the registry -------------------------------------------------------------------------------

Factory = Callable[[GuardrailSpec], Guardrail]
_REGISTRY: dict[str, Factory] = {}


def register_guardrail(kind: str, factory: Factory) -> None:
    """Make `kind` usable in policies; `factory(spec)` returns the guardrail."""
    _REGISTRY[kind] = factory


def build_guardrail(spec: GuardrailSpec) -> Guardrail:
    kind = spec.kind or spec.name
    if kind in _REGISTRY:
        guardrail = _REGISTRY[kind](spec)
    elif ":" in kind:
        guardrail = _from_import_path(kind, spec)
    else:
        raise ValueError(f"guardrail {spec.name!r}: unknown kind {kind!r}; built-in and registered kinds: "
                         f"{', '.join(sorted(_REGISTRY))}, or 'module:attribute'")
    if not isinstance(guardrail, Guardrail):
        raise TypeError(f"guardrail {spec.name!r}: {kind!r} made a {type(guardrail).__name__}, not a Guardrail")
    guardrail.name = spec.name
    return guardrail


def _from_import_path(path: str, spec: GuardrailSpec) -> Guardrail:
    module_name, _, attribute = path.partition(":")
    target = getattr(importlib.import_module(module_name), attribute)
    if isinstance(target, type) and issubclass(target, Guardrail):
        options = dict(spec.options)
        if spec.threshold is not None:
            options["threshold"] = spec.threshold
        return target(**options)
    return target(spec)


def _pii(spec: GuardrailSpec) -> Guardrail:
    from serving.guardrails.pii import PIIScrubber

    return PIIScrubber(**spec.options)


def _jailbreak(spec: GuardrailSpec) -> Guardrail:
    from serving.guardrails.jailbreak import JailbreakHeuristic

    options = dict(spec.options)
    if spec.threshold is not None:
        options["threshold"] = spec.threshold
    return JailbreakHeuristic(**options)


def _classifier(spec: GuardrailSpec) -> Guardrail:
    from serving.guardrails.classifier import ClassifierGuardrail, http_classifier

    options = dict(spec.options)
    url, callable_path = options.pop("url", None), options.pop("callable", None)
    if (url is None) == (callable_path is None):
        raise ValueError(f"classifier {spec.name!r}: give exactly one of options.url and options.callable")
    if url is not None:
        http_options = {k: options.pop(k) for k in ("timeout_s", "headers", "input_field") if k in options}
        classify = http_classifier(url, **http_options)
    else:
        module_name, _, attribute = callable_path.partition(":")
        classify = getattr(importlib.import_module(module_name), attribute)
    if spec.threshold is not None:
        options["threshold"] = spec.threshold
    return ClassifierGuardrail(classify, **options)


register_guardrail("pii", _pii)
register_guardrail("jailbreak", _jailbreak)
register_guardrail("classifier", _classifier)
