"""The metric registry: one spec per metric, with its meaning and its compute function.

Every metric the evaluator can compute is a :class:`MetricSpec`: name, family,
aggregation, reference, direction, best value, what it needs from a covariate block and
the function that computes it. The catalogue (:func:`catalogue`), the selection of
``metrics=`` / ``--metrics`` (:func:`resolve_metrics`), the named profiles (``default``,
``all``, and any added with :func:`register_profile`), the direction of normalised
scores and the report's arrows (:func:`higher_is_better`, :func:`direction`) all derive
from it. Metrics of other installed packages register through the entry-point group
``pertbench.metrics`` (see :func:`plugin_specs`) and are ordinary specs.

Built-in names: ``<metric>_<aggregation>`` (fit), ``<metric>_rank_<aggregation>``
(rank), ``matrix_distance``, ``jaccard_top<k>``, ``jaccard_abs_top<k>``,
``overlap_top<k>``, ``direction_agreement`` (DE), ``edistance``, ``mmd``,
``mean_var_kde`` (distribution).

Selections: a comma list (or list) mixing profile names (``default`` = fit + rank + DE
on the aggregations average, delta, logfc and var; ``all`` = every family on every
aggregation, plug-ins included), family names (``fit``, ``rank``, ``de``,
``distribution`` or a plug-in's family; default aggregations) and metric names.

What a spec needs, and the signature of its ``compute`` (the evaluator calls it once per
covariate block with the block's scored groups, n of them):

- ``profiles``: ``compute(pair) -> (n,)``, ``pair`` a
  :class:`~pertbench.metrics.fit.ProfilePair` of the spec's aggregation (``pair.pred``,
  ``pair.truth``: (n, genes); row ranks shared through ``pair.pred_ranks``/``truth_ranks``).
- ``moments``: ``compute(pred_mean, pred_var, truth_mean, truth_var) -> float`` per group.
- ``de``: ``compute(de) -> (n,)``, ``de`` a :class:`~pertbench.metrics.de.DEPair`
  (Wilcoxon z and FDR of both sides, deltas, ``top_k``, ``fdr``).
- ``cells``: ``compute(pred_cells, truth_cells) -> float`` per group, cells in the
  block's PCA space.
- ``distances``: the evaluator computes the N x N matrix of ``distance`` (a kind of
  :data:`pertbench.metrics.rank.DISTANCE_KINDS`) ONCE per block, source and aggregation,
  and gives every spec of that kind its column ranks: ``compute(ranks) -> (n,)``
  (``None``: the ranks themselves).
- ``covariate`` (``per_covariate=True``): ``compute(pair) -> float`` for the block.
- ``block``: ``compute(view) -> (n,)``, ``view`` a :class:`~pertbench.metrics.score.BlockView`
  with everything known about the block (statistics of both sides, controls, and with
  ``all_groups=True`` the observed aggregates of every group of the covariate block in the
  truth, whatever its split): the hook for metrics that look beyond one group
  (reference-aware metrics, genetic interactions).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

from pertbench.errors import ConfigError
from pertbench.metrics.aggregations import AGGREGATIONS, DEFAULT_AGGREGATIONS
from pertbench.metrics.fit import FIT_METRICS, HIGHER_IS_BETTER

FAMILIES = ("fit", "rank", "de", "distribution", "reference")
DISTRIBUTION_METRICS = ("edistance", "mmd", "mean_var_kde")
NEEDS = ("profiles", "moments", "de", "cells", "distances", "covariate", "block")
#: What delta-type metrics are taken against: the covariate's controls, or ``centroid``
#: (Systema's mean perturbation profile; needs="block" with all_groups=True).
REFERENCES = ("control", "centroid")
COMPUTED_REFERENCES = ("control", "centroid")
#: Fit measures offered against the centroid (errors do not depend on the reference).
CENTROID_METRICS = ("cosine", "pearson", "spearman", "r2")
ENTRY_POINT_GROUP = "pertbench.metrics"


class MetricPluginWarning(UserWarning):
    """A metric plug-in could not be loaded (it is left out of the catalogue)."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric: what it means, which way is better, what it needs, how it is computed.

    Attributes
    ----------
    name
        Unique name (a column of ``per_group.csv`` or ``per_covariate.csv``).
    family
        ``fit``, ``rank``, ``de``, ``distribution`` (built-in) or a plug-in's own family.
    base
        The underlying measure (``rmse``, ``cosine``, ... or the metric's own name).
    aggregation
        The aggregation compared (``average``, ``delta``, ...), ``None`` when not one.
    higher_is_better
        Direction (normalised scores follow it, report arrows show it).
    per_covariate
        One value per covariate combination (``per_covariate.csv``) instead of per group.
    needs
        What the compute function receives (see the module docstring): ``profiles``,
        ``moments``, ``de``, ``cells``, ``distances`` or ``covariate``.
    reference
        What deltas are taken against: ``control`` (``centroid`` reserved).
    best
        The best attainable value (``None`` when unbounded).
    compute
        The function (signature by ``needs``).
    distance
        For ``needs="distances"``: the distance kind whose N x N matrix it ranks.
    all_groups
        The metric reads the observed aggregates of every group of its covariate block,
        whatever the split (:attr:`BlockView.all_groups`); they are computed only then.
    diagnostic
        A property of the data (the same for every source, e.g. ``systematic_variation``):
        reported, never normalised nor compared with baselines.
    description
        One line for the catalogue.
    source
        ``pertbench`` or the distribution providing a plug-in.
    """

    name: str
    family: str
    base: str
    aggregation: str | None = None
    higher_is_better: bool = False
    per_covariate: bool = False
    needs: str = "profiles"
    reference: str = "control"
    best: float | None = None
    compute: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    distance: str | None = None
    all_groups: bool = False
    diagnostic: bool = False
    description: str = ""
    source: str = "pertbench"

    @property
    def direction(self) -> str:
        """``higher`` or ``lower`` (is better)."""
        return "higher" if self.higher_is_better else "lower"

    def check(self) -> None:
        """Raise ConfigError when the spec is not usable by the evaluator."""
        if not self.name or not isinstance(self.name, str) or "/" in self.name:
            raise ConfigError(f"metric name {self.name!r} must be a non-empty string without '/'")
        if self.needs not in NEEDS:
            raise ConfigError(
                f"metric '{self.name}' needs {self.needs!r}; use one of {', '.join(NEEDS)}"
            )
        if self.reference not in REFERENCES:
            raise ConfigError(
                f"metric '{self.name}' has reference {self.reference!r}; use one of "
                f"{', '.join(REFERENCES)}"
            )
        if self.reference == "centroid" and not (self.needs == "block" and self.all_groups):
            raise ConfigError(
                f"metric '{self.name}': reference 'centroid' is computed from every group "
                "of the covariate block; use needs='block' and all_groups=True"
            )
        if self.needs == "distances":
            from pertbench.metrics.rank import DISTANCE_KINDS

            if self.distance not in DISTANCE_KINDS:
                raise ConfigError(
                    f"metric '{self.name}' ranks distance {self.distance!r}; use one of "
                    f"{', '.join(DISTANCE_KINDS)}"
                )
        elif self.compute is None:
            raise ConfigError(f"metric '{self.name}' has no compute function")
        if self.per_covariate != (self.needs == "covariate"):
            raise ConfigError(
                f"metric '{self.name}': per_covariate=True goes with needs='covariate'"
            )
        if self.needs in ("profiles", "covariate") and self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"metric '{self.name}' compares aggregation {self.aggregation!r}; use one of "
                f"{', '.join(AGGREGATIONS)}"
            )


# ---------------------------------------------------------------------------------------
# Built-in metrics
# ---------------------------------------------------------------------------------------
def de_metric_names(top_k: int) -> tuple[str, ...]:
    return (
        f"jaccard_top{top_k}",
        f"jaccard_abs_top{top_k}",
        f"overlap_top{top_k}",
        "direction_agreement",
    )


@lru_cache(maxsize=16)
def _builtin_specs(top_k: int) -> tuple[MetricSpec, ...]:
    from pertbench.metrics import de, distribution, fit, rank

    specs: list[MetricSpec] = []
    for agg in AGGREGATIONS:
        for m in FIT_METRICS:
            higher = m in HIGHER_IS_BETTER
            specs.append(
                MetricSpec(
                    f"{m}_{agg}",
                    "fit",
                    m,
                    agg,
                    higher,
                    compute=partial(fit.pair_metric, m),
                    best=fit.BEST_VALUE[m],
                    description=f"{m} of the predicted vs observed {agg} profile",
                )
            )
    for agg in AGGREGATIONS:
        for m in FIT_METRICS:
            specs.append(
                MetricSpec(
                    f"{m}_rank_{agg}",
                    "rank",
                    m,
                    agg,
                    False,
                    needs="distances",
                    distance=m,
                    best=0.0,
                    description=f"rank of the observed {agg} profile among all predictions "
                    f"of its covariates, by {m} (0 best, 0.5 chance)",
                )
            )
    specs.append(
        MetricSpec(
            "matrix_distance",
            "rank",
            "matrix_distance",
            "logfc",
            False,
            per_covariate=True,
            needs="covariate",
            compute=rank.pair_matrix_distance,
            best=0.0,
            description="Frobenius distance of the predicted and observed logfc cosine "
            "similarity matrices of a covariate combination",
        )
    )
    de_compute = {
        f"jaccard_top{top_k}": partial(de.pair_jaccard, absolute=False),
        f"jaccard_abs_top{top_k}": partial(de.pair_jaccard, absolute=True),
        f"overlap_top{top_k}": de.pair_overlap,
        "direction_agreement": de.pair_direction_agreement,
    }
    for name in de_metric_names(top_k):
        specs.append(
            MetricSpec(
                name,
                "de",
                name,
                None,
                True,
                needs="de",
                compute=de_compute[name],
                best=1.0,
                description="agreement of Wilcoxon DE genes (group vs its controls)",
            )
        )
    for name, needs, fn in (
        ("edistance", "cells", distribution.edistance),
        ("mmd", "cells", distribution.mmd),
        ("mean_var_kde", "moments", distribution.pair_mean_var_kde),
    ):
        specs.append(
            MetricSpec(
                name,
                "distribution",
                name,
                None,
                False,
                needs=needs,
                compute=fn,
                best=0.0,
                description="distance between predicted and observed cell distributions",
            )
        )
    specs.extend(_reference_specs())
    return tuple(specs)


def _reference_specs() -> list[MetricSpec]:
    """Systema's reference-aware metrics (family ``reference``)."""
    from pertbench.metrics import systema

    specs = [
        MetricSpec(
            f"{m}_delta_centroid",
            "reference",
            m,
            "delta",
            m in HIGHER_IS_BETTER,
            needs="block",
            reference="centroid",
            all_groups=True,
            compute=partial(systema.block_delta_centroid, m),
            best=1.0,
            description=f"{m} of the predicted vs observed profile, both taken from the "
            "centroid of the covariate's perturbations (Systema)",
        )
        for m in CENTROID_METRICS
    ]
    specs.append(
        MetricSpec(
            "centroid_accuracy",
            "reference",
            "centroid_accuracy",
            "average",
            True,
            needs="block",
            compute=systema.block_centroid_accuracy,
            best=1.0,
            description="share of the covariate's other perturbations whose observed "
            "average is farther from the prediction than its own (1 best, 0.5 chance)",
        )
    )
    specs.append(
        MetricSpec(
            "systematic_variation",
            "reference",
            "systematic_variation",
            "delta",
            False,
            needs="block",
            reference="centroid",
            all_groups=True,
            diagnostic=True,
            compute=systema.block_systematic_variation,
            description="data diagnostic: cos(truth - control, centroid - control), "
            "the share of an effect that is the shift shared by all perturbations",
        )
    )
    return specs


# ---------------------------------------------------------------------------------------
# Plug-ins (entry points) and in-process registration
# ---------------------------------------------------------------------------------------
_REGISTERED: dict[str, MetricSpec] = {}
_PLUGIN_CACHE: list[MetricSpec] | None = None
_PLUGIN_PROBLEMS: list[str] = []


def _entry_points():
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP)


def _as_specs(obj: Any) -> list[MetricSpec]:
    if callable(obj) and not isinstance(obj, MetricSpec):
        obj = obj()
    if isinstance(obj, MetricSpec):
        return [obj]
    specs = list(obj)
    bad = [type(s).__name__ for s in specs if not isinstance(s, MetricSpec)]
    if bad:
        raise TypeError(f"expected MetricSpec objects, got {', '.join(bad)}")
    return specs


def plugin_specs() -> list[MetricSpec]:
    """Metric specs provided by installed packages through entry points.

    An entry point of group ``pertbench.metrics`` names a :class:`MetricSpec`, a list of
    them, or a function returning either. A plug-in that fails to load, whose spec is
    invalid or whose name is already taken is left out with a
    :class:`MetricPluginWarning` (listed by :func:`plugin_problems`); the rest of the
    catalogue is unaffected. Loaded once per process (:func:`reload_plugins` reloads).
    """
    global _PLUGIN_CACHE
    if _PLUGIN_CACHE is not None:
        return _PLUGIN_CACHE
    taken = {s.name for s in _builtin_specs(100)}
    found: list[MetricSpec] = []
    _PLUGIN_PROBLEMS.clear()
    for ep in sorted(_entry_points(), key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value.split(":")[0]
        try:
            specs = _as_specs(ep.load())
            for spec in specs:
                spec.check()
                if spec.name in taken or _top_k_name(spec.name) is not None:
                    raise ConfigError(f"metric name '{spec.name}' is already taken")
                taken.add(spec.name)
        except Exception as exc:  # a broken plug-in must not break the evaluator
            problem = f"metric plug-in '{ep.name}' ({dist}) was left out: {exc}"
            _PLUGIN_PROBLEMS.append(problem)
            warnings.warn(problem, MetricPluginWarning, stacklevel=2)
            continue
        found.extend(s if s.source != "pertbench" else _with_source(s, str(dist)) for s in specs)
    _PLUGIN_CACHE = found
    return found


def _with_source(spec: MetricSpec, source: str) -> MetricSpec:
    from dataclasses import replace

    return replace(spec, source=source)


def plugin_problems() -> list[str]:
    """Why plug-ins were left out of the catalogue (empty when all loaded)."""
    plugin_specs()
    return list(_PLUGIN_PROBLEMS)


def reload_plugins() -> None:
    """Forget the loaded plug-ins; the next catalogue access reads the entry points again."""
    global _PLUGIN_CACHE
    _PLUGIN_CACHE = None


def register_metric(spec: MetricSpec, *, replace: bool = False) -> MetricSpec:
    """Add a metric to the catalogue of this process (e.g. from a script or a notebook).

    Raises ConfigError when the spec is invalid or its name is taken (unless ``replace``
    and the name is not a built-in one).
    """
    spec.check()
    builtin = {s.name for s in _builtin_specs(100)}
    if spec.name in builtin or _top_k_name(spec.name) is not None:
        raise ConfigError(f"'{spec.name}' is a built-in metric name; choose another")
    if not replace and (spec.name in _REGISTERED or spec.name in {s.name for s in plugin_specs()}):
        raise ConfigError(f"metric '{spec.name}' is already registered")
    _REGISTERED[spec.name] = spec
    return spec


def unregister_metric(name: str) -> None:
    """Remove a metric added with :func:`register_metric` (no error if absent)."""
    _REGISTERED.pop(name, None)


# ---------------------------------------------------------------------------------------
# The catalogue, profiles and selections
# ---------------------------------------------------------------------------------------
def catalogue(top_k: int = 100) -> dict[str, MetricSpec]:
    """Every metric the evaluator can compute, in output order (plug-ins last)."""
    out = {s.name: s for s in _builtin_specs(top_k)}
    for spec in [*plugin_specs(), *_REGISTERED.values()]:
        out.setdefault(spec.name, spec)
    return out


def _family(cat: dict[str, MetricSpec], family: str, aggregations: Iterable[str]) -> list[str]:
    aggs = set(aggregations)
    return [
        s.name
        for s in cat.values()
        if s.family == family and (s.aggregation is None or s.aggregation in aggs)
    ]


def _default_profile(cat: dict[str, MetricSpec]) -> list[str]:
    families = ("fit", "rank", "de", "reference")
    return [n for fam in families for n in _family(cat, fam, DEFAULT_AGGREGATIONS)]


def _all_profile(cat: dict[str, MetricSpec]) -> list[str]:
    return list(cat)


_PROFILES: dict[str, Callable[[dict[str, MetricSpec]], list[str]] | tuple[str, ...]] = {
    "default": _default_profile,
    "all": _all_profile,
}


def register_profile(
    name: str,
    metrics: Iterable[str] | Callable[[dict[str, MetricSpec]], list[str]],
    *,
    replace: bool = False,
) -> None:
    """Add a named metric profile (selectable as ``metrics=NAME`` or ``--profile NAME``).

    ``metrics`` is a list of metric names (``_top<k>`` names follow ``top_k``, written
    with k = 100) or a function of the catalogue returning one.
    """
    key = name.strip().lower()
    if not key or key in FAMILIES:
        raise ConfigError(f"profile name {name!r} is empty or a family name")
    if key in _PROFILES and not replace:
        raise ConfigError(f"profile '{key}' already exists")
    _PROFILES[key] = metrics if callable(metrics) else tuple(str(m) for m in metrics)


def profiles() -> list[str]:
    """Names of the metric profiles."""
    return list(_PROFILES)


def profile_metrics(name: str, *, top_k: int = 100) -> list[str]:
    """Metric names of a profile, in catalogue order."""
    key = name.strip().lower()
    if key not in _PROFILES:
        raise ConfigError(f"unknown metric profile '{name}'; choose one of {', '.join(_PROFILES)}")
    cat = catalogue(top_k)
    chosen = _PROFILES[key]
    names = chosen(cat) if callable(chosen) else [_retarget_top_k(n, top_k) for n in chosen]
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise ConfigError(
            f"profile '{key}' names unknown metric(s) {', '.join(unknown[:5])}; is the "
            "package providing them installed?"
        )
    wanted = set(names)
    return [n for n in cat if n in wanted]


def resolve_metrics(
    selection: str | Iterable[str] | None = "default", *, top_k: int = 100
) -> list[MetricSpec]:
    """Turn a selection (see module docstring) into an ordered list of metric specs.

    Raises
    ------
    ConfigError
        An unknown name (the message lists profiles, families and a few valid names).
    """
    cat = catalogue(top_k)
    if selection is None:
        selection = "default"
    items = (
        [s.strip() for s in selection.split(",")]
        if isinstance(selection, str)
        else [str(s).strip() for s in selection]
    )
    items = [s for s in items if s]
    if not items:
        raise ConfigError("no metrics selected; use default, all, a family or metric names")
    families = dict.fromkeys([*FAMILIES, *(s.family for s in cat.values())])
    chosen: set[str] = set()
    for item in items:
        key = item.lower()
        if item in cat:
            chosen.add(item)
        elif key in _PROFILES:
            chosen.update(profile_metrics(key, top_k=top_k))
        elif key in families:
            chosen.update(_family(cat, key, DEFAULT_AGGREGATIONS))
        else:
            examples = ", ".join(["rmse_average", "cosine_rank_logfc", f"jaccard_top{top_k}"])
            raise ConfigError(
                f"unknown metric '{item}'; use a profile ({', '.join(_PROFILES)}), a family "
                f"({', '.join(families)}) or metric names such as {examples}"
            )
    return [spec for name, spec in cat.items() if name in chosen]


_TOP_K = re.compile(r"^(jaccard_top|jaccard_abs_top|overlap_top)(\d+)$")


def _top_k_name(name: str) -> int | None:
    match = _TOP_K.match(name)
    return int(match.group(2)) if match else None


def _retarget_top_k(name: str, top_k: int) -> str:
    match = _TOP_K.match(name)
    return f"{match.group(1)}{top_k}" if match else name


def metric_spec(name: str) -> MetricSpec | None:
    """The spec of a metric by name (``_top<k>`` names for any k), ``None`` if unknown."""
    k = _top_k_name(name)
    return catalogue(k if k is not None else 100).get(name)


def higher_is_better(name: str, *, top_k: int = 100) -> bool:
    """Direction of a metric by name (normalised scores are always higher-is-better)."""
    spec = catalogue(top_k).get(name) or metric_spec(name)
    if spec is None:
        raise ConfigError(f"unknown metric '{name}'")
    return spec.higher_is_better


def direction(name: str) -> str | None:
    """``higher`` / ``lower`` (is better) for a metric name; ``normalized/<m>`` and ``normalized_best/<m>`` are higher;
    ``<reference>/<m>`` follows ``m``; ``None`` for names outside the catalogue."""
    head, _, tail = name.partition("/")
    if tail:
        return "higher" if head in ("normalized", "normalized_best") else direction(tail)
    spec = metric_spec(name)
    return None if spec is None else spec.direction
