"""Worker processes die with their parent, however the parent dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from bench_helpers import descendants, still_running, subprocess_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A parent that starts one child calling die_with_parent(), then waits forever.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
time.sleep(600)
"""
CHILD = """
import os, sys, time
from pertbench.utils import processes
if {force_watchdog}:
    processes._parent_death_signal = lambda: False
print(processes.die_with_parent(os.getppid(), interval=0.2), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("force_watchdog", [False, True], ids=["pdeathsig", "watchdog"])
def test_child_dies_within_seconds_of_a_sigkilled_parent(force_watchdog):
    code = CHILD.format(force_watchdog=force_watchdog)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, code],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        how = parent.stdout.readline().strip()  # the child reports how it watches
        assert how == ("watchdog" if force_watchdog else "pdeathsig")
        children = descendants(parent.pid)
        assert len(children) == 1
        os.kill(parent.pid, signal.SIGKILL)
        deadline = time.time() + 5
        while still_running(children) and time.time() < deadline:
            time.sleep(0.1)
        assert still_running(children) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
