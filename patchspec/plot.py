"""Heatmaps of labelled results: token labels on position axes, facets, a colour scale centred on 0.

:func:`plot` draws with matplotlib's object API (a bare ``Figure`` rendered by Agg): it never
opens a window or touches ``pyplot`` state, so it is safe in scripts, tests and servers, and a
notebook shows the returned figure. :func:`plot_interactive` draws the same layout with plotly
when plotly is installed (it is not a dependency).

Position tick labels follow one policy (:func:`tick_labels`): the token where every prompt has
the same one, else the index (``"8: *"``) or the position's name; the full set of tokens stays
in the result's ``<dim>_token`` coordinate. Every panel shares one colour scale, symmetric around
0 and ``[-1, 1]`` for normalised values. The panels are laid out here rather than by xarray's
``FacetGrid``, which draws through ``pyplot`` (global figure state) and cannot draw into a
caller's ``ax=``/``fig=``.

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
    if not result.data_vars:
        raise InputError("plot got a Dataset without data variables")
    result = as_heads(result)
    shapes = {name: tuple(var.dims) for name, var in result.data_vars.items()}
    if len({frozenset(dims) for dims in shapes.values()}) > 1:
        listed = ", ".join(f"{name} {dims}" for name, dims in shapes.items())
        hint = ""
        if any("kv_head" in dims for dims in shapes.values()):
            hint = " (kv_head is read as head only where the model has as many of each)"
        raise InputError(
            f"the Dataset's variables have different dims ({listed}){hint}; plot them one at a "
            "time, e.g. plot(ds['<name>'])"
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


def as_heads(ds: xr.Dataset) -> xr.Dataset:
    """``kv_head`` read as ``head`` where a Dataset mixes the two and they have the same size.

    On a model with as many key/value heads as query heads (no grouped-query attention),
    ``kv_head`` k is head k, so ``catalog.HEAD_ALL_POS_EVERY`` (output, query, key, value and
    pattern per head) draws as one ``(spec, layer, head)`` grid. With grouped-query attention
    they differ and the Dataset is left as it is (plot such variables one at a time).

    Example:
        >>> ds = xr.Dataset({"q": (("layer", "head"), np.zeros((2, 4))),
        ...                  "k": (("layer", "kv_head"), np.ones((2, 4)))})
        >>> dict(as_heads(ds)["k"].sizes)
        {'layer': 2, 'head': 4}
    """
    dims = {str(d) for var in ds.data_vars.values() for d in var.dims}
    if not {"head", "kv_head"} <= dims:
        return ds
    heads = {var.sizes["head"] for var in ds.data_vars.values() if "head" in var.dims}
    kv_heads = {var.sizes["kv_head"] for var in ds.data_vars.values() if "kv_head" in var.dims}
    if len(heads) != 1 or heads != kv_heads:
        return ds
    renamed = {
        name: var.rename({"kv_head": "head"})
        if "kv_head" in var.dims and "head" not in var.dims
        else var
        for name, var in ds.data_vars.items()
    }
    return xr.Dataset(renamed, attrs=ds.attrs)


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


#: Drawn for a position where the prompts have different tokens (see :func:`tick_labels`).
VARIES = "*"
#: Tick labels are cut to this many characters (the full text stays in the coordinate).
MAX_LABEL = 14
#: Largest figure edge in inches; panels shrink to fit.
MAX_WIDTH, MAX_HEIGHT = 24.0, 20.0
#: Tick labels per inch of axis (font size 8, rotated labels on x).
TICKS_PER_INCH = 6.0


def distinct_tokens(label: str) -> list[str]:
    """The distinct tokens of a ``<dim>_token`` label (``"a|b"``: ``["a", "b"]``).

    Results join the distinct tokens of the prompts at a position with ``|``; a label whose
    parts would be empty (the token ``"|"`` itself) is one token.

    Example:
        >>> distinct_tokens("fox|owl"), distinct_tokens("fox"), distinct_tokens("|")
        (['fox', 'owl'], ['fox'], ['|'])
    """
    parts = str(label).split("|")
    if len(parts) == 1 or any(part == "" for part in parts):
        return [str(label)]
    return parts


def _short(text: str) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def tick_labels(data: xr.DataArray, dim: str) -> list[str]:
    """Labels of ``dim``'s cells, by the token-label policy.

    For a position dim with a ``<dim>_token`` coordinate: ``"<pos>: <token>"`` where every
    prompt has the same token there, else ``"<pos>: *"`` (an index) or just ``"<name>"`` (a
    named position such as ``"S1"``, whose token differs from prompt to prompt). The full
    set of tokens stays in the ``<dim>_token`` coordinate (``"fox|owl|pen"``). Long tokens
    are cut to :data:`MAX_LABEL` characters. Other dims: their coordinate values.

    Example:
        >>> a = xr.DataArray([1.0, 2.0, 3.0], dims="pos", coords={"pos": [0, 1, 2],
        ...                  "pos_token": ("pos", ["<bos>", "cat", "fox|owl"])})
        >>> tick_labels(a, "pos")
        ['0: <bos>', '1: cat', '2: *']
        >>> named = xr.DataArray([1.0, 2.0], dims="pos", coords={"pos": ["S1", "END"],
        ...                      "pos_token": ("pos", ["John|Mary", "."])})
        >>> tick_labels(named, "pos")
        ['S1', 'END: .']
    """
    values = data[dim].values if dim in data.coords else np.arange(data.sizes[dim])
    tokens_name = f"{dim}_token"
    if tokens_name not in data.coords or data[tokens_name].dims != (dim,):
        return [_short(str(v)) for v in values]
    out = []
    for value, label in zip(values, data[tokens_name].values, strict=True):
        if not isinstance(label, str) or not label:  # no token recorded (e.g. an outer join)
            out.append(_short(str(value)))
            continue
        tokens = distinct_tokens(label)
        if len(tokens) == 1:
            out.append(f"{value}: {_short(tokens[0])}")
        elif isinstance(value, str):
            out.append(_short(value))
        else:
            out.append(f"{value}: {VARIES}")
    return out


def _prepare(result: xr.DataArray | xr.Dataset, reduce: str | None) -> tuple[xr.DataArray, str]:
    data = _as_array(result)
    note = ""
    if reduce is not None and reduce in data.dims:
        if data.sizes[reduce] > 1:
            note = f" (mean over {data.sizes[reduce]} {reduce}s)"
        data = data.mean(reduce, keep_attrs=True)
    return data, note


def _scale(data: xr.DataArray, vmax: float | None, clip: bool | None = None) -> float:
    """The colour limit: ``vmax``, else 1 for clipped normalised values, else the largest |value|."""
    if vmax is not None:
        return float(vmax)
    finite = np.isfinite(data.values)
    biggest = float(np.nanmax(np.abs(data.values[finite]))) if finite.any() else 0.0
    if clip is None:
        clip = data.attrs.get("quantity") == "normalized"
    if clip:
        return 1.0
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


def _headline(data: xr.DataArray, note: str) -> str:
    """Title: what was patched and measured, and how the values are read, each said once.

    ``"head_out_by_pos · logprob · normalized (mean over 16 examples)"`` then a line with
    :func:`describe` (direction and formula).
    """
    what = [data.attrs.get("spec_name") or data.attrs.get("sweep"), data.name]
    metric = data.attrs.get("metric")
    quantity = data.attrs.get("quantity")
    shown = {"normalized": "normalized", "effect": "effect", "pvalue": "p-value"}.get(
        str(quantity), quantity
    )
    parts = [str(p) for p in (*what, metric) if p]
    head = " · ".join(dict.fromkeys(parts))
    if shown:
        head = f"{head} · {shown}" if head else str(shown)
    head += note
    meaning = "" if data.attrs.get("formula_by_spec") else describe(data)
    if meaning == shown:
        meaning = ""
    return f"{head}\n{meaning}" if head and meaning else head or meaning


def _colour_label(data: xr.DataArray) -> str:
    quantity = data.attrs.get("quantity")
    metric = data.attrs.get("metric")
    if quantity == "pvalue":
        correction = data.attrs.get("correction")
        return f"p-value ({correction})" if correction and correction != "none" else "p-value"
    if quantity == "normalized":
        return "normalized effect"
    if quantity == "effect":
        return f"effect on {metric}" if metric else "effect"
    return str(metric or data.name or "value")


def _layout(
    n_x: int, n_y: int, n_rows: int, n_cols: int, longest_title: int
) -> tuple[tuple[float, float], float, float]:
    """``(figsize, panel width, panel height)`` in inches, from the data's shape."""
    panel_w = min(12.0, max(2.5, 0.22 * n_x + 0.8), max(2.0, (MAX_WIDTH - 1.8) / n_cols))
    panel_w = max(panel_w, min(0.07 * longest_title, (MAX_WIDTH - 1.8) / n_cols))
    panel_h = min(8.0, max(1.8, 0.2 * n_y + 0.6), max(1.2, (MAX_HEIGHT - 1.5) / n_rows))
    return (n_cols * panel_w + 1.8, n_rows * (panel_h + 0.9) + 1.0), panel_w, panel_h


def _wrap(n: int, panel_w: float) -> int | None:
    """Facet columns per row: as many as fit in 60 % of :data:`MAX_WIDTH`, rows balanced."""
    fit = max(1, int(0.6 * MAX_WIDTH / panel_w))
    if n <= fit:
        return None
    rows = math.ceil(n / fit)
    return math.ceil(n / rows)


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
    clip: bool | None = None,
    ax: Any = None,
    fig: Figure | None = None,
) -> Figure:
    """Draw a result as heatmaps (one per facet) on one shared colour scale around zero.

    Every panel (facet, or variable of a Sweep's Dataset) shares one symmetric scale
    ``[-vmax, vmax]``, so a noise-level panel is drawn pale next to a real effect. Normalised
    values (``quantity == "normalized"``) are drawn on ``[-1, 1]``: values past the whole
    clean-corrupted gap get the end colours (``clip=False``: scale to the largest value).
    p-values are drawn on a log scale from the smallest to 1 (dark: small). A result with a
    ``bound`` dim (:meth:`bootstrap_ci`) is drawn as intervals (:func:`plot_intervals`).

    Args:
        result: A DataArray, or a Sweep's Dataset (its specs become a ``spec`` facet). In a
            Dataset that mixes ``head`` and ``kv_head`` dims (``catalog.HEAD_ALL_POS_EVERY``),
            ``kv_head`` is read as ``head`` when the model has as many of each.
        path: Where to save the figure (format from the suffix, e.g. ``.png``, ``.pdf``).
        x, y, col, row: Dims to place; the rest are placed by name (see :func:`placement`).
        col_wrap: Wrap a long ``col`` facet after this many panels.
        reduce: Dim averaged over first when present (``None``: keep it).
        cmap: A diverging matplotlib colormap; NaN (not measured) cells are drawn grey.
        vmax: Colour limit (``[-vmax, vmax]``); default 1 for normalised values, else the
            largest absolute value over all panels.
        title: Figure title; default the spec, metric and quantity, and what the values mean
            (:func:`describe`: direction and formula, e.g. ``noising: clean - patched``).
        figsize: Figure size in inches; default from the number of cells and panels.
        dpi: Resolution of the saved file.
        clip: Draw values on ``[-1, 1]`` (default: for normalised values only).
        ax: A matplotlib ``Axes`` to draw one panel into (the result must have no facets).
        fig: A matplotlib ``Figure`` to draw the panels into (default a new one).

    Returns:
        The matplotlib ``Figure`` (a new one is not registered with pyplot).

    Raises:
        InputError: a dim named in ``x``/``y``/``col``/``row`` is missing, too many dims, or
            ``ax`` given for a result with facets.

    Example:
        >>> a = xr.DataArray(np.arange(6.0).reshape(2, 3) - 2, dims=("layer", "pos"),
        ...                  coords={"pos_token": ("pos", ["<bos>", "a", "b"])}, name="m")
        >>> fig = plot(a)
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0: <bos>', '1: a', '2: b']
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    if "bound" in _dims_of(result):
        return plot_intervals(
            result,
            path,
            x=x,
            col=col,
            row=row,
            title=title,
            figsize=figsize,
            dpi=dpi,
            ax=ax,
            fig=fig,
            reduce=reduce,
        )
    data, note = _prepare(result, reduce)
    place = placement(data, x=x, y=y, col=col, row=row)
    x_dim, y_dim, col_dim, row_dim = place["x"], place["y"], place["col"], place["row"]
    if x_dim is None:
        raise InputError(f"result {data.name!r} has no dims to draw; it is a single value")
    n_x = data.sizes[x_dim]
    n_y = data.sizes[y_dim] if y_dim else 1
    if col_wrap is None and col_dim and not row_dim and ax is None and fig is None:
        col_wrap = _wrap(data.sizes[col_dim], _layout(n_x, n_y, 1, 1, 0)[1])
    facets = _facets(data, col_dim, row_dim, col_wrap)
    n_rows = max(p[0] for _, p, _ in facets) + 1
    n_cols = max(p[1] for _, p, _ in facets) + 1
    if ax is not None and len(facets) > 1:
        raise InputError(
            f"ax= draws one panel; this result has {len(facets)} facets "
            f"({', '.join(d for d in (col_dim, row_dim) if d)}); pass fig= instead, or select "
            "one with .sel(...)"
        )
    longest = max((len(line) for _, _, t in facets for line in t.split("\n")), default=0)
    size, panel_w, panel_h = _layout(n_x, n_y, n_rows, n_cols, longest)
    if title is None:
        title = _headline(data, note)
    # Room for the title's longest line (about 0.1 inch per character at the default size).
    size = (max(size[0], 0.1 * max((len(line) for line in title.split("\n")), default=0)), size[1])
    if figsize is not None:
        size = figsize
        panel_w, panel_h = figsize[0] / n_cols, figsize[1] / n_rows
    if ax is not None:
        fig = ax.figure
        axes: Any = [[ax]]
        box = ax.get_position()
        panel_w = fig.get_figwidth() * box.width
        panel_h = fig.get_figheight() * box.height
    else:
        if fig is None:
            fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
    pvalues = data.attrs.get("quantity") == "pvalue"
    norm: Normalize
    extend = "neither"
    if pvalues:
        colours = colormaps["magma"].with_extremes(bad="lightgrey")
        finite = data.values[np.isfinite(data.values) & (data.values > 0)]
        low = float(finite.min()) if finite.size else 1e-3
        norm = LogNorm(vmin=min(low, 0.01) if vmax is None else float(vmax), vmax=1.0)
    else:
        colours = colormaps[cmap].with_extremes(bad="lightgrey")
        limit = _scale(data, vmax, clip)
        norm = Normalize(vmin=-limit, vmax=limit)
        finite = np.abs(data.values[np.isfinite(data.values)])
        if finite.size and float(finite.max()) > limit:
            extend = "both"
    image: Any = None
    used = set()
    for where, (r, c), facet_title in facets:
        panel = data.isel(where)
        target = axes[r][c]
        used.add((r, c))
        grid = panel.transpose(y_dim, x_dim).values if y_dim else panel.values[np.newaxis, :]
        image = target.imshow(grid, cmap=colours, norm=norm, aspect="auto", interpolation="nearest")
        _ticks(target, "x", panel, x_dim, panel_w)
        if y_dim:
            _ticks(target, "y", panel, y_dim, panel_h)
        else:
            target.set_yticks([])
        if facet_title:
            target.set_title(facet_title, fontsize="medium")
    for r in range(n_rows):
        for c in range(n_cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    fig.colorbar(
        image,
        ax=[a for row_axes in axes for a in row_axes],
        label=_colour_label(data),
        shrink=1.0 if fig.figure.get_figheight() <= 4 else max(0.4, min(0.9, 6.0 / fig.figure.get_figheight())),
        extendfrac=0.04,
        extend=extend,
    )
    if title:
        if ax is not None:
            ax.set_title(title, fontsize="medium")
        else:
            fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _dims_of(result: xr.DataArray | xr.Dataset) -> set[str]:
    return {str(d) for d in result.dims} if hasattr(result, "dims") else set()


def _ticks(ax: Any, axis: str, panel: xr.DataArray, dim: str, inches: float = 6.0) -> None:
    labels = tick_labels(panel, dim)
    room = max(2, int(0.7 * inches * TICKS_PER_INCH))  # less the tick labels and margins
    step = max(1, math.ceil(len(labels) / min(room, MAX_TICKS)))
    ticks = list(range(0, len(labels), step))
    shown = [labels[i] for i in ticks]
    if axis == "x":
        rotate = sum(len(s) for s in shown) * 0.08 > inches
        ax.set_xticks(ticks, shown, rotation=90 if rotate else 0, fontsize=8)
        ax.set_xlabel(dim)
    else:
        ax.set_yticks(ticks, shown, fontsize=8)
        ax.set_ylabel(dim)


def plot_agreement(
    exact: xr.DataArray,
    estimate: xr.DataArray,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (14.0, 7.0),
    dpi: int = 100,
) -> Figure:
    """Draw an estimate beside the exact result of the same grid, and how well they agree.

    The exact effect above the estimated effect, as heatmaps on one colour scale, and beside
    them a scatter of estimate against exact (one dot per cell, averaged over examples) with the
    line ``y = x`` and their Pearson and Spearman correlations (``scipy.stats``). An unsigned
    score (``estimator="graddrop"``, ``attrs["quantity"] == "score"``) is drawn beside, and
    compared with, the exact result's ``|effect|``.

    Args:
        exact: A raw result of ``spec.run(...)`` (exact; 1-2 dims once averaged over examples).
        estimate: The same spec's result with ``estimator="atp"`` (or any other estimator).
        path: Where to save the figure.
        title: Figure title (default: the spec, the estimator and the correlations).
        figsize: Figure size in inches.
        dpi: Resolution of the saved file.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        InputError: the two results are not on the same grid.

    Example:
        >>> grid = {"dims": ("layer", "head"), "attrs": {"clean_baseline": 1.0, "corrupted_baseline": 0.0}}
        >>> exact = xr.DataArray([[0.1, 0.9], [0.2, 0.0]], **grid)
        >>> atp = xr.DataArray([[0.2, 0.8], [0.1, 0.0]], **grid).assign_attrs(estimator="atp")
        >>> fig = plot_agreement(exact, atp)
        >>> len(fig.axes[-1].collections[0].get_offsets())  # one dot per cell in the scatter
        4
    """
    from matplotlib.figure import Figure

    from patchspec.stats import agreement, comparable_values

    scores = agreement(exact, estimate)  # checks the grids first
    score = estimate.attrs.get("quantity") == "score"  # unsigned: beside |exact effect|
    if score:
        magnitude = abs(exact.patch.effect())
        magnitude.attrs["formula"] = "|" + str(magnitude.attrs.get("formula", "effect")) + "|"
        effects = [magnitude, estimate]
    else:
        effects = [r.patch.effect() for r in (exact, estimate)]
    effects = [e.mean("example", keep_attrs=True) if "example" in e.dims else e for e in effects]
    x, y = comparable_values(exact, estimate)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    vmax = float(max(np.abs(x).max(initial=0.0), np.abs(y).max(initial=0.0))) or 1.0
    name = str(estimate.attrs.get("estimator", "estimate"))
    fig = Figure(figsize=figsize, layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[2.6, 1], squeeze=False)[0]
    heatmaps = left.subfigures(2, 1, squeeze=False)[:, 0]
    for panel, data, label in ((heatmaps[0], effects[0], "exact"), (heatmaps[1], effects[1], name)):
        formula = data.attrs.get("formula", "effect")
        plot(data, fig=panel, vmax=vmax, reduce=None, title=f"{label}: {formula}")
    scatter = right.subplots()
    scatter.scatter(x, y, s=12, alpha=0.7)
    scatter.plot([-vmax, vmax], [-vmax, vmax], color="grey", linestyle="--", linewidth=1)
    scatter.set_xlabel("|exact effect|" if score else "exact effect")
    scatter.set_ylabel(f"{name} score" if score else f"{name} effect")
    scatter.set_title(
        f"Pearson {scores['pearson']:.3f}, Spearman {scores['spearman']:.3f}", fontsize="medium"
    )
    spec = exact.attrs.get("spec_name", exact.name)
    fig.suptitle(title or f"{spec}: {name} beside exact patching ({x.size} cells)")
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def plot_intervals(
    result: xr.DataArray | xr.Dataset,
    path: str | Path | None = None,
    *,
    x: str | None = None,
    hue: str | None = None,
    col: str | None = None,
    row: str | None = None,
    estimate: xr.DataArray | xr.Dataset | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    ax: Any = None,
    fig: Figure | None = None,
    reduce: str | None = "example",
) -> Figure:
    """Draw intervals (a ``bound`` dim with ``low``/``high``, e.g. :meth:`bootstrap_ci`) as bars.

    One vertical bar per cell along ``x`` from ``low`` to ``high`` (dashes at the ends); a
    further dim (``hue``, default ``layer`` or the next one) gives side-by-side bars in different
    colours, and up to two more become facet columns and rows. A dashed line marks 0 (no effect); a bar that does
    not cross it is drawn solid, one that does is drawn faint. ``estimate`` (e.g. the mean
    normalised values) adds a dot per bar.

    Args:
        result: Intervals: a DataArray or Dataset with a ``bound`` dim.
        path: Where to save the figure.
        x, hue, col, row: Dims to place (default: a position dim or the last dim along x).
        estimate: Point values drawn as dots (averaged over ``reduce`` when present).
        title: Figure title (default the spec, metric and what the bounds are of).
        figsize: Figure size in inches; default from the number of bars and panels.
        dpi: Resolution of the saved file.
        ax: A matplotlib ``Axes`` to draw into (one panel only).
        fig: A matplotlib ``Figure`` to draw into.
        reduce: Dim averaged over in ``estimate``.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        InputError: no ``bound`` dim with ``low`` and ``high``, too many dims, or ``ax`` with
            several facets.

    Example:
        >>> ci = xr.DataArray([[-0.1, 0.2], [0.5, 0.9]], dims=("layer", "bound"),
        ...                   coords={"bound": ["low", "high"]}, name="m")
        >>> fig = plot_intervals(ci)
        >>> [len(bars.get_segments()) for bars in fig.axes[0].collections]  # 2 bars, 1 crosses 0
        [2, 1]
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    data = _as_array(result)
    if "bound" not in data.dims or not {"low", "high"} <= set(map(str, data["bound"].values)):
        raise InputError(
            f"plot_intervals needs a 'bound' dim with 'low' and 'high' (bootstrap_ci output); "
            f"the result has dims {tuple(map(str, data.dims))}"
        )
    low, high = data.sel(bound="low"), data.sel(bound="high")
    centre = None
    if estimate is not None:
        centre, _ = _prepare(estimate, reduce)
    place = placement(low, x=x, y=hue, col=col, row=row)
    x_dim, hue_dim, col_dim, row_dim = place["x"], place["y"], place["col"], place["row"]
    if x_dim is None:
        raise InputError("plot_intervals got one interval and no dims to draw it along")
    facets = _facets(low, col_dim, row_dim, None)
    n_rows = max(p[0] for _, p, _ in facets) + 1
    n_cols = max(p[1] for _, p, _ in facets) + 1
    if ax is not None and len(facets) > 1:
        raise InputError(
            f"ax= draws one panel; these intervals have {len(facets)} facets; pass fig= instead"
        )
    n_x = low.sizes[x_dim]
    n_hue = low.sizes[hue_dim] if hue_dim else 1
    width = min(MAX_WIDTH, max(4.0, n_cols * (1.0 + 0.12 * n_x * max(1, n_hue) ** 0.5)) + 1.5)
    size = figsize or (width, min(MAX_HEIGHT, n_rows * 2.8 + 1.0))
    if ax is not None:
        fig = ax.figure
        axes: Any = [[ax]]
    else:
        if fig is None:
            fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=True)
    palette = colormaps["viridis"]
    offsets = np.linspace(-0.35, 0.35, n_hue) if n_hue > 1 else np.zeros(1)
    positions = np.arange(n_x)
    used = set()
    for where, (r, c), facet_title in facets:
        target = axes[r][c]
        used.add((r, c))
        for k in range(n_hue):
            pick = dict(where)
            if hue_dim:
                pick[hue_dim] = k
            lo = low.isel(pick).transpose(x_dim).values
            hi = high.isel(pick).transpose(x_dim).values
            colour = palette(k / max(1, n_hue - 1) * 0.85)
            label = (
                f"{hue_dim} = {tick_labels(low, hue_dim)[k]}" if hue_dim and r == c == 0 else None
            )
            where_x = positions + offsets[k]
            crosses = (lo <= 0) & (hi >= 0)
            target.vlines(where_x, lo, hi, colors=[colour], linewidth=2.5, label=label, alpha=None)
            if crosses.any():
                target.vlines(
                    where_x[crosses], lo[crosses], hi[crosses], colors="white", linewidth=1.0
                )
            # Ends as dashes, so an interval that collapsed to a point still shows.
            target.plot(where_x, lo, "_", where_x, hi, "_", color=colour, markersize=6)
            if centre is not None:
                point = centre.isel(pick).transpose(x_dim).values
                target.plot(where_x, point, "o", color=colour, markersize=3)
        target.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
        labels = tick_labels(low, x_dim)
        box_w = size[0] / n_cols
        step = max(1, math.ceil(n_x / max(2, int(box_w * TICKS_PER_INCH))))
        ticks = list(range(0, n_x, step))
        shown = [labels[i] for i in ticks]
        rotate = sum(len(s) for s in shown) * 0.08 > box_w
        target.set_xticks(ticks, shown, rotation=90 if rotate else 0, fontsize=8)
        target.set_xlabel(x_dim)
        target.set_xlim(-0.6, n_x - 0.4)
        if facet_title:
            target.set_title(facet_title, fontsize="medium")
    for r in range(n_rows):
        for c in range(n_cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    axes[0][0].set_ylabel(_colour_label(data).split(" (")[0])
    if hue_dim and n_hue > 1:
        if ax is not None:
            ax.legend(fontsize="small", ncols=min(n_hue, 4))
        else:
            fig.legend(loc="outside lower center", fontsize="small", ncols=min(n_hue, 8))
    level = data.attrs.get("ci")
    if title is None:
        head = _headline(data, "")
        title = (
            f"{int(level * 100)}% intervals: {head}"
            if isinstance(level, float)
            else (f"intervals: {head}")
        )
    if ax is not None:
        ax.set_title(title, fontsize="medium")
    else:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


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
