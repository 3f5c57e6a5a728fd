"""runtime/ dataclasses <-> the worker's protobuf messages, both ways, in one place."""

from __future__ import annotations

import dataclasses

from runtime.block_manager import AllBlocksCleared, BlockRemoved, BlockStored
from runtime.engine_client import KVEvent
from runtime.outputs import CompletionOutput, RequestOutput, RequestTimings, TokenLogprob
from runtime.request import Request, SamplingParams
from runtime.request_limits import RequestLimits
from serving.rpc import tessera_pb2 as pb

_OPTIONAL_PARAMS = ("seed", "logprobs")  # None <-> unset (proto3 `optional`)
_TUPLE_PARAMS = ("stop", "stop_token_ids")


def local_only_params(params: SamplingParams) -> list[str]:
    """Fields set to something the worker protocol does not carry yet (it would drop them)."""
    carried = pb.SamplingParams.DESCRIPTOR.fields_by_name
    return [f.name for f in dataclasses.fields(params)
            if f.name not in carried and getattr(params, f.name) != f.default]


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    if lost := local_only_params(params):
        raise ValueError(f"{lost[0]} is not supported through a remote worker yet")
    carried = pb.SamplingParams.DESCRIPTOR.fields_by_name
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name in carried}
    return pb.SamplingParams(**{k: v for k, v in values.items() if v is not None})


def params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (SamplingParams' own checks) for values that do not fit."""
    values = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name not in message.DESCRIPTOR.fields_by_name:
            continue  # not carried yet: its default
        if f.name in _OPTIONAL_PARAMS:
            values[f.name] = getattr(message, f.name) if message.HasField(f.name) else None
        elif f.name in _TUPLE_PARAMS:
            values[f.name] = tuple(getattr(message, f.name))
        else:
            values[f.name] = getattr(message, f.name)
    return SamplingParams(**values)


def request_to_proto(request: Request) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                              params=params_to_proto(request.params), priority=request.priority,
                              tenant=request.tenant, cache_salt=request.cache_salt, trace_id=request.trace_id)


def request_fields(message: pb.GenerateRequest) -> dict:
    """The keyword arguments of `EngineClient.make_request` beyond prompt and params."""
    return dict(request_id=message.request_id, priority=message.priority, tenant=message.tenant or "default",
                cache_salt=message.cache_salt, trace_id=message.trace_id)


def limits_to_proto(limits: RequestLimits) -> pb.RequestLimits:
    values = dataclasses.asdict(limits)
    values["eos_token_ids"] = sorted(limits.eos_token_ids)
    return pb.RequestLimits(**values)


def limits_from_proto(message: pb.RequestLimits) -> RequestLimits:
    values = {f.name: getattr(message, f.name) for f in dataclasses.fields(RequestLimits)}
    values["eos_token_ids"] = frozenset(message.eos_token_ids)
    return RequestLimits(**values)


# -- outputs --------------------------------------------------------------------------------

def _since(t: float | None, origin: float) -> float:
    return -1.0 if t is None else t - origin


def _at(offset: float, origin: float) -> float | None:
    return None if offset < 0 else origin + offset


def output_to_proto(output: RequestOutput) -> pb.GenerateResponse:
    message = pb.GenerateResponse(
        request_id=output.request_id, finished=output.finished, num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens, num_generated_tokens=output.num_generated_tokens,
        metrics=output.metrics, error=output.error or "",
    )
    for o in output.outputs:
        delta = message.outputs.add(index=o.index, text=o.text, token_ids=o.token_ids,
                                    has_logprobs=o.logprobs is not None, finish_reason=o.finish_reason or "")
        for lp in o.logprobs or ():
            delta.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, top_ids=[t for t, _ in lp.top],
                               top_logprobs=[p for _, p in lp.top])
        if isinstance(o.stop_reason, str):
            delta.stop_string = o.stop_reason
        elif o.stop_reason is not None:
            delta.stop_token = o.stop_reason
    if output.finished:
        t = output.timings
        origin = t.arrival_time
        message.timings.CopyFrom(pb.Timings(
            first_scheduled=_since(t.first_scheduled_time, origin), first_token=_since(t.first_token_time, origin),
            last_token=_since(t.last_token_time, origin), finished=_since(t.finished_time, origin),
            num_prompt_tokens=t.num_prompt_tokens, num_cached_tokens=t.num_cached_tokens,
            num_generation_tokens=t.num_generation_tokens, num_preemptions=t.num_preemptions,
            token_times=[x - origin for x in t.token_times], detokenize_seconds=t.detokenize_seconds,
            finished_reason=t.finished_reason or "",
        ))
    return message


def output_from_proto(message: pb.GenerateResponse, arrival_time: float) -> RequestOutput:
    """`arrival_time`: the request's arrival on this side's monotonic clock; the worker's
    timings are offsets from its own arrival and are placed after this one."""
    outputs = []
    for d in message.outputs:
        logprobs = None
        if d.has_logprobs:
            logprobs = [TokenLogprob(lp.token_id, lp.logprob, tuple(zip(lp.top_ids, lp.top_logprobs)))
                        for lp in d.logprobs]
        kind = d.WhichOneof("stop_reason")
        stop_reason = None if kind is None else getattr(d, kind)
        outputs.append(CompletionOutput(d.index, d.text, list(d.token_ids), logprobs, d.finish_reason or None,
                                        stop_reason))
    timings = RequestTimings(arrival_time, num_prompt_tokens=message.num_prompt_tokens)
    if message.HasField("timings"):
        t = message.timings
        timings = RequestTimings(
            arrival_time, _at(t.first_scheduled, arrival_time), _at(t.first_token, arrival_time),
            _at(t.last_token, arrival_time), _at(t.finished, arrival_time), t.num_prompt_tokens,
            t.num_cached_tokens, t.num_generation_tokens, t.num_preemptions,
            [arrival_time + x for x in t.token_times], t.detokenize_seconds, t.finished_reason or None,
        )
    return RequestOutput(message.request_id, outputs, message.finished, message.num_prompt_tokens,
                         message.num_cached_tokens, message.num_generated_tokens, dict(message.metrics), timings,
                         message.error or None)


# -- KV events ------------------------------------------------------------------------------

def kv_event_to_proto(event: KVEvent) -> pb.KvEvent:
    if isinstance(event, BlockStored):
        return pb.KvEvent(stored=pb.BlockStored(keys=event.keys, parent_key=event.parent_key,
                                                token_ids=event.token_ids, block_size=event.block_size))
    if isinstance(event, BlockRemoved):
        return pb.KvEvent(removed=pb.BlockRemoved(keys=event.keys))
    return pb.KvEvent(cleared=pb.AllBlocksCleared())


def kv_event_from_proto(message: pb.KvEvent) -> KVEvent:
    kind = message.WhichOneof("event")
    if kind == "stored":
        s = message.stored
        return BlockStored(tuple(s.keys), s.parent_key, tuple(s.token_ids), s.block_size)
    if kind == "removed":
        return BlockRemoved(tuple(message.removed.keys))
    return AllBlocksCleared()
