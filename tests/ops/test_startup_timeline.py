"""ops/startup.py: the start-up timeline `tessera serve` logs, and the collector paused for its imports."""

import gc
import logging
import re
import subprocess
import sys
import time

from ops.startup import StartupTimeline, _seconds_since_process_start, pause_collector, resume_collector


def test_the_process_start_is_read_from_the_kernel():
    # A child that sleeps before asking: it must count the time since its own start, not since the import.
    code = ("import time; time.sleep(0.6); from ops.startup import _seconds_since_process_start as s; "
            "print(s())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) >= 0.6
    assert 0 < _seconds_since_process_start() < time.clock_gettime(time.CLOCK_BOOTTIME)


def test_marks_are_phases_between_begin_and_ready(caplog):
    caplog.set_level(logging.INFO, logger="ops.startup")
    timeline = StartupTimeline()
    assert timeline.mark("before begin") == 0.0 and timeline.phases == []  # engines built by tests: silent
    timeline.begin()
    timeline.mark("python and imports")
    time.sleep(0.05)
    assert timeline.mark("model load") >= 0.05
    timeline.ready()
    timeline.ready()  # once per process
    assert timeline.mark("a reload's warm-up") == 0.0
    assert [name for name, _ in timeline.phases] == ["python and imports", "model load", "server start"]
    assert abs(timeline.ready_at - sum(seconds for _, seconds in timeline.phases)) < 1e-6  # from the process's start
    lines = [r.getMessage() for r in caplog.records if r.name == "ops.startup"]  # other threads may log too
    summaries = [line for line in lines if "start-up: ready" in line]
    assert len(summaries) == 1
    assert re.fullmatch(r"start-up: ready [\d.]+s after the process started, [\d.]+s of CPU "
                        r"\(python and imports [\d.]+s, model load [\d.]+s, server start [\d.]+s\)", summaries[0])
    assert [line.split(" ")[1] for line in lines] == ["python", "model", "server", "ready"]


def test_the_collector_resumes_frozen_or_not():
    was_enabled = gc.isenabled()
    try:
        pause_collector()
        assert not gc.isenabled()
        resume_collector(freeze=False)
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        resume_collector()  # not paused: nothing happens
        assert gc.get_freeze_count() == frozen
        pause_collector()
        resume_collector()  # paused: collected, the survivors frozen out of later collections
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.enable() if was_enabled else gc.disable()


def test_tessera_leaves_the_collector_on_when_it_ends_early():
    from serving.cli import main

    assert main(["serve", "--max-num-seqs", "0"]) == 2  # refused before serve's imports end
    assert gc.isenabled()
