"""Engine faults: what a failed step does, and a test-only switch that makes steps fail.

A step that raises fails the requests it was computing (and only those); the loop goes on.
When the fault has taken the KV cache with it (the cache is donated to the step, so a step
that dies on the device leaves it deleted or unreadable), the engine reinitialises: the cache
is allocated again, the step is compiled again, the running sequences are preempted to be
recomputed, and a probe step proves the device works. If that fails too, the engine is dead
and says so (`/health` answers 503, so the orchestrator restarts the process).

Fault injection is for tests only: `FaultInjector.arm()` refuses unless the process was
started with TESSERA_FAULT_INJECTION=1.

    "step"      the next step raises on the host; the cache is untouched
    "device"    the next step deletes the cache, then raises (what a device fault leaves behind)
    "readback"  the next step is dispatched, then reading its tokens back raises (a device error
                that surfaces late; with overlapped scheduling the step after it is in flight)
    "dead"      every step and every recovery probe fails, until disarmed
"""

from __future__ import annotations

import os

import jax

ENV_SWITCH = "TESSERA_FAULT_INJECTION"
FAULT_KINDS = ("step", "device", "readback", "dead")


class InjectedFault(RuntimeError):
    """A fault made on purpose by a test."""


class EngineUnrecoverable(RuntimeError):
    """The engine could not be reinitialised after a fault: it cannot serve any more."""


class FaultInjector:
    def __init__(self, enabled: bool | None = None):
        self.enabled = os.environ.get(ENV_SWITCH) == "1" if enabled is None else enabled
        self._pending: list[str] = []
        self._dead = False

    def arm(self, kind: str, times: int = 1) -> None:
        if not self.enabled:
            raise RuntimeError(f"fault injection is off; it is for tests ({ENV_SWITCH}=1)")
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind={kind!r} must be one of {', '.join(FAULT_KINDS)}")
        if kind == "dead":
            self._dead = True
        else:
            self._pending += [kind] * times

    def disarm(self) -> None:
        self._pending.clear()
        self._dead = False

    def before_step(self, kv_cache) -> None:
        """Called by the engine before each step is dispatched."""
        if not self._dead and not (self._pending and self._pending[0] in ("step", "device")):
            return
        kind = "device" if self._dead else self._pending.pop(0)
        if kind == "device":
            for leaf in jax.tree.leaves(kv_cache):
                leaf.delete()
        raise InjectedFault(f"injected {kind} fault")

    def before_readback(self) -> None:
        """Called by the engine before a dispatched step's tokens are read back."""
        if self._pending and self._pending[0] == "readback":
            self._pending.pop(0)
            raise InjectedFault("injected readback fault")

    def before_probe(self) -> None:
        if self._dead:
            raise InjectedFault("injected fault: the device does not come back")
