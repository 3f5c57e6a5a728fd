"""Drive Tessera's forward pass and transformers' the same way: a prefill, then decode steps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from models.forward import forward
from models.kv_cache import AttentionMetadata
from models.loader import LoadedModel

PAGE_SIZE = 4


def tessera_logits(model: LoadedModel, prompt: list[int], continuation: list[int]) -> list[np.ndarray]:
    """[prefill logits [len(prompt), vocab], then one [vocab] row per continuation token].

    Pages are handed out in a scrambled order so attention has to follow the block table.
    """
    total = len(prompt) + len(continuation)
    num_pages = -(-total // PAGE_SIZE) + 2
    pages = np.random.RandomState(1).permutation(num_pages)[: -(-total // PAGE_SIZE)]
    block_table = jnp.asarray(pages, jnp.int32)[None]
    cache = model.allocate_kv_cache(num_pages, PAGE_SIZE)

    def run(tokens: list[int], start: int):
        nonlocal cache
        pos = np.arange(start, start + len(tokens))
        md = AttentionMetadata(
            slot_mapping=jnp.asarray(pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE, jnp.int32),
            block_tables=block_table,
            context_lens=jnp.asarray([start + len(tokens)], jnp.int32),
            query_start_loc=jnp.asarray([0, len(tokens)], jnp.int32),
        )
        logits, cache = forward(
            model.graphdef, model.state, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32),
            cache, md, jnp.arange(len(tokens)),
        )
        return np.asarray(logits, np.float32)

    out = [run(prompt, 0)]
    for i, token in enumerate(continuation):
        out.append(run([token], len(prompt) + i)[0])
    return out


def transformers_logits(hf_model, prompt: list[int], continuation: list[int]) -> list[np.ndarray]:
    """The same as `tessera_logits`, from transformers with its own KV cache."""
    with torch.no_grad():
        res = hf_model(torch.tensor([prompt]), use_cache=True)
        out = [res.logits[0].float().numpy()]
        past = res.past_key_values
        for token in continuation:
            res = hf_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[0, -1].float().numpy())
    return out
