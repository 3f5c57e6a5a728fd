"""serving/tokenizer_pool.py: the tokenizer workers end with the server, however it ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVER = """
import os, time
from models.tokenizer import Tokenizer
from serving.tokenizer_pool import TokenizerPool

if __name__ == "__main__":
    pool = TokenizerPool(Tokenizer.from_dir("models/demo"), workers=2)
    pool.start()
    pids = {pool._executor.submit(os.getpid).result(timeout=120) for _ in range(8)}
    while len(pids) < 2:  # both workers up
        pids.add(pool._executor.submit(os.getpid).result(timeout=120))
    print(*sorted(pids), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_of_a_killed_server_exit(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        workers = [int(pid) for pid in server.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        server.send_signal(signal.SIGKILL)  # no shutdown of the pool
        server.wait(10)
    deadline = time.monotonic() + 30  # they notice within a second; the machine may be busy
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
