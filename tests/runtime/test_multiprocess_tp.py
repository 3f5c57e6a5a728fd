"""One model over two processes: jax.distributed on 2 CPU processes (loopback, gloo collectives),
tensor parallel 2, gives the greedy tokens of the same engine in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.cluster import REPO, free_port
from tests.helpers.tiny_checkpoint import build_checkpoint
from tests.helpers.tp_process import greedy_tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 2 KV heads, MLP width 256, vocabulary 520: every sharded axis splits over 2.
    return build_checkpoint(tmp_path_factory.mktemp("tp2"), "llama", num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def test_two_processes_give_the_greedy_tokens_of_one(model_dir):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device per process
    processes = [subprocess.Popen([sys.executable, "-m", "tests.helpers.tp_process", str(model_dir), str(i), "2",
                                   coordinator], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    _, expected = greedy_tokens(str(model_dir), 1)

    assert [r["tokens"] for r in results] == [expected, expected]
    assert all(len(t) == 8 for t in expected)
    assert [r["process_index"] for r in results] == [0, 1]
    assert [(r["devices"], r["local_devices"]) for r in results] == [(2, 1), (2, 1)]
    # The MLP really is split across the processes: each holds half of gate_proj's columns.
    assert [(r["gate_shape"], r["gate_local_shape"]) for r in results] == [([128, 256], [128, 128])] * 2
