"""Adapter load time, LoRA's cost per decode step, and the base model's hot reload time.

On the demo model (models/demo) unless --model is given:
- adapter load: read + check a PEFT folder (rank 8, 16, 64 on all seven targets), median of 5;
  and the first copy into a device slot (what a miss costs the step that needs it);
- decode: 8 greedy requests x 64 tokens, with no adapter slots, with slots but every request on
  the base model, and with the requests spread over 4 adapters (rank 16);
- model reload: AsyncEngine.reload_model of the same folder, idle and under 8 streams of 256
  tokens (the switch waits for the running streams to finish: drain time is their remaining length).

    .venv/bin/python perf/lora_reload_bench.py [--out perf/results/lora_reload_cpu.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def _engine(model: Path, **config):
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    defaults = dict(max_num_seqs=8, max_num_batched_tokens=64, token_buckets=(8, 64), num_blocks=256)
    engine = Engine.from_model_dir(model, config=EngineConfig(**{**defaults, **config}))
    engine.warm_up()
    return engine


def _decode_tok_s(engine, adapters: list[str]) -> float:
    from runtime.request import SamplingParams

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(8):
        engine.add_request([5 + i, 6, 7, 8, 9, 10, 11, 12], params, adapter=adapters[i % len(adapters)])
    started = time.perf_counter()
    done = engine.run_to_completion()
    return sum(len(o[0].token_ids) for o in done.values()) / (time.perf_counter() - started)


async def _reload_under_load(engine, model: Path, streams: int) -> tuple[int, float, float]:
    from runtime.request import SamplingParams

    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)

    async def stream(i: int):
        async for _ in engine.generate([3 + i, 4, 5, 6], params):
            pass

    tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
    await asyncio.sleep(0.5)
    result = await engine.reload_model(str(model))
    await asyncio.gather(*tasks)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from runtime.adapters import AdapterManager
    from runtime.async_engine import AsyncEngine
    from serving.default_model import resolve_model
    from tests.helpers.tiny_adapter import build_adapter

    model = resolve_model(str(args.model) if args.model else None)
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    rows = []
    base = _engine(model, max_loras=4, max_lora_rank=64)
    folders = {}
    for rank in (8, 16, 64):
        folders[rank] = build_adapter(model, tmp / f"r{rank}", rank=rank, targets=ALL, seed=rank)
        manager = AdapterManager(base.model.cfg, 4, 64, base.model.dtype)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            version = manager.load("x", folders[rank])
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        manager.activate({version.version_id})
        import jax

        jax.block_until_ready(manager.stacks)
        copy = time.perf_counter() - started
        size = (folders[rank] / "adapter_model.safetensors").stat().st_size
        rows.append(f"| adapter load, rank {rank}, all 7 targets ({size / 2**20:.1f} MiB) | "
                    f"{statistics.median(times) * 1e3:.1f} ms | first slot copy {copy * 1e3:.1f} ms |")

    plain = _engine(model)
    for i in range(4):
        base.adapters.load(f"a{i}", folders[16])
    rounds = {"plain": [], "base": [], "spread": []}
    for _ in range(3):  # interleaved, medians: the shared machine's load drifts by the minute
        rounds["plain"].append(_decode_tok_s(plain, [""]))
        rounds["base"].append(_decode_tok_s(base, [""]))
        rounds["spread"].append(_decode_tok_s(base, [f"a{i}" for i in range(4)]))
    no_slots, on_base, spread = (statistics.median(rounds[k]) for k in ("plain", "base", "spread"))
    rows.append(f"| decode, 8 requests x 64 tokens, no adapter slots (median of 3) | {no_slots:.0f} tok/s | |")
    rows.append(f"| same, 4 slots of rank 64, every request on the base model (the step without LoRA products) | {on_base:.0f} tok/s | "
                f"{on_base / no_slots:.2f}x |")
    rows.append(f"| same, requests over 4 adapters | {spread:.0f} tok/s | {spread / no_slots:.2f}x |")

    front = AsyncEngine(base)
    idle = [asyncio.run(front.reload_model(str(model))) for _ in range(3)]
    busy = asyncio.run(_reload_under_load(front, model, 8))
    front.shutdown()
    for label, (version, load_s, switch_s) in [*(("idle", r) for r in idle), ("under 8 streams", busy)]:
        rows.append(f"| model reload ({label}) to version {version} | load {load_s:.2f} s | "
                    f"drain + switch {switch_s:.2f} s |")

    import jax

    header = (f"# LoRA adapters and hot reload on CPU\n\n`perf/lora_reload_bench.py`, {time.strftime('%Y-%m-%d')}, "
              f"{_cpu()} (shared development machine), jax {jax.__version__}, model `{model.name}` "
              f"({model}), float32, max_lora_rank 64 (slots are as wide as the largest rank).\n\n"
              "| what | time | note |\n|---|---|---|\n")
    shutil.rmtree(tmp, ignore_errors=True)
    text = header + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
