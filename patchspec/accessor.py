"""The ``.patch`` accessor: patching verbs on labelled results.

Importing :mod:`patchspec` registers ``.patch`` on every ``xarray.DataArray`` and
``xarray.Dataset``, so a result reads like the analysis it is part of::

    result.patch.normalized().mean("example")     # recovery per cell (0: none, 1: all)
    result.patch.effect().patch.bootstrap_ci()    # interval of the mean effect per cell
    result.patch.permutation_pvalue()             # sign-flip test that the effect is zero
    result.patch.top(5)                           # the five cells that matter most
    result.patch.plot("heatmap.png")

Baselines are read from the ``clean_baseline`` / ``corrupted_baseline`` coordinates when a result
has them (per-prompt metrics store them along ``example``, so they follow ``sel``/``isel``), and
from the attrs of the same names otherwise. ``effect()`` and ``normalized()`` mark their output
with ``attrs["quantity"]`` and drop the baselines, so they are never applied twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from patchspec import stats
from patchspec.errors import InputError
from patchspec.results import BASELINE_KEYS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: ``attrs["quantity"]`` of derived results; raw patched metric values carry none.
DERIVED = ("effect", "normalized")


def _baseline(data: xr.DataArray, key: str, dim: str = "example") -> xr.DataArray:
    """One baseline of ``data`` as an array that broadcasts against it."""
    if key in data.coords:
        return data[key].reset_coords([k for k in BASELINE_KEYS if k in data[key].coords], drop=True)
    if key not in data.attrs:
        raise InputError(
            f"result {data.name!r} has no {key!r} coordinate or attr; baselines come with "
            "results of spec.run(...) and Sweep(...).run(...)"
        )
    value = np.asarray(data.attrs[key], dtype=np.float64)
    if value.ndim == 0:
        return xr.DataArray(float(value))
    # From attrs: [example], [metric] or [metric, example] (several metrics, unselected).
    dims: list[str] = []
    per_metric = "metric" in data.dims and value.shape[0] == data.sizes["metric"]
    if per_metric and (value.ndim == 2 or dim not in data.dims):
        dims.append("metric")
    if len(dims) < value.ndim:
        dims.append(dim)
    if len(dims) != value.ndim:
        raise InputError(
            f"the {key} in attrs has shape {value.shape}, which does not match the result's "
            f"dims {tuple(data.dims)}; compute effect() or normalized() before selecting"
        )
    coords: dict[str, Any] = {"metric": data["metric"]} if "metric" in dims else {}
    if dim in dims:
        n = value.shape[-1]
        if dim not in data.dims:
            raise InputError(
                f"result {data.name!r} has {n} per-example {key}s but no {dim!r} dim (its dims "
                f"are {tuple(data.dims)}); compute effect() or normalized() before reducing over "
                f"{dim!r}, e.g. result.patch.normalized().mean({dim!r})"
            )
        index = data[dim].values
        if index.dtype.kind not in "iu" or index.min() < 0 or index.max() >= n:
            raise InputError(
                f"the {dim!r} coordinate {index.tolist()} does not index the {n} per-example "
                f"{key}s in attrs; keep the original {dim!r} labels (0..n-1)"
            )
        value = value[..., index]
        coords[dim] = data[dim]
    return xr.DataArray(value, dims=dims, coords=coords)


def baselines(data: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """The clean and corrupted baselines of a result, as arrays that broadcast against it.

    Args:
        data: A result of ``spec.run(...)`` (or a selection of one).

    Returns:
        ``(clean, corrupted)``: scalars for a scalar metric, arrays along ``example`` for a
        per-prompt metric.

    Raises:
        InputError: the result carries no baselines, or per-example baselines lost their dim.

    Example:
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                                   "corrupted_baseline": 1.0})
        >>> [float(b) for b in baselines(r)]
        [3.0, 1.0]
    """
    return _baseline(data, "clean_baseline"), _baseline(data, "corrupted_baseline")


def _derived(data: xr.DataArray, out: xr.DataArray, quantity: str) -> xr.DataArray:
    out = out.drop_vars([k for k in BASELINE_KEYS if k in out.coords]).rename(data.name)
    out.attrs = {k: v for k, v in data.attrs.items() if k not in BASELINE_KEYS}
    out.attrs["quantity"] = quantity
    return out


def _check_raw(data: xr.DataArray, verb: str) -> None:
    quantity = data.attrs.get("quantity")
    if quantity in DERIVED:
        raise InputError(
            f"{verb}() needs patched metric values, but result {data.name!r} is already a "
            f"{quantity} (attrs['quantity'] == {quantity!r})"
        )


def effect(data: xr.DataArray) -> xr.DataArray:
    """``patched - corrupted baseline`` per cell (and per example for per-prompt metrics).

    Example:
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                                   "corrupted_baseline": 1.0})
        >>> effect(r).values.tolist()
        [0.0, 1.0]
    """
    _check_raw(data, "effect")
    corrupted = _baseline(data, "corrupted_baseline")
    return _derived(data, data - corrupted, "effect")


def normalized(data: xr.DataArray) -> xr.DataArray:
    """``(patched - corrupted) / (clean - corrupted)``: 0 is no recovery, 1 full recovery.

    Per example when the baselines are per example. Where the clean and corrupted baselines are
    equal there is no recovery scale: those values are NaN (never ``inf``) and a
    ``RuntimeWarning`` names them.

    Example:
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                                   "corrupted_baseline": 1.0})
        >>> normalized(r).values.tolist()
        [0.0, 0.5]
    """
    _check_raw(data, "normalized")
    clean, corrupted = baselines(data)
    scale = clean - corrupted
    equal = scale == 0
    if bool(equal.any()):
        where = ""
        if equal.ndim == 1:
            (name,) = equal.dims
            labels = equal[name].values if name in equal.coords else np.arange(equal.size)
            where = f" for {name} {labels[equal.values].tolist()}"
        warnings.warn(
            f"the clean and corrupted baselines of {data.name!r} are equal{where}; there is no "
            "recovery scale, so those normalized values are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    return _derived(data, (data - corrupted) / scale.where(~equal), "normalized")


def top(
    data: xr.DataArray, k: int = 10, *, absolute: bool = True, dim: str = "example"
) -> xr.DataArray:
    """The ``k`` cells with the largest (absolute) values, largest first, with their labels.

    Args:
        data: A result.
        k: How many cells.
        absolute: Rank by ``|value|`` (default) or by the signed value.
        dim: Averaged over first when present (``example``: rank the mean over prompts).

    Returns:
        A 1-D array over ``rank`` (1..k) whose coordinates are each cell's labels (``layer``,
        ``pos``, ``pos_token`` ...); ``.to_dataframe()`` turns it into a table. NaN cells (not
        measured) are never ranked.

    Raises:
        InputError: ``k`` is not positive or the result has no dims.

    Example:
        >>> r = xr.DataArray([[0.1, -3.0], [2.0, 0.5]], dims=("layer", "pos"),
        ...                  coords={"layer": [0, 1], "pos": [0, 1]}, name="m")
        >>> t = top(r, 2)
        >>> t.values.tolist(), t.layer.values.tolist(), t.pos.values.tolist()
        ([-3.0, 2.0], [0, 1], [1, 0])
    """
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if dim in data.dims:
        data = data.mean(dim)
    if not data.dims:
        raise InputError(f"result {data.name!r} has no dims left to rank")
    flat = data.stack(cell=data.dims)
    score = np.abs(flat.values) if absolute else flat.values
    order = np.argsort(-score, kind="stable")
    order = order[~np.isnan(score[order])][:k]
    picked = flat.isel(cell=order).reset_index("cell")
    picked = picked.drop_vars("cell", errors="ignore").rename(cell="rank")
    return picked.assign_coords(rank=np.arange(1, len(order) + 1))


@xr.register_dataarray_accessor("patch")
class PatchAccessor:
    """Patching verbs on a result DataArray (``result.patch.<verb>``).

    Example:
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                                   "corrupted_baseline": 1.0})
        >>> r.patch.normalized().values.tolist()
        [0.0, 0.5]
    """

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    def baselines(self) -> tuple[xr.DataArray, xr.DataArray]:
        """``(clean, corrupted)`` baselines that broadcast against the result."""
        return baselines(self._obj)

    def effect(self) -> xr.DataArray:
        """``patched - corrupted baseline`` (see :func:`effect`)."""
        return effect(self._obj)

    def normalized(self) -> xr.DataArray:
        """``(patched - corrupted) / (clean - corrupted)``, NaN where undefined."""
        return normalized(self._obj)

    def top(self, k: int = 10, *, absolute: bool = True, dim: str = "example") -> xr.DataArray:
        """The ``k`` largest cells with their labels (see :func:`top`)."""
        return top(self._obj, k, absolute=absolute, dim=dim)

    def stderr(self, dim: str = "example") -> xr.DataArray:
        """Standard error of the mean along ``dim`` (see :func:`patchspec.stats.standard_error`)."""
        return stats.standard_error(self._obj, dim)

    def bootstrap_ci(
        self,
        dim: str = "example",
        *,
        confidence: float = 0.95,
        n_resamples: int = 1000,
        seed: int = 0,
        statistic: stats.Statistic = "mean",
    ) -> xr.DataArray:
        """Percentile bootstrap interval along ``dim`` with a ``bound`` (low/high) dim.

        Of the values as they are: chain ``.patch.effect()`` or ``.patch.normalized()`` first
        for an interval of the effect (see :func:`patchspec.stats.bootstrap_ci`).
        """
        return stats.bootstrap_ci(
            self._obj,
            dim,
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            statistic=statistic,
        )

    def permutation_pvalue(
        self,
        dim: str = "example",
        *,
        n_permutations: int = 1000,
        seed: int = 0,
        alternative: stats.Alternative = "two-sided",
    ) -> xr.DataArray:
        """Sign-flip p-value that the mean effect along ``dim`` is zero.

        Tests :meth:`effect` of raw results, and the values themselves of an ``effect()`` or
        ``normalized()`` output (see :func:`patchspec.stats.permutation_pvalue`).
        """
        data = self._obj
        if data.attrs.get("quantity") not in DERIVED:
            data = effect(data)
        return stats.permutation_pvalue(
            data, dim, n_permutations=n_permutations, seed=seed, alternative=alternative
        )

    def plot(self, path: str | Path | None = None, **options: Any) -> Figure:
        """A heatmap with token labels (see :func:`patchspec.plot.plot`)."""
        from patchspec.plot import plot

        return plot(self._obj, path, **options)


@xr.register_dataset_accessor("patch")
class PatchDatasetAccessor:
    """The same verbs on a Sweep's Dataset, applied to every data variable (spec).

    Example:
        >>> a = xr.DataArray([1.0, 2.0], dims="layer",
        ...                  attrs={"clean_baseline": 3.0, "corrupted_baseline": 1.0})
        >>> ds = xr.Dataset({"a": a})
        >>> ds.patch.effect()["a"].values.tolist()
        [0.0, 1.0]
    """

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def _map(self, verb: Callable[[xr.DataArray], xr.DataArray]) -> xr.Dataset:
        # Not Dataset.map: it either resets the variables' attrs or restores the inputs' ones.
        results = {name: verb(array) for name, array in self._obj.data_vars.items()}
        return xr.Dataset(results, attrs=dict(self._obj.attrs))

    def effect(self) -> xr.Dataset:
        """:meth:`PatchAccessor.effect` of every variable."""
        return self._map(effect)

    def normalized(self) -> xr.Dataset:
        """:meth:`PatchAccessor.normalized` of every variable."""
        return self._map(normalized)

    def stderr(self, dim: str = "example") -> xr.Dataset:
        """:meth:`PatchAccessor.stderr` of every variable."""
        return self._map(lambda da: stats.standard_error(da, dim))

    def bootstrap_ci(self, dim: str = "example", **options: Any) -> xr.Dataset:
        """:meth:`PatchAccessor.bootstrap_ci` of every variable."""
        return self._map(lambda da: da.patch.bootstrap_ci(dim, **options))

    def permutation_pvalue(self, dim: str = "example", **options: Any) -> xr.Dataset:
        """:meth:`PatchAccessor.permutation_pvalue` of every variable."""
        return self._map(lambda da: da.patch.permutation_pvalue(dim, **options))

    def plot(self, path: str | Path | None = None, **options: Any) -> Figure:
        """Heatmaps of every variable, one facet per spec (see :func:`patchspec.plot.plot`)."""
        from patchspec.plot import plot

        return plot(self._obj, path, **options)
