"""The engine: requests, scheduler, KV block manager, runner, sampling, backends."""

from runtime.xla_cpu_flags import apply_cpu_flags

apply_cpu_flags()
