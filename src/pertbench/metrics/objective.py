"""The objective of hyperparameter searches: an arithmetic expression over metric names.

PerturBench's objective, the default, is ``rmse_average + 0.1 * rmse_rank_average`` on
the validation split (lower is better). Users may give any expression built from metric
names, numbers, ``+ - * /`` and parentheses; it is parsed once with :mod:`ast` (never
``eval``), so a typo is reported before any model is trained. :func:`hpo_objective`
scores an evaluation with it; :mod:`pertbench.tuning` optimises it.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pertbench.errors import ConfigError

DEFAULT_OBJECTIVE = "rmse_average + 0.1 * rmse_rank_average"

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


@dataclass(frozen=True)
class Objective:
    """A parsed objective expression.

    Attributes
    ----------
    expression
        The text as given (whitespace-normalised).
    direction
        ``"minimize"`` (default, for errors and ranks) or ``"maximize"``.
    metrics
        Metric names the expression reads, in order of first appearance.
    """

    expression: str
    direction: str
    metrics: tuple[str, ...]

    @classmethod
    def parse(cls, expression: str | None = None, *, direction: str = "minimize") -> Objective:
        """Parse ``expression`` (default: PerturBench's objective).

        Raises
        ------
        ConfigError
            Empty or malformed expression, a forbidden construct, or a bad direction.
        """
        text = " ".join((expression or DEFAULT_OBJECTIVE).split())
        if direction not in ("minimize", "maximize"):
            raise ConfigError(
                f"objective direction must be minimize or maximize, got {direction!r}"
            )
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ConfigError(
                f"cannot parse objective {text!r}: use metric names, numbers, + - * / and ()"
            ) from exc
        names: list[str] = []
        _check(tree.body, text, names)
        if not names:
            raise ConfigError(f"objective {text!r} names no metric; e.g. '{DEFAULT_OBJECTIVE}'")
        return cls(expression=text, direction=direction, metrics=tuple(dict.fromkeys(names)))

    def evaluate(self, values: Mapping[str, float]) -> float:
        """Value of the objective given metric values (NaN if a metric is missing or NaN)."""
        tree = ast.parse(self.expression, mode="eval")
        try:
            result = _evaluate(tree.body, values)
        except ZeroDivisionError:
            return math.nan
        return float(result)


def _check(node: ast.AST, text: str, names: list[str]) -> None:
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, text, names)
        _check(node.right, text, names)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, text, names)
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        if isinstance(node.value, bool):
            raise ConfigError(f"objective {text!r}: booleans are not allowed")
    elif isinstance(node, ast.Name):
        names.append(node.id)
    else:
        raise ConfigError(
            f"objective {text!r}: only metric names, numbers, + - * / and () are allowed"
        )


def _evaluate(node: ast.AST, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    if isinstance(node, ast.Constant):
        return float(node.value)
    assert isinstance(node, ast.Name)
    value = values.get(node.id)
    return math.nan if value is None else float(value)


def hpo_objective(summary, objective: str | Objective | Mapping[str, float] | None = None) -> float:
    """Value of the hyperparameter objective for one evaluation (lower is better by default).

    Parameters
    ----------
    summary
        An :class:`~pertbench.metrics.EvaluationResult`, its ``summary`` table, or a
        mapping metric -> value.
    objective
        An expression (default :data:`DEFAULT_OBJECTIVE`), a parsed :class:`Objective`, or
        weights ``{metric: weight}`` summed as ``sum(weight * metric)`` (give a negative
        weight to a higher-is-better metric, e.g. cosine_logfc).

    Raises
    ------
    ConfigError
        A metric of the objective is missing or undefined (NaN) in the summary.
    """
    if hasattr(summary, "summary"):
        summary = summary.summary
    if isinstance(summary, pd.DataFrame):
        values = dict(zip(summary["metric"], summary["value"], strict=True))
    else:
        values = dict(summary)
    if isinstance(objective, Mapping):
        weights = {str(k): float(w) for k, w in objective.items()}
        names = tuple(weights)
    else:
        parsed = objective if isinstance(objective, Objective) else Objective.parse(objective)
        names = parsed.metrics
    for metric in names:
        value = values.get(metric)
        if value is None or not np.isfinite(value):
            raise ConfigError(
                f"objective metric '{metric}' is missing or undefined; evaluate it "
                "(e.g. metrics='default') or change the objective"
            )
    if isinstance(objective, Mapping):
        return float(sum(w * float(values[m]) for m, w in weights.items()))
    return parsed.evaluate(values)
