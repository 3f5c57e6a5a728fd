"""Checkpoint load time and peak host memory: Tessera (safetensors and orbax) beside transformers.

Builds a random float32 checkpoint with SmolLM2-135M's shapes once, then loads it in a
fresh process per variant, so each peak RSS belongs to that load alone.

    .venv/bin/python perf/load_time.py [--dir .cache/perf-smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from perf.bench_engine import build_checkpoint  # noqa: E402

# name -> (imports, the load statement that is timed)
_TESSERA = "from models.loader import load_model"
LOADERS = {
    "transformers fp32": ("import transformers, torch", "transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)"),
    "tessera safetensors fp32": (_TESSERA, "load_model(d, 'float32')"),
    "tessera safetensors bf16": (_TESSERA, "load_model(d, 'bfloat16')"),
    "tessera orbax fp32": (_TESSERA, "load_model(d + '-orbax-fp32', 'float32')"),
    "tessera orbax bf16": (_TESSERA, "load_model(d + '-orbax-bf16', 'bfloat16')"),
}


def measure(imports: str, code: str, folder: Path) -> tuple[float, float, float]:
    """In a fresh interpreter: seconds for the load statement, the peak resident set during
    the load minus the resident set before it (MiB; counts mapped file pages), and the
    anonymous memory the loaded model holds afterwards (MiB; private copies only)."""
    script = textwrap.dedent(f"""
        import json, time
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        {imports}
        d = {str(folder)!r}
        before, anon_before = status("VmRSS"), status("RssAnon")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
        t = time.perf_counter()
        {code}
        seconds = time.perf_counter() - t
        print(json.dumps([seconds, status("VmHWM") - before, status("RssAnon") - anon_before]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".cache/perf-smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = Path(args.dir).absolute()
    if not (folder / "config.json").exists():
        build_checkpoint(folder)  # the engine benchmark's checkpoint shapes
    from models.loader import convert_checkpoint

    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        if not Path(f"{folder}-orbax-{short}").exists():
            convert_checkpoint(folder, f"{folder}-orbax-{short}", dtype)
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"checkpoint: {size_mb:.0f} MiB float32 safetensors, SmolLM2-135M shapes")
    print(f"| loader | seconds (median of {args.repeats}) | peak RSS added MiB | anonymous MiB held | speed vs transformers |")
    print("|---|---|---|---|---|")
    base = None
    for name, (imports, code) in LOADERS.items():
        runs = [measure(imports, code, folder) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        rss, anon = max(r[1] for r in runs), max(r[2] for r in runs)
        base = base or seconds
        print(f"| {name} | {seconds:.2f} | {rss:.0f} | {anon:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
