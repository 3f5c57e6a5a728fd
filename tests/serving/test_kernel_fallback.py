"""`tessera serve` where the C++ CPU kernels cannot build: one warning line that says what is
missing and what runs instead, it serves, and the log and /metrics show the fallback plan."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.conftest import free_port
from tests.serving.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serves_on_xla_with_one_warning_when_the_kernels_cannot_build(tiny_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CXX": "no-such-compiler", "TESSERA_KERNEL_CACHE_DIR": str(tmp_path / "kernels"),
           "TESSERA_MODEL": str(tiny_model), "TESSERA_ALLOW_UNSIGNED": "true", "TESSERA_WARM_UP": "false",
           "TESSERA_MAX_NUM_SEQS": "2", "TESSERA_MAX_MODEL_LEN": "128", "TESSERA_TOKEN_BUCKETS": "8",
           "TESSERA_MAX_NUM_BATCHED_TOKENS": "8", "TESSERA_NUM_BLOCKS": "32", "TESSERA_LOG_FILE": str(tmp_path / "log")}
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _ready(url) or process.poll() is not None, 120, 0.2)
        assert process.poll() is None
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 0},
                            timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tessera:backend_mode{backend="cpu_xla",model_name=' in metrics
        mode = [line for line in metrics.splitlines() if line.startswith("tessera:backend_mode{")]
        assert len(mode) == 1 and mode[0].endswith(" 1.0")
        plan = [re.sub(r'model_name="[^"]*",', "", line) for line in metrics.splitlines()
                if line.startswith("tessera:execution_plan{")]
        assert plan == ['tessera:execution_plan{attention="reference",device="cpu",dtype="float32",fused="true",'
                        'layout="dense",linear="xla",sampling="xla",tensor_parallel="1"} 1.0']
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    log = stderr + (tmp_path / "log").read_text() if (tmp_path / "log").exists() else stderr
    warnings = [line for line in log.splitlines() if "CPU kernels unavailable" in line]
    assert len(warnings) == 1, log[-3000:]
    assert "no C++ compiler 'no-such-compiler' found (install g++, or set CXX)" in warnings[0]
    assert "XLA's own operations and the jnp reference attention run instead" in warnings[0]
    plans = [line for line in log.splitlines() if "execution plan:" in line]
    assert len(plans) == 1, log[-3000:]
    assert ("execution plan: device=cpu tensor_parallel=1 dtype=float32 attention=reference linear=xla fused=true "
            "layout=dense sampling=xla") in plans[0]
