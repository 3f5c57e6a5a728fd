"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as Flax NNX modules.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`); `models/sharding.py` maps them onto a mesh. Weights are laid out for einsum:
projections are [in, *out], e.g. q_proj [embed, heads, head_dim].
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
from models.linear import gated_linear, linear, qkv_with_rope
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
    if md.mesh is None:
        return attend(*args)
    # Each device attends with its own KV heads and their query heads; the batch metadata is replicated.
    heads, pages, whole = P(None, MODEL_AXIS, None), P(None, None, MODEL_AXIS, None), P()
    return jax.shard_map(attend, mesh=md.mesh, in_specs=(heads, pages, pages, whole, whole, whole),
                         out_specs=heads, check_vma=False)(*args)


def _param(shape: tuple[int, ...], axes: tuple[str, ...], dtype, fill: float = 0.0) -> nnx.Param:
    # Values are placeholders: real weights come from the checkpoint (see models/loader.py).
    return nnx.Param(jnp.full(shape, fill, dtype), sharding_names=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis: str):
        self.weight = _param((dim,), (axis,), dtype, fill=1.0)
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
        self.q_proj = _param((e, h, d), ("embed", "heads", "head_dim"), dtype)
        self.k_proj = _param((e, k, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = _param((e, k, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = _param((h, d, e), ("heads", "head_dim", "embed"), dtype)
        if cfg.attention_bias:
            self.q_bias = _param((h, d), ("heads", "head_dim"), dtype)
            self.k_bias = _param((k, d), ("kv_heads", "head_dim"), dtype)
            self.v_bias = _param((k, d), ("kv_heads", "head_dim"), dtype)
        if cfg.o_proj_bias:
            self.o_bias = _param((e,), ("embed",), dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim")

    def __call__(
        self,
        x: Float[Array, "tokens embed"],
        positions: Int[Array, " tokens"],
        kv: LayerKV | None,
        md: AttentionMetadata | None,
    ) -> tuple[Float[Array, "tokens embed"], LayerKV | None]:
        """With md=None the tokens are one whole sequence, attended causally without a cache."""
        cfg = self.cfg
        inv_freq = jnp.asarray(inverse_frequencies(cfg.rope, cfg.head_dim))
        impl = getattr(self, "linear_impl", "xla")
        if hasattr(self, "qkv_proj") and impl != "xla" and not (cfg.attention_bias or cfg.qk_norm):
            with jax.named_scope("qkv_rope"):  # one CPU kernel call (models/linear.py)
                q, k, v = qkv_with_rope(x, self.qkv_proj[...], impl, positions, inv_freq, cfg.num_heads, cfg.num_kv_heads)
        else:
            with jax.named_scope("qkv"):
                q, k, v = self._project_qkv(x)
                if cfg.attention_bias:
                    q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
                if cfg.qk_norm:
                    q, k = self.q_norm(q), self.k_norm(k)
            with jax.named_scope("rope"):
                q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if md is None:  # training and scoring
            with jax.named_scope("attention"):
                out = causal_attention(q, k, v, sm_scale=cfg.head_dim**-0.5, sliding_window=self.window)
            return self._project_out(out), None
        with jax.named_scope("attention"):
            write = write_kv_pages_cpu if md.backend == "cpu" else write_kv_pages_ref
            k_pages, v_pages = write(kv[0], kv[1], k, v, md.slot_mapping)
            out = _paged_attention(md, q, k_pages, v_pages, cfg.head_dim**-0.5, self.window)
        return self._project_out(out), (k_pages, v_pages)

    def _project_qkv(self, x: Float[Array, "tokens embed"]):
        cfg = self.cfg
        if hasattr(self, "qkv_proj"):  # fused for single-device serving (models/fusion.py)
            h, k = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            qkv = linear(x, self.qkv_proj[...], getattr(self, "linear_impl", "xla"))
            split = (qkv[:, :h], qkv[:, h : h + k], qkv[:, h + k :])
            return tuple(part.reshape(x.shape[0], -1, cfg.head_dim) for part in split)
        return tuple(jnp.einsum("te,ehd->thd", x, w[...]) for w in (self.q_proj, self.k_proj, self.v_proj))

    def _project_out(self, out: Float[Array, "tokens heads head_dim"]) -> Float[Array, "tokens embed"]:
        # As one [tokens, heads*head_dim] x [heads*head_dim, embed] product: the weight's
        # reshape is free, where the einsum made XLA CPU transpose the weight every step.
        impl = getattr(self, "linear_impl", "xla")
        rows = out.reshape(out.shape[0], -1)
        w = self.o_proj[...]
        if impl != "packed":  # packed already as [heads * head_dim, embed]
            w = w.reshape(rows.shape[1], -1)
        y = linear(rows, w, impl)
        return y + self.o_bias[...] if self.cfg.o_proj_bias else y


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.has_bias = cfg.mlp_bias
        self.gate_proj = _param((e, m), ("embed", "mlp"), dtype)
        self.up_proj = _param((e, m), ("embed", "mlp"), dtype)
        self.down_proj = _param((m, e), ("mlp", "embed"), dtype)
        if cfg.mlp_bias:
            self.gate_bias = _param((m,), ("mlp",), dtype)
            self.up_bias = _param((m,), ("mlp",), dtype)
            self.down_bias = _param((e,), ("embed",), dtype)

    def __call__(self, x: Float[Array, "tokens embed"]) -> Float[Array, "tokens embed"]:
        impl = getattr(self, "linear_impl", "xla")  # "cpu": models/linear.py
        if hasattr(self, "gate_up_proj"):  # fused for single-device serving (models/fusion.py)
            gate_up = linear(x, self.gate_up_proj[...], impl)
            if not self.has_bias:
                return gated_linear(gate_up, self.down_proj[...], impl)
            gate, up = gate_up[:, : gate_up.shape[1] // 2], gate_up[:, gate_up.shape[1] // 2 :]
        else:
            gate, up = x @ self.gate_proj[...], x @ self.up_proj[...]
        if self.has_bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        y = linear(jax.nn.silu(gate) * up, self.down_proj[...], impl)
        return y + self.down_bias[...] if self.has_bias else y


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.self_attn = Attention(cfg, layer, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        self.mlp = MLP(cfg, dtype)

    def __call__(self, x, positions, kv: LayerKV | None, md: AttentionMetadata | None):
        attn_out, kv = self.self_attn(self.input_layernorm(x), positions, kv, md)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.cfg = cfg
        self.embed_tokens = _param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, "embed")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(
        self,
        tokens: Int[Array, " tokens"],
        positions: Int[Array, " tokens"],
        kv_cache: KVCache | None,
        md: AttentionMetadata | None,
    ) -> tuple[Float[Array, "tokens embed"], KVCache | None]:
        """Final hidden states of every token, and the cache with this step's keys written.
        With kv_cache and md None, the tokens are one whole sequence attended causally with
        no cache (training and scoring), and no cache is returned."""
        x = self.embed_tokens[...][tokens]
        new_cache = []
        for layer, kv in zip(self.layers, kv_cache or [None] * len(self.layers), strict=True):
            x, kv = layer(x, positions, kv, md)
            new_cache.append(kv)
        return self.norm(x), None if kv_cache is None else new_cache

    def logits(self, hidden: Float[Array, "rows embed"]) -> Float[Array, "rows vocab"]:
        impl = getattr(self, "linear_impl", "xla")
        if impl == "packed":  # models/linear.py packed the head, tied or not
            out = linear(hidden, self.lm_head_packed[...], impl)
        elif hasattr(self, "lm_head_kn"):  # models/linear.py: a tied head laid out [K, N]
            out = linear(hidden, self.lm_head_kn[...], impl)
        elif self.cfg.tie_word_embeddings:
            out = linear(hidden, self.embed_tokens[...], impl, transposed=True)
        else:
            out = linear(hidden, self.lm_head[...], impl)
        return out.astype(jnp.float32)
