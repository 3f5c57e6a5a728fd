"""Prefill and decode logits equal transformers' for every architecture Tessera serves."""

import numpy as np
import pytest
import torch

from models.loader import load_model
from tests.helpers.paged_run import tessera_logits, transformers_logits
from tests.helpers.tiny_checkpoint import ARCHITECTURES, load_reference

PROMPT = [5, 77, 300, 12, 9, 411, 250, 33, 71, 2, 199, 64, 480, 7, 15, 128, 91, 3, 44, 310, 222, 18]
CONTINUATION = [100, 7, 350, 42, 501]  # 5 decode steps, crossing a page boundary


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_float32_logits_match(checkpoint, arch):
    folder = checkpoint(arch)
    got = tessera_logits(load_model(folder, "float32"), PROMPT, CONTINUATION)
    want = transformers_logits(load_reference(folder, torch.float32), PROMPT, CONTINUATION)
    assert got[0].shape == (len(PROMPT), 520)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {step}")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bfloat16_logits_match(checkpoint, arch):
    # transformers' default initialisation: with the larger weights of the float32 tests these
    # 2-layer random models amplify rounding so much that transformers' own bfloat16 run is
    # 2% away from its float32 run, and nothing can be compared at 2e-2.
    folder = checkpoint(arch, initializer_range=0.02)
    got = tessera_logits(load_model(folder, "bfloat16"), PROMPT, CONTINUATION)
    want = transformers_logits(load_reference(folder, torch.bfloat16), PROMPT, CONTINUATION)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        rel = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert rel < 2e-2, f"step {step}: relative error {rel:.4f}"


def test_sliding_window_changes_the_result(checkpoint):
    """The Mistral checkpoint's window (12) is shorter than the prompt, so it must matter:
    without it, the logits past position 12 differ from transformers'."""
    folder = checkpoint("mistral")
    model = load_model(folder)
    assert model.cfg.layer_windows == (12, 12)
    windowed = tessera_logits(model, PROMPT, [])[0]
    full_model = load_model(checkpoint("mistral", sliding_window=None))
    full = tessera_logits(full_model, PROMPT, [])[0]
    np.testing.assert_allclose(windowed[:12], full[:12], atol=1e-5)
    assert np.abs(windowed[12:] - full[12:]).max() > 1e-2
