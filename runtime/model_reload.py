"""Hot reload of the base model: load beside, check, switch between steps, never drop a stream.

    prepare_model (any thread)  read the new folder, lay it out by the served execution plan,
                                and check that every weight has the served one's path, shape
                                and dtype (so every compiled step program serves it unchanged:
                                nothing to compile, nothing to warm)
    ModelSwitch (loop thread)   the engine stops starting new requests (they wait in the queue,
                                their connections open), lets every started one finish on the
                                old weights, then swaps the weights at the start of a step,
                                forgets the prefix cache and counts a new model version

The old weights are freed when the last reference (the switch, the runner) lets go. A failure
before the switch leaves the old model serving; the caller is told why.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax

from models.loader import LoadedModel, lay_out, load_model


class ModelReloadError(ValueError):
    """The new model cannot replace the served one; the message says why."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def prepare_model(served: LoadedModel, model_dir: str | Path, tokenizer_max_id: int | None = None,
                  served_dir: str | Path | None = None) -> LoadedModel:
    """The model in `model_dir`, laid out as `served`, or ModelReloadError. The tokenizer is not
    reloaded: its files must be the served folder's byte for byte."""
    try:
        model = load_model(model_dir, served.dtype, mesh=served.mesh, max_token_id=tokenizer_max_id)
    except (OSError, ValueError) as e:
        raise ModelReloadError(f"the model in {model_dir} cannot be loaded: {e}") from None
    if model.cfg != served.cfg:  # the compiled step holds the config (RoPE, norms, windows) as constants
        raise ModelReloadError(f"the model in {model_dir} has another config.json than the served model; only new "
                               "weights for the same architecture and settings hot-reload")
    if served_dir is not None:
        for name in TOKENIZER_FILES:
            old, new = Path(served_dir) / name, Path(model_dir) / name
            if old.exists() != new.exists() or (old.exists() and old.read_bytes() != new.read_bytes()):
                raise ModelReloadError(f"the model in {model_dir} has another tokenizer ({name} differs); only new "
                                       "weights with the same tokenizer hot-reload")
    model = lay_out(model, served.layout)
    old_leaves, old_def = jax.tree.flatten(served.state)
    new_leaves, new_def = jax.tree.flatten(model.state)
    if old_def != new_def:
        raise ModelReloadError(f"the model in {model_dir} is another architecture (its weights are not the served "
                               "model's); start a new server for it")
    for old, new in zip(old_leaves, new_leaves, strict=True):
        if old.shape != new.shape or old.dtype != new.dtype:
            raise ModelReloadError(f"the model in {model_dir} has a weight of shape {new.shape} {new.dtype} where the "
                                   f"served one has {old.shape} {old.dtype}; only same-shaped weights hot-reload")
    return model


@dataclass
class ModelSwitch:
    """A prepared model waiting for the engine to drain; its future gives the new version."""

    model: LoadedModel
    model_dir: str
    requested_at: float = field(default_factory=time.perf_counter)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def begin(self) -> bool:
        """The engine is about to switch: False if the caller gave up (timed out) first."""
        return self.future.set_running_or_notify_cancel()

    def done(self, version: int) -> None:
        self.future.set_result(version)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
