"""Where jobs run: in this process, in local worker processes, or on a Ray cluster.

Every backend runs the same top-level job function (:func:`pertbench.benchmark.jobs.run_job`)
on picklable job specs, and :func:`execute` walks the job graph (a job starts once the jobs
it depends on have finished). Job functions record their own Python errors; a backend only
has to survive infrastructure failures: a local worker process that dies (killed, out of
memory) breaks the pool, which is rebuilt and the interrupted jobs resubmitted (both are
logged); a job that takes down its worker twice is recorded as failed.

Local workers never outlive the command: each one calls
:func:`pertbench.utils.processes.die_with_parent` first, so a benchmark killed with
``SIGKILL`` leaves no worker (nor multiprocessing resource tracker) running.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pertbench.errors import ConfigError, require

MAX_CRASHES = 2


def _init_worker(threads: int, parent_pid: int) -> None:
    """Die with the parent; limit math-library threads so N workers do not oversubscribe."""
    from pertbench.utils.processes import die_with_parent, limit_threads

    die_with_parent(parent_pid)
    limit_threads(threads)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class InlineBackend:
    """Runs each job in this process, one after the other (``--workers 1``)."""

    name = "inline"
    capacity = 1

    def submit(self, fn: Callable[[Any], Any], job: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(job))
        except BaseException as exc:  # the job function records its own errors; this is a bug
            if isinstance(exc, KeyboardInterrupt):
                raise
            future.set_exception(exc)
        return future

    def wait(self, handles: list[Any]) -> list[Any]:
        return list(handles)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def shutdown(self) -> None:
        pass


class LocalBackend:
    """A pool of spawned worker processes, each limited to ``cores / workers`` threads."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = int(workers)
        self.capacity = self.workers
        self.threads = threads_per_worker(self.workers)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._processes: dict[int, Any] = {}  # pid -> process, kept to report deaths

    @property
    def pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads, os.getpid()),
            )
        return self._pool

    def submit(self, fn: Callable[[Any], Any], job: Any) -> cf.Future:
        future = self.pool.submit(fn, job)
        self._processes.update(getattr(self._pool, "_processes", None) or {})
        return future

    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return sorted(self._processes)

    def deaths(self) -> list[str]:
        """How the pool's dead workers ended, e.g. ``pid 123 killed by signal 9``."""
        import time

        # A worker's pipe closes (and the pool breaks) a moment before the kernel reports
        # its exit status, so poll the exit codes briefly instead of reading them once.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in self._processes.values()):
                break
            time.sleep(0.05)
        out = []
        for pid, process in sorted(self._processes.items()):
            code = process.exitcode
            if code is None or code == 0:
                continue
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            out.append(f"pid {pid} {how}")
        return out

    def wait(self, handles: list[Any]) -> list[Any]:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def reset(self) -> None:
        """Drop a broken pool; the next submit starts a fresh one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._processes = {}

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def abort(self) -> None:
        """Stop the workers now (their running jobs are lost, never half-written)."""
        if self._pool is not None:
            processes = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
        self._pool = None


class RayBackend:
    """Runs jobs as Ray tasks (one CPU each) on a local or remote cluster.

    The benchmark directory must be visible to every node at the same path (a shared file
    system), because jobs read the materialised data and write their results there.
    """

    name = "ray"

    def __init__(self, workers: int, address: str | None = None) -> None:
        self.ray = require("ray", "ray", "the Ray backend (--backend ray)")
        self.workers = int(workers)
        self._started_here = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": True,
                "configure_logging": False,
            }
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = self.workers
                # Workers of a local cluster import what this process imports (this
                # checkout of pertbench, user model modules given as package.module:Class).
                paths = [str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()]
                kwargs["runtime_env"] = {
                    "env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
                }
            try:
                self.ray.init(**kwargs)
            except ConnectionError as exc:
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {address!r}: {exc}"
                ) from exc
            self._started_here = True
        self._remote: dict[Any, Any] = {}

    def submit(self, fn: Callable[[Any], Any], job: Any) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self.ray.remote(num_cpus=1, max_retries=0)(fn)
            self._remote[fn] = remote
        return remote.remote(job)

    def wait(self, handles: list[Any]) -> list[Any]:
        done, _ = self.ray.wait(list(handles), num_returns=1)
        return list(done)

    def result(self, handle: Any) -> Any:
        return self.ray.get(handle)

    def shutdown(self) -> None:
        if self._started_here:
            self.ray.shutdown()


def make_backend(kind: str, workers: int, ray_address: str | None = None) -> Any:
    """``local`` (inline for one worker, else a process pool) or ``ray``."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if kind == "local":
        if ray_address:
            raise ConfigError("--ray-address needs --backend ray")
        return InlineBackend() if workers == 1 else LocalBackend(workers)
    if kind == "ray":
        return RayBackend(workers, ray_address)
    raise ConfigError(f"--backend must be local or ray, got {kind!r}")


def execute(
    jobs: Mapping[str, Any],
    dependencies: Mapping[str, set[str]],
    fn: Callable[[Any], Any],
    backend: Any,
    *,
    on_result: Callable[[str, Any], None],
    on_crash: Callable[[str, str], Any],
    log: Callable[[str], None] | None = None,
) -> None:
    """Run every job once its dependencies are done.

    At most ``backend.capacity`` jobs are in flight (all of them for Ray, which queues
    itself). When a worker process dies, every job that was running with it is a suspect:
    suspects are re-run one at a time, so the job that kills its worker again is recorded
    as crashed while the innocent ones finish normally.

    Parameters
    ----------
    jobs
        Job id -> picklable job spec.
    dependencies
        Job id -> ids that must finish first (whatever their outcome).
    fn
        Top-level job function; returns an outcome and records its own errors.
    backend
        :class:`InlineBackend`, :class:`LocalBackend` or :class:`RayBackend`.
    on_result
        Called with (job id, outcome) as jobs finish.
    on_crash
        Called with (job id, message) when a job cannot run at all (its worker died
        twice, or the backend failed); returns the outcome to record.
    log
        Receives a line when a worker process dies, naming the jobs that are re-run.
    """
    log = log or (lambda message: None)
    waiting = {jid: set(dependencies.get(jid, ())) & set(jobs) for jid in jobs}
    finished: set[str] = set()
    running: dict[Any, str] = {}
    crashes: dict[str, int] = {}
    suspects: list[str] = []
    capacity = getattr(backend, "capacity", None)

    blocking = {dep for deps in waiting.values() for dep in deps}

    def ready() -> list[str]:
        # Jobs that others wait for (tuning) go first, so their dependants can start early.
        candidates = [jid for jid, deps in waiting.items() if deps <= finished]
        return sorted(candidates, key=lambda jid: (jid not in blocking, jid))

    def finish(jid: str, outcome: Any, *, crashed: str | None = None) -> None:
        if crashed is not None:
            outcome = on_crash(jid, crashed)
        on_result(jid, outcome)
        finished.add(jid)

    try:
        while waiting or running or suspects:
            if suspects:
                if not running:
                    jid = suspects.pop(0)
                    running[backend.submit(fn, jobs[jid])] = jid
            else:
                for jid in ready():
                    if capacity is not None and len(running) >= capacity:
                        break
                    del waiting[jid]
                    running[backend.submit(fn, jobs[jid])] = jid
            if not running:
                # Dependencies that can never finish (should not happen: ids are validated).
                for jid in sorted(waiting):
                    finish(jid, None, crashed="its dependencies did not run")
                waiting.clear()
                break
            for handle in backend.wait(list(running)):
                if handle not in running:
                    continue
                jid = running.pop(handle)
                try:
                    outcome = backend.result(handle)
                except cf.process.BrokenProcessPool:
                    # A worker died; every job running in the pool was interrupted with it.
                    interrupted = [jid, *running.values()]
                    running.clear()
                    deaths = backend.deaths() if hasattr(backend, "deaths") else []
                    backend.reset()
                    rerun, given_up = [], []
                    for other in sorted(interrupted):
                        crashes[other] = crashes.get(other, 0) + 1
                        if crashes[other] >= MAX_CRASHES:
                            given_up.append(other)
                            finish(
                                other,
                                None,
                                crashed="its worker process died (killed or out of memory)",
                            )
                        else:
                            rerun.append(other)
                            suspects.append(other)
                    log(
                        "a worker process died ("
                        + (", ".join(deaths) or "cause unknown")
                        + ")"
                        + (f"; re-running one at a time: {', '.join(rerun)}" if rerun else "")
                        + (
                            f"; recorded as failed (its worker died {MAX_CRASHES} times): "
                            f"{', '.join(given_up)}"
                            if given_up
                            else ""
                        )
                    )
                    break
                except Exception as exc:  # a Ray task error or a bug in the job function
                    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    finish(jid, None, crashed=message + "\n" + traceback.format_exc())
                else:
                    finish(jid, outcome)
    except BaseException:
        # Ctrl-C or a bug: stop at once instead of waiting for running jobs; finished
        # cells are on disk and a resumed run picks up the rest.
        getattr(backend, "abort", backend.shutdown)()
        raise
    backend.shutdown()
