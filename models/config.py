"""Model configuration read from a Hugging Face `config.json`.

Both layouts load: the one transformers 4 wrote for published checkpoints (`rope_theta`
and `rope_scaling` at the top level) and the one transformers 5 writes (`rope_parameters`).
Anything Tessera cannot compute exactly is refused with a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that Tessera cannot serve; the message names the field."""


# Architecture name -> the features it switches on. Unknown names are refused.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}

# transformers' per-class defaults for fields a config.json may leave out.
_DEFAULTS = {
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, tie_word_embeddings=False),
    "qwen2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen3": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ROPE_TYPES = ("default", "linear", "llama3")
_QWEN_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config/Qwen3Config default


@dataclasses.dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v (and o for Llama) projections carry a bias
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Attention window per layer in tokens (None = full attention): a query at position p
    # sees keys at positions p - window + 1 ... p.
    layer_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_windows)} entries for {self.num_layers} layers")

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def kv_group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _parse(raw)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model folder needs config.json")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return _parse(raw)


def _parse(raw: dict[str, Any]) -> ModelConfig:
    architecture = _architecture(raw)
    kind = ARCHITECTURES[architecture]
    for name in _REQUIRED:
        if raw.get(name) is None:
            raise ConfigError(f"config.json is missing the field {name!r}")
        _positive_int(raw, name)
    if raw.get("num_key_value_heads") is not None:
        _positive_int(raw, "num_key_value_heads")
    get = lambda name: raw[name] if raw.get(name) is not None else _DEFAULTS[kind].get(name)  # noqa: E731

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    num_heads = raw["num_attention_heads"]
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"head_dim={head_dim!r} must be a positive even integer")

    attention_bias = kind != "mistral" and bool(raw.get("attention_bias", False))
    if kind == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases and never an o bias
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    num_layers = raw["num_hidden_layers"]
    return ModelConfig(
        architecture=architecture,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_number(get("rms_norm_eps"), "rms_norm_eps", float),
        max_position_embeddings=_number(get("max_position_embeddings"), "max_position_embeddings", int),
        rope=_rope(raw, _number(_rope_theta(raw, kind), "rope_theta", float)),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        attention_bias=attention_bias,
        o_proj_bias=attention_bias and kind in ("llama", "qwen3"),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=kind == "qwen3",
        layer_windows=_layer_windows(raw, kind, num_layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise ConfigError(f"architectures={archs!r}: expected exactly one architecture")
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(
                f"architectures={archs[0]!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        return archs[0]
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError("config.json is missing the field 'architectures' (and 'model_type')")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def _positive_int(raw: dict[str, Any], name: str) -> None:
    value = raw[name]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _number(value: Any, name: str, kind: type) -> int | float:
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}={value!r} must be a number") from e


def _rope_params(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The rope dict and the field it came from, whichever layout the file uses."""
    if isinstance(raw.get("rope_parameters"), dict):
        return "rope_parameters", raw["rope_parameters"]
    if isinstance(raw.get("rope_scaling"), dict):
        return "rope_scaling", raw["rope_scaling"]
    return "rope_scaling", {}


def _rope_theta(raw: dict[str, Any], kind: str) -> float:
    _, params = _rope_params(raw)
    return params.get("rope_theta") or raw.get("rope_theta") or _DEFAULTS[kind]["rope_theta"]


def _rope(raw: dict[str, Any], theta: float) -> RopeConfig:
    field, params = _rope_params(raw)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{field}.rope_type={kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")
    if kind == "default":
        return RopeConfig(theta=theta)
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ConfigError(f"{field}.factor={factor!r} must be a positive number")
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(factor))
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if params.get(key) is None:
            raise ConfigError(f"{field}.{key} is required for rope_type 'llama3'")
    return RopeConfig(
        theta=theta,
        kind="llama3",
        factor=float(factor),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    # null (or 0) means no window; anything else must be a size in tokens.
    if not raw.get("sliding_window"):
        return None
    _positive_int(raw, "sliding_window")
    return raw["sliding_window"]


def _layer_windows(raw: dict[str, Any], kind: str, num_layers: int) -> tuple[int | None, ...]:
    window = _sliding_window(raw)
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        allowed = ("full_attention", "sliding_attention")
        for t in layer_types:
            if t not in allowed:
                raise ConfigError(f"layer_types entry {t!r} is not supported; expected one of {allowed}")
        if "sliding_attention" in layer_types and not window:
            raise ConfigError("layer_types names sliding_attention but sliding_window is not set")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if kind == "mistral":
        return (window or None,) * num_layers
    if kind in ("qwen2", "qwen3") and raw.get("use_sliding_window") and window:
        first = raw.get("max_window_layers")
        first = _QWEN_MAX_WINDOW_LAYERS if first is None else first
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


# Sampling fields of generation_config.json a request falls back to (vLLM's `--generation-config auto`).
GENERATION_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(folder: str | Path) -> dict[str, float | int]:
    """The model's sampling defaults from `generation_config.json` (absent file or fields: none)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return {name: raw[name] for name in GENERATION_SAMPLING_FIELDS
            if isinstance(raw.get(name), int | float) and not isinstance(raw.get(name), bool)}
