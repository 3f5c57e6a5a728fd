"""The throughput cost of a grammar: 16 concurrent requests on the demo model, in process, with
and without structured output (runtime/structured.py). Grammar requests run their steps in
series (their tokens are read back before the next step) and carry a token mask per row.

    python perf/bench_structured.py [--concurrency 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import time

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.request import SamplingParams
from runtime.structured import GuidedDecoding
from serving.default_model import resolve_model

SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
          "required": ["words"], "additionalProperties": False}
CASES = {
    "none": None,
    "regex": GuidedDecoding("regex", r"[A-Za-z ,.]{1,4000}"),
    "json_schema": GuidedDecoding("json", json.dumps(SCHEMA)),
}


def run(engine: Engine, guided, concurrency: int, tokens: int) -> tuple[float, int]:
    for i in range(concurrency):
        engine.add_request(f"Emma said {i}", SamplingParams(max_tokens=tokens, temperature=1.0, seed=i,
                                                           ignore_eos=True, guided=guided))
    started = time.perf_counter()
    done = engine.run_to_completion()
    seconds = time.perf_counter() - started
    return seconds, sum(len(o.token_ids) for outs in done.values() for o in outs.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    config = EngineConfig(max_num_seqs=args.concurrency, max_num_batched_tokens=256, token_buckets=(16, 256),
                          num_blocks=256, max_model_len=512)
    engine = Engine.from_model_dir(resolve_model(None), config=config)
    engine.warm_up()
    for guided in CASES.values():  # compile grammars and the first steps outside the timing
        run(engine, guided, 2, 4)
    print(f"| grammar | {args.concurrency} concurrent x {args.tokens} tokens: s | tok/s | vs none |")
    print("|---|---|---|---|")
    base = None
    for name, guided in CASES.items():
        seconds, count = run(engine, guided, args.concurrency, args.tokens)
        rate = count / seconds
        base = base or rate
        print(f"| {name} | {seconds:.2f} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
