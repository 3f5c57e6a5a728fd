"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as Flax NNX modules.

Built in the checkpoint layout: every parameter carries logical axis names (`embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`), which `models/sharding.py` maps onto a mesh, and each
weight is a projection of `models/projection.py` ([in, *out], e.g. q_proj [embed, heads,
head_dim]). On one device the loader lays the weights out as the execution plan says
(`models/loader.py` `lay_out`): `SplitQKV` becomes `FusedQKV`, `MLP` becomes `FusedMLP`, and
each projection is rebuilt in the plan's layout. Nothing here asks which layout it holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from kernels.paged_kv_write import write_kv_pages_cpu, write_kv_pages_ref
from kernels.ragged_paged_attention import ragged_paged_attention
from kernels.ragged_paged_attention_cpu import ragged_paged_attention_cpu
from kernels.ragged_paged_attention_ref import ragged_paged_attention_ref
from models.causal_attention import causal_attention
from models.config import ModelConfig
from models.kv_cache import AttentionMetadata, KVCache, LayerKV
from models.lora import LoraInputs, LoraLayer
from models.mlp import FusedMLP, MLP
from models.projection import Dense, MergeHeads, Projection, Transposed, placeholder
from models.qkv import FusedQKV, SplitQKV
from models.rope import apply_rope, inverse_frequencies
from models.sharding import MODEL_AXIS


_ATTENTION = {
    "reference": ragged_paged_attention_ref,
    "pallas": ragged_paged_attention,
    "cpu": ragged_paged_attention_cpu,
    "pallas_interpret": functools.partial(ragged_paged_attention, interpret=True),
}


def _paged_attention(md: AttentionMetadata, q, k_pages, v_pages, sm_scale: float, window: int | None):
    attend = functools.partial(_ATTENTION[md.backend], sm_scale=sm_scale, sliding_window=window)
    args = (q, k_pages, v_pages, md.block_tables, md.context_lens, md.query_start_loc)
    if md.work is not None and md.backend.startswith("pallas"):
        args += (md.work,)
    if md.mesh is None:
        return attend(*args)
    # Each device attends with its own KV heads and their query heads; the batch metadata is replicated.
    heads, pages, whole = P(None, MODEL_AXIS, None), P(None, None, MODEL_AXIS, None), P()
    return jax.shard_map(attend, mesh=md.mesh, in_specs=(heads, pages, pages) + (whole,) * (len(args) - 3),
                         out_specs=heads, check_vma=False)(*args)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis: str):
        self.weight = placeholder((dim,), (axis,), dtype, fill=1.0)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        # Normalise in float32, scale in the activation dtype, as transformers does.
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.window = cfg.layer_windows[layer]
        self.qkv: SplitQKV | FusedQKV = SplitQKV(cfg, dtype)
        self.o_proj: Projection = MergeHeads(placeholder((h, d, e), ("heads", "head_dim", "embed"), dtype))
        if cfg.attention_bias:
            self.q_bias = placeholder((h, d), ("heads", "head_dim"), dtype)
            self.k_bias = placeholder((k, d), ("kv_heads", "head_dim"), dtype)
            self.v_bias = placeholder((k, d), ("kv_heads", "head_dim"), dtype)
        if cfg.o_proj_bias:
            self.o_bias = placeholder((e,), ("embed",), dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim")

    def __call__(
        self,
        x: Float[Array, "tokens embed"],
        positions: Int[Array, " tokens"],
        kv: LayerKV | None,
        md: AttentionMetadata | None,
        lora: LoraLayer | None = None,
    ) -> tuple[Float[Array, "tokens embed"], LayerKV | None]:
        """With md=None the tokens are one whole sequence, attended causally without a cache."""
        cfg = self.cfg
        inv_freq = jnp.asarray(inverse_frequencies(cfg.rope, cfg.head_dim))
        if cfg.attention_bias or cfg.qk_norm or lora is not None:  # these come between the product and the rotation
            with jax.named_scope("qkv"):
                q, k, v = self.qkv(x)
                if lora is not None:
                    q, k, v = (y + lora.delta(t, x).reshape(y.shape)
                               for y, t in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")))
                if cfg.attention_bias:
                    q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
                if cfg.qk_norm:
                    q, k = self.q_norm(q), self.k_norm(k)
            with jax.named_scope("rope"):
                q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        else:
            with jax.named_scope("qkv_rope"):
                q, k, v = self.qkv.rotated(x, positions, inv_freq)
        if md is None:  # training and scoring
            with jax.named_scope("attention"):
                out = causal_attention(q, k, v, sm_scale=cfg.head_dim**-0.5, sliding_window=self.window)
            return self._project_out(out, lora), None
        with jax.named_scope("attention"):
            write = write_kv_pages_cpu if md.backend == "cpu" else write_kv_pages_ref
            k_pages, v_pages = write(kv[0], kv[1], k, v, md.slot_mapping)
            out = _paged_attention(md, q, k_pages, v_pages, cfg.head_dim**-0.5, self.window)
        return self._project_out(out, lora), (k_pages, v_pages)

    def _project_out(self, out: Float[Array, "tokens heads head_dim"], lora: LoraLayer | None) -> Float[Array, "tokens embed"]:
        flat = out.reshape(out.shape[0], -1)
        y = self.o_proj(flat)
        if lora is not None:
            y = y + lora.delta("o_proj", flat)
        return y + self.o_bias[...] if self.cfg.o_proj_bias else y


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.mlp: MLP | FusedMLP = MLP(cfg, dtype)

    def __call__(self, x, positions, kv: LayerKV | None, md: AttentionMetadata | None, lora: LoraLayer | None = None):
        attn_out, kv = self.self_attn(self.input_layernorm(x), positions, kv, md, lora)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x), lora), kv


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.cfg = cfg
        self.embed_tokens = placeholder((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        # A tied head is the embedding table itself, read as [vocab, embed]: one weight, two uses.
        self.lm_head: Projection = (
            Transposed(self.embed_tokens) if cfg.tie_word_embeddings
            else Dense(placeholder((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype))
        )

    def __call__(
        self,
        tokens: Int[Array, " tokens"],
        positions: Int[Array, " tokens"],
        kv_cache: KVCache | None,
        md: AttentionMetadata | None,
        lora: LoraInputs | None = None,
    ) -> tuple[Float[Array, "tokens embed"], KVCache | None]:
        """Final hidden states of every token, and the cache with this step's keys written.
        With kv_cache and md None, the tokens are one whole sequence attended causally with
        no cache (training and scoring), and no cache is returned. `lora`: each token's
        adapter slot and the stacked adapter weights (models/lora.py)."""
        x = self.embed_tokens[...][tokens]
        new_cache = []
        for i, (layer, kv) in enumerate(zip(self.layers, kv_cache or [None] * len(self.layers), strict=True)):
            x, kv = layer(x, positions, kv, md, None if lora is None else lora.layer(i))
            new_cache.append(kv)
        return self.norm(x), None if kv_cache is None else new_cache

    def logits(self, hidden: Float[Array, "rows embed"]) -> Float[Array, "rows vocab"]:
        return self.lm_head(hidden).astype(jnp.float32)
