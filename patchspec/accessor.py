"""The ``.patch`` accessor: patching verbs on labelled results.

Importing :mod:`patchspec` registers ``.patch`` on every ``xarray.DataArray`` and
``xarray.Dataset``, so a result reads like the analysis it is part of::

    result.patch.normalized().mean("example")     # per cell: 0 no effect, 1 the whole clean gap
    result.patch.effect().patch.bootstrap_ci()    # interval of the mean effect per cell
    result.patch.permutation_pvalue()             # sign-flip test, corrected for every cell (BH)
    result.patch.top(5)                           # the five cells that matter most
    result.patch.plot("heatmap.png")

**Which run received the patch decides what the numbers mean.** Every result records it in
``attrs["receiver"]`` (``"clean"`` or ``"corrupted"``) and ``attrs["direction"]``:
``"denoising"`` (clean values written into the corrupted run), ``"noising"`` (corrupted values
written into the clean run) or ``"ablation"`` (zero, mean, resample or noise, written into
either run). Each quantity is measured against the *receiving* run's own baseline and signed so
that a cell that matters comes out large and positive (for a metric that is higher on the clean
run, such as a logit difference) and a cell that does nothing comes out 0, in every direction:

================================  ==========================  ====================================
receiving run                     ``effect()``                ``normalized()``
================================  ==========================  ====================================
corrupted (denoising; ablation    ``patched - corrupted``     ``(patched - corrupted) /
inside the corrupted run)                                     (clean - corrupted)``: the fraction
                                                              of the clean behaviour restored
clean (noising; ablation of the   ``clean - patched``         ``(clean - patched) /
clean run, the default)                                       (clean - corrupted)``: the fraction
                                                              of the clean behaviour destroyed
================================  ==========================  ====================================

Results that do not say which run received the patch (files written before it was recorded,
hand-built arrays) are read from their ``sources``/``source`` attrs when they have them, and as
denoising (TransformerLens's only direction) when they carry no provenance at all; an ablation
whose receiving run cannot be told is refused (see :func:`direction_of`).

Baselines are read from the ``clean_baseline`` / ``corrupted_baseline`` coordinates when a result
has them (per-prompt metrics store them along ``example``, so they follow ``sel``/``isel``), and
from the attrs of the same names otherwise. ``effect()`` and ``normalized()`` mark their output
with ``attrs["quantity"]`` and a human-readable ``attrs["formula"]`` (and ``attrs["meaning"]``),
keep ``receiver``/``direction`` and drop the baselines, so they are never applied twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import xarray as xr

from patchspec import stats
from patchspec.errors import InputError, did_you_mean

#: Baselines stored in attrs, and for per-prompt metrics also as coordinates along ``example``.
BASELINE_KEYS = ("clean_baseline", "corrupted_baseline")

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: ``attrs["quantity"]`` of derived results; raw patched metric values carry none.
DERIVED = ("effect", "normalized")
#: Every ``attrs["quantity"]`` an analysis verb writes: the derived values and their p-values.
QUANTITIES = (*DERIVED, "pvalue")
#: The runs that can receive a patch (``attrs["receiver"]``).
RECEIVERS = ("clean", "corrupted")
#: What a patch does (``attrs["direction"]``), as :func:`patchspec.runner.direction` names it.
DIRECTIONS = ("denoising", "noising", "ablation")
#: ``attrs["formula"]`` of each derived quantity, by the receiving run.
FORMULAS: dict[str, dict[str, str]] = {
    "corrupted": {
        "effect": "patched - corrupted",
        "normalized": "(patched - corrupted) / (clean - corrupted)",
    },
    "clean": {
        "effect": "clean - patched",
        "normalized": "(clean - patched) / (clean - corrupted)",
    },
}
#: ``attrs["meaning"]`` of each derived quantity, by (direction, receiving run).
MEANINGS: dict[tuple[str, str], dict[str, str]] = {
    ("denoising", "corrupted"): {
        "effect": "how far patching in clean values moves the corrupted run toward the clean "
        "baseline, in metric units",
        "normalized": "fraction of the clean behaviour restored (0: none, 1: all)",
    },
    ("noising", "clean"): {
        "effect": "how far patching in corrupted values moves the clean run away from its "
        "baseline, toward the corrupted one, in metric units",
        "normalized": "fraction of the clean behaviour destroyed (0: none, 1: as corrupted)",
    },
    ("ablation", "clean"): {
        "effect": "how far the ablation moves the clean run away from its baseline, toward the "
        "corrupted one, in metric units",
        "normalized": "fraction of the clean behaviour the ablation destroys (0: none, 1: as "
        "much as corrupting the prompt)",
    },
    ("ablation", "corrupted"): {
        "effect": "how far ablating inside the corrupted run moves it toward the clean "
        "baseline, in metric units",
        "normalized": "fraction of the clean-corrupted gap closed by ablating inside the "
        "corrupted run (0: none, 1: as clean)",
    },
}
_EXPECTED_RECEIVER = {"denoising": "corrupted", "noising": "clean"}


def _source_receiver(source: Any) -> str | None:
    """The receiving run of one ``attrs["sources"]`` entry (a source's ``to_dict()``)."""
    if not isinstance(source, Mapping):
        return None
    from patchspec.sources import source_from_dict

    try:
        return str(source_from_dict(source).receiver)
    except ValueError:  # SpecError: an unregistered custom source; trust its recorded field
        receiver = source.get("receiver")
        return str(receiver) if receiver is not None else None


def _kinds(attributes: Mapping[str, Any]) -> list[str] | None:
    sources = attributes.get("sources")
    if isinstance(sources, list | tuple) and sources:
        kinds = [s.get("kind") for s in sources if isinstance(s, Mapping)]
        if kinds and all(isinstance(k, str) for k in kinds):
            return [str(k) for k in kinds]
    kind = attributes.get("source")
    if isinstance(kind, str) and kind:
        return [k.strip() for k in kind.split(",")]
    return None


def _legacy_receiver(data: xr.DataArray | xr.Dataset, direction: str | None) -> str:
    """The receiving run of a result that does not record ``attrs["receiver"]``."""
    attributes = data.attrs
    if direction in _EXPECTED_RECEIVER:
        return _EXPECTED_RECEIVER[direction]
    valid = ", ".join(map(repr, RECEIVERS))
    how = f"set it, e.g. result.attrs['receiver'] = 'clean' (one of {valid})"
    sources = attributes.get("sources")
    if isinstance(sources, list | tuple) and sources:
        receivers = {_source_receiver(s) for s in sources}
        if len(receivers) == 1 and None not in receivers:
            return str(receivers.pop())
        raise InputError(
            f"result {data.name!r} does not record which run received the patch, and its "
            f"sources {sources!r} do not tell; {how}"
        )
    kinds = _kinds(attributes)
    if kinds is not None:
        if set(kinds) == {"clean"}:
            return "corrupted"
        if set(kinds) == {"corrupted"}:
            return "clean"
        raise InputError(
            f"result {data.name!r} does not record which run received the patch, and an "
            f"ablation (source {attributes.get('source')!r}) may patch either run; {how}"
        )
    if direction == "ablation":
        raise InputError(
            f"result {data.name!r} is an ablation (attrs['direction'] == 'ablation') but does "
            f"not record which run was ablated; {how}"
        )
    return "corrupted"  # no provenance at all: a hand-built or legacy result, read as denoising


def direction_of(data: xr.DataArray | xr.Dataset) -> tuple[str, str]:
    """``(receiver, direction)`` of a result: which run received the patch, and what it did.

    Read from ``attrs["receiver"]`` and ``attrs["direction"]``, which every result of
    ``spec.run(...)`` records. Results without them (files written before they were recorded,
    hand-built arrays) are read from ``attrs["sources"]`` or ``attrs["source"]`` when present
    (``clean`` values patch the corrupted run, ``corrupted`` values the clean one, an ablation
    source says which run it ablated) and, when they carry no provenance at all, as denoising
    (``("corrupted", "denoising")``): TransformerLens's only direction.

    Args:
        data: A result, or a quantity derived from one.

    Returns:
        ``(receiver, direction)``: ``receiver`` in :data:`RECEIVERS`, ``direction`` in
        :data:`DIRECTIONS`.

    Raises:
        InputError: a recorded value is not a valid one, the two contradict each other (noising
            that patched the corrupted run), or an ablation's receiving run cannot be told.

    Example:
        >>> r = xr.DataArray([1.0], dims="layer", attrs={"receiver": "clean",
        ...                                              "direction": "noising"})
        >>> direction_of(r), direction_of(xr.DataArray([1.0], dims="layer"))
        (('clean', 'noising'), ('corrupted', 'denoising'))
    """
    receiver = data.attrs.get("receiver")
    direction = data.attrs.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        raise InputError(
            f"attrs['direction'] of result {data.name!r} is {direction!r}; valid directions are "
            f"{', '.join(map(repr, DIRECTIONS))}{did_you_mean(str(direction), DIRECTIONS)}"
        )
    if receiver is None:
        receiver = _legacy_receiver(data, direction)
    elif receiver not in RECEIVERS:
        raise InputError(
            f"attrs['receiver'] of result {data.name!r} is {receiver!r}; the receiving run is "
            f"one of {', '.join(map(repr, RECEIVERS))}{did_you_mean(str(receiver), RECEIVERS)}"
        )
    if direction is None:
        kinds = _kinds(data.attrs)
        if kinds is None:
            if receiver == "clean":
                raise InputError(
                    f"result {data.name!r} patched the clean run (attrs['receiver'] == 'clean') "
                    "but records neither its direction nor its source; set "
                    "result.attrs['direction'] to 'noising' or 'ablation'"
                )
            direction = "denoising"
        else:
            from patchspec.runner import direction as direction_from_sources

            direction = direction_from_sources(receiver, kinds)  # type: ignore[arg-type]
    expected = _EXPECTED_RECEIVER.get(direction)
    if expected is not None and receiver != expected:
        raise InputError(
            f"result {data.name!r} says it is {direction} (attrs['direction']) but that the "
            f"{receiver} run received the patch (attrs['receiver']); {direction} patches the "
            f"{expected} run, so one of the two attrs is wrong"
        )
    return str(receiver), str(direction)


def _baseline(
    data: xr.DataArray, key: str, dim: str = "example", *, needed_for: str = "this"
) -> xr.DataArray:
    """One baseline of ``data`` as an array that broadcasts against it."""
    if key in data.coords:
        return data[key].reset_coords(
            [k for k in BASELINE_KEYS if k in data[key].coords], drop=True
        )
    if key not in data.attrs:
        raise InputError(
            f"result {data.name!r} has no {key!r} coordinate or attr; baselines come with "
            "results of spec.run(...) and Sweep(...).run(...)"
        )
    if data.attrs[key] is None:
        run = key.removesuffix("_baseline")
        raise InputError(
            f"result {data.name!r} has no {key} (attrs[{key!r}] is None: the sweep had no "
            f"{run} run, e.g. it was given only a {run} cache), so {needed_for} cannot be "
            "computed"
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


def is_raw(data: xr.DataArray) -> bool:
    """Whether ``data`` holds patched metric values (baselines, no ``attrs["quantity"]``).

    Example:
        >>> r = xr.DataArray([1.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                              "corrupted_baseline": 1.0})
        >>> is_raw(r), is_raw(effect(r)), is_raw(xr.DataArray([1.0], dims="layer"))
        (True, False, False)
    """
    if data.attrs.get("quantity") is not None:
        return False
    return any(key in data.coords or key in data.attrs for key in BASELINE_KEYS)


def _derived(
    data: xr.DataArray, out: xr.DataArray, quantity: str, receiver: str, direction: str
) -> xr.DataArray:
    out = out.transpose(*data.dims)
    out = out.drop_vars([k for k in BASELINE_KEYS if k in out.coords]).rename(data.name)
    out.attrs = {k: v for k, v in data.attrs.items() if k not in BASELINE_KEYS}
    out.attrs["quantity"] = quantity
    out.attrs["formula"] = FORMULAS[receiver][quantity]
    out.attrs["meaning"] = MEANINGS[direction, receiver][quantity]
    out.attrs["receiver"] = receiver
    out.attrs["direction"] = direction
    return out


def _check_raw(data: xr.DataArray, verb: str) -> None:
    if not isinstance(data, xr.DataArray):
        raise InputError(f"{verb}() needs an xarray.DataArray, got {type(data).__name__}")
    quantity = data.attrs.get("quantity")
    if quantity is not None:
        raise InputError(
            f"{verb}() needs patched metric values, but result {data.name!r} is already a "
            f"{quantity} (attrs['quantity'] == {quantity!r})"
        )


def effect(data: xr.DataArray) -> xr.DataArray:
    """The change each patch makes, measured from the receiving run's own baseline.

    ``patched - corrupted`` when the corrupted run received the patch (denoising, or an ablation
    inside the corrupted run) and ``clean - patched`` when the clean run did (noising, or an
    ablation of the clean run, the ablations' default). A cell that does nothing is 0 either
    way, and a cell that matters is positive for a metric that is higher on the clean run
    (logit difference, log-probability of the clean answer); for one that is lower (loss),
    it is negative. Per cell, and per example for per-prompt metrics.

    Args:
        data: A result of ``spec.run(...)`` with its baselines.

    Returns:
        The effect, with ``attrs["quantity"] == "effect"``, ``attrs["formula"]`` (e.g.
        ``"clean - patched"``), ``attrs["meaning"]``, ``receiver`` and ``direction``.

    Raises:
        InputError: the result is already derived, lacks the receiving run's baseline, or does
            not say which run received the patch (see :func:`direction_of`).

    Example:
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                                   "corrupted_baseline": 1.0})
        >>> effect(r).values.tolist()
        [0.0, 1.0]
        >>> noised = r.assign_attrs(receiver="clean", direction="noising")
        >>> effect(noised).values.tolist(), effect(noised).attrs["formula"]
        ([2.0, 1.0], 'clean - patched')
    """
    _check_raw(data, "effect")
    receiver, direction = direction_of(data)
    what = "the effect (" + FORMULAS[receiver]["effect"] + ")"
    if receiver == "corrupted":
        out = data - _baseline(data, "corrupted_baseline", needed_for=what)
    else:
        out = _baseline(data, "clean_baseline", needed_for=what) - data
    return _derived(data, out, "effect", receiver, direction)


def normalized(data: xr.DataArray) -> xr.DataArray:
    """The effect as a fraction of the clean-corrupted gap, per direction (0: no effect).

    ``(patched - corrupted) / (clean - corrupted)`` when the corrupted run received the patch:
    the fraction of the clean behaviour restored (denoising). ``(clean - patched) / (clean -
    corrupted)`` when the clean run received it: the fraction of the clean behaviour destroyed
    (noising, ablations of the clean run). Either way 0 is no effect and 1 is the whole gap,
    whatever the metric's sign.

    Per example when the baselines are per example. Where the clean and corrupted baselines are
    equal there is no scale: those values are NaN (never ``inf``) and a ``RuntimeWarning`` names
    them.

    Args:
        data: A result of ``spec.run(...)`` with both baselines.

    Returns:
        The normalised effect, with ``attrs["quantity"] == "normalized"``, ``attrs["formula"]``,
        ``attrs["meaning"]``, ``receiver`` and ``direction``.

    Raises:
        InputError: as :func:`effect`, or a baseline is missing (a sweep without a clean run).

    Example:
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", attrs={"clean_baseline": 3.0,
        ...                                                   "corrupted_baseline": 1.0})
        >>> normalized(r).values.tolist()
        [0.0, 0.5]
        >>> normalized(r.assign_attrs(receiver="clean", direction="noising")).values.tolist()
        [1.0, 0.5]
    """
    _check_raw(data, "normalized")
    receiver, direction = direction_of(data)
    what = "normalized() (" + FORMULAS[receiver]["normalized"] + ")"
    clean = _baseline(data, "clean_baseline", needed_for=what)
    corrupted = _baseline(data, "corrupted_baseline", needed_for=what)
    scale = clean - corrupted
    equal = scale == 0
    if bool(equal.any()):
        where = ""
        if equal.ndim == 1:
            (name,) = equal.dims
            labels = equal[name].values if name in equal.coords else np.arange(equal.size)
            where = f" for {name} {labels[equal.values].tolist()}"
        kind = "recovery" if receiver == "corrupted" else "damage"
        warnings.warn(
            f"the clean and corrupted baselines of {data.name!r} are equal{where}; there is no "
            f"{kind} scale, so those normalized values are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    change = data - corrupted if receiver == "corrupted" else clean - data
    return _derived(data, change / scale.where(~equal), "normalized", receiver, direction)


def _rankable(data: xr.DataArray) -> xr.DataArray:
    """What :func:`top` ranks: the effect of raw results, derived quantities as they are."""
    if not isinstance(data, xr.DataArray):
        raise InputError(f"top() needs an xarray.DataArray, got {type(data).__name__}")
    quantity = data.attrs.get("quantity")
    if quantity == "pvalue":
        raise InputError(
            f"top() ranks cells by the size of an effect, but result {data.name!r} holds "
            "p-values (attrs['quantity'] == 'pvalue'), where small means significant; rank "
            "the effect (result.patch.top(k)) and read its p-values, or list the smallest "
            "with p.to_series().nsmallest(k)"
        )
    if not is_raw(data):
        return data
    try:
        return effect(data)
    except InputError as err:
        raise InputError(
            f"top() ranks a raw result by its effect, measured from the receiving run's "
            f"baseline, and that failed: {err}. Rank before reducing (top() averages over "
            f"'example' itself: result.patch.top(k)), or rank effect() or normalized() output"
        ) from None


def _top_flat(data: xr.DataArray, k: int, absolute: bool, dim: str) -> xr.DataArray:
    metrics = data.sizes.get("metric", 1)
    if metrics > 1 and data.attrs.get("quantity") == "effect":
        names = data["metric"].values.tolist() if "metric" in data.coords else list(range(metrics))
        raise InputError(
            f"top() would rank effects of {metrics} metrics {names} against each other, each in "
            "its own units; rank one metric, e.g. result.sel(metric=...).patch.top(k), or the "
            "normalized() values, which share one scale"
        )
    if dim in data.dims:
        data = data.mean(dim, keep_attrs=True)
    if not data.dims:
        raise InputError(f"result {data.name!r} has no dims left to rank")
    flat = data.stack(cell=data.dims)
    score = np.abs(flat.values) if absolute else flat.values
    order = np.argsort(-score, kind="stable")
    order = order[~np.isnan(score[order])][:k]
    picked = flat.isel(cell=order).reset_index("cell")
    picked = picked.drop_vars("cell", errors="ignore").rename(cell="rank")
    return picked.assign_coords(rank=np.arange(1, len(order) + 1))


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")


def top(
    data: xr.DataArray, k: int = 10, *, absolute: bool = True, dim: str = "example"
) -> xr.DataArray:
    """The ``k`` cells that matter most, largest first, with their labels.

    A raw result (patched metric values with their baselines) is ranked by its
    :func:`effect`, which is measured from the receiving run's baseline: ranking the raw
    values themselves would rank by how large the metric is, not by how much a patch changed it
    (in a noising run every cell that does nothing keeps the large clean value). A derived
    result (``effect()``, ``normalized()``) or a plain array without baselines is ranked as it
    is.

    Args:
        data: A result, or a quantity derived from one.
        k: How many cells.
        absolute: Rank by ``|value|`` (default) or by the signed value (largest first: the
            most restoring cells of a denoising run, the most damaging of a noising run).
        dim: Averaged over first when present (``example``: rank the mean over prompts).

    Returns:
        A 1-D array over ``rank`` (1..k) of the ranked values (the effect, for a raw result)
        whose coordinates are each cell's labels (``layer``, ``pos``, ``pos_token`` ...);
        ``.to_dataframe()`` turns it into a table. NaN cells (not measured) are never ranked.

    Raises:
        InputError: ``k`` is not positive, the result has no dims, holds p-values, or holds
            effects of several metrics (a ``metric`` dim: their units differ).

    Example:
        >>> r = xr.DataArray([[0.1, -3.0], [2.0, 0.5]], dims=("layer", "pos"),
        ...                  coords={"layer": [0, 1], "pos": [0, 1]}, name="m")
        >>> t = top(r, 2)
        >>> t.values.tolist(), t.layer.values.tolist(), t.pos.values.tolist()
        ([-3.0, 2.0], [0, 1], [1, 0])
        >>> noised = r.assign_attrs(clean_baseline=2.0, corrupted_baseline=-2.0,
        ...                         receiver="clean", direction="noising")
        >>> top(noised, 1).values.tolist()  # clean - patched: the cell that fell to -3.0
        [5.0]
    """
    _check_k(k)
    return _top_flat(_rankable(data), k, absolute, dim)


def top_across(
    data: xr.Dataset, k: int = 10, *, absolute: bool = True, dim: str = "example"
) -> xr.DataArray:
    """One ranking of the cells of every variable of a Sweep's Dataset.

    Each variable is ranked as :func:`top` ranks it (raw results by their effect, from each
    spec's own receiving run), then the variables' cells are merged into one ranking. The
    variables must hold the same quantity (all raw or effects, or all normalised): an effect
    in metric units and a fraction do not rank against each other.

    Args:
        data: A Sweep's Dataset (or its ``effect()`` / ``normalized()``).
        k: How many cells in all.
        absolute: Rank by ``|value|`` (default) or by the signed value.
        dim: Averaged over first when present.

    Returns:
        A 1-D array over ``rank`` with a ``spec`` coordinate (the variable's name) and every label
        coordinate of the variables; a label a variable lacks (``head`` of a ``resid_pre``
        cell) is NaN for its cells.

    Raises:
        InputError: ``k`` is not positive, the Dataset is empty, or its variables hold
            different quantities.

    Example:
        >>> a = xr.DataArray([1.0, 4.0], dims="layer", coords={"layer": [0, 1]}, name="m")
        >>> ds = xr.Dataset({"attn": a, "mlp": -2 * a})
        >>> t = top_across(ds, 3)
        >>> t.values.tolist(), t.spec.values.tolist(), t.layer.values.tolist()
        ([-8.0, 4.0, -2.0], ['mlp', 'attn', 'mlp'], [1, 1, 0])
    """
    _check_k(k)
    if not isinstance(data, xr.Dataset) or not data.data_vars:
        raise InputError("top() of a Dataset needs a Dataset with at least one data variable")
    ranked = {str(name): _rankable(var) for name, var in data.data_vars.items()}
    quantities = {name: var.attrs.get("quantity") for name, var in ranked.items()}
    if len(set(quantities.values())) > 1:
        listed = ", ".join(f"{name}: {q or 'plain values'}" for name, q in quantities.items())
        raise InputError(
            f"top() ranks one quantity across the Dataset's variables, but they hold different "
            f"ones ({listed}); rank them one at a time, e.g. ds['<name>'].patch.top(k)"
        )
    tops = {name: _top_flat(var, k, absolute, dim) for name, var in ranked.items()}
    rows: list[tuple[float, str, int]] = []
    for name, picked in tops.items():
        values = picked.values
        rows.extend(
            (float(abs(v) if absolute else v), name, i) for i, v in enumerate(values.tolist())
        )
    order = sorted(range(len(rows)), key=lambda j: -rows[j][0])[:k]  # stable: spec order on ties
    chosen = [rows[j] for j in order]
    names = [name for _, name, _ in chosen]
    values = np.array([tops[name].values[i] for _, name, i in chosen], dtype=np.float64)
    label_names: list[str] = []
    for picked in tops.values():
        label_names += [str(c) for c in picked.coords if c != "rank" and c not in label_names]
    coords: dict[str, Any] = {"rank": np.arange(1, len(chosen) + 1), "spec": ("rank", names)}
    for label in label_names:
        column = [
            tops[name][label].values[i].item() if label in tops[name].coords else None
            for _, name, i in chosen
        ]
        coords[label] = ("rank", pd.Series(column, dtype=None).to_numpy())
    quantity = next(iter(quantities.values()))
    name = data.attrs.get("metric") or quantity or "value"
    out = xr.DataArray(values, dims="rank", coords=coords, name=str(name))
    out.attrs = dict(data.attrs)
    shared = _shared_attrs(ranked.values())
    out.attrs.update(shared)
    return out


#: Attrs lifted to a Dataset when all its variables agree on them (what and how they measure).
QUANTITY_ATTRS = ("quantity", "formula", "meaning", "receiver", "direction", "correction")


def _shared_attrs(arrays: Iterable[xr.DataArray]) -> dict[str, Any]:
    arrays = list(arrays)
    out = {}
    for key in QUANTITY_ATTRS:
        values = [a.attrs.get(key) for a in arrays]
        if values and values[0] is not None and all(v == values[0] for v in values):
            out[key] = values[0]
    return out


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

    def direction(self) -> tuple[str, str]:
        """``(receiver, direction)``: which run received the patch (see :func:`direction_of`)."""
        return direction_of(self._obj)

    def effect(self) -> xr.DataArray:
        """The change from the receiving run's baseline (see :func:`effect`)."""
        return effect(self._obj)

    def normalized(self) -> xr.DataArray:
        """The effect over ``clean - corrupted``, NaN where undefined (see :func:`normalized`)."""
        return normalized(self._obj)

    def top(self, k: int = 10, *, absolute: bool = True, dim: str = "example") -> xr.DataArray:
        """The ``k`` cells that matter most, with their labels (see :func:`top`)."""
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
        correction: stats.Correction | None = "bh",
    ) -> xr.DataArray:
        """Sign-flip p-value that the mean effect along ``dim`` is zero, corrected per grid.

        Tests :meth:`effect` of raw results (measured from the receiving run's baseline), and
        the values themselves of an ``effect()`` or ``normalized()`` output; the p-values of
        every cell are adjusted together (Benjamini-Hochberg by default; ``correction=None``
        for the raw ones). See :func:`patchspec.stats.permutation_pvalue`.
        """
        stats.check_correction(correction)  # options before the baselines are looked up
        data = self._obj
        if data.attrs.get("quantity") is None:
            data = effect(data)  # a result without baselines is refused, not tested as it is
        return stats.permutation_pvalue(
            data,
            dim,
            n_permutations=n_permutations,
            seed=seed,
            alternative=alternative,
            correction=correction,
        )

    def plot(self, path: str | Path | None = None, **options: Any) -> Figure:
        """A heatmap with token labels (see :func:`patchspec.plot.plot`)."""
        from patchspec.plot import plot

        return plot(self._obj, path, **options)


@xr.register_dataset_accessor("patch")
class PatchDatasetAccessor:
    """The same verbs on a Sweep's Dataset, applied to every data variable (spec).

    Each variable is read with its own receiving run and direction (a Sweep may mix denoising
    and noising specs). ``top`` ranks the cells of every variable together, and
    ``permutation_pvalue`` corrects the p-values of every cell of every variable as one family.

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
        attributes = dict(self._obj.attrs)
        attributes.update(_shared_attrs(results.values()))
        return xr.Dataset(results, attrs=attributes)

    def effect(self) -> xr.Dataset:
        """:meth:`PatchAccessor.effect` of every variable."""
        return self._map(effect)

    def normalized(self) -> xr.Dataset:
        """:meth:`PatchAccessor.normalized` of every variable."""
        return self._map(normalized)

    def top(self, k: int = 10, *, absolute: bool = True, dim: str = "example") -> xr.DataArray:
        """One ranking of every variable's cells, with a ``spec`` coord (see :func:`top_across`)."""
        return top_across(self._obj, k, absolute=absolute, dim=dim)

    def stderr(self, dim: str = "example") -> xr.Dataset:
        """:meth:`PatchAccessor.stderr` of every variable."""
        return self._map(lambda da: stats.standard_error(da, dim))

    def bootstrap_ci(self, dim: str = "example", **options: Any) -> xr.Dataset:
        """:meth:`PatchAccessor.bootstrap_ci` of every variable."""
        return self._map(lambda da: da.patch.bootstrap_ci(dim, **options))

    def permutation_pvalue(
        self,
        dim: str = "example",
        *,
        correction: stats.Correction | None = "bh",
        **options: Any,
    ) -> xr.Dataset:
        """:meth:`PatchAccessor.permutation_pvalue` of every variable, corrected as one family.

        Every cell of every variable is one test of the sweep, so the correction (default
        Benjamini-Hochberg) runs over all of them together; ``correction=None`` gives the raw
        p-values, and ``ds[name].patch.permutation_pvalue()`` corrects within one spec.
        """
        stats.check_correction(correction)
        raw = self._map(lambda da: da.patch.permutation_pvalue(dim, correction=None, **options))
        if correction is None or correction == "none":
            return raw
        return cast(xr.Dataset, stats.adjust_pvalues(raw, correction))  # a Dataset in and out

    def plot(self, path: str | Path | None = None, **options: Any) -> Figure:
        """Heatmaps of every variable, one facet per spec (see :func:`patchspec.plot.plot`)."""
        from patchspec.plot import plot

        return plot(self._obj, path, **options)
