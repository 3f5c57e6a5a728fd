"""Startup time and prefix-cache hit rate of `tessera serve` with the disk KV tier, across restarts.

    python perf/kv_restart.py [--out perf/results/kv_restart_cpu.md]

Runs the restart test's scenario (tests/helpers/kv_restart.py): 50 prompts over 5 shared
192-token prefixes, then restarts twice (after a SIGTERM of the previous process, then after a
SIGKILL) and measures, per start, the seconds from spawning the process to /ready answering
200, the start-up phases the server logs (ops/startup.py: seconds from the process's start),
and the first request's cached tokens and latency; with the CPU model (lscpu) and the load
average before each start.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.kv_restart import complete, complete_all, metric, prompts, start_serve, stop, wait_for_disk_writes  # noqa: E402

LOG_ENV = {"TESSERA_LOG_LEVEL": "info", "TESSERA_LOG_JSON": "false"}


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", out)
    return f"{model.group(1).strip() if model else 'unknown'}, {os.cpu_count()} CPUs"


def _phase(output: str, pattern: str) -> str:
    match = re.search(pattern, output)
    return match.group(1) if match else "?"


def _phases(output: str) -> str:
    """The server's own start-up timeline: '4.10 s of CPU; python and imports 2.91s, ..., server start 0.21s'."""
    match = re.search(r"start-up: ready [\d.]+s after the process started, ([\d.]+)s of CPU \((.*)\)", output)
    return f"{match.group(1)} s of CPU; {match.group(2)}" if match else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="perf/results/kv_restart_cpu.md")
    args = parser.parse_args()
    os.environ.setdefault("TESSERA_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tessera-xla-"))
    kv_dir = Path(tempfile.mkdtemp(prefix="tessera-kv-"))
    batch = prompts()
    rows = []

    load = os.getloadavg()[0]
    handle, url, ready = start_serve(kv_dir, env=LOG_ENV)
    started = time.perf_counter()
    complete_all(url, batch[0::10])
    complete_all(url, [p for i, p in enumerate(batch) if i % 10])
    seconds = time.perf_counter() - started
    hit_rate = metric(url, "tessera:prefix_cache_hits_total") / metric(url, "tessera:prefix_cache_queries_total")
    wait_for_disk_writes(url)
    disk_bytes = metric(url, "tessera:kv_tier_usage_bytes", tier="disk")
    stop(handle, signal.SIGTERM)
    rows.append(("first start (cold compile cache)", ready, load, "-", "-", "-", _phases(handle.output)))

    # Each restart is labelled by how its predecessor ended: the first follows the SIGTERM above
    # and is killed, so the second follows a SIGKILL (its block writes cut short).
    previous = signal.SIGTERM
    for how in (signal.SIGKILL, signal.SIGTERM):
        load = os.getloadavg()[0]
        handle, url, ready = start_serve(kv_dir, env=LOG_ENV)
        t = time.perf_counter()
        _, cached = complete(url, batch[25])
        first_ms = (time.perf_counter() - t) * 1000
        load_s = metric(url, "tessera:kv_tier_load_seconds_total", tier="disk")
        restored = _phase(handle.output, r"KV tiers: (\d+) blocks restored")
        complete(url, batch[45][:-8] + [31, 32, 33])  # new pages: block writes in flight when a SIGKILL comes
        stop(handle, how)
        rows.append((f"restart after {previous.name} of the previous", ready, load, restored,
                     f"{cached}/200 ({first_ms:.0f} ms)", f"{load_s * 1000:.1f}", _phases(handle.output)))
        previous = how

    now = os.getloadavg()
    lines = [
        "# KV tiers: restart time and prefix-cache hit rate (CPU)",
        "",
        f"Machine: {_cpu()} (lscpu); load average {now[0]:.1f} {now[1]:.1f} {now[2]:.1f} when written "
        "(shared with other engineers' jobs).",
        "Model: the demo model (4 layers, 256 wide, float32), pages of 16 tokens (64 KiB of K/V each), one 64-token "
        "bucket, persistent XLA compilation cache. `python perf/kv_restart.py`.",
        "",
        f"50 prompts (5 prefixes of 192 tokens x 10 tails of 8, the first of each prefix alone, then 8 at a time): "
        f"prefix-cache hit rate {hit_rate:.3f} of prompt tokens (the most possible: 45 x 192 / 10,000 = 0.864), "
        f"{seconds:.1f} s; disk tier {disk_bytes / 2**20:.1f} MiB.",
        "",
        "| start | ready (s, spawn to /ready 200) | load average (1 min) before | blocks restored "
        "| first request: cached tokens (latency) | disk load time (ms) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {ready:.1f} | {load:.1f} | {restored} | {first} | {load_ms} |"
              for name, ready, load, restored, first, load_ms, _ in rows]
    lines += ["", "Start-up phases (the server's log, `start-up: ready ...`; seconds from the process's start):", ""]
    lines += [f"- {name}: {phases}" for name, _, _, _, _, _, phases in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
