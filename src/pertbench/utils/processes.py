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


#: Environment variables read by the math libraries when they are loaded.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_threads(threads: int) -> None:
    """Limit this (worker) process to ``threads`` math-library threads.

    Sets torch's intra-op threads and the thread pools of the BLAS and OpenMP libraries
    already loaded (numpy's OpenBLAS is loaded with ``import numpy``, before a worker can
    set any environment variable, and would otherwise run as many threads as there are
    cores in every worker: N workers would oversubscribe the machine N times over), and
    the environment variables read by libraries loaded later. The number of threads does
    not change pertbench's numbers on CPU.
    """
    threads = max(1, int(threads))
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(limits=threads)
