"""The model `tessera serve` serves without `--model`.

The trained demo model in `models/demo/` once it exists; until then a small random llama
checkpoint, built on first use into `.cache/demo-model` beside the source tree (with the
test helpers, which need `transformers`: `pip install -e '.[test]'`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "models" / "demo"
FALLBACK_MODEL = REPO_ROOT / ".cache" / "demo-model"


def resolve_model(model: str | None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of `model`: a folder as given, an object-store URI downloaded (or found)
    in `cache_dir` (serving/model_store.py), or the default model."""
    if model is not None and "://" in model:
        from serving.model_store import fetch_model

        return fetch_model(model, cache_dir or Path.home() / ".cache" / "tessera" / "models").path
    if model is not None:
        return Path(model)
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL
    if not (FALLBACK_MODEL / "config.json").is_file():
        build_fallback(FALLBACK_MODEL)
    return FALLBACK_MODEL


def build_fallback(folder: Path) -> None:
    log.warning("no demo model in %s yet: building a small random checkpoint in %s", DEMO_MODEL, folder)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from tests.helpers.tiny_checkpoint import build_checkpoint
    except ImportError as e:
        raise ValueError(
            f"no default model: {DEMO_MODEL} is missing and the random fallback needs the test helpers "
            f"({e}); pass --model DIR"
        ) from e
    build_checkpoint(folder, "llama")
