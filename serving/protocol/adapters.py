"""LoRA adapter and model reload bodies, spelled as vLLM spells them (`lora_name`, `lora_path`)."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct


class LoadLoraAdapterRequest(Struct, forbid_unknown_fields=True):
    lora_name: str
    lora_path: str
    load_inplace: bool = True
    """vLLM's switch to replace a loaded name; Tessera always replaces (running requests finish on the old one)."""


class UnloadLoraAdapterRequest(Struct, forbid_unknown_fields=True):
    lora_name: str
    lora_int_id: int | None = None  # vLLM sends it; unused


class LoraAdapterInfo(Struct):
    lora_name: str
    version: str
    lora_path: str
    rank: int
    targets: list[str]
    load_seconds: float
    status: Literal["loaded", "unloaded"] = "loaded"


class AdapterDebug(Struct):
    max_loras: int
    max_lora_rank: int
    free_slots: int
    adapters: list[dict[str, Any]]


class ReloadModelRequest(Struct, forbid_unknown_fields=True):
    model_path: str | None = None
    """The folder to serve next; default: the folder served now (its files changed on disk)."""


class ReloadModelResponse(Struct):
    model: str
    model_path: str
    version: int
    load_seconds: float
    switch_seconds: float
