"""Greedy generation equals transformers' `generate(do_sample=False)` token for token."""

import pytest
import torch

from models.loader import load_model
from models.tokenizer import Tokenizer
from runtime.generate import SamplingParams, generate_ids
from serving.cli import main
from tests.helpers.tiny_checkpoint import ARCHITECTURES, load_reference

PROMPT = "The scheduler frees its cache blocks when a sequence ends, and"
NEW_TOKENS = 32


def _transformers_greedy(folder, prompt_ids: list[int]) -> list[int]:
    hf = load_reference(folder)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("layout", ["v4", "v5"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_tokens_equal_transformers(checkpoint, arch, layout):
    folder = checkpoint(arch, layout)
    prompt_ids = Tokenizer.from_dir(folder).encode(PROMPT)
    model = load_model(folder)
    got = list(generate_ids(model, prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
    want = _transformers_greedy(folder, prompt_ids)
    assert len(got) == NEW_TOKENS
    assert got == want


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cli_generate_prints_transformers_text(checkpoint, arch, capsys):
    folder = checkpoint(arch)
    tokenizer = Tokenizer.from_dir(folder)
    want = tokenizer.decode(_transformers_greedy(folder, tokenizer.encode(PROMPT)))
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", str(NEW_TOKENS), "--ignore-eos"])
    assert code == 0
    assert capsys.readouterr().out == want + "\n"


def test_generation_stops_at_eos(checkpoint):
    folder = checkpoint("llama")
    prompt_ids = Tokenizer.from_dir(folder).encode(PROMPT)
    model = load_model(folder)
    greedy = list(generate_ids(model, prompt_ids, SamplingParams(max_tokens=8, ignore_eos=True)))
    # Declare the 4th greedy token an end token: generation yields it and stops there.
    stopped = list(generate_ids(model, prompt_ids, SamplingParams(max_tokens=8), eos_ids=frozenset({greedy[3]})))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]


def test_seeded_sampling_is_reproducible(checkpoint):
    folder = checkpoint("qwen2")
    prompt_ids = Tokenizer.from_dir(folder).encode(PROMPT)
    model = load_model(folder)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    first = list(generate_ids(model, prompt_ids, params))
    assert list(generate_ids(model, prompt_ids, params)) == first
    other_seed = list(generate_ids(model, prompt_ids, SamplingParams(12, 1.0, 0.9, seed=8, ignore_eos=True)))
    assert other_seed != first


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens", "0"], "max_tokens=0 must be at least 1"),
        (["--temperature", "-1"], "temperature=-1.0 must not be negative"),
        (["--top-p", "1.5"], r"top_p=1.5 must be in \(0, 1\]"),
        (["--max-tokens", "400"], "exceeds the model's context of 256 tokens"),
    ],
)
def test_cli_rejects_bad_parameters(checkpoint, capsys, flags, message):
    import re

    folder = checkpoint("llama")
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
