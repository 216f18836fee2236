"""Study storage: interrupted trials are failed and queued again, never lost or repeated."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest
from optuna.trial import TrialState

from pertbench.errors import ConfigError
from pertbench.tuning.storage import (
    INTERRUPTED_MESSAGE,
    default_storage_url,
    is_owned_storage,
    make_storage,
    recover_interrupted_trials,
    run_lock,
    study_progress,
)


def _study(tmp_path):
    storage = make_storage(default_storage_url(tmp_path))
    return optuna.create_study(study_name="s", storage=storage, load_if_exists=True)


def test_recover_fails_running_trial_and_requeues_its_params(tmp_path):
    study = _study(tmp_path)
    done = study.ask()
    done.suggest_float("x", 0, 1)
    study.tell(done, 1.0)
    running = study.ask()  # a trial whose process "died": never told
    x = running.suggest_float("x", 0, 1)
    assert study_progress(study).running == 1

    recovered = recover_interrupted_trials(study)
    assert recovered == [running.number]
    trials = study.get_trials()
    assert trials[running.number].state == TrialState.FAIL
    assert trials[running.number].user_attrs["error"] == INTERRUPTED_MESSAGE
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == {"x": x}
    progress = study_progress(study)
    assert (progress.complete, progress.interrupted, progress.failed, progress.waiting) == (
        1,
        1,
        0,
        1,
    )
    assert progress.finished == 1  # the interrupted trial does not count towards n_trials

    # the queued trial is the next one asked for, with the very same parameters
    retry = study.ask()
    assert retry.suggest_float("x", 0, 1) == x
    study.tell(retry, 0.5)
    assert study_progress(study).finished == 2
    assert recover_interrupted_trials(study) == []  # nothing left to recover


def test_storage_reopens_after_reload(tmp_path):
    study = _study(tmp_path)
    trial = study.ask()
    trial.suggest_int("n", 1, 3)
    study.tell(trial, 2.0)
    again = _study(tmp_path)
    assert [t.value for t in again.get_trials()] == [2.0]
    assert is_owned_storage(default_storage_url(tmp_path), tmp_path)
    assert not is_owned_storage("sqlite:///elsewhere.db", tmp_path)


def test_bad_storage_url_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SQLAlchemy URL"):
        make_storage("study.db")
    with pytest.raises(ConfigError, match="cannot open study storage"):
        make_storage("postgresql+psycopg://nobody@127.0.0.1:1/none")


def _try_lock(path, queue):
    try:
        with run_lock(path):
            queue.put("locked")
    except ConfigError as exc:
        queue.put(str(exc))


def test_run_lock_is_exclusive_and_released(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with run_lock(tmp_path):
        p = ctx.Process(target=_try_lock, args=(tmp_path, queue))
        p.start()
        p.join(60)
        assert "another 'pertbench tune' is running" in queue.get(timeout=5)
    p = ctx.Process(target=_try_lock, args=(tmp_path, queue))
    p.start()
    p.join(60)
    assert queue.get(timeout=5) == "locked"
