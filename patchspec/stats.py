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
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Literal

import numpy as np
import torch
import xarray as xr

from patchspec.errors import InputError, did_you_mean

Alternative = Literal["two-sided", "greater", "less"]
Statistic = Literal["mean", "median"]

ALTERNATIVES: tuple[str, ...] = ("two-sided", "greater", "less")
STATISTICS: tuple[str, ...] = ("mean", "median")
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
        >>> a = torch.randint(0, 9, (3,), generator=derive_generator(0, "bootstrap"))
        >>> b = torch.randint(0, 9, (3,), generator=derive_generator(0, "bootstrap"))
        >>> bool((a == b).all())
        True
    """
    key = ":".join([str(seed), *(str(label) for label in labels)]).encode()
    derived = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF
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


def permutation_pvalue(
    effect: xr.DataArray,
    dim: str = "example",
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
) -> xr.DataArray:
    """Paired sign-flip permutation p-value that the mean of ``effect`` along ``dim`` is zero.

    Under the null each per-example effect is symmetric about zero, so every pattern of sign
    flips is equally likely. With at most 12 examples all ``2**n`` patterns are enumerated (exact
    and deterministic; ``seed`` is unused); otherwise ``n_permutations`` seeded random patterns
    give ``(hits + 1) / (n_permutations + 1)``.

    Args:
        effect: Per-example effects (patched minus corrupted baseline, or normalised).
        dim: The dim whose signs are flipped.
        n_permutations: Random sign patterns when there are more than 12 examples.
        seed: Seed of the random patterns.
        alternative: ``"two-sided"`` (``|null| >= |observed|``), ``"greater"`` or ``"less"``.

    Returns:
        ``effect`` without ``dim``; NaN where a value along ``dim`` is NaN.

    Raises:
        InputError: ``dim`` is missing or empty, or an argument is out of range.

    Example:
        >>> x = xr.DataArray([1.0, 2.0, 3.0, 4.0], dims="example")
        >>> float(permutation_pvalue(x))
        0.125
    """
    _check_dim(effect, dim, 1, "permutation_pvalue")
    _choice(alternative, ALTERNATIVES, "alternative")
    if n_permutations < 1:
        raise InputError(f"n_permutations must be at least 1, got {n_permutations}")
    return xr.apply_ufunc(
        _pvalue,
        effect,
        input_core_dims=[[dim]],
        kwargs={"n_permutations": n_permutations, "seed": seed, "alternative": alternative},
        keep_attrs=True,
    )
