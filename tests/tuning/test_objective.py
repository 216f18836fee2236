"""The tuning objective expression: parsed safely, evaluated exactly."""

from __future__ import annotations

import math

import pytest

from pertbench.errors import ConfigError
from pertbench.metrics.objective import DEFAULT_OBJECTIVE, Objective


def test_default_is_perturbench_objective():
    objective = Objective.parse()
    assert objective.expression == DEFAULT_OBJECTIVE == "rmse_average + 0.1 * rmse_rank_average"
    assert objective.metrics == ("rmse_average", "rmse_rank_average")
    assert objective.direction == "minimize"
    value = objective.evaluate({"rmse_average": 0.25, "rmse_rank_average": 0.4})
    assert value == pytest.approx(0.25 + 0.1 * 0.4, abs=1e-15)


def test_arithmetic_and_precedence():
    objective = Objective.parse("(a - b) / 2 + -c * 3", direction="maximize")
    assert objective.metrics == ("a", "b", "c")
    assert objective.evaluate({"a": 5.0, "b": 1.0, "c": 0.5}) == pytest.approx((5 - 1) / 2 - 1.5)
    assert objective.direction == "maximize"


def test_missing_metric_or_division_by_zero_is_nan():
    objective = Objective.parse("a / b")
    assert math.isnan(objective.evaluate({"a": 1.0}))
    assert math.isnan(objective.evaluate({"a": 1.0, "b": 0.0}))


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "a ** 2",
        "a if b else c",
        "a +",
        "1 + 2",
        "a.b",
        "True + a",
    ],
)
def test_forbidden_or_malformed_expressions_are_config_errors(text):
    with pytest.raises(ConfigError) as info:
        Objective.parse(text)
    assert "\n" not in str(info.value)


def test_bad_direction():
    with pytest.raises(ConfigError, match="minimize or maximize"):
        Objective.parse(None, direction="down")


def test_hpo_objective_scores_a_summary_with_expression_or_weights():
    from pertbench.metrics import hpo_objective

    summary = {"rmse_average": 0.5, "rmse_rank_average": 0.2, "cosine_logfc": 0.8}
    assert hpo_objective(summary) == pytest.approx(0.5 + 0.1 * 0.2)
    assert hpo_objective(summary, "rmse_average - cosine_logfc / 2") == pytest.approx(0.1)
    assert hpo_objective(summary, {"rmse_average": 1.0, "cosine_logfc": -1.0}) == pytest.approx(
        -0.3
    )
    with pytest.raises(ConfigError, match="'pearson_delta' is missing"):
        hpo_objective(summary, "rmse_average + pearson_delta")
    with pytest.raises(ConfigError, match="'rmse_average' is missing or undefined"):
        hpo_objective({"rmse_average": float("nan"), "rmse_rank_average": 0.1})
