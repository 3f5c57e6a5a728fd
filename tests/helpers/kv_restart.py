"""`tessera serve` on the demo model with the disk KV tier, restarted: shared by the restart test
(tests/integration/test_kv_restart.py) and its measurement (perf/kv_restart.py)."""

from __future__ import annotations

import random
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.helpers.cluster import Process, _spawn, free_port

# Pages of 16 tokens; one 64-token bucket compiles in a few seconds and caches on disk.
SERVE_ENV = {"TESSERA_MAX_NUM_SEQS": "8", "TESSERA_MAX_NUM_BATCHED_TOKENS": "64", "TESSERA_TOKEN_BUCKETS": "64",
             "TESSERA_NUM_BLOCKS": "256", "TESSERA_MAX_MODEL_LEN": "512", "TESSERA_LOG_LEVEL": "warning",
             "TESSERA_TOKENIZER_WORKERS": "1"}


def prompts(num_prefixes: int = 5, per_prefix: int = 10, prefix_len: int = 192, seed: int = 0) -> list[list[int]]:
    """num_prefixes x per_prefix prompts of token ids: a long shared prefix and a short own tail."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_prefixes):
        prefix = [rng.randrange(10, 4000) for _ in range(prefix_len)]
        out += [prefix + [rng.randrange(10, 4000) for _ in range(8)] for _ in range(per_prefix)]
    return out


def start_serve(kv_dir: Path, env: dict | None = None, timeout: float = 180) -> tuple[Process, str, float]:
    """(handle, url, seconds from spawn to /ready answering 200)."""
    port = free_port()
    started = time.monotonic()
    handle = _spawn([sys.executable, "-m", "serving.cli", "serve", "--port", str(port)],
                    {**SERVE_ENV, "TESSERA_KV_DISK_DIR": str(kv_dir), **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = started + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(f"tessera serve exited ({handle.process.returncode}):\n{handle.output[-4000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return handle, url, time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    handle.kill()
    raise RuntimeError(f"tessera serve not ready in {timeout}s:\n{handle.output[-4000:]}")


def complete(url: str, prompt: list[int], max_tokens: int = 8) -> tuple[list[int] | str, int]:
    """(the greedy completion's text, the prompt's cached tokens)."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    data = response.json()
    details = data["usage"].get("prompt_tokens_details") or {}
    return data["choices"][0]["text"], details.get("cached_tokens") or 0


def complete_all(url: str, batch: list[list[int]], workers: int = 8) -> list[tuple[str, int]]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: complete(url, p), batch))


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one series of GET /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def wait_for_disk_writes(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, "tessera:kv_tier_pending_writes") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the disk tier did not commit its writes")
        time.sleep(0.05)


def stop(handle: Process, how: signal.Signals) -> int:
    handle.process.send_signal(how)
    return handle.process.wait(60)
