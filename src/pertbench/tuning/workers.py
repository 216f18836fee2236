"""Local tuning workers: spawned processes sharing one study, supervised by the command.

Each worker runs :func:`pertbench.tuning.study._search` on the same storage. The parent waits
for them and replaces one that dies (its trial is queued again first), so the others, which
may wait for that trial's result (:mod:`pertbench.tuning.sampling`), never wait forever.
Workers die with the parent (:func:`pertbench.utils.processes.die_with_parent`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import PertbenchError
from pertbench.metrics.objective import Objective
from pertbench.tuning.storage import MAX_RETRY, recover_interrupted_trials, study_progress
from pertbench.tuning.study import TuneSettings, _open_study, _search, _SearchContext


def run_workers(
    ctx: _SearchContext, data_path: Path, split_path: Path, deadline: float | None
) -> None:
    """Run ``settings.workers`` spawned processes on the same storage and supervise them.

    A worker that dies (killed, out of memory) has its trial queued again and is replaced,
    so the others never wait forever for that trial's result; a worker that stops with an
    error message (exit code 2) is not replaced. Workers die with this process.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    spawn = multiprocessing.get_context("spawn")
    spec = {
        "data_path": str(data_path),
        "split_path": str(split_path),
        "keys": ctx.keys.to_dict(),
        "settings": dataclasses.asdict(ctx.settings),
        "storage_url": ctx.storage_url,
        "study_name": ctx.study_name,
        "identity": ctx.identity,
        "space": ctx.space,
        "out_dir": str(ctx.out_dir),
        "deadline": deadline,
        "threads": max(1, (os.cpu_count() or 1) // ctx.settings.workers),
        "parent_pid": os.getpid(),
    }

    def start(i: int) -> Any:
        process = spawn.Process(target=worker_entry, args=(spec, i), name=f"pertbench-tune-{i}")
        process.start()
        return process

    running = {i: start(i) for i in range(ctx.settings.workers)}
    replacements_left = ctx.settings.workers * (MAX_RETRY + 1)
    stopped: list[tuple[int, int]] = []
    try:
        while running:
            wait([p.sentinel for p in running.values()])
            for i, process in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[i]
                code = process.exitcode
                if code in (0, 2):  # done, or stopped with an error it printed
                    if code:
                        stopped.append((i, code))
                    continue
                study = _open_study(ctx)
                requeued = recover_interrupted_trials(study, owners={process.pid})
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                message = f"worker {i} (pid {process.pid}) died ({how})"
                if requeued:
                    message += f"; trial(s) {', '.join(map(str, requeued))} queued again"
                if replacements_left > 0 and not study_progress(study).done(ctx.settings.n_trials):
                    replacements_left -= 1
                    running[i] = start(i)
                    message += f"; started worker {i} again (pid {running[i].pid})"
                else:
                    stopped.append((i, code))
                ctx.log(message)
    except BaseException:
        for p in running.values():
            if p.is_alive():
                p.terminate()
        for p in running.values():
            p.join()
        raise
    if stopped:
        ctx.log(
            "worker(s) "
            + ", ".join(f"{i} (exit code {code})" for i, code in stopped)
            + " stopped early; their messages are above"
        )


def worker_entry(spec: dict[str, Any], worker: int) -> None:
    """Entry point of a spawned tuning worker (top level, so it pickles)."""
    from pertbench.utils.processes import die_with_parent, limit_threads

    die_with_parent(int(spec["parent_pid"]))
    from pertbench.tuning.fitting import load_dataset, load_split

    limit_threads(int(spec["threads"]))
    keys = PerturbationKeys.from_dict(spec["keys"])
    settings_dict = dict(spec["settings"])
    if settings_dict.get("report_metrics") is not None:
        settings_dict["report_metrics"] = tuple(settings_dict["report_metrics"])
    settings = TuneSettings(**settings_dict)
    adata = load_dataset(spec["data_path"], keys=keys)
    split = load_split(spec["split_path"], adata)
    ctx = _SearchContext(
        adata=adata,
        split=split,
        keys=keys,
        settings=settings,
        objective=Objective.parse(settings.objective, direction=settings.direction),
        space=spec["space"],
        storage_url=spec["storage_url"],
        study_name=spec["study_name"],
        identity=spec["identity"],
        out_dir=Path(spec["out_dir"]),
        log=lambda msg: print(f"[worker {worker}] {msg}", file=sys.stderr, flush=True),
    )
    try:
        _search(ctx, worker=worker, deadline=spec["deadline"])
    except PertbenchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
