"""The GPU check's table, from the JSON files that perf/gpu_check.sh's steps wrote.

    python perf/gpu_table.py OUT_DIR        (prints markdown; gpu_check.sh saves it)

Files: kernel.json (perf/gpu_kernel_check.py), lora.json (perf/gpu_lora_check.py), and per model shape tessera_SHAPE.json,
tessera_SHAPE_fp8.json and transformers_SHAPE.json (perf/gpu_serve_bench.py). A missing or
malformed file becomes a line saying so: the table of a partial run still prints.

Roofline: a decode step reads every weight once (an untied embedding table only by its rows)
and the KV cache of each sequence; at the device's measured copy bandwidth (bytes read plus
written, Tessera's process measures it) that takes (weight bytes + mean context x KV bytes per
token) / bandwidth, whose inverse is the batch-1 tok/s ceiling.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# Issue 23's targets.
ROOFLINE_SHARE = 0.80  # bfloat16 batch-1 decode of the 8B shape
CONCURRENT_TPS = 8000  # at 256 concurrent, bfloat16 or fp8
TTFT_P99_S = 0.100  # 2,048-token prompt
KERNEL_VS_JAX = 1.2  # decode at batch 1, 8, 64


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q, method="higher"))


def kernel_section(k: dict | None) -> list[str]:
    if k is None:
        return ["kernel check: no result (it failed, ran out of time, or was skipped; see the log)"]
    try:
        return _kernel_rows(k)
    except (KeyError, TypeError, ValueError) as e:  # the kernel check's format is its own
        return [f"kernel check: kernel.json not in the expected format ({type(e).__name__}: {e}); see the file"]


def _kernel_rows(k: dict) -> list[str]:
    rows = k["correctness"]
    ok = sum(r["ok"] for r in rows)
    worst = {d: max((r.get("rel_err", float("inf")) for r in rows if r["dtype"] == d), default=float("nan"))
             for d in ("float32", "bfloat16")}
    out = [f"kernel check: device {k['device']}, jax {k['jax']}, copy bandwidth {k['copy_gbs']:.0f} GB/s",
           f"kernel correctness (compiled, poisoned outputs): {ok}/{len(rows)} cases pass; worst relative error "
           f"float32 {worst['float32']:.2e}, bfloat16 {worst['bfloat16']:.2e}",
           "", "| attention workload (bf16, 32 q / 8 kv heads, d=128) | Tessera kernel | GB/s | jax paged_attention | "
           "XLA reference | kernel vs jax | decode-only variant vs jax |", "|---|---|---|---|---|---|---|"]
    for t in k["timings"]:
        if "error" in t:
            out.append(f"| {t['workload']} | error: {t['error'][:80]} | | | | | |")
            continue
        gbs = t["bytes"] / t["tessera_s"] / 1e9
        jax_s, ref_s, ours_s = t.get("jax_paged_attention_s"), t.get("reference_s"), t["tessera_s"]
        jax_cell = f"{jax_s * 1e6:.1f} us" if jax_s else t.get("jax_error", "-")[:40]
        ref_cell = f"{ref_s * 1e6:.1f} us" if ref_s else "-"
        ratio = f"{jax_s / ours_s:.2f}x" if jax_s else "-"
        only_s = t.get("tessera_decode_only_s")
        only = f"{only_s * 1e6:.1f} us, {jax_s / only_s:.2f}x" if only_s and jax_s else "-"
        out.append(f"| {t['workload']} | {ours_s * 1e6:.1f} us | {gbs:.0f} | {jax_cell} | {ref_cell} | {ratio} | {only} |")
    return out


def lora_section(k: dict | None) -> list[str]:
    if k is None:
        return ["", "LoRA kernels: no result (they failed or ran out of time; see the log)"]
    rows = k["correctness"]
    worst = {d: max((r.get("rel_err", float("inf")) for r in rows if r["dtype"] == d), default=None)
             for d in ("float32", "bfloat16")}
    how = "interpreted" if k.get("interpret") else "compiled"
    out = ["", f"LoRA kernels (BGMV/SGMV, {how}): {sum(r['ok'] for r in rows)}/{len(rows)} cases match the XLA "
               f"product; worst relative error float32 {worst['float32']:.2e}, bfloat16 {worst['bfloat16']:.2e}",
           "", "| LoRA workload (bf16, rank 16, 4096 -> 14336) | kernels | GB/s | XLA masked product | kernels vs XLA |",
           "|---|---|---|---|---|"]
    for t in k.get("timings", []):
        if "error" in t:
            out.append(f"| {t['workload']} | error: {t['error'][:80]} | | | |")
            continue
        out.append(f"| {t['workload']} | {t['kernel_s'] * 1e6:.1f} us | {t['bytes'] / t['kernel_s'] / 1e9:.0f} | "
                   f"{t['xla_s'] * 1e6:.1f} us | {t['xla_s'] / t['kernel_s']:.2f}x |")
    return out


def kernel_targets(k: dict | None) -> list[str]:
    try:
        decode = [t for t in (k or {}).get("timings", []) if t["workload"].startswith("decode")
                  and t.get("jax_paged_attention_s") and t.get("tessera_s")]
    except (KeyError, TypeError, AttributeError):
        decode = []
    if not decode:
        return [f"- kernel >= {KERNEL_VS_JAX}x jax's paged_attention on decode: no figures"]
    ratios = {t["workload"]: t["jax_paged_attention_s"] / t["tessera_s"] for t in decode}
    cells = ", ".join(f"{w} {r:.2f}x" for w, r in ratios.items())
    return [f"- kernel >= {KERNEL_VS_JAX}x jax's paged_attention on decode: {cells}: "
            f"{'met' if min(ratios.values()) >= KERNEL_VS_JAX else 'NOT met'}"]


def roofline_tps(r: dict, copy_gbs: float) -> float:
    """Batch-1 decode's ceiling: one step's bytes at the measured copy bandwidth."""
    ctx = r["prompt_tokens"] + r.get("decode_new_tokens", r["new_tokens"]) / 2  # the mean context over the decode
    step_bytes = r.get("decode_weight_bytes", r["param_bytes"]) + ctx * r["kv_bytes_per_token"]
    return copy_gbs * 1e9 / step_bytes


def _weights(r: dict) -> str:
    return r.get("quantization") or r["dtype"]


def serving_section(folder: Path, shapes: list[str]) -> tuple[list[str], list[str]]:
    """The table rows and the lines below it (ratios, FP8 agreement, targets)."""
    rows = ["| model | system | weights | attention | TTFT 2k P50 | TTFT 2k P99 | batch-1 decode | roofline | "
            "share | concurrent | tok/s | per stream |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes, targets = [], []
    for shape in shapes:
        ours, fp8, peer = (_load(folder, f"{name}.json") for name in
                           (f"tessera_{shape}", f"tessera_{shape}_fp8", f"transformers_{shape}"))
        copy_gbs = next((r["copy_gbs"] for r in (ours, fp8) if r and r.get("copy_gbs")), None)
        for name, r in (("tessera", ours), ("tessera fp8", fp8), ("transformers", peer)):
            if r is None:
                rows.append(f"| {shape} | {name} | no result (see the log) | | | | | | | | | |")
                continue
            ceiling, share = "-", "-"
            if copy_gbs:
                tps = roofline_tps(r, copy_gbs)
                ceiling, share = f"{tps:.0f} tok/s", f"{r['decode_tps'] / tps:.0%}"
            rows.append(
                f"| {shape} | {r['system']} | {_weights(r)} | {r['attention']} | {_pct(r['ttft_s'], 50) * 1e3:.1f} ms | "
                f"{_pct(r['ttft_s'], 99) * 1e3:.1f} ms | {r['decode_tps']:.1f} tok/s | {ceiling} | {share} | "
                f"{r['concurrent']} | {r['concurrent_tps']:.0f} | {r['concurrent_tps'] / r['concurrent']:.1f} |"
            )
        notes += _shape_notes(shape, ours, fp8, peer)
        if shape == "llama-3.1-8b" or len(shapes) == 1:
            targets += _targets(shape, ours, fp8, copy_gbs)
    return rows, notes + [""] + targets


def _shape_notes(shape: str, ours: dict | None, fp8: dict | None, peer: dict | None) -> list[str]:
    out = []
    if ours and "decode_tps_series" in ours:
        out.append(f"- {shape}: batch-1 decode overlapped {ours['decode_tps']:.1f} tok/s, steps in series "
                   f"{ours['decode_tps_series']:.1f} tok/s ({ours['decode_tps'] / ours['decode_tps_series']:.2f}x)")
    for r in (ours, fp8):
        if r and r.get("step_custom_calls") is not None:
            calls = ", ".join(f"{t} x{n}" for t, n in sorted(r["step_custom_calls"].items())) or "none"
            out.append(f"- {shape}: {_weights(r)} decode step's custom calls (GEMMs, kernels): {calls}")
        stats = (r or {}).get("memory_stats") or {}
        if stats.get("bytes_limit"):
            out.append(f"- {shape}: {_weights(r)} device memory: peak {stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB "
                       f"of jax's pool {stats['bytes_limit'] / 2**30:.1f} GiB; {r['kv_pages']} KV pages")
    if ours and ours.get("concurrent_preemptions"):
        out.append(f"- {shape}: {ours['concurrent_preemptions']} preemptions in the concurrent run (KV cache short)")
    if fp8 and "fp8_agreement" in fp8:
        a = fp8["fp8_agreement"]
        out.append(f"- {shape}: fp8 vs {fp8['dtype']} (the same random weights, teacher-forced on random tokens): "
                   f"top-1 agreement {a['top1_agreement']:.2%} over {a['positions']} positions, max |logit error| "
                   f"{a['max_abs_logit_error']:.4f}, mean {a['mean_abs_logit_error']:.4f} (relative to the largest "
                   f"logit {a['max_rel_logit_error']:.4f}); weights {fp8['param_bytes'] / 2**30:.2f} GiB")
    if fp8 and ours:
        out.append(f"- {shape}: fp8 / {ours['dtype']}: batch-1 decode {fp8['decode_tps'] / ours['decode_tps']:.2f}x, "
                   f"{ours['concurrent']} concurrent {fp8['concurrent_tps'] / ours['concurrent_tps']:.2f}x, "
                   f"TTFT P50 {_pct(fp8['ttft_s'], 50) / _pct(ours['ttft_s'], 50):.2f}x the time")
    if ours and peer:
        out.append(f"- {shape}: Tessera / transformers ({ours['dtype']}): TTFT P50 "
                   f"{_pct(peer['ttft_s'], 50) / _pct(ours['ttft_s'], 50):.2f}x faster, batch-1 decode "
                   f"{ours['decode_tps'] / peer['decode_tps']:.2f}x, {ours['concurrent']} concurrent "
                   f"{ours['concurrent_tps'] / peer['concurrent_tps']:.2f}x")
    return out


def _targets(shape: str, ours: dict | None, fp8: dict | None, copy_gbs: float | None) -> list[str]:
    out = [f"Against issue 23's targets ({shape}):"]
    if ours and copy_gbs:
        share = ours["decode_tps"] / roofline_tps(ours, copy_gbs)
        out.append(f"- {ours['dtype']} batch-1 decode >= {ROOFLINE_SHARE:.0%} of the measured roofline: {share:.0%}: "
                   f"{'met' if share >= ROOFLINE_SHARE else 'NOT met'}")
    else:
        out.append(f"- batch-1 decode >= {ROOFLINE_SHARE:.0%} of the measured roofline: no figures")
    runs = [r for r in (ours, fp8) if r]
    if runs:
        best = max(runs, key=lambda r: r["concurrent_tps"])
        out.append(f"- >= {CONCURRENT_TPS:,} tok/s at 256 concurrent: {best['concurrent_tps']:,.0f} tok/s "
                   f"({_weights(best)}, {best['concurrent']} concurrent): "
                   f"{'met' if best['concurrent_tps'] >= CONCURRENT_TPS and best['concurrent'] >= 256 else 'NOT met'}")
    if ours:
        p99 = _pct(ours["ttft_s"], 99)
        out.append(f"- TTFT P99 of a {ours['long_prompt']:,}-token prompt < {TTFT_P99_S * 1e3:.0f} ms: {p99 * 1e3:.1f} ms: "
                   f"{'met' if p99 < TTFT_P99_S else 'NOT met'}")
    return out


def main() -> None:
    folder = Path(sys.argv[1])
    shapes = sys.argv[2:] or sorted({p.stem.split("_", 1)[1].removesuffix("_fp8") for p in folder.glob("*_*.json")
                                     if p.stem.split("_", 1)[0] in ("tessera", "transformers")})
    device = next((r for r in (_load(folder, f"tessera_{s}{q}.json") for s in shapes for q in ("", "_fp8")) if r), None)
    head = [f"device: {device['device']}, measured copy bandwidth {device['copy_gbs']:.0f} GB/s (read + write): "
            "the roofline below"] if device else ["device: no Tessera result"]
    kernel = _load(folder, "kernel.json")
    rows, notes = serving_section(folder, shapes)
    print("\n".join(head + [""] + kernel_section(kernel) + lora_section(_load(folder, "lora.json")) + [""] + rows
                    + [""] + notes + kernel_targets(kernel)))


if __name__ == "__main__":
    main()
