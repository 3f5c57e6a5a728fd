"""The GPU check's table, from the JSON files that perf/gpu_check.sh's steps wrote.

    python perf/gpu_table.py OUT_DIR        (prints markdown; gpu_check.sh saves it)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q, method="higher"))


def kernel_section(k: dict | None) -> list[str]:
    if k is None:
        return ["kernel check: no result (it failed or ran out of time; see the log)"]
    rows = k["correctness"]
    ok = sum(r["ok"] for r in rows)
    worst = {d: max((r.get("rel_err", float("inf")) for r in rows if r["dtype"] == d), default=None)
             for d in ("float32", "bfloat16")}
    out = [f"device: {k['device']}, jax {k['jax']}, measured copy bandwidth {k['copy_gbs']:.0f} GB/s (read + write)",
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


def serving_section(folder: Path) -> list[str]:
    out = ["", "| model (bf16) | system | attention | TTFT 2k P50 | TTFT 2k P99 | batch-1 decode | HBM roofline share | "
           "64 concurrent | per stream |", "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for shape in ("llama-3.2-1b", "llama-3.1-8b"):
        ours, peer = _load(folder, f"tessera_{shape}.json"), _load(folder, f"transformers_{shape}.json")
        copy_gbs = (ours or {}).get("copy_gbs")
        for r in (ours, peer):
            if r is None:
                continue
            ctx = 128 + r["new_tokens"] / 2
            bytes_per_step = r["param_bytes"] + ctx * r["kv_bytes_per_token"]
            share = f"{r['decode_tps'] * bytes_per_step / (copy_gbs * 1e9):.0%}" if copy_gbs else "-"
            out.append(
                f"| {shape} | {r['system']} | {r['attention']} | {_pct(r['ttft_s'], 50) * 1e3:.1f} ms | "
                f"{_pct(r['ttft_s'], 99) * 1e3:.1f} ms | {r['decode_tps']:.1f} tok/s | {share} | "
                f"{r['concurrent_tps']:.0f} tok/s | {r['concurrent_tps'] / r['concurrent']:.1f} tok/s |"
            )
        if ours is None:
            out.append(f"| {shape} | tessera | no result (see the log) | | | | | | |")
        if ours and "decode_tps_series" in ours:
            ratios.append(f"{shape}: batch-1 decode overlapped {ours['decode_tps']:.1f} tok/s, in series "
                          f"{ours['decode_tps_series']:.1f} tok/s ({ours['decode_tps'] / ours['decode_tps_series']:.2f}x)")
        if ours and peer:
            ratios.append(
                f"{shape}: Tessera / transformers: TTFT P50 {_pct(peer['ttft_s'], 50) / _pct(ours['ttft_s'], 50):.2f}x "
                f"faster, batch-1 decode {ours['decode_tps'] / peer['decode_tps']:.2f}x, "
                f"64 concurrent {ours['concurrent_tps'] / peer['concurrent_tps']:.2f}x"
            )
            ratios.append(
                f"{shape}: requirement (TTFT P99 < 250 ms, >= 30 tok/s per stream, >= 400 tok/s aggregate): "
                f"{'met' if _pct(ours['ttft_s'], 99) < 0.25 and ours['concurrent_tps'] / ours['concurrent'] >= 30 and ours['concurrent_tps'] >= 400 else 'NOT met'}"
            )
    return out + [""] + ratios


def main() -> None:
    folder = Path(sys.argv[1])
    print("\n".join(kernel_section(_load(folder, "kernel.json")) + lora_section(_load(folder, "lora.json"))
                    + serving_section(folder)))


if __name__ == "__main__":
    main()
