"""Exact verification of an estimate: patch its strongest cells and a random sample exactly.

Attribution patching is a screen, not a measurement (Kramar et al. 2024 recommend verifying its
top candidates; published agreement with exact patching ranges from excellent for attention
outputs to poor for MLP outputs). :func:`verify` patches exactly, with the batched engine and
only those cells, the ``top`` cells the estimate ranks highest and ``random`` cells drawn
uniformly from the rest, and returns one Dataset with ``estimate`` and ``exact`` on the same
grid (``exact`` is NaN where it was not measured, never 0).

From the random draw it bounds what the screen may have missed: of ``n`` random cells, ``x``
have an exact effect above ``threshold`` (default: the weakest exact effect among the verified
top cells), and the one-sided Clopper-Pearson upper bound at ``confidence`` on the share of all
unverified cells (those outside the top) exceeding it is ``beta.ppf(confidence, x + 1, n - x)``
(1 when ``x == n``), the exact binomial bound (``scipy.stats``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from patchspec.errors import InputError, OptionError
from patchspec.metrics import MetricArg
from patchspec.model.session import Prompts
from patchspec.plan.positions import PositionTable
from patchspec.results import BASELINE_KEYS
from patchspec.spec import AnySpec

#: What the ``exceed_share_upper`` attr is, recorded with it.
STATISTIC = (
    "one-sided Clopper-Pearson upper bound (exact binomial) on the share of unverified cells"
)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise OptionError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def is_score(array: xr.DataArray) -> bool:
    """Whether ``array`` holds an unsigned ranking score (``estimator="graddrop"``:
    ``attrs["quantity"] == "score"``), not patched metric values.

    Example:
        >>> is_score(xr.DataArray([0.5], dims="layer", attrs={"quantity": "score"}))
        True
    """
    return array.attrs.get("quantity") == "score"


def effect_scores(array: xr.DataArray, n_grid_dims: int) -> np.ndarray:
    """One score per cell: ``|value - receiving baseline|``, averaged over examples before the
    absolute value and maximised over metrics; NaN where the cell was not measured. A score
    (:func:`is_score`, already ``>= 0``) is ranked by its value, averaged over examples.

    Example:
        >>> a = xr.DataArray([[1.0, 3.0], [2.0, 2.0]], dims=("pos", "example"),
        ...                  attrs={"receiver": "corrupted", "corrupted_baseline": [1.0, 1.0]})
        >>> effect_scores(a, 1).tolist()
        [1.0, 1.0]
    """
    receiver = array.attrs.get("receiver", "corrupted")
    base = None if is_score(array) else array.attrs.get(f"{receiver}_baseline")
    values = np.asarray(array.values, dtype=np.float64)
    if base is not None:
        values = values - np.asarray(base, dtype=np.float64)
    trailing = list(array.dims[n_grid_dims:])
    cells = values.reshape(math.prod(values.shape[:n_grid_dims]), *values.shape[n_grid_dims:])
    if "example" in trailing:
        cells = cells.mean(axis=1 + trailing.index("example"))
    cells = np.abs(cells)
    if cells.ndim > 1:
        cells = cells.reshape(cells.shape[0], -1).max(axis=1)
    return cells


def clopper_pearson_upper(exceeding: int, n: int, confidence: float) -> float:
    """One-sided upper bound on a binomial proportion from ``exceeding`` of ``n`` draws.

    Example:
        >>> round(clopper_pearson_upper(0, 20, 0.95), 4)   # the "rule of three": about 3/n
        0.1391
    """
    from scipy import stats

    if n == 0 or exceeding >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, exceeding + 1, n - exceeding))


def _check_tensors(estimate: xr.DataArray, given: Mapping[str, Any]) -> None:
    """Refuse run-time tensors other than those the estimate was made with (by SHA-256)."""
    from patchspec.interventions import tensor_record

    for key, record in dict(estimate.attrs.get("tensors") or {}).items():
        if key in given and tensor_record(given[key]).get("sha256") != record.get("sha256"):
            raise InputError(
                f"tensor {key!r} is not the one the estimate was made with (its SHA-256 "
                f"differs from attrs['tensors'][{key!r}]); pass the same tensors to verify"
            )


def verify(
    estimate: xr.DataArray,
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricArg,
    *,
    top: int = 10,
    random: int = 20,
    threshold: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    spec: AnySpec | None = None,
    engine: Any = None,
    positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
    reference: Prompts | Mapping[str, Prompts] | None = None,
    progress: bool | None = None,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
    tensors: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Patch the estimate's ``top`` cells and ``random`` others exactly, on the same grid.

    Args:
        estimate: An estimate (``spec.run(..., estimator="atp")``), or any result of the spec.
        model, clean, corrupted, metric: The run the estimate was made from.
        top: How many of the highest-ranked cells to verify (ranked by :func:`effect_scores`).
        random: How many cells to draw uniformly from the rest.
        threshold: The effect size that counts as missed (default: the smallest exact effect
            among the verified top cells).
        confidence: Confidence level of the upper bound.
        seed: Seed of the random draw.
        spec: The spec (default: rebuilt from ``estimate.attrs["spec"]``).
        engine: The exact engine (default ``"batched"``).
        positions, reference: As for ``spec.run``.
        progress, cells_per_batch, max_memory: As for ``spec.run``.
        tensors: The run-time tensors the spec's sources name, as for ``spec.run``; they must
            be the ones the estimate records (``attrs["tensors"]``, by SHA-256).

    An estimate that is a score (``estimator="graddrop"``, ``attrs["quantity"] == "score"``) is
    ranked by its value (already unsigned), and the Dataset's ``estimate_quantity`` attr says so.

    Returns:
        A Dataset with ``estimate``, ``exact`` (NaN where not measured), ``checked`` (``"top"``,
        ``"random"`` or ``""`` per cell) and attrs ``threshold``, ``random_checked``,
        ``random_exceeding``, ``unverified_cells``, ``exceed_share_upper`` (the bound),
        ``exceed_cells_upper`` (the bound times the unverified cells), ``confidence`` and
        ``statistic``.

    Raises:
        OptionError: bad ``top``, ``random``, ``confidence`` or ``threshold``.
        InputError: the estimate is not a result of the spec on these inputs.

    Example:
        >>> atp = catalog.HEAD_OUT_BY_POS.run(model, clean, corrupted, metric, estimator="atp")  # doctest: +SKIP
        >>> checked = ps.verify(atp, model, clean, corrupted, metric, top=10, random=30)  # doctest: +SKIP
    """
    from patchspec import runner
    from patchspec.model.adapter import ModelAdapter
    from patchspec.options import RunOptions
    from patchspec.plan.grid import compile
    from patchspec.spec import as_specs, spec_from_dict

    top, random = _count(top, "top"), _count(random, "random")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, float | int)
        or not 0 < confidence < 1
    ):
        raise OptionError(f"confidence must be a number between 0 and 1, got {confidence!r}")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float)
    ):
        raise OptionError(f"threshold must be a number or None, got {threshold!r}")
    if not isinstance(estimate, xr.DataArray):
        raise InputError(
            f"verify takes one spec's result (an xarray.DataArray), got {type(estimate).__name__}; "
            "verify each variable of a Dataset on its own"
        )
    if spec is None:
        stored = estimate.attrs.get("spec")
        if not isinstance(stored, Mapping):
            raise InputError(
                "the estimate's attrs hold no spec dict (a spec with a custom rule is stored as "
                "its repr); pass spec= explicitly"
            )
        spec = spec_from_dict(stored)
    (spec,) = as_specs([spec])
    options = RunOptions(
        engine=engine, progress=progress, cells_per_batch=cells_per_batch, max_memory=max_memory
    )
    with ModelAdapter.of(model).exclusive():
        run = runner.prepare(
            model,
            clean,
            corrupted,
            metric,
            options=options,
            positions=positions,
            reference=reference,
            tensors=tensors,
        )
        _check_tensors(estimate, run.session.tensors)
        grid = run.add(compile(spec, run.sizes, positions=run.positions))
        n = len(grid.dims)
        if tuple(estimate.dims[:n]) != grid.dims or tuple(estimate.shape[:n]) != grid.shape:
            raise InputError(
                f"the estimate has dims {dict(estimate.sizes)} but spec {spec.label!r} on these "
                f"inputs has {dict(zip(grid.dims, grid.shape, strict=True))}; verify it with the "
                "model, prompts and spec it was made from"
            )
        scores = effect_scores(estimate, n)
        ranked = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
        chosen_top = ranked[:top]
        rest = np.setdiff1d(np.arange(grid.n_cells), chosen_top)
        rng = np.random.default_rng(seed)
        drawn = np.sort(rng.choice(rest, size=min(random, len(rest)), replace=False))
        cells = np.concatenate([chosen_top, drawn]).astype(np.int64)
        values, evaluate, clean_base, corrupted_base = runner.run_grid(
            run, grid, spec.label, cells=cells
        )
        exact = runner.label(run, spec, grid, values, evaluate, clean_base, corrupted_base)
    exact_scores = effect_scores(exact, n)
    if threshold is None:
        threshold = float(np.min(exact_scores[chosen_top])) if top else 0.0
    exceeding = int((exact_scores[drawn] > threshold).sum())
    upper = clopper_pearson_upper(exceeding, len(drawn), confidence)
    checked = np.full(grid.n_cells, "", dtype=object)
    checked[chosen_top] = "top"
    checked[drawn] = "random"
    grid_coords = {d: estimate.coords[d] for d in grid.dims}
    unverified = grid.n_cells - len(chosen_top)
    arrays = {"estimate": estimate, "exact": exact}
    for key in BASELINE_KEYS:  # each keeps its own baselines in attrs
        if any(key in a.coords for a in arrays.values()):
            arrays = {k: a.drop_vars(key, errors="ignore") for k, a in arrays.items()}
    arrays["checked"] = xr.DataArray(
        checked.reshape(grid.shape).astype(str), dims=grid.dims, coords=grid_coords
    )
    return xr.Dataset(
        arrays,
        attrs={
            "spec_name": spec.label,
            "estimator": estimate.attrs.get("estimator", ""),
            "top": len(chosen_top),
            "threshold": float(threshold),
            "random_checked": len(drawn),
            "random_exceeding": exceeding,
            "unverified_cells": unverified,
            "exceed_share_upper": upper,
            "exceed_cells_upper": upper * unverified,
            "confidence": float(confidence),
            "statistic": STATISTIC,
            "estimate_quantity": "score" if is_score(estimate) else "patched metric value",
            "score": (
                "estimate ranked by its score (unsigned, not an effect), mean over examples, max "
                "over metrics; exact: |value - receiving baseline|, mean over examples, max "
                "over metrics"
                if is_score(estimate)
                else "|value - receiving baseline|, mean over examples, max over metrics"
            ),
        },
    )
