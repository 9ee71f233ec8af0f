"""The API's submit processes end with the API process, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys
from service.jobs.pool import SubmitPool
pool = SubmitPool(2)
print(" ".join(str(f.result()) for f in pool._warming), flush=True)
sys.stdin.read()  # until killed
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else ""
    )
    return state != "Z"


def test_pool_processes_end_when_the_api_process_is_killed() -> None:
    api = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert api.stdout is not None
        children = [int(p) for p in api.stdout.readline().split()]
        assert len(children) == 2 and all(_alive(p) for p in children)
        api.send_signal(signal.SIGKILL)  # no shutdown, no atexit
        api.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "pool processes outlived the API"
    finally:
        api.kill()
        api.wait()
