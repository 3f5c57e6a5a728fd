"""Random-weight models of real shapes, made on the device, for benchmarks.

Writing an 8B checkpoint to disk and reading it back would cost minutes of a GPU lease;
these draw every parameter where it will live, with its sharding, in seconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import tokenizers
from flax import nnx

from models.config import ModelConfig
from models.loader import LoadedModel, abstract_model, resolve_dtype
from models.sharding import ShardingRules, make_mesh
from models.tokenizer import Tokenizer

# Hugging Face config.json fields of the shapes the GPU check serves.
LLAMA_3_2_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
)
LLAMA_3_1_8B = dict(
    LLAMA_3_2_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
    tie_word_embeddings=False,
)
TINY = dict(LLAMA_3_2_1B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024, bos_token_id=1, eos_token_id=2)
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B, "tiny": TINY}


def random_model(raw_config: dict, dtype: str = "bfloat16", tensor_parallel: int = 1, seed: int = 0) -> LoadedModel:
    cfg = ModelConfig.from_dict(raw_config)
    dtype = resolve_dtype(dtype)
    mesh, rules = make_mesh(tensor_parallel), ShardingRules()
    graphdef, state, specs = abstract_model(cfg, dtype)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        spec = specs[i]
        assert spec.path == tuple(path)
        sharding = rules.sharding(spec.axes, spec.shape, mesh)
        fill = 1.0 if "norm" in "/".join(map(str, path)) else None  # norms at 1, like a trained model's scale
        var.set_value(_draw(jax.random.fold_in(key, i), spec.shape, dtype, fill, sharding))
    return LoadedModel(cfg, graphdef, state, dtype, mesh, rules)


def _draw(key, shape, dtype, fill, sharding):
    return _drawer(shape, jnp.dtype(dtype), fill, sharding)(key)


@functools.lru_cache(maxsize=None)
def _drawer(shape, dtype, fill, sharding):
    """One compiled initialiser per distinct (shape, dtype, fill, sharding): layers share them."""
    if fill is not None:
        return jax.jit(lambda k: jnp.full(shape, fill, dtype), out_shardings=sharding)
    return jax.jit(lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype), out_shardings=sharding)


def numbered_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer whose token i is "t{i}": any id a random model emits decodes."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, {})
