"""Request fields -> the engine's SamplingParams; fields Tessera does not serve are refused by name."""

from __future__ import annotations

from collections.abc import Mapping

from runtime.request import SamplingParams
from runtime.structured import GuidedDecoding
from serving.errors import bad_request, from_engine_error
from serving.protocol.common import SamplingFields


def sampling_params(data: SamplingFields, *, max_tokens: int, logprobs: int | None,
                    defaults: Mapping[str, float | int] | None = None,
                    prompt_logprobs: int | None = None, guided: GuidedDecoding | None = None) -> SamplingParams:
    """`defaults`: the model's generation_config.json sampling fields, used for fields the
    request leaves out (as vLLM does); then OpenAI's defaults. `prompt_logprobs`: the top-N to
    compute for prompt tokens when the endpoint needs more than the request's own field asks."""
    if data.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    defaults = defaults or {}

    def pick(name: str, fallback):
        value = getattr(data, name)
        return defaults.get(name, fallback) if value is None else value

    stop = (data.stop,) if isinstance(data.stop, str) else tuple(data.stop or ())
    top_k = pick("top_k", 0)
    top_k = 0 if top_k == -1 else top_k  # vLLM's -1 and OpenAI's absence both mean off
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=top_k,
            min_p=pick("min_p", 0.0),
            seed=None if data.seed is None else data.seed % 2**32,
            stop=stop,
            stop_token_ids=tuple(data.stop_token_ids or ()),
            ignore_eos=data.ignore_eos,
            min_tokens=data.min_tokens,
            presence_penalty=data.presence_penalty,
            frequency_penalty=data.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logprobs=logprobs,
            prompt_logprobs=_larger(data.prompt_logprobs, prompt_logprobs),
            n=data.n,
            include_stop_str_in_output=data.include_stop_str_in_output,
            skip_special_tokens=data.skip_special_tokens,
            guided=guided,
        )
    except ValueError as e:
        raise from_engine_error(e) from None


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def engine_fields(data: SamplingFields) -> dict:
    """Per-request engine settings beside the sampling parameters."""
    fields: dict = {"priority": data.priority}
    if data.cache_salt:
        fields["cache_salt"] = data.cache_salt
    return fields
