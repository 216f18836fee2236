"""Suggestions that do not depend on crashes or timing: a pure function of (seed, trial
index, the finished history visible to that index).

Optuna's samplers keep state between trials and read whatever the storage holds when a
trial starts, so a run that was killed and resumed (or whose workers finished in another
order) continues with other suggestions than an uninterrupted one. pertbench instead plans
every trial itself:

- **Trial index.** Trial *k* is the *k*-th configuration of the search. A fresh trial's index
  is the number of fresh trials created before it; a trial re-queued after its process died
  (Optuna's retry, ``system_attrs['retry_history']``) keeps the index of the trial it
  repeats, and the dead attempt is *interrupted*: it belongs to no index.
- **Visible history.** Trial *k* sees the finished trials (complete, pruned, failed; never
  interrupted ones) of indices ``0 .. k - W`` for ``W`` local workers (``W = 1``: every earlier
  trial). With several workers a trial waits until those have finished, which they almost
  always have: at most ``W - 1`` other trials run beside it.
- **Suggestion.** A fresh TPE sampler seeded from ``(seed, k)`` is given exactly that history
  (an in-memory copy, in index order) and asked for one configuration; the real trial takes
  it (:class:`PlannedSampler`). Pruning decisions compare against the same history
  (:class:`HistoryPruner`).

So an uninterrupted run and a run killed at any point and resumed, with the same seed and
the same number of workers, produce the same configurations, values and best trial; a
re-queued trial repeats the killed configuration with the same training seed. This module
imports Optuna; :mod:`pertbench.tuning.study` imports it only when a search starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler

#: System attribute naming the process that runs a trial (to recover a dead worker's trial).
OWNER_ATTR = "pertbench_pid"
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
WAIT_POLL_SECONDS = 0.25


def retried_numbers(trials: Sequence[Any]) -> set[int]:
    """Numbers of the trials that were re-queued after their process died (interrupted)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def trial_indices(trials: Sequence[Any]) -> dict[int, int]:
    """Trial number -> index in the search (see the module docstring)."""
    fresh = sorted(t.number for t in trials if "failed_trial" not in t.system_attrs)
    position = {number: i for i, number in enumerate(fresh)}
    out = {}
    for t in trials:
        origin = t.system_attrs.get("retry_history", [t.number])[0]
        if origin in position:
            out[t.number] = position[origin]
        else:  # the original is gone from the storage: count the fresh trials before it
            out[t.number] = int(np.searchsorted(fresh, origin))
    return out


def settled_trials(trials: Sequence[Any]) -> dict[int, Any]:
    """Index -> the finished, not interrupted trial of that index."""
    retried = retried_numbers(trials)
    indices = trial_indices(trials)
    return {
        indices[t.number]: t
        for t in trials
        if t.state.name in FINISHED_STATES and t.number not in retried
    }


@dataclass
class SearchPlan:
    """How suggestions are made: the seed, the space, and the lag of the visible history.

    Attributes
    ----------
    seed
        Seeds the sampler of every trial (with the trial index).
    space
        The search space (see :mod:`pertbench.models.search_space`).
    direction
        ``"minimize"`` or ``"maximize"``.
    n_startup_trials
        Random trials before TPE models the history.
    lag
        Trial *k* sees indices ``0 .. k - lag``: the number of local workers.
    wait
        Wait for that history to finish (local workers of one run); without it, trial *k*
        sees whatever of it has finished (a study shared between machines).
    """

    seed: int
    space: Mapping[str, Mapping[str, Any]]
    direction: str
    n_startup_trials: int
    lag: int = 1
    wait: bool = False
    log: Callable[[str], None] = field(default=lambda message: None, repr=False)

    def history(self, trials: Sequence[Any], index: int) -> list[Any]:
        """The finished trials visible to trial ``index``, in index order."""
        settled = settled_trials(trials)
        return [settled[i] for i in sorted(settled) if i <= index - self.lag]

    def missing(self, trials: Sequence[Any], index: int) -> list[int]:
        """Indices trial ``index`` must see that have not finished yet."""
        settled = settled_trials(trials)
        return [i for i in range(index - self.lag + 1) if i not in settled]

    def propose(self, history: Sequence[Any], index: int) -> dict[str, Any]:
        """The configuration of trial ``index`` given its visible ``history``."""
        import optuna

        from pertbench.models.search_space import suggest_params
        from pertbench.tuning.storage import _quiet_optuna

        state = np.random.SeedSequence([int(self.seed), int(index)]).generate_state(1)[0]
        with _quiet_optuna():
            sampler = optuna.samplers.TPESampler(
                seed=int(state), n_startup_trials=self.n_startup_trials, multivariate=True
            )
            copy = optuna.create_study(direction=self.direction, sampler=sampler)
            copy.add_trials(history)
            trial = copy.ask()
            return suggest_params(trial, self.space)


class PlannedSampler(BaseSampler):
    """An Optuna sampler that hands each new trial the configuration :class:`SearchPlan`
    proposes for its index (a re-queued trial keeps its parameters).

    ``on_trial_created`` is called as soon as the trial exists in the storage (the search
    loop releases its "ask" lock there).
    """

    def __init__(self, plan: SearchPlan, on_trial_created: Callable[[], None] | None = None):
        self.plan = plan
        self.on_trial_created = on_trial_created or (lambda: None)
        self._planned: dict[int, dict[str, Any]] = {}

    # Optuna's sampler interface ----------------------------------------------------------
    def reseed_rng(self) -> None:  # suggestions carry their own seeds
        pass

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Any, trial: Any) -> None:
        self.on_trial_created()
        study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, os.getpid())
        if trial.distributions:  # a re-queued trial: its parameters are fixed
            return
        trials = study.get_trials(deepcopy=False)
        index = trial_indices(trials)[trial.number]
        if self.plan.wait:
            trials = self._wait_for_history(study, index, trials)
        self._planned[trial.number] = self.plan.propose(self.plan.history(trials, index), index)

    def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
        planned = self._planned.get(trial.number, {})
        if name not in planned:
            raise KeyError(f"trial {trial.number} has no planned value for '{name}'")
        return planned[name]

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._planned.pop(trial.number, None)

    # -------------------------------------------------------------------------------------
    def _wait_for_history(self, study: Any, index: int, trials: list[Any]) -> list[Any]:
        announced = False
        while True:
            missing = self.plan.missing(trials, index)
            if not missing:
                return trials
            if not announced:
                self.plan.log(
                    f"trial {index} waits for trial(s) {', '.join(map(str, missing))} to finish "
                    "(the same history as any run with these workers)"
                )
                announced = True
            time.sleep(WAIT_POLL_SECONDS)
            trials = study.get_trials(deepcopy=False)


class _HistoryView:
    """The part of a study a pruner may look at: the history visible to one trial."""

    def __init__(self, study: Any, trials: Sequence[Any]) -> None:
        self._study = study
        self._trials = list(trials)
        self._storage = study._storage
        self.direction = study.direction
        self.directions = study.directions

    def get_trials(self, deepcopy: bool = True, states: Sequence[Any] | None = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]


class HistoryPruner(BasePruner):
    """Wraps an Optuna pruner so it compares a trial only against its visible history."""

    def __init__(self, inner: Any, plan: SearchPlan) -> None:
        self.inner = inner
        self.plan = plan

    def prune(self, study: Any, trial: Any) -> bool:
        trials = study.get_trials(deepcopy=False)
        index = trial_indices(trials).get(trial.number, 0)
        return bool(self.inner.prune(_HistoryView(study, self.plan.history(trials, index)), trial))
