"""The engine step is one device program with its KV cache donated and no host round trip inside:
read from its HLO. On this CPU: the compiled program of the CPU plans (the C++ kernels and the
XLA-only one); for the GPU: the StableHLO lowered for CUDA (the Pallas kernel through Triton,
bfloat16 and fp8 weights), which needs no GPU to make. A host callback, infeed/outfeed,
send/recv or host memory inside would each show there; the detectors are checked on a function
that has callbacks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.loader import lay_out, load_model
from models.projection import WeightLayout
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.execution_plan import ExecutionPlan
from runtime.runner import Runner

# Ops that move data between host and device, or run host code, inside a program.
_HLO_HOST_OPS = re.compile(r"=\s*\S+\s+(infeed|outfeed|send|recv|send-done|recv-done)\(")
_STABLEHLO_HOST_OPS = re.compile(r"stablehlo\.(infeed|outfeed|send|recv)\b")
_HOST_MARKS = re.compile(r"pinned_host|unpinned_host|_xla_compute_type|_xla_host_transfer")
_CALLBACK_TARGET = re.compile(r"callback|host", re.IGNORECASE)


def host_work_in_hlo(text: str) -> list[str]:
    """What in a compiled HLO module runs on or talks to the host."""
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    return ([m.group(1) for m in _HLO_HOST_OPS.finditer(text)] + _HOST_MARKS.findall(text)
            + [t for t in targets if _CALLBACK_TARGET.search(t)])


def host_work_in_stablehlo(text: str) -> list[str]:
    targets = re.findall(r"custom_call @([\w$.]+)", text)
    return (_STABLEHLO_HOST_OPS.findall(text) + _HOST_MARKS.findall(text)
            + [t for t in targets if _CALLBACK_TARGET.search(t)])


def test_the_detectors_see_host_callbacks():
    def with_callbacks(x):
        jax.debug.callback(lambda v: None, x)
        return jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1

    lowered = jax.jit(with_callbacks).lower(jnp.ones(4))
    assert "xla_ffi_python_cpu_callback" in host_work_in_hlo(lowered.compile().as_text())
    assert "xla_ffi_python_cpu_callback" in host_work_in_stablehlo(lowered.as_text())
    assert host_work_in_hlo(jax.jit(lambda x: x + 1).lower(jnp.ones(4)).compile().as_text()) == []


def _aliased_params(hlo: str) -> set[int]:
    """Parameter numbers of the entry computation that share a buffer with an output."""
    header = re.search(r"input_output_alias=\{ (.*?) \}", hlo)
    return {int(p) for p in re.findall(r"\(\s*(\d+),\s*\{[^}]*\},\s*(?:may|must)-alias\)", header.group(1))} if header else set()


def _params_of_shape(hlo: str, shape: str) -> set[int]:
    entry = hlo[hlo.index("\nENTRY "):]
    return {int(n) for n in re.findall(rf"= {re.escape(shape)}\{{[^}}]*\}} parameter\((\d+)\)", entry)}


@pytest.mark.parametrize("plan", [dict(), dict(attention_backend="reference", linear="xla")],
                         ids=["cpu-kernels", "xla-only"])
def test_the_compiled_cpu_step_keeps_to_the_device_and_updates_the_cache_in_place(checkpoint, plan):
    engine = Engine.from_model_dir(checkpoint("llama"), config=EngineConfig(
        block_size=4, num_blocks=32, max_num_seqs=8, max_num_batched_tokens=32, token_buckets=(8, 32), **plan))
    cfg, runner = engine.model.cfg, engine.runner
    for bucket, adjust in [(8, False), (32, False), (32, True)]:  # decode-sized, prefill-sized, with penalties
        hlo = runner.lower_step(bucket, adjust=adjust).compile().as_text()
        assert host_work_in_hlo(hlo) == [], (bucket, adjust)
        cache = _params_of_shape(hlo, f"f32[32,4,{cfg.num_kv_heads},{cfg.head_dim}]")
        assert len(cache) == 2 * cfg.num_layers  # K and V of each layer
        assert cache <= _aliased_params(hlo)  # donated: written in place, never copied
        assert hlo.count("\nENTRY ") == 1


@pytest.fixture(scope="module")
def gpu_shaped(checkpoint):
    # Heads of 64 on 16-token pages: shapes the Pallas kernel takes.
    return load_model(checkpoint("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=64), "bfloat16")


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_the_gpu_step_lowered_for_cuda_has_no_host_work_and_donates_the_cache(gpu_shaped, quantization):
    plan = ExecutionPlan("gpu", 1, "bfloat16", "pallas", WeightLayout("xla", fused=True, quantization=quantization), "xla")
    model = lay_out(gpu_shaped, plan.weights)
    runner = Runner(model, plan, 64, 16, 8, 256, (8, 64))
    cfg = model.cfg
    for bucket in (8, 64):
        text = runner.lower_step(bucket, platforms=("cuda",)).as_text()
        assert host_work_in_stablehlo(text) == []
        assert set(re.findall(r"custom_call @([\w$.]+)", text)) == {"__gpu$xla.gpu.triton"}  # the attention kernel only
        signature = text.split("@main(", 1)[1].split(") ->", 1)[0]
        args = [(int(n), shape, rest) for n, shape, rest in re.findall(r"%arg(\d+): tensor<([^>]+)>(.*?)(?=, %arg|$)",
                                                                       signature, re.S)]
        page = f"64x16x{cfg.num_kv_heads}x{cfg.head_dim}xbf16"
        cache = {n for n, shape, _ in args if shape == page}
        donated = {n for n, _, attrs in args if "tf.aliasing_output" in attrs}
        assert len(cache) == 2 * cfg.num_layers and cache == donated
        f8_dots = re.findall(r"stablehlo\.dot_general[^\n]*xf8E4M3FN", text)
        # Every layer's q/k/v, o, gate/up and down products read float8 operands (XLA's FP8 GEMM on Hopper).
        assert len(f8_dots) == (4 * cfg.num_layers if quantization == "fp8" else 0)

