"""Heatmaps of labelled results: token labels on position axes, facets, a colour scale centred on 0.

:func:`plot` draws with matplotlib's object API (a bare ``Figure`` rendered by Agg): it never
opens a window or touches ``pyplot`` state, so it is safe in scripts, tests and servers, and a
notebook shows the returned figure. :func:`plot_interactive` draws the same layout with plotly
when plotly is installed (it is not a dependency).

Which dim goes where is decided from the names: a position dim (``pos``, ``src_pos`` ...) runs
along x with its ``<dim>_token`` strings as tick labels, a second position dim or ``layer`` runs
down y, and up to two further dims (``head``, ``spec``, ``metric``, ``source`` ...) become facet
columns and rows. Per-prompt results are averaged over ``example`` first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from patchspec.errors import InputError, did_you_mean
from patchspec.results import is_position_dim

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: At most this many tick labels per axis; longer axes label every n-th cell.
MAX_TICKS = 80


def _as_array(result: xr.DataArray | xr.Dataset) -> xr.DataArray:
    """A Dataset's variables stacked along a ``spec`` dim (they must share dims)."""
    if isinstance(result, xr.DataArray):
        return result
    if not isinstance(result, xr.Dataset):
        raise InputError(f"plot needs an xarray DataArray or Dataset, got {type(result).__name__}")
    shapes = {name: tuple(var.dims) for name, var in result.data_vars.items()}
    if not shapes:
        raise InputError("plot got a Dataset without data variables")
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {dims}" for name, dims in shapes.items())
        raise InputError(
            f"the Dataset's variables have different dims ({listed}); plot them one at a time, "
            "e.g. plot(ds['<name>'])"
        )
    array = result.to_dataarray(dim="spec", name=str(result.attrs.get("metric", "value")))
    array = array.assign_attrs(result.attrs)
    notes = {str(name): describe(var) for name, var in result.data_vars.items()}
    keys = ("quantity", "formula", "receiver", "direction", "correction", "tested")
    if len(set(notes.values())) == 1:  # one meaning: say it once, in the title and colour bar
        first = next(iter(result.data_vars.values()))
        array.attrs.update({k: first.attrs[k] for k in keys if k in first.attrs})
    else:  # specs that mean different things (a denoising and a noising spec): say it per panel
        for key in keys:
            array.attrs.pop(key, None)
        quantities = {var.attrs.get("quantity") for var in result.data_vars.values()}
        if len(quantities) == 1 and None not in quantities:
            array.attrs["quantity"] = quantities.pop()
        array.attrs["formula_by_spec"] = notes
    return array


def describe(data: xr.DataArray) -> str:
    """What the values of a result mean, for titles: direction and formula.

    ``"noising: (clean - patched) / (clean - corrupted)"`` for a derived quantity,
    ``"p-value (bh) of clean - patched"`` for p-values, ``"denoising: patched values (corrupted
    run)"`` for raw results that record their direction, ``""`` when nothing is recorded.

    Example:
        >>> a = xr.DataArray([0.5], dims="layer", attrs={"quantity": "normalized",
        ...     "formula": "(clean - patched) / (clean - corrupted)", "direction": "noising"})
        >>> describe(a)
        'noising: (clean - patched) / (clean - corrupted)'
    """
    attributes = data.attrs
    quantity = attributes.get("quantity")
    direction = attributes.get("direction")
    formula = attributes.get("formula")
    lead = f"{direction}: " if direction else ""
    if quantity == "pvalue":
        correction = attributes.get("correction")
        how = f" ({correction})" if correction and correction != "none" else " (uncorrected)"
        return f"{lead}p-value{how} of {formula or attributes.get('tested') or 'the values'}"
    if quantity:
        return f"{lead}{formula or quantity}"
    receiver = attributes.get("receiver")
    if receiver:
        return f"{lead}patched values ({receiver} run)"
    return ""


def placement(
    data: xr.DataArray,
    *,
    x: str | None = None,
    y: str | None = None,
    col: str | None = None,
    row: str | None = None,
) -> dict[str, str | None]:
    """Which dim runs along x and y and which ones facet columns and rows.

    Args:
        data: The array to draw (already reduced over ``example``).
        x, y, col, row: Dims to place; the others are placed by name (see the module docs).

    Returns:
        ``{"x": ..., "y": ..., "col": ..., "row": ...}``; ``None`` where no dim is placed.

    Raises:
        InputError: a named dim does not exist, or more than four dims are left.

    Example:
        >>> a = xr.DataArray(np.zeros((2, 3, 4)), dims=("layer", "pos", "head"))
        >>> placement(a)
        {'x': 'pos', 'y': 'layer', 'col': 'head', 'row': None}
    """
    dims = [str(d) for d in data.dims]
    chosen = {"x": x, "y": y, "col": col, "row": row}
    for role, dim in chosen.items():
        if dim is not None and dim not in dims:
            raise InputError(
                f"{role}={dim!r} is not a dim of the result; its dims are {tuple(dims)}"
                f"{did_you_mean(dim, dims)}"
            )
    left = [d for d in dims if d not in chosen.values()]

    def take(candidates: Sequence[str]) -> str | None:
        for dim in candidates:
            if dim in left:
                left.remove(dim)
                return dim
        return None

    positions = [d for d in left if is_position_dim(d)]
    if chosen["x"] is None:
        chosen["x"] = take([*positions[::-1], *left[::-1]])
    if chosen["y"] is None:
        chosen["y"] = take([*[d for d in positions if d in left][::-1], "layer", *left])
    if chosen["col"] is None:
        chosen["col"] = take(left)
    if chosen["row"] is None:
        chosen["row"] = take(left)
    if left:
        raise InputError(
            f"the result has {len(dims)} dims {tuple(dims)}, one too many to draw ({left} left "
            "over); select one value with .sel(...) or average with .mean(...) first"
        )
    return chosen


def tick_labels(data: xr.DataArray, dim: str) -> list[str]:
    """Labels of ``dim``'s cells: ``"<pos>: <token>"`` where a ``<dim>_token`` coord exists.

    Example:
        >>> a = xr.DataArray([1.0, 2.0], dims="pos",
        ...                  coords={"pos": [0, 1], "pos_token": ("pos", ["<bos>", "cat"])})
        >>> tick_labels(a, "pos")
        ['0: <bos>', '1: cat']
    """
    values = data[dim].values if dim in data.coords else np.arange(data.sizes[dim])
    tokens_name = f"{dim}_token"
    if tokens_name in data.coords and data[tokens_name].dims == (dim,):
        return [f"{v}: {t}" for v, t in zip(values, data[tokens_name].values, strict=True)]
    return [str(v) for v in values]


def _prepare(result: xr.DataArray | xr.Dataset, reduce: str | None) -> tuple[xr.DataArray, str]:
    data = _as_array(result)
    note = ""
    if reduce is not None and reduce in data.dims:
        note = f" (mean over {data.sizes[reduce]} {reduce}s)"
        data = data.mean(reduce, keep_attrs=True)
    return data, note


def _scale(data: xr.DataArray, vmax: float | None) -> float:
    if vmax is not None:
        return float(vmax)
    biggest = float(np.nanmax(np.abs(data.values))) if np.isfinite(data.values).any() else 0.0
    return biggest if biggest > 0 else 1.0


def _facets(
    data: xr.DataArray, col: str | None, row: str | None, col_wrap: int | None
) -> list[tuple[dict[Hashable, int], tuple[int, int], str]]:
    """``(isel, (row, col) of the axes, title)`` of each facet."""
    n_col = data.sizes[col] if col else 1
    n_row = data.sizes[row] if row else 1
    notes = data.attrs.get("formula_by_spec") or {}
    out = []
    for r in range(n_row):
        for c in range(n_col):
            where: dict[Hashable, int] = {}
            title = []
            for dim, i in ((row, r), (col, c)):
                if dim is not None:
                    where[dim] = i
                    title.append(f"{dim} = {tick_labels(data, dim)[i]}")
                    if dim == "spec" and notes.get(str(data[dim].values[i])):
                        title[-1] += f"\n{notes[str(data[dim].values[i])]}"
            place = (r, c) if not col_wrap or row else divmod(c, col_wrap)
            out.append((where, place, ", ".join(title)))
    return out


def plot(
    result: xr.DataArray | xr.Dataset,
    path: str | Path | None = None,
    *,
    x: str | None = None,
    y: str | None = None,
    col: str | None = None,
    row: str | None = None,
    col_wrap: int | None = None,
    reduce: str | None = "example",
    cmap: str = "RdBu_r",
    vmax: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Figure:
    """Draw a result as heatmaps (one per facet) on one symmetric colour scale around zero.

    Args:
        result: A DataArray, or a Sweep's Dataset (its specs become a ``spec`` facet).
        path: Where to save the figure (format from the suffix, e.g. ``.png``, ``.pdf``).
        x, y, col, row: Dims to place; the rest are placed by name (see :func:`layout`).
        col_wrap: Wrap a long ``col`` facet after this many panels.
        reduce: Dim averaged over first when present (``None``: keep it).
        cmap: A diverging matplotlib colormap; NaN (not measured) cells are drawn grey.
        vmax: Colour limit (``[-vmax, vmax]``); default the largest absolute value.
        title: Figure title; default the result's name and spec, and what the values mean
            (:func:`describe`: direction and formula, e.g. ``noising: clean - patched``).
        figsize: Figure size in inches; default from the number of cells.
        dpi: Resolution of the saved file.

    Returns:
        The matplotlib ``Figure`` (not registered with pyplot).

    Raises:
        InputError: a dim named in ``x``/``y``/``col``/``row`` is missing, or too many dims.

    Example:
        >>> a = xr.DataArray(np.arange(6.0).reshape(2, 3) - 2, dims=("layer", "pos"),
        ...                  coords={"pos_token": ("pos", ["<bos>", "a", "b"])}, name="m")
        >>> fig = plot(a)
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0: <bos>', '1: a', '2: b']
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    data, note = _prepare(result, reduce)
    place = placement(data, x=x, y=y, col=col, row=row)
    x_dim, y_dim, col_dim, row_dim = place["x"], place["y"], place["col"], place["row"]
    if x_dim is None:
        raise InputError(f"result {data.name!r} has no dims to draw; it is a single value")
    limit = _scale(data, vmax)
    facets = _facets(data, col_dim, row_dim, col_wrap)
    n_rows = max(p[0] for _, p, _ in facets) + 1
    n_cols = max(p[1] for _, p, _ in facets) + 1
    n_x = data.sizes[x_dim]
    n_y = data.sizes[y_dim] if y_dim else 1
    if figsize is None:
        longest = max((len(line) for _, _, t in facets for line in t.split("\n")), default=0)
        panel_width = max(1.5 + 0.35 * n_x, 0.075 * longest)  # room for the facet titles
        width = min(40.0, max(4.0, n_cols * panel_width) + 1.0)
        height = min(40.0, max(3.0, n_rows * (1.2 + 0.3 * n_y)) + 0.8)
        figsize = (width, height)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    colours = colormaps[cmap].with_extremes(bad="lightgrey")
    image: Any = None
    used = set()
    for where, (r, c), facet_title in facets:
        panel = data.isel(where)
        ax = axes[r][c]
        used.add((r, c))
        grid = panel.transpose(y_dim, x_dim).values if y_dim else panel.values[np.newaxis, :]
        image = ax.imshow(
            grid, cmap=colours, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
        )
        _ticks(ax, "x", panel, x_dim)
        if y_dim:
            _ticks(ax, "y", panel, y_dim)
        else:
            ax.set_yticks([])
        if facet_title:
            ax.set_title(facet_title, fontsize="medium")
    for r in range(n_rows):
        for c in range(n_cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    label = str(data.attrs.get("metric", data.name or "value"))
    meaning = describe(data)
    quantity = data.attrs.get("quantity")
    if quantity == "pvalue":
        label = f"{label}: p-value"
    elif quantity:
        label = f"{label}: {data.attrs.get('formula') or quantity}"
    fig.colorbar(image, ax=[a for row_axes in axes for a in row_axes], label=label, shrink=0.9)
    if title is None:
        spec = data.attrs.get("spec_name")
        title = " · ".join(dict.fromkeys(str(t) for t in (data.name, spec) if t)) + note
        if meaning:
            title = f"{title}\n{meaning}" if title else meaning
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _ticks(ax: Any, axis: str, panel: xr.DataArray, dim: str) -> None:
    labels = tick_labels(panel, dim)
    step = max(1, math.ceil(len(labels) / MAX_TICKS))
    ticks = list(range(0, len(labels), step))
    shown = [labels[i] for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, shown, rotation=90 if any(len(s) > 3 for s in shown) else 0)
        ax.set_xlabel(dim)
    else:
        ax.set_yticks(ticks, shown)
        ax.set_ylabel(dim)


def plot_interactive(
    result: xr.DataArray | xr.Dataset,
    path: str | Path | None = None,
    *,
    x: str | None = None,
    y: str | None = None,
    col: str | None = None,
    col_wrap: int | None = None,
    reduce: str | None = "example",
    vmax: float | None = None,
) -> Any:
    """The same heatmaps as an interactive plotly figure (needs ``pip install plotly``).

    Args:
        result: A DataArray or a Sweep's Dataset.
        path: Where to save the figure as HTML.
        x, y, col: Dims to place (see :func:`layout`); there is no ``row`` facet.
        col_wrap: Wrap the ``col`` facet after this many panels.
        reduce: Dim averaged over first when present.
        vmax: Colour limit (``[-vmax, vmax]``).

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        InputError: plotly is not installed, or the dims do not fit (see :func:`plot`).
    """
    try:
        import plotly.express as px
    except ImportError:
        raise InputError(
            "plot_interactive needs plotly, which is not installed; pip install plotly, or use "
            "plot(...) for a matplotlib figure"
        ) from None
    data, note = _prepare(result, reduce)
    place = placement(data, x=x, y=y, col=col)
    x_dim, y_dim, col_dim = place["x"], place["y"], place["col"]
    if x_dim is None or place["row"] is not None:
        raise InputError(
            f"plot_interactive draws 1 to 3 dims, the result has {tuple(data.dims)}; "
            "select with .sel(...) first"
        )
    order = [d for d in (col_dim, y_dim, x_dim) if d is not None]
    grid = data.transpose(*order).values
    if y_dim is None:
        grid = grid[..., np.newaxis, :]
    limit = _scale(data, vmax)
    fig = px.imshow(
        grid,
        x=tick_labels(data, x_dim),
        y=tick_labels(data, y_dim) if y_dim else [""],
        facet_col=0 if col_dim else None,
        facet_col_wrap=col_wrap or 0,
        color_continuous_scale="RdBu_r",
        zmin=-limit,
        zmax=limit,
        aspect="auto",
        labels={"x": x_dim, "y": y_dim or "", "color": str(data.name or "value")},
        title=" · ".join(t for t in (f"{data.name or ''}{note}", describe(data)) if t),
    )
    if col_dim:
        names = tick_labels(data, col_dim)
        for annotation in fig.layout.annotations:
            index = int(annotation.text.split("=")[-1])
            annotation.text = f"{col_dim} = {names[index]}"
    if path is not None:
        fig.write_html(str(path))
    return fig
