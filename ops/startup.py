"""Where a start's seconds go: phases on one clock that begins when the process started.

    from ops.startup import timeline
    timeline.begin()              # `tessera serve` / `worker`: marks count from now on
    timeline.mark("model load")   # the phase that ends now, since the previous mark
    timeline.ready()              # logs the whole timeline once: "start-up: ready 6.12s after ..."

Marks are no-ops until `begin()`: engines built by tests and tools log nothing.

Each mark logs `start-up: <phase> <seconds>s (cpu <seconds>s; at <seconds since the process
started>s)`; the CPU seconds are all the process's threads' (XLA's pool too, so they may pass
the wall seconds): on a shared machine, wall seconds well above them were spent waiting for a core;
`ready()` logs one summary line that perf/kv_restart.py reads back. The first phase
("python and imports") runs from the kernel's start time of the process (/proc/self/stat),
so the interpreter's own start and every import before the first mark are counted; where
/proc is missing it runs from this module's import. Marks after `ready()` (a reload's warm-up)
are no-ops: the timeline is the process's start.
"""

from __future__ import annotations

import gc
import logging
import os
import time

log = logging.getLogger(__name__)


def _seconds_since_process_start() -> float | None:
    """How long ago the kernel started this process (10 ms resolution), or None off Linux."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: fields count from the last ")".
        start_ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupTimeline:
    def __init__(self) -> None:
        since = _seconds_since_process_start()
        self.origin = time.monotonic() - (since if since is not None else 0.0)
        self.phases: list[tuple[str, float]] = []
        self._last = self.origin
        self._last_cpu = 0.0  # time.process_time() counts from the process's start, all threads
        self.ready_at: float | None = None  # seconds since the process started
        self.active = False

    def begin(self) -> None:
        self.active = True

    def mark(self, phase: str) -> float:
        """End `phase` now; returns its seconds (0 before `begin()` and after `ready()`)."""
        if not self.active or self.ready_at is not None:
            return 0.0
        now, cpu = time.monotonic(), time.process_time()
        seconds, self._last = now - self._last, now
        cpu_seconds, self._last_cpu = cpu - self._last_cpu, cpu
        self.phases.append((phase, seconds))
        log.info("start-up: %s %.2fs (cpu %.2fs; at %.2fs)", phase, seconds, cpu_seconds, now - self.origin)
        return seconds

    def ready(self, phase: str = "server start") -> None:
        """The last phase ends: everything /ready waits for is done. Logged once per process."""
        if not self.active or self.ready_at is not None:
            return
        self.mark(phase)
        self.ready_at = self._last - self.origin
        log.info("start-up: ready %.2fs after the process started, %.2fs of CPU (%s)", self.ready_at,
                 self._last_cpu, ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.phases))


timeline = StartupTimeline()


def pause_collector() -> None:
    """Importing the stack (jax, flax, litestar: ~300,000 objects that live as long as the
    process) while the cyclic collector runs costs it walks over them again and again: ~0.3 s
    of CPU of ~2 s on the 2-core development machine. `tessera` pauses it from its first line
    until `resume_collector()`."""
    gc.disable()


def resume_collector(freeze: bool = True) -> None:
    """After the imports: collect what they left and (`freeze`) move the survivors out of
    every later collection (start-up's own tracing and the serving process's requests then
    walk only what is new), then collect as usual again. Before a model loads: garbage there
    may hold device buffers. A no-op when the collector was not paused."""
    if gc.isenabled():
        return
    if freeze:
        gc.collect()
        gc.freeze()
    gc.enable()
