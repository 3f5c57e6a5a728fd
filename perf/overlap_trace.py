"""Host time per engine step against a simulated GPU: what overlapped scheduling hides.

The engine runs for real (scheduler, packed step inputs, read-back, detokenizing, stop checks)
on a tiny random model, but each step's device work is replaced by a serial device queue whose
steps take a fixed time: the H100's measured decode steps (perf/results/gpu_h100.md: 7.3 ms
for Llama-3.2-1B, 14.5 ms for 8B) and the 1B's weight-read time at the roofline (0.8 ms). In
series a step costs host + device; overlapped, max(host, device).

    .venv/bin/python perf/overlap_trace.py [--out perf/results/overlap_trace.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.bench_engine import cpu_model  # noqa: E402

DEVICE_STEPS_MS = {"1B at the HBM roofline": 0.8, "1B as measured": 7.3, "8B as measured": 14.5}
BATCHES = (1, 64)
STEPS = 200


class SimulatedDevice:
    """One stream: a step starts when the previous one ends (or when dispatched, if later)."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.free_at = 0.0

    def submit(self) -> float:
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + self.step_s
        return self.free_at


def simulate(engine, device: SimulatedDevice) -> None:
    """Swap the runner's device work for the simulated queue; everything on the host stays."""
    from runtime.runner import StepResult

    runner = engine.runner

    def fake_step(state_leaves, kv_cache, packed, previous_tokens, adjustments, lora_stacks, prompt_targets, *,
                  layout):
        return device.submit(), previous_tokens, kv_cache, None  # "sampled" is the time the step ends

    def collect(step) -> StepResult:
        waited = time.perf_counter()
        while time.perf_counter() < step.sampled:
            pass  # spin: a sleep on a busy 2-core machine overshoots by milliseconds
        waited = time.perf_counter() - waited
        tokens = {c.seq.seq_id: 100 + c.seq.num_tokens % 500 for c in step.batch.chunks if c.samples}
        return StepResult(tokens, {}, time.perf_counter() - step.dispatched_at, waited)

    runner._jitted_step = fake_step
    runner.collect = collect


def run(overlap: bool, batch: int, device_ms: float) -> dict[str, float]:
    from perf.random_model import TINY, numbered_tokenizer, random_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.request import SamplingParams

    config = EngineConfig(max_num_seqs=max(BATCHES), max_num_batched_tokens=2048, max_model_len=1024,
                          num_blocks=4096, token_buckets=(1, 64, 2048), async_scheduling=overlap)
    engine = Engine(random_model(TINY, "float32"), numbered_tokenizer(TINY["vocab_size"]), config)
    device = SimulatedDevice(device_ms / 1e3)
    simulate(engine, device)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, stop=("never",))
    for i in range(batch):
        engine.add_request(list(range(10 + i, 138 + i)), params, request_id=f"r{i}")
    engine.step()  # the prompts: not part of the decode figures
    engine.step()
    c = engine.counters
    steps0, wall0, wait0 = c.steps, c.engine_seconds, c.device_wait_seconds
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t
    steps = c.steps - steps0
    host = (c.engine_seconds - wall0) - (c.device_wait_seconds - wait0)
    return {"wall_ms": 1e3 * wall / steps, "host_ms": 1e3 * host / steps,
            "busy": device_ms * steps / (1e3 * wall)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [
        f"machine (host side): {cpu_model()}; device steps simulated, {STEPS} decode steps per run",
        "",
        "| device step | batch | in series ms/step | overlapped ms/step | host ms/step (series / overlapped) "
        "| device busy (series / overlapped) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ms in DEVICE_STEPS_MS.items():
        for batch in BATCHES:
            series, overlapped = run(False, batch, ms), run(True, batch, ms)
            lines.append(
                f"| {name} ({ms} ms) | {batch} | {series['wall_ms']:.2f} | {overlapped['wall_ms']:.2f} | "
                f"{series['host_ms']:.2f} / {overlapped['host_ms']:.2f} | "
                f"{100 * series['busy']:.0f}% / {100 * overlapped['busy']:.0f}% | "
                f"{series['wall_ms'] / overlapped['wall_ms']:.2f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
