"""Job graph execution: dependencies, parallel processes, a dying worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pertbench.benchmark.backends import (
    MAX_CRASHES,
    InlineBackend,
    LocalBackend,
    execute,
    make_backend,
    threads_per_worker,
)
from pertbench.errors import ConfigError


def record_job(job):
    """Append the job id to a log, after its dependencies (checked by the test)."""
    folder, name, delay = job
    time.sleep(delay)
    with open(Path(folder) / "order.log", "a") as handle:
        handle.write(f"{name}\n")
    import torch
    from threadpoolctl import threadpool_info

    blas = {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    return {"name": name, "pid": os.getpid(), "threads": (torch.get_num_threads(), blas)}


def crash_job(job):
    name = job[1]
    if name == "crash":
        os._exit(3)  # a worker killed outright (as by the OOM killer)
    return record_job(job)


def _run(backend, fn, jobs, deps, log=None):
    results, crashed = {}, {}
    execute(
        jobs,
        deps,
        fn,
        backend,
        on_result=lambda jid, out: results.__setitem__(jid, out),
        on_crash=lambda jid, msg: crashed.setdefault(jid, msg),
        log=log,
    )
    return results, crashed


@pytest.mark.parametrize("workers", [1, 2])
def test_dependencies_run_first(tmp_path, workers):
    jobs = {
        "tune": (tmp_path, "tune", 0.3),
        "a": (tmp_path, "a", 0.0),
        "b": (tmp_path, "b", 0.0),
        "free": (tmp_path, "free", 0.0),
    }
    deps = {"a": {"tune"}, "b": {"tune"}}
    results, crashed = _run(make_backend("local", workers), record_job, jobs, deps)
    assert not crashed
    assert set(results) == set(jobs)
    order = (tmp_path / "order.log").read_text().split()
    assert order.index("tune") < order.index("a") and order.index("tune") < order.index("b")
    pids = {r["pid"] for r in results.values()}
    if workers == 1:
        assert pids == {os.getpid()}  # inline
    else:
        assert os.getpid() not in pids  # worker processes
        # each worker's torch and BLAS (numpy's OpenBLAS is loaded before the worker
        # starts) use its share of the cores, so the workers do not oversubscribe them
        share = threads_per_worker(workers)
        assert {r["threads"][0] for r in results.values()} == {share}
        assert set().union(*(r["threads"][1] for r in results.values())) == {share}


def test_dead_worker_is_recorded_and_others_finish(tmp_path):
    jobs = {name: (tmp_path, name, 0.0) for name in ("ok1", "crash", "ok2", "ok3")}
    lines: list[str] = []
    results, crashed = _run(LocalBackend(2), crash_job, jobs, {}, log=lines.append)
    assert set(crashed) == {"crash"}
    # every death is logged with its cause and what happens to the interrupted jobs
    deaths = [line for line in lines if line.startswith("a worker process died")]
    assert len(deaths) == MAX_CRASHES
    assert "exit code 3" in deaths[0] and "re-running one at a time:" in deaths[0]
    assert "crash" in deaths[0].split("re-running one at a time:")[1]
    assert "recorded as failed" in deaths[-1] and deaths[-1].endswith("crash")
    assert "worker process died" in crashed["crash"]
    assert {"ok1", "ok2", "ok3"} <= {r["name"] for r in results.values() if isinstance(r, dict)}
    assert MAX_CRASHES >= 2


def test_backend_choice_errors():
    with pytest.raises(ConfigError, match="at least 1"):
        make_backend("local", 0)
    with pytest.raises(ConfigError, match="local or ray"):
        make_backend("slurm", 1)
    with pytest.raises(ConfigError, match="--backend ray"):
        make_backend("local", 2, "ray://host:10001")
    assert isinstance(make_backend("local", 1), InlineBackend)
    assert threads_per_worker(2) == max(1, (os.cpu_count() or 1) // 2)
