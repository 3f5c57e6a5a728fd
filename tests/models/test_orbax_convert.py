"""`tessera convert` writes orbax weights that load to the same model."""

import numpy as np
from flax import nnx

from models.loader import ORBAX_DIR, load_model
from models.sharding import make_mesh
from serving.cli import main
from tests.helpers.paged_run import tessera_logits

PROMPT = [5, 77, 300, 12, 9, 411]


def _params(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model.state)}


def test_convert_then_load_gives_identical_weights_and_logits(checkpoint, tmp_path, capsys):
    src = checkpoint("qwen3")
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(src), "--out", str(out), "--dtype", "float32"]) == 0
    assert "converted" in capsys.readouterr().out
    assert (out / ORBAX_DIR).is_dir() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.safetensors"))

    original, restored = load_model(src), load_model(out)
    a, b = _params(original), _params(restored)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    np.testing.assert_array_equal(tessera_logits(original, PROMPT, [])[0], tessera_logits(restored, PROMPT, [])[0])


def test_converted_weights_restore_into_a_mesh(checkpoint, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(checkpoint("qwen2")), "--out", str(out)]) == 0
    model = load_model(out, "bfloat16", mesh=make_mesh(4))
    q_proj = dict((tuple(p), v) for p, v in nnx.to_flat_state(model.state))[("layers", 0, "self_attn", "qkv", "q_proj", "weight")]
    assert q_proj.get_value().dtype == np.dtype("bfloat16")
    assert {s.data.shape for s in q_proj.get_value().addressable_shards} == {(64, 1, 16)}
