"""The demo model that ships in models/demo: Tessera's loader and engine give the recorded
greedy answer, and transformers loads the same folder as an ordinary Hugging Face checkpoint
(AutoTokenizer, AutoModelForCausalLM) and picks the same greedy tokens."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from models.config import ModelConfig
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
PROMPT_TEXT = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 40
# Recorded from this checkpoint with Tessera (float32, CPU), the first time the test ran.
RECORDED = '"I am sure you are not to be sure.'


@pytest.fixture(scope="module")
def tessera_greedy():
    engine = Engine.from_model_dir(
        DEMO, config=EngineConfig(max_num_seqs=1, max_num_batched_tokens=16, token_buckets=(16,))
    )
    text = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), request_id="demo")
    return text, prompt, engine.run_to_completion()["demo"][0]


def test_folder_is_a_complete_small_checkpoint():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert (DEMO / name).is_file(), name
    assert (DEMO / "model.safetensors").stat().st_size < 30 * 2**20
    cfg = ModelConfig.from_dir(DEMO)
    assert (cfg.architecture, cfg.vocab_size, cfg.max_position_embeddings) == ("LlamaForCausalLM", 4096, 512)
    generation = json.loads((DEMO / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(cfg.eos_token_ids) == [4095, 4093]  # <|im_end|>, <|endoftext|>


def test_greedy_answer_is_the_recorded_text(tessera_greedy):
    text, _, out = tessera_greedy
    assert text == PROMPT_TEXT
    assert out.text == RECORDED


def test_transformers_loads_the_folder_and_picks_the_same_tokens(tessera_greedy):
    text, prompt, out = tessera_greedy
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    assert tokenizer(text, add_special_tokens=False).input_ids == prompt
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS,
        )
    assert generated[0, len(prompt):].tolist() == out.token_ids
    assert tokenizer.decode(out.token_ids, skip_special_tokens=True) == out.text
