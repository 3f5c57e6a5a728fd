"""models.tokenizer.Tokenizer against transformers' AutoTokenizer on the same checkpoint folder."""

import json
import shutil
from pathlib import Path

import pytest

from models.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The server reads a request, and the scheduler frees its blocks.",
    "  two leading spaces,\ttabs and\n\nblank lines\r\n",
    "Emoji: 😀🚀🦀 and a flag 🇯🇵 done",
    "中文：你好，世界！日本語のテキスト。한국어",
    "Special <|eot_id|> and <|im_end|> inside text",
    "I'LL count 1234567 numbers",
]


def _copy_with_config(src: Path, dst: Path, config_changes: dict, generation_config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text()) | config_changes
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation_config))
    return dst


def _assert_same_as_transformers(folder: Path) -> None:
    ours = Tokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(theirs)
    assert ours.all_special_ids == theirs.all_special_ids
    for text in TEXTS:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == theirs.encode(text, add_special_tokens=add_special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_encode_decode_match_transformers(checkpoints, style):
    _assert_same_as_transformers(checkpoints[style])


def test_llama3_ids_and_bos_prepended(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["llama3"])
    # 507 merged BPE tokens, then the five special tokens in order.
    assert (tok.vocab_size, tok.max_token_id) == (512, 511)
    assert tok.bos_token_id == 507 == tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_ids == frozenset({508})
    assert tok.pad_token_id is None
    assert tok.token_to_id("<|eot_id|>") == 511
    assert tok.all_special_ids == [507, 508]
    ids = tok.encode("Hello world")
    assert ids[0] == 507 and 507 not in tok.encode("Hello world", add_special_tokens=False)
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>Hello world"


def test_chatml_has_no_bos_and_pads_with_eos(checkpoints):
    tok = Tokenizer.from_dir(checkpoints["chatml"])
    assert (tok.vocab_size, tok.max_token_id) == (512, 511)
    assert tok.bos_token_id is None
    assert tok.eos_token_ids == frozenset({509})
    assert tok.pad_token_id == 509
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [509, 510, 511]
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False)
    assert tok.chat_template.startswith("{%- if messages[0]['role'] == 'system' %}")


def test_eos_ids_union_generation_config_list(checkpoints, tmp_path):
    generation = {"bos_token_id": 507, "eos_token_id": [508, 511]}
    folder = _copy_with_config(checkpoints["llama3"], tmp_path / "ckpt", {}, generation)
    assert Tokenizer.from_dir(folder).eos_token_ids == frozenset({508, 511})


def test_eos_ids_union_generation_config_int(checkpoints, tmp_path):
    # Qwen2.5-Instruct shape: the tokenizer says <|endoftext|>, generation stops at <|im_end|> too.
    folder = _copy_with_config(checkpoints["chatml"], tmp_path / "ckpt", {}, {"eos_token_id": 511, "pad_token_id": 509})
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token_ids == frozenset({509, 511})
    assert tok.pad_token_id == 509


def test_bos_from_generation_config_when_tokenizer_has_none(checkpoints, tmp_path):
    folder = _copy_with_config(checkpoints["chatml"], tmp_path / "ckpt", {}, {"bos_token_id": 509})
    assert Tokenizer.from_dir(folder).bos_token_id == 509


def test_added_token_dicts_in_config(checkpoints, tmp_path):
    added = {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "rstrip": False,
             "normalized": False, "single_word": False, "special": True}
    folder = _copy_with_config(checkpoints["llama3"], tmp_path / "ckpt", {"eos_token": added})
    assert Tokenizer.from_dir(folder).eos_token_ids == frozenset({511})
    _assert_same_as_transformers(folder)


def test_add_bos_token_flags_are_ignored_with_tokenizer_json(checkpoints, tmp_path):
    # transformers 5 drops add_bos_token/add_eos_token from the config when tokenizer.json exists:
    # the post-processor in tokenizer.json alone decides which tokens encode adds.
    flags = {"add_bos_token": False, "add_eos_token": True}
    folder = _copy_with_config(checkpoints["llama3"], tmp_path / "ckpt", flags)
    ids = Tokenizer.from_dir(folder).encode("Hello world")
    assert ids[0] == 507 and ids[-1] != 508
    _assert_same_as_transformers(folder)


def test_special_token_missing_from_vocab_is_added(checkpoints, tmp_path):
    changes = {"unk_token": "<unk>", "image_token": "<|image|>",
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    folder = _copy_with_config(checkpoints["chatml"], tmp_path / "ckpt", changes)
    tok = Tokenizer.from_dir(folder)
    assert tok.all_special_ids == [509, 512, 513, 510, 511]  # eos and pad share <|endoftext|>
    assert (tok.token_to_id("<unk>"), tok.token_to_id("<|image|>")) == (512, 513)
    assert tok.vocab_size == 514
    assert tok.encode("a <|image|> b") == [64, 220, 513, 268]
    _assert_same_as_transformers(folder)


def test_missing_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(info.value, ValueError)
