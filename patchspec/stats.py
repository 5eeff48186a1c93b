"""Statistics over one named dim of a labelled result (``example`` by default).

Standard error of the mean, percentile bootstrap confidence intervals (Efron & Tibshirani 1993,
"An Introduction to the Bootstrap", ch. 13) and paired sign-flip permutation p-values (Fisher
1935, "The Design of Experiments"; Good 2005, "Permutation, Parametric and Bootstrap Tests of
Hypotheses"). Every function takes an ``xarray.DataArray``, reduces one named dim and keeps every
other dim and coordinate; the arithmetic is vectorised numpy under :func:`xarray.apply_ufunc`.

The random draws reproduce TransformerLens 4.3's ``transformer_lens.utilities.statistics``
exactly: the same seeded generator (:func:`derive_generator`, SHA-256 of the seed and labels
seeding a CPU ``torch.Generator``), the same draws in the same order and shape (chunks of 256
resamples, one resampling pattern shared by every cell) and the same percentile and tie rules,
so ``bootstrap_ci`` and ``permutation_pvalue`` give TransformerLens's numbers (to float rounding)
for the same per-example values and seed. One deliberate difference: ``statistic="median"``
is the usual median (the mean of the two middle values for an even count), where
TransformerLens takes ``torch.median``'s lower middle value; the two agree for odd counts.

A grid of cells is a grid of tests: at 8 prompts the smallest two-sided sign-flip p-value is
``2 / 2**8 = 0.0078``, and among 100 cells that do nothing about 5 fall under 0.05 by chance.
:func:`permutation_pvalue` therefore adjusts the p-values of every cell together, by default
with the Benjamini-Hochberg procedure (Benjamini & Hochberg 1995, "Controlling the False
Discovery Rate", via :func:`scipy.stats.false_discovery_control`), which controls the expected
fraction of false discoveries; Benjamini-Yekutieli (2001, any dependence), Holm (1979, "A
Simple Sequentially Rejective Multiple Test Procedure") and Bonferroni, which control the
chance of any false discovery, are available, and :func:`adjust_pvalues` applies them to any
array of p-values.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import xarray as xr

from patchspec.errors import InputError, did_you_mean

if TYPE_CHECKING:
    import torch

Alternative = Literal["two-sided", "greater", "less"]
Statistic = Literal["mean", "median"]
Correction = Literal["bh", "by", "holm", "bonferroni"]

ALTERNATIVES: tuple[str, ...] = ("two-sided", "greater", "less")
STATISTICS: tuple[str, ...] = ("mean", "median")
#: Multiple-comparison corrections: Benjamini-Hochberg and Benjamini-Yekutieli (false discovery
#: rate), Holm and Bonferroni (family-wise error rate).
CORRECTIONS: tuple[str, ...] = ("bh", "by", "holm", "bonferroni")
#: Resamples (or sign patterns) drawn per call of the generator, as TransformerLens draws them.
CHUNK = 256
#: Resampled values held in memory at once (float64 elements) while reducing.
BUDGET = 1 << 24
#: Up to this many examples the permutation test enumerates every sign pattern (exact).
EXACT_MAX_N = 12


def derive_generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator keyed on ``seed`` and ``labels``, as TransformerLens 4.3 derives it.

    Args:
        seed: The user's seed.
        *labels: What the stream is for (``"bootstrap"``, ``"mean"`` ...), so that streams for
            different purposes are independent.

    Returns:
        A seeded ``torch.Generator`` on the CPU.

    Example:
        >>> import torch
        >>> a = torch.randint(0, 9, (3,), generator=derive_generator(0, "bootstrap"))
        >>> b = torch.randint(0, 9, (3,), generator=derive_generator(0, "bootstrap"))
        >>> bool((a == b).all())
        True
    """
    key = ":".join([str(seed), *(str(label) for label in labels)]).encode()
    derived = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF
    import torch  # imported on use: the accessor (and so `import patchspec`) needs no torch

    return torch.Generator(device="cpu").manual_seed(derived)


def _check_dim(data: xr.DataArray, dim: str, need: int, what: str) -> int:
    if not isinstance(data, xr.DataArray):
        raise InputError(f"{what} needs an xarray.DataArray, got {type(data).__name__}")
    if dim not in data.dims:
        raise InputError(
            f"{what} reduces dim {dim!r}, which the result does not have; its dims are "
            f"{tuple(data.dims)}{did_you_mean(dim, [str(d) for d in data.dims])} (a per-prompt "
            "metric, e.g. reduce='none', gives results an 'example' dim)"
        )
    n = int(data.sizes[dim])
    if n < need:
        raise InputError(f"{what} needs at least {need} values along {dim!r}, got {n}")
    return n


def _choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise InputError(
            f"{what} must be one of {', '.join(map(repr, valid))}, got {value!r}"
            f"{did_you_mean(str(value), valid)}"
        )


def standard_error(data: xr.DataArray, dim: str = "example") -> xr.DataArray:
    """Standard error of the mean along ``dim``: unbiased standard deviation over ``sqrt(n)``.

    Args:
        data: Values with a ``dim`` of at least two entries.
        dim: The dim to reduce.

    Returns:
        ``data`` without ``dim``; NaN where a value along ``dim`` is NaN.

    Raises:
        InputError: ``dim`` is missing or has fewer than two entries.

    Example:
        >>> x = xr.DataArray([[1.0, 3.0], [2.0, 2.0]], dims=("layer", "example"))
        >>> standard_error(x).values.tolist()
        [1.0, 0.0]
    """
    n = _check_dim(data, dim, 2, "standard_error")
    return data.std(dim, ddof=1, skipna=False) / math.sqrt(n)


def _bootstrap(
    values: np.ndarray, *, statistic: str, confidence: float, n_resamples: int, seed: int
) -> np.ndarray:
    """``values[..., n]`` -> ``[..., 2]`` (low, high)."""
    import torch

    n = values.shape[-1]
    gen = derive_generator(seed, "bootstrap", statistic)
    reduce = np.mean if statistic == "mean" else np.median
    index = np.concatenate(
        [
            torch.randint(0, n, (min(CHUNK, n_resamples - start), n), generator=gen).numpy()
            for start in range(0, n_resamples, CHUNK)
        ]
    )  # [n_resamples, n]: the draws in TransformerLens's order
    step = max(1, BUDGET // max(1, values.size))
    stats = np.concatenate(
        [reduce(values[..., index[i : i + step]], axis=-1) for i in range(0, n_resamples, step)],
        axis=-1,
    )  # [..., n_resamples]
    alpha = (1.0 - confidence) / 2.0
    bounds = np.quantile(stats, [alpha, 1.0 - alpha], axis=-1)  # [2, ...]
    return np.moveaxis(bounds, 0, -1)


def bootstrap_ci(
    data: xr.DataArray,
    dim: str = "example",
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    statistic: Statistic = "mean",
) -> xr.DataArray:
    """Percentile bootstrap confidence interval of ``statistic`` along ``dim``, per cell.

    Resamples ``dim`` with replacement ``n_resamples`` times (one seeded pattern shared by every
    cell, as in TransformerLens) and takes the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resampled statistic. A percentile bootstrap cannot
    show uncertainty the sample does not contain: a constant vector collapses to a point, and
    intervals on a handful of examples are wide and skewed.

    Args:
        data: Values with a ``dim``.
        dim: The dim to resample.
        confidence: Coverage in (0, 1).
        n_resamples: Number of bootstrap resamples.
        seed: Seed of the draws (same seed, same interval).
        statistic: ``"mean"`` or ``"median"``.

    Returns:
        ``data`` without ``dim`` and with a trailing ``bound`` dim labelled ``low``/``high``.

    Raises:
        InputError: ``dim`` is missing or empty, or an argument is out of range.

    Example:
        >>> x = xr.DataArray([[1.0, 2.0, 3.0, 4.0]], dims=("layer", "example"))
        >>> ci = bootstrap_ci(x, n_resamples=200)
        >>> ci.dims, bool(ci.sel(bound="low") <= ci.sel(bound="high"))
        (('layer', 'bound'), True)
    """
    _check_dim(data, dim, 1, "bootstrap_ci")
    _choice(statistic, STATISTICS, "statistic")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be at least 1, got {n_resamples}")
    out = xr.apply_ufunc(
        _bootstrap,
        data,
        input_core_dims=[[dim]],
        output_core_dims=[["bound"]],
        kwargs={
            "statistic": statistic,
            "confidence": confidence,
            "n_resamples": n_resamples,
            "seed": seed,
        },
        keep_attrs=True,
    )
    return out.assign_coords(bound=["low", "high"])


def _signs(n: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """Sign patterns ``[patterns, n]`` and whether they are all ``2**n`` of them."""
    if n <= EXACT_MAX_N:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n))), True
    import torch

    gen = derive_generator(seed, "permutation")
    chunks = [
        torch.randint(0, 2, (min(CHUNK, n_permutations - start), n), generator=gen).numpy()
        for start in range(0, n_permutations, CHUNK)
    ]
    return np.concatenate(chunks).astype(np.float64) * 2 - 1, False


def _pvalue(values: np.ndarray, *, n_permutations: int, seed: int, alternative: str) -> np.ndarray:
    """``values[..., n]`` -> ``[...]`` sign-flip p-values of a zero mean."""
    n = values.shape[-1]
    signs, exact = _signs(n, n_permutations, seed)
    observed = values.mean(axis=-1, keepdims=True)  # [..., 1]
    # A null mean within a relative 100 eps of the observed one is a tie (summation order).
    tolerance = np.abs(observed) * (100 * np.finfo(np.float64).eps)
    hits = np.zeros(values.shape[:-1])
    for start in range(0, len(signs), 4096):
        null = values @ signs[start : start + 4096].T / n  # [..., patterns]
        if alternative == "two-sided":
            hit = np.abs(null) >= np.abs(observed) - tolerance
        elif alternative == "greater":
            hit = null >= observed - tolerance
        else:
            hit = null <= observed + tolerance
        hits += hit.sum(axis=-1)
    pvalue = hits / len(signs) if exact else (hits + 1.0) / (n_permutations + 1.0)
    return np.where(np.isnan(observed[..., 0]), np.nan, pvalue)


def check_correction(correction: str | None) -> None:
    """Refuse an unknown correction name (``None`` or ``"none"``: no correction).

    Example:
        >>> check_correction("holm")
        >>> try:
        ...     check_correction("bonferoni")
        ... except InputError as err:
        ...     print(str(err).split("; ")[-1])
        did you mean 'bonferroni'?
    """
    if correction is None or correction == "none":
        return
    if not isinstance(correction, str) or correction not in CORRECTIONS:
        raise InputError(
            f"correction must be one of {', '.join(map(repr, CORRECTIONS))} or None, got "
            f"{correction!r}{did_you_mean(str(correction), CORRECTIONS)}"
        )


def _adjust_family(p: np.ndarray, method: str) -> np.ndarray:
    """Adjusted p-values of one family (1-D); NaN entries are not tests and stay NaN."""
    out = np.full(p.shape, np.nan)
    keep = ~np.isnan(p)
    x = p[keep]
    m = x.size
    if m == 0:
        return out
    if method in ("bh", "by"):
        import scipy.stats

        adjusted = scipy.stats.false_discovery_control(x, method=method)
    elif method == "bonferroni":
        adjusted = np.minimum(1.0, x * m)
    else:  # holm: step down, the i-th smallest times (m - i), kept monotone
        order = np.argsort(x, kind="stable")
        steps = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * x[order]))
        adjusted = np.empty(m)
        adjusted[order] = steps
    out[keep] = adjusted
    return out


def _adjust_rows(p: np.ndarray, *, method: str) -> np.ndarray:
    """``p[families, cells]``: each row is one family."""
    return np.stack([_adjust_family(row, method) for row in p]).reshape(p.shape)


def _check_pvalues(p: xr.DataArray, what: str) -> None:
    values = np.asarray(p.values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise InputError(
            f"{what} needs p-values in [0, 1], but {p.name!r} holds values from "
            f"{finite.min():g} to {finite.max():g}; pass the output of permutation_pvalue(..., "
            "correction=None), not effects"
        )
    done = p.attrs.get("correction")
    if done not in (None, "none"):
        raise InputError(
            f"{p.name!r} is already corrected (attrs['correction'] == {done!r}); adjust the "
            "raw p-values (permutation_pvalue(..., correction=None)) once"
        )


def adjust_pvalues(
    p: xr.DataArray | xr.Dataset,
    method: Correction = "bh",
    *,
    dims: str | Sequence[str] | None = None,
) -> xr.DataArray | xr.Dataset:
    """Adjust p-values for testing many cells at once.

    ``"bh"`` (Benjamini-Hochberg) and ``"by"`` (Benjamini-Yekutieli) control the false discovery
    rate (:func:`scipy.stats.false_discovery_control`); ``"holm"`` and ``"bonferroni"`` control
    the family-wise error rate. NaN cells (not measured) are not tests: they are left out of the
    family and stay NaN.

    Args:
        p: Raw p-values, e.g. ``permutation_pvalue(..., correction=None)``. For a Dataset, every
            cell of every variable is one family.
        method: The correction.
        dims: The dims one family spans (DataArrays only); each combination of the other dims is
            a family of its own. Default: every dim, one family for the whole array.

    Returns:
        Adjusted p-values, same dims and coords, with ``attrs["correction"] = method``.

    Raises:
        InputError: an unknown method or dim, values outside [0, 1], or p-values that are
            already corrected.

    Example:
        >>> p = xr.DataArray([0.01, 0.04, 0.03, np.nan], dims="head")
        >>> adjust_pvalues(p, "bh").values.round(3).tolist()
        [0.03, 0.04, 0.04, nan]
        >>> adjust_pvalues(p, "holm").values.round(3).tolist()
        [0.03, 0.06, 0.06, nan]
    """
    check_correction(method)
    if method is None or method == "none":
        raise InputError("adjust_pvalues needs a correction method, got None")
    if isinstance(p, xr.Dataset):
        if dims is not None:
            raise InputError(
                "adjust_pvalues of a Dataset corrects every cell of every variable as one "
                "family; for families along dims, adjust each variable: adjust_pvalues(ds[name], "
                "method, dims=...)"
            )
        names = list(p.data_vars)
        for name in names:
            _check_pvalues(p[name], "adjust_pvalues")
        flat = np.concatenate([np.asarray(p[n].values, np.float64).ravel() for n in names])
        adjusted = _adjust_family(flat, method)
        corrected = p.copy()
        start = 0
        for name in names:
            size = p[name].size
            var = p[name].copy(data=adjusted[start : start + size].reshape(p[name].shape))
            var.attrs["correction"] = method
            corrected[name] = var
            start += size
        corrected.attrs["correction"] = method
        return corrected
    if not isinstance(p, xr.DataArray):
        raise InputError(
            f"adjust_pvalues needs an xarray DataArray or Dataset, got {type(p).__name__}"
        )
    _check_pvalues(p, "adjust_pvalues")
    family = (
        [str(d) for d in p.dims]
        if dims is None
        else [dims]
        if isinstance(dims, str)
        else list(dims)
    )
    for dim in family:
        if dim not in p.dims:
            raise InputError(
                f"dims={dim!r} is not a dim of the p-values; their dims are {tuple(p.dims)}"
                f"{did_you_mean(dim, [str(d) for d in p.dims])}"
            )
    others = [str(d) for d in p.dims if d not in family]
    moved = p.transpose(*others, *family)  # each family's cells last, then one family per row
    size = math.prod(p.sizes[d] for d in family)
    adjusted = _adjust_rows(np.asarray(moved.values, np.float64).reshape(-1, size), method=method)
    out = moved.copy(data=adjusted.reshape(moved.shape)).transpose(*p.dims)
    out.attrs = {**p.attrs, "correction": method}
    return out


def permutation_pvalue(
    effect: xr.DataArray,
    dim: str = "example",
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
    correction: Correction | None = "bh",
) -> xr.DataArray:
    """Paired sign-flip permutation p-value that the mean of ``effect`` along ``dim`` is zero.

    Under the null each per-example effect is symmetric about zero, so every pattern of sign
    flips is equally likely. With at most 12 examples all ``2**n`` patterns are enumerated (exact
    and deterministic; ``seed`` is unused); otherwise ``n_permutations`` seeded random patterns
    give ``(hits + 1) / (n_permutations + 1)``. The p-values of every cell (every combination of
    the other dims) are then adjusted together for testing them all (``correction``).

    A raw patching result (patched metric values with their baselines) is tested on its effect,
    measured from the receiving run's own baseline (:func:`patchspec.accessor.effect`): the test
    is that the patch changes nothing, in every direction. Derived values (``effect()``,
    ``normalized()``) and plain arrays are tested as they are.

    Args:
        effect: Per-example effects, or a raw result (its effect is tested).
        dim: The dim whose signs are flipped.
        n_permutations: Random sign patterns when there are more than 12 examples.
        seed: Seed of the random patterns.
        alternative: ``"two-sided"`` (``|null| >= |observed|``), ``"greater"`` (the effect is
            positive: the patch restores in denoising, destroys in noising and ablations) or
            ``"less"``.
        correction: ``"bh"`` (Benjamini-Hochberg, default), ``"by"``, ``"holm"``,
            ``"bonferroni"``, or ``None`` for the raw p-values (TransformerLens's numbers). See
            :func:`adjust_pvalues`; NaN cells are left out of the family.

    Returns:
        ``effect`` without ``dim``; NaN where a value along ``dim`` is NaN. ``attrs["quantity"]``
        is ``"pvalue"``, ``attrs["tested"]`` the quantity tested (``"effect"`` ...),
        ``attrs["alternative"]`` and ``attrs["correction"]`` (``"none"`` when uncorrected) say
        what they are.

    Raises:
        InputError: ``dim`` is missing or empty, an argument is out of range, the correction is
            unknown, or the values are already p-values.

    Example:
        >>> x = xr.DataArray([1.0, 2.0, 3.0, 4.0], dims="example")
        >>> float(permutation_pvalue(x))
        0.125
        >>> grid = xr.DataArray([[1.0, 2.0, 3.0, 4.0], [1.0, -2.0, 3.0, -4.0]],
        ...                     dims=("head", "example"))
        >>> permutation_pvalue(grid, correction=None).values.tolist()
        [0.125, 0.875]
        >>> permutation_pvalue(grid, correction="bonferroni").values.tolist()
        [0.25, 1.0]
    """
    check_correction(correction)
    if isinstance(effect, xr.DataArray):
        if effect.attrs.get("quantity") == "pvalue":
            raise InputError(
                f"permutation_pvalue tests effects, but {effect.name!r} already holds p-values "
                "(attrs['quantity'] == 'pvalue')"
            )
        from patchspec.accessor import effect as effect_of
        from patchspec.accessor import is_raw

        if is_raw(effect):
            effect = effect_of(effect)
    _check_dim(effect, dim, 1, "permutation_pvalue")
    _choice(alternative, ALTERNATIVES, "alternative")
    if n_permutations < 1:
        raise InputError(f"n_permutations must be at least 1, got {n_permutations}")
    p = xr.apply_ufunc(
        _pvalue,
        effect,
        input_core_dims=[[dim]],
        kwargs={"n_permutations": n_permutations, "seed": seed, "alternative": alternative},
        keep_attrs=True,
    )
    p.attrs["tested"] = effect.attrs.get("quantity")
    p.attrs["quantity"] = "pvalue"
    p.attrs["alternative"] = alternative
    p.attrs["correction"] = "none"
    if correction is None or correction == "none":
        return p
    return adjust_pvalues(p, correction)  # type: ignore[return-value]


def agreement(exact: xr.DataArray, estimate: xr.DataArray) -> dict[str, float | int | bool]:
    """How well an estimate (``estimator="atp"``) agrees with the exact result of the same grid,
    on their effects averaged over examples: the number of cells both measured, Pearson and
    Spearman correlations (``scipy.stats``; NaN when either is constant or under 3 cells), and
    whether the largest cell is the same one.

    An unsigned score (``estimator="graddrop"``, ``attrs["quantity"] == "score"``) is compared
    with the exact result's ``|effect|`` (per example, then averaged over examples, as the score
    is), never with the signed effect.

    Example:
        >>> grid = {"dims": ("layer",), "attrs": {"clean_baseline": 1.0, "corrupted_baseline": 0.0}}
        >>> exact = xr.DataArray([0.1, 0.9, 0.3], **grid)
        >>> agreement(exact, xr.DataArray([0.2, 0.8, 0.3], **grid))["same_top"]
        True

    Raises:
        InputError: the two results are not on the same grid, or ``exact`` is a score.
    """
    from scipy import stats

    if exact.dims != estimate.dims or exact.shape != estimate.shape:
        raise InputError(
            f"the exact result {dict(exact.sizes)} and the estimate {dict(estimate.sizes)} are "
            "not on the same grid; run the same spec with both estimators"
        )
    x, y = comparable_values(exact, estimate)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    varied = x.size > 2 and bool(x.std()) and bool(y.std())
    return {
        "cells": int(x.size),
        "pearson": float(stats.pearsonr(x, y)[0]) if varied else math.nan,
        "spearman": float(stats.spearmanr(x, y)[0]) if varied else math.nan,
        "same_top": bool(x.size) and int(np.argmax(x)) == int(np.argmax(y)),
    }


def comparable_values(
    exact: xr.DataArray, estimate: xr.DataArray
) -> tuple[np.ndarray, np.ndarray]:
    """The exact result's and the estimate's values to compare, flat: their effects, or for a
    score estimate (``attrs["quantity"] == "score"``) ``|effect|`` of the exact result against
    the score, each averaged over examples.

    Raises:
        InputError: ``exact`` is itself a score.
    """
    if exact.attrs.get("quantity") == "score":
        raise InputError(
            f"the exact result {exact.name!r} is a score (attrs['quantity'] == 'score', "
            f"estimator {exact.attrs.get('estimator')!r}); pass the exact result first and "
            "the estimate second"
        )
    if estimate.attrs.get("quantity") != "score":
        return effect_values(exact), effect_values(estimate)
    magnitude = abs(exact.patch.effect())
    if "example" in magnitude.dims:
        magnitude = magnitude.mean("example")
    score = estimate.mean("example") if "example" in estimate.dims else estimate
    return (
        np.asarray(magnitude.values, dtype=float).ravel(),
        np.asarray(score.values, dtype=float).ravel(),
    )


def effect_values(result: xr.DataArray) -> np.ndarray:
    """A result's effects (:func:`patchspec.accessor.effect`) averaged over examples, flat."""
    effect = result.patch.effect()
    if "example" in effect.dims:
        effect = effect.mean("example")
    return np.asarray(effect.values, dtype=float).ravel()
