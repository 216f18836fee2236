"""Where a study lives, and how a study survives a killed process.

Default storage: an SQLite file ``DIR/study.db``. SQLite was chosen over Optuna's journal
file because it survives ``SIGKILL`` cleanly: every change is one ACID transaction (a kill
mid-write is rolled back on the next open), and its locks are operating-system file locks
that vanish with the process, whereas the journal file's lock is a lock *file* that a killed
process leaves behind (others then wait for its grace period) and a kill mid-append can
leave a partial log line. Any SQLAlchemy URL (``postgresql+psycopg://...``) shares one study
between processes and machines.

A trial that was RUNNING when its process died is never lost and never silently repeated:
it is marked FAIL (with ``user_attrs['error']``) and its parameters are queued again as a new
WAITING trial, so the configuration is evaluated exactly once in the end. For the default
storage this happens at once when the run resumes (the run directory is locked, so any
RUNNING trial found there belongs to a dead process); for shared storage Optuna's heartbeat
does it after a grace period, because a RUNNING trial there may belong to a live worker
elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertbench.errors import ConfigError

DEFAULT_DB = "study.db"
LOCK_FILE = ".tune.lock"
#: Seconds between heartbeats of a running trial, and after which a silent trial is stale.
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 60
#: How often a killed trial's parameters are retried before they are given up.
MAX_RETRY = 2
STORAGE_ATTEMPTS = 5
INTERRUPTED_MESSAGE = (
    "interrupted: the process running this trial died; its parameters were queued again"
)


def default_storage_url(out_dir: str | os.PathLike) -> str:
    """SQLite URL of the study file inside ``out_dir``."""
    return f"sqlite:///{Path(out_dir).resolve() / DEFAULT_DB}"


def is_owned_storage(url: str, out_dir: str | os.PathLike) -> bool:
    """True when ``url`` is the default SQLite file of ``out_dir`` (no other run shares it)."""
    return url == default_storage_url(out_dir)


def make_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats and automatic retry of killed trials."""
    import optuna

    if "://" not in url:
        raise ConfigError(
            f"--storage must be an SQLAlchemy URL such as sqlite:///study.db or "
            f"postgresql+psycopg://user@host/db, got {url!r}"
        )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local workers share one file: wait for the write lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 120}
    elif url.startswith("postgresql"):
        from pertbench.errors import require

        require("psycopg", "postgres", "a PostgreSQL study storage")
        engine_kwargs["pool_pre_ping"] = True
    # Workers that start together on a fresh database race to create Optuna's tables; the
    # loser sees a unique-key violation and succeeds once the tables exist, so retry.
    jitter = random.Random(os.getpid())
    for attempt in range(STORAGE_ATTEMPTS):
        with _quiet_optuna():
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                )
            except ImportError as exc:
                raise ConfigError(f"no database driver for storage {url!r}: {exc}") from exc
            except Exception as exc:  # connection refused, bad credentials, schema race...
                if attempt + 1 < STORAGE_ATTEMPTS and _transient(exc):
                    time.sleep(0.5 * (attempt + 1) + jitter.random())
                    continue
                text = str(exc).strip()
                first_line = text.splitlines()[0] if text else type(exc).__name__
                raise ConfigError(
                    f"cannot open study storage '{redact_url(url)}': {first_line}"
                ) from exc
    raise AssertionError("unreachable")


def _transient(exc: BaseException) -> bool:
    """Errors worth retrying: a concurrent schema creation or a lock, not a refused login."""
    text = str(exc).lower()
    return any(s in text for s in ("unique", "duplicate", "already exists", "locked", "deadlock"))


def redact_url(url: str) -> str:
    """The URL with any password hidden (for messages and files)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: show no credentials at all
        return url.rsplit("@", 1)[-1]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's per-trial log lines and experimental-feature warnings (pertbench
    prints its own progress), restoring the user's logging level afterwards."""
    import warnings

    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` for the duration of one tuning command.

    The lock is an ``flock`` on ``DIR/.tune.lock``: the kernel releases it when the process
    dies, however it dies, so a killed run never blocks its own resumption.
    """
    path = Path(out_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(
                f"another 'pertbench tune' is running in '{out_dir}'; wait for it or choose another --out"
            ) from exc
        yield path
    finally:
        handle.close()


@dataclass(frozen=True)
class Progress:
    """Trial counts of a study, as the stopping rule sees them."""

    complete: int
    pruned: int
    failed: int
    interrupted: int
    running: int
    waiting: int
    #: Distinct positions of the search (fresh trials; a re-queued trial repeats one).
    indices: int = 0

    @property
    def finished(self) -> int:
        """Trials that count towards ``n_trials`` (complete, pruned, failed; not interrupted)."""
        return self.complete + self.pruned + self.failed

    def done(self, n_trials: int) -> bool:
        """True when no trial is queued and the search has ``n_trials`` positions."""
        return self.waiting == 0 and self.indices >= n_trials


def study_progress(study: Any) -> Progress:
    """Count trials by state; FAIL trials that were queued again count as interrupted."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counts = dict.fromkeys(("complete", "pruned", "failed", "interrupted", "running", "waiting"), 0)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.FAIL:
            counts["interrupted" if t.number in retried else "failed"] += 1
        elif t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.state == TrialState.WAITING:
            counts["waiting"] += 1
    fresh = sum(1 for t in trials if "failed_trial" not in t.system_attrs)
    return Progress(**counts, indices=fresh)


def requeue_trial(study: Any, trial: Any) -> bool:
    """Mark ``trial`` as interrupted and queue its parameters again (at most
    :data:`MAX_RETRY` times).

    A RUNNING trial (its process died) is failed here; a trial already failed because its
    process was stopped (Ctrl-C, SIGTERM) only gets its copy queued. Returns False when
    another process finished the trial first.
    """
    import copy

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage  # Optuna exposes no public handle on a loaded study's storage
    if trial.state == TrialState.RUNNING:
        try:
            storage.set_trial_user_attr(trial._trial_id, "error", INTERRUPTED_MESSAGE)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return True


def recover_interrupted_trials(study: Any, *, owners: set[int] | None = None) -> list[int]:
    """Fail every RUNNING trial of ``study`` and queue its parameters again.

    Only safe when no live process can own a RUNNING trial (the default storage of a
    locked run directory), or for the trials of ``owners``: process ids known to be dead
    (``system_attrs['pertbench_pid']``). Returns the numbers of the recovered trials.
    """
    from optuna.trial import TrialState

    from pertbench.tuning.sampling import OWNER_ATTR

    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owners is not None and trial.system_attrs.get(OWNER_ATTR) not in owners:
            continue
        if requeue_trial(study, trial):
            recovered.append(trial.number)
    return recovered
