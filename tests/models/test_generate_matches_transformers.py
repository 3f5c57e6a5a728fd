"""Greedy generation equals transformers' `generate(do_sample=False)` token for token."""

import pytest
import torch

from models.tokenizer import Tokenizer
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from serving.cli import main
from tests.helpers.tiny_checkpoint import ARCHITECTURES, load_reference

PROMPT = "The scheduler frees its cache blocks when a sequence ends, and"
NEW_TOKENS = 32


def _engine(folder) -> Engine:
    return Engine.from_model_dir(folder, config=EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, token_buckets=(2, 64)))


def _generate(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    engine.add_request(prompt_ids, params, request_id="one")
    return engine.run_to_completion()["one"][0].token_ids


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
    got = _generate(_engine(folder), prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
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
    engine = _engine(folder)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    greedy = _generate(engine, prompt_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    # Declare the 4th greedy token an end token: generation yields it and stops there.
    engine.eos_token_ids = frozenset({greedy[3]})
    stopped = _generate(engine, prompt_ids, SamplingParams(max_tokens=8, temperature=0))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens", "0"], "max_tokens=0 must be an integer >= 1"),
        (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--top-p", "1.5"], r"top_p=1.5 must be in \(0, 1\]"),
        (["--max-tokens", "400"], "max_tokens=400 is too large: the prompt has 18 tokens and the model's context is 256"),
    ],
)
def test_cli_rejects_bad_parameters(checkpoint, capsys, flags, message):
    import re

    folder = checkpoint("llama")
    code = main(["generate", "--model", str(folder), "--prompt", PROMPT, *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bfloat16_on_cpu_warns(checkpoint, capsys):
    folder = checkpoint("llama")
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "2", "--dtype", "bfloat16"]) == 0
    assert "bfloat16 on the CPU backend is emulated" in capsys.readouterr().err
    main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-tokens", "2"])
    assert "emulated" not in capsys.readouterr().err
