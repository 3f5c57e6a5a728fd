"""A damaged checkpoint is refused before any weight loads, with a message naming the field,
tensor or file; sharded and bfloat16 checkpoints load."""

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch_file

from models.config import ConfigError
from models.loader import load_model
from models.safetensors_io import CheckpointError
from models.tokenizer import Tokenizer
from serving.cli import main


@pytest.fixture
def llama_copy(checkpoint, tmp_path):
    """A private copy of the tiny llama checkpoint, safe to damage."""
    return shutil.copytree(checkpoint("llama"), tmp_path / "llama")


def edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def flat_params(model) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model.state)}


def test_missing_config_field(llama_copy):
    edit_config(llama_copy, intermediate_size=None)
    with pytest.raises(ConfigError, match="config.json is missing the field 'intermediate_size'"):
        load_model(llama_copy)


def test_unknown_architecture(llama_copy):
    edit_config(llama_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="architectures='GPT2LMHeadModel' is not supported"):
        load_model(llama_copy)


def test_tensor_of_the_wrong_shape(llama_copy):
    name = "model.layers.1.mlp.up_proj.weight"
    edit_tensors(llama_copy, lambda t: t.update({name: t[name].reshape(64, 128)}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' in model\.safetensors has shape \[64, 128\], "
        r"the config needs \[128, 64\]",
    ):
        load_model(llama_copy)


def test_tensor_missing(llama_copy):
    edit_tensors(llama_copy, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' is missing"):
        load_model(llama_copy)


def test_unexpected_extra_tensor(llama_copy):
    # a third layer in a checkpoint whose config says two
    edit_tensors(llama_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.2\.mlp\.up_proj\.weight' in model\.safetensors is not part of a "
        r"LlamaForCausalLM with this config \(1 unexpected tensors\)",
    ):
        load_model(llama_copy)


def test_missing_shard_file(checkpoint, tmp_path):
    folder = shutil.copytree(checkpoint("llama", max_shard_size="20KB"), tmp_path / "sharded")
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (folder / shard).unlink()
    with pytest.raises(
        CheckpointError, match=rf"shard file {shard} named in model\.safetensors\.index\.json is missing"
    ):
        load_model(folder)


def test_truncated_safetensors_file(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    cut_size = len(data) - 1000
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors: truncated: tensor '.+' ends at byte \d+, the file has {cut_size}"
    ):
        load_model(llama_copy)


CORRUPTIONS = {
    "garbage": (lambda data: b"\x00garbage" * 3, r"corrupt or truncated .+ \(header of \d+ bytes in a file of 24\)"),
    "empty": (lambda data: b"", r"truncated safetensors file \(0 bytes, no header\)"),
    "bad-json": (lambda data: struct.pack("<Q", 5) + b"{nope" + data[13:], r"corrupt safetensors header \(Expecting"),
    "not-object": (lambda data: struct.pack("<Q", 2) + b"[]" + data[10:], r"corrupt safetensors header \(not a JSON"),
    "header-longer-than-file": (
        lambda data: struct.pack("<Q", len(data)) + data[8:],
        r"corrupt or truncated safetensors file \(header of {n} bytes in a file of {n}\)",
    ),
}


@pytest.mark.parametrize(("damage", "match"), CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_header(llama_copy, damage, match):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(damage(data))
    with pytest.raises(CheckpointError, match="model\\.safetensors: " + match.replace("{n}", str(len(data)))):
        load_model(llama_copy)


def test_unsupported_tensor_dtype(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].replace(b'"F32"', b'"F8_E4M3"', 1)  # same length, so offsets hold
    path.write_bytes(data[:8] + header + data[8 + length :])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.+' has dtype F8_E4M3, which is not supp"):
        load_model(llama_copy)


def test_tokenizer_ids_past_the_vocabulary(checkpoint):
    folder = checkpoint("llama")  # vocab_size 520
    assert load_model(folder, max_token_id=519).cfg.vocab_size == 520
    with pytest.raises(CheckpointError, match="the tokenizer has ids up to 520 but the model's vocab_size is 520"):
        load_model(folder, max_token_id=520)


def test_real_tokenizer_larger_than_the_model(checkpoint):
    folder = checkpoint("llama", vocab_size=300)
    tokenizer = Tokenizer.from_dir(folder)
    assert tokenizer.max_token_id == 511
    with pytest.raises(CheckpointError, match="the tokenizer has ids up to 511 but the model's vocab_size is 300"):
        load_model(folder, max_token_id=tokenizer.max_token_id)


def test_sharded_checkpoint_loads_the_same_params(checkpoint):
    sharded = checkpoint("llama", max_shard_size="20KB")
    files = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(files) == 14 and not (sharded / "model.safetensors").exists()
    got, want = flat_params(load_model(sharded)), flat_params(load_model(checkpoint("llama")))
    assert got.keys() == want.keys() and len(got) == 21
    for path in got:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    assert np.abs(got[("embed_tokens",)]).max() > 0.1  # random weights, not zeros


def test_bfloat16_checkpoint_loads_into_float32(checkpoint):
    folder = checkpoint("llama", torch_dtype=torch.bfloat16)
    saved = load_torch_file(folder / "model.safetensors")
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    params = flat_params(load_model(folder, "float32"))
    assert all(a.dtype == np.float32 for a in params.values())
    np.testing.assert_array_equal(params[("embed_tokens",)], saved["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(params[("lm_head", "weight")], saved["lm_head.weight"].float().numpy().T)


def test_cli_reports_a_bad_config_without_a_traceback(llama_copy, capsys):
    edit_config(llama_copy, hidden_size=None)
    code = main(["generate", "--model", str(llama_copy), "--prompt", "hello", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "tessera generate: error: config.json is missing the field 'hidden_size'\n"
