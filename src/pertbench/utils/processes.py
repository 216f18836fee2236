"""Worker processes that never outlive the command that started them.

A benchmark or tuning run killed with ``SIGKILL`` cannot clean up after itself, so its worker
processes must notice on their own: :func:`die_with_parent`, called first thing in every
worker, asks the Linux kernel to send the worker ``SIGKILL`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``). Where that is unavailable (macOS, other systems), a daemon
thread polls the parent's pid once a second instead. Either way an orphaned worker stops
within about a second, so a resumed run never shares its folder with a stale worker, and
the multiprocessing resource tracker (which exits once no process holds its pipe) follows.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

#: ``PR_SET_PDEATHSIG`` from ``<linux/prctl.h>``.
_PR_SET_PDEATHSIG = 1
WATCHDOG_INTERVAL = 1.0


def _parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent_pid:  # reparented: the parent is gone
            os._exit(1)


def die_with_parent(parent_pid: int, *, interval: float = WATCHDOG_INTERVAL) -> str:
    """Make this (worker) process end when the process ``parent_pid`` ends.

    Parameters
    ----------
    parent_pid
        The pid of the process that started this one (``os.getpid()`` there).
    interval
        Polling interval of the fallback watchdog thread, in seconds.

    Returns
    -------
    str
        ``"pdeathsig"`` or ``"watchdog"``: how the parent is watched.
    """
    how = "pdeathsig" if _parent_death_signal() else "watchdog"
    # The parent may have died before the kernel watched it: check once by hand.
    if os.getppid() != parent_pid:
        os._exit(1)
    if how == "watchdog":
        threading.Thread(
            target=_watch_parent,
            args=(int(parent_pid), float(interval)),
            name="pertbench-parent-watchdog",
            daemon=True,
        ).start()
    return how
