"""A deliberately slowed `tessera serve`, for testing that `tessera replay --compare` catches
a regression: every engine step that produced output sleeps `--step-delay-ms` more.

    TESSERA_FAULT_INJECTION=1 python -m perf.replay.slowed_serve --step-delay-ms 40 serve [flags]

Test-only, like the engine's fault injection (runtime/faults.py): it refuses to run without
TESSERA_FAULT_INJECTION=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def slow_down(delay_s: float) -> None:
    from runtime.engine import Engine

    step = Engine.step

    def slowed_step(self):
        outputs = step(self)
        if outputs:
            time.sleep(delay_s)
        return outputs

    Engine.step = slowed_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.replay.slowed_serve", description=__doc__.splitlines()[0])
    parser.add_argument("--step-delay-ms", type=float, required=True)
    args, rest = parser.parse_known_args(argv)
    if os.environ.get("TESSERA_FAULT_INJECTION") != "1":
        print("slowed_serve is for tests: set TESSERA_FAULT_INJECTION=1", file=sys.stderr)
        return 2
    slow_down(args.step_delay_ms / 1000)
    from serving.cli import main as tessera

    return tessera(rest)


if __name__ == "__main__":
    sys.exit(main())
