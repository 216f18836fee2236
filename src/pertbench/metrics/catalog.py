"""Names of all metrics, their families, direction, and how a metric selection is parsed.

Names: ``<metric>_<aggregation>`` (fit), ``<metric>_rank_<aggregation>`` (rank),
``matrix_distance``, ``jaccard_top<k>``, ``jaccard_abs_top<k>``, ``overlap_top<k>``,
``direction_agreement`` (DE), ``edistance``, ``mmd``, ``mean_var_kde`` (distribution).

Selections: ``"default"`` = fit + rank + DE on the aggregations average, delta, logfc and
var; ``"all"`` adds the ``logp`` aggregation and the distribution metrics; or a comma
list mixing family names (``fit``, ``rank``, ``de``, ``distribution``), ``default``,
``all`` and metric names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pertbench.errors import ConfigError
from pertbench.metrics.aggregations import AGGREGATIONS, DEFAULT_AGGREGATIONS
from pertbench.metrics.fit import FIT_METRICS, HIGHER_IS_BETTER

FAMILIES = ("fit", "rank", "de", "distribution")
DISTRIBUTION_METRICS = ("edistance", "mmd", "mean_var_kde")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, family, base metric, aggregation and direction."""

    name: str
    family: str
    base: str
    aggregation: str | None = None
    higher_is_better: bool = False
    per_covariate: bool = False
    """True for metrics with one value per covariate combination (matrix_distance)."""


def de_metric_names(top_k: int) -> tuple[str, ...]:
    return (
        f"jaccard_top{top_k}",
        f"jaccard_abs_top{top_k}",
        f"overlap_top{top_k}",
        "direction_agreement",
    )


def catalogue(top_k: int = 100) -> dict[str, MetricSpec]:
    """Every metric the evaluator can compute, in output order."""
    out: dict[str, MetricSpec] = {}
    for agg in AGGREGATIONS:
        for m in FIT_METRICS:
            name = f"{m}_{agg}"
            out[name] = MetricSpec(name, "fit", m, agg, m in HIGHER_IS_BETTER)
    for agg in AGGREGATIONS:
        for m in FIT_METRICS:
            name = f"{m}_rank_{agg}"
            out[name] = MetricSpec(name, "rank", m, agg, False)
    out["matrix_distance"] = MetricSpec(
        "matrix_distance", "rank", "matrix_distance", "logfc", False, per_covariate=True
    )
    for name in de_metric_names(top_k):
        out[name] = MetricSpec(name, "de", name, None, True)
    for name in DISTRIBUTION_METRICS:
        out[name] = MetricSpec(name, "distribution", name, None, False)
    return out


def _family(cat: dict[str, MetricSpec], family: str, aggregations: Iterable[str]) -> list[str]:
    aggs = set(aggregations)
    return [
        s.name
        for s in cat.values()
        if s.family == family and (s.aggregation is None or s.aggregation in aggs)
    ]


def resolve_metrics(
    selection: str | Iterable[str] = "default", *, top_k: int = 100
) -> list[MetricSpec]:
    """Turn a selection (see module docstring) into an ordered list of metrics.

    Raises
    ------
    ConfigError
        An unknown name (the message lists families and a few valid names).
    """
    cat = catalogue(top_k)
    items = (
        [s.strip() for s in selection.split(",")]
        if isinstance(selection, str)
        else [str(s).strip() for s in selection]
    )
    items = [s for s in items if s]
    if not items:
        raise ConfigError("no metrics selected; use default, all, a family or metric names")
    chosen: set[str] = set()
    for item in items:
        key = item.lower()
        if key == "default":
            for fam in ("fit", "rank", "de"):
                chosen.update(_family(cat, fam, DEFAULT_AGGREGATIONS))
        elif key == "all":
            for fam in FAMILIES:
                chosen.update(_family(cat, fam, AGGREGATIONS))
        elif key in FAMILIES:
            chosen.update(_family(cat, key, DEFAULT_AGGREGATIONS))
        elif item in cat:
            chosen.add(item)
        else:
            examples = ", ".join(["rmse_average", "cosine_rank_logfc", f"jaccard_top{top_k}"])
            raise ConfigError(
                f"unknown metric '{item}'; use default, all, a family ({', '.join(FAMILIES)}) "
                f"or metric names such as {examples}"
            )
    return [spec for name, spec in cat.items() if name in chosen]


def higher_is_better(name: str, *, top_k: int = 100) -> bool:
    """Direction of a metric by name (normalised scores are always higher-is-better)."""
    spec = catalogue(top_k).get(name)
    if spec is None:
        raise ConfigError(f"unknown metric '{name}'")
    return spec.higher_is_better
