"""Prompt logprobs in the two shapes clients read: OpenAI's `echo` + `logprobs` lists and vLLM's
`prompt_logprobs` (a map per prompt token, keyed by token id, the first token null)."""

from __future__ import annotations

from runtime.outputs import TokenLogprob
from serving.protocol.common import PromptLogprob
from serving.state import ServerState


def vllm_prompt_logprobs(server: ServerState, logprobs: list[TokenLogprob | None],
                         top: int) -> list[dict[str, PromptLogprob] | None]:
    """Each entry: the prompt token (with its rank) and the `top` most likely tokens (ranks 1..top)."""
    out: list[dict[str, PromptLogprob] | None] = []
    for lp in logprobs:
        if lp is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): PromptLogprob(lp.logprob, lp.rank, server.token_text(lp.token_id))}
        for rank, (token_id, value) in enumerate(lp.top[:top], start=1):
            entry.setdefault(str(token_id), PromptLogprob(value, rank, server.token_text(token_id)))
        out.append(entry)
    return out
