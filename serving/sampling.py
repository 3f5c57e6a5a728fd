"""Request fields -> the engine's SamplingParams; fields Tessera does not serve are refused by name."""

from __future__ import annotations

from runtime.request import SamplingParams
from serving.errors import bad_request, from_engine_error
from serving.protocol.common import SamplingFields


def sampling_params(data: SamplingFields, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if data.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    stop = (data.stop,) if isinstance(data.stop, str) else tuple(data.stop or ())
    top_k = 0 if data.top_k in (None, -1) else data.top_k  # vLLM's -1 and OpenAI's absence both mean off
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if data.temperature is None else data.temperature,
            top_p=1.0 if data.top_p is None else data.top_p,
            top_k=top_k,
            min_p=data.min_p or 0.0,
            seed=None if data.seed is None else data.seed % 2**32,
            stop=stop,
            stop_token_ids=tuple(data.stop_token_ids or ()),
            ignore_eos=data.ignore_eos,
            min_tokens=data.min_tokens,
            presence_penalty=data.presence_penalty,
            frequency_penalty=data.frequency_penalty,
            repetition_penalty=1.0 if data.repetition_penalty is None else data.repetition_penalty,
            logprobs=logprobs,
            n=data.n,
            include_stop_str_in_output=data.include_stop_str_in_output,
            skip_special_tokens=data.skip_special_tokens,
        )
    except ValueError as e:
        raise from_engine_error(e) from None


def engine_fields(data: SamplingFields) -> dict:
    """Per-request engine settings beside the sampling parameters."""
    fields: dict = {"priority": data.priority}
    if data.cache_salt:
        fields["cache_salt"] = data.cache_salt
    return fields
