"""One process of a 2-process tensor-parallel engine (tests/runtime/test_multiprocess_tp.py):
    python -m tests.helpers.tp_process MODEL_DIR PROCESS_ID NUM_PROCESSES COORDINATOR
prints one JSON line: the greedy tokens of PROMPTS and what this process holds of the weights."""

from __future__ import annotations

import json
import sys

PROMPTS = [[5, 9, 200, 17, 3, 44, 81, 2], [300, 301], [7] * 5]
# One token bucket: each process compiles one step shape (compiles dominate this test's time).
CONFIG = dict(block_size=8, num_blocks=32, max_num_seqs=4, max_num_batched_tokens=16, token_buckets=(16,),
              attention_backend="reference")


def greedy_tokens(model_dir: str, tensor_parallel: int):
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.request import SamplingParams

    engine = Engine.from_model_dir(model_dir, config=EngineConfig(**CONFIG), tensor_parallel=tensor_parallel)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params).request_id for p in PROMPTS]
    done = engine.run_to_completion()
    return engine, [done[i][0].token_ids for i in ids]


def main() -> None:
    model_dir, process_id, num_processes, coordinator = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from runtime import distributed

    distributed.initialize(coordinator, num_processes, process_id)
    import jax

    engine, tokens = greedy_tokens(model_dir, num_processes)
    gate = engine.model.state["layers"][0]["mlp"]["gate_proj"]["weight"].get_value()
    print(json.dumps({"tokens": tokens, "process_index": jax.process_index(), "devices": len(jax.devices()),
                      "local_devices": len(jax.local_devices()), "gate_shape": list(gate.shape),
                      "gate_local_shape": list(gate.addressable_shards[0].data.shape)}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
