"""Compiled grids: a spec and the sizes of one model and input, resolved once.

``compile(spec, sizes)`` resolves every swept axis to its coordinates (layer numbers, heads,
positions or position names, sources) and every restriction of an unswept dim to a fixed
selection, and caches the result per ``(spec, sizes, positions)``. Cells stay implicit: cell
``i`` is the flat (C-order) index into the product of the axes' coordinates, so a grid of
589,824 attention-pattern cells costs a few tuples, not 589,824 objects. Engines turn a chunk
of flat indices into coordinate indices (:meth:`Grid.coordinate_indices`) and build the
chunk's masks vectorised from them (:mod:`patchspec.execute.masks`).

The explicit path stays for what cannot be vectorised or is given cell by cell: custom
rules (their regions come from calling the rule, :func:`~patchspec.plan.cells.regions_of`),
explicit rows of coordinates (``index_df``-style lists, subsets), and explicit cells with
their regions (:func:`explicit_grid`). :meth:`Grid.cell` spells any cell out as a
:class:`~patchspec.plan.cells.Cell`, which is what the reference estimator writes from.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np

from patchspec.errors import SpecError
from patchspec.layouts import Layout, layout
from patchspec.plan.cells import (
    Cell,
    DimIndex,
    Region,
    aligned,
    axis_values,
    is_named,
    named_index,
    regions_of,
    resolve,
)
from patchspec.plan.positions import Positions
from patchspec.plan.sizes import Sizes
from patchspec.sources import Receiver, Source, source_labels
from patchspec.spec import RESERVED_DIMS, SOURCE_AXIS, AnySpec, JointSpec, PatchSpec

#: What the coordinates of an axis are: token or head indices, position names (resolved per
#: prompt), value sources, a field of the source (``strength``: the values label the axis, the
#: sources set to them are its values), or the listed values of a custom-rule axis.
AxisKind = Literal["index", "named", "source", "parameter", "custom"]


@attrs.frozen(eq=False)
class Axis:
    """One swept axis of one part of a grid.

    Attributes:
        name: The axis name in its spec (``"head"``).
        dim: Its result dim (``"head_2"`` in a joint spec whose parts share the name).
        kind: What the coordinates are (see :data:`AxisKind`).
        values: One value per coordinate: an int index, a position name, a source, or a
            custom-rule value.
        labels: One coordinate label per value (a source's label for the ``source`` axis).
    """

    name: str
    dim: str
    kind: AxisKind
    values: tuple[Any, ...]
    labels: tuple[Any, ...]


@attrs.frozen(eq=False)
class Part:
    """One spec of a grid (a joint spec has several), with its selections resolved.

    Attributes:
        spec: The spec.
        axes: Its swept axes, in order.
        first: The grid dim of its first axis.
        layers: Every layer some cell of this part may patch, sorted.
        fixed: ``(dim, selection)`` per activation dim but ``batch`` that is not swept: its
            restriction resolved (``None``: all of it).
        tables: For each swept named-position axis (by axis index), ``[name][prompt]`` token
            indices in the receiving run.
        named: Whether some selection of this part names positions.
    """

    spec: PatchSpec
    axes: tuple[Axis, ...]
    first: int
    layers: tuple[int, ...]
    fixed: tuple[tuple[str, DimIndex], ...]
    tables: Mapping[int, tuple[tuple[int, ...], ...]]
    named: bool = False

    @property
    def layout(self) -> Layout:
        """The activation's layout."""
        return self.spec.layout

    @property
    def vectorised(self) -> bool:
        """Whether masks can be built from coordinates (no custom rule)."""
        return self.spec.rule is None

    def axis_index(self, name: str) -> int | None:
        """The position in :attr:`axes` of the axis called ``name``, or ``None``."""
        return next((i for i, a in enumerate(self.axes) if a.name == name), None)

    def source(self, source: Source, positions: Positions | None) -> Source:
        """The source this part really reads for ``source`` (aligned for moved names)."""
        return aligned(self.spec.activation, source, positions) if self.named else source


@attrs.frozen(eq=False, slots=False)
class Grid:
    """The cells of a sweep of one spec, implicit, in C order over ``dims``.

    Attributes:
        dims: Result dims.
        coords: Coordinate labels per dim.
        parts: The spec's parts (one, or several for a joint spec).
        receiver: The run every cell patches.
        sizes: Sizes of the model and inputs.
        positions: Named positions, when the sweep got any.
        rows: Explicit cells as coordinate indices ``[cells, dims]`` (``None``: every cell of
            the product, in C order).
        explicit: Explicit cells with their regions (replacing ``parts``), e.g. for
            hand-built cell lists.
    """

    dims: tuple[str, ...]
    coords: Mapping[str, tuple[Any, ...]]
    parts: tuple[Part, ...]
    receiver: Receiver
    sizes: Sizes
    positions: Positions | None = None
    rows: np.ndarray | None = None
    explicit: tuple[Cell, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of coordinates along each dim."""
        return tuple(len(self.coords[d]) for d in self.dims)

    @functools.cached_property
    def _strides(self) -> tuple[np.ndarray, np.ndarray]:
        shape = np.asarray(self.shape, dtype=np.int64)
        strides = np.cumprod(np.concatenate([shape[1:], [1]])[::-1])[::-1].astype(np.int64)
        return shape, strides

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        if self.explicit is not None:
            return len(self.explicit)
        if self.rows is not None:
            return int(self.rows.shape[0])
        return math.prod(self.shape)

    @property
    def vectorised(self) -> bool:
        """Whether every part builds its masks from coordinates."""
        return self.explicit is None and all(p.vectorised for p in self.parts)

    def coordinate_indices(self, cells: np.ndarray | Sequence[int]) -> np.ndarray:
        """``[len(cells), len(dims)]``: the coordinate index along each dim of each cell."""
        flat = np.asarray(cells, dtype=np.int64)
        if self.rows is not None:
            return self.rows[flat]
        shape, strides = self._strides
        return (flat[:, None] // strides) % shape

    def columns(self, cells: np.ndarray, dims: np.ndarray) -> np.ndarray:
        """``[len(cells), len(dims)]``: the coordinate indices along grid dims ``dims`` only."""
        if self.rows is not None:
            return self.rows[cells][:, dims]
        shape, strides = self._strides
        return (cells[:, None] // strides[dims]) % shape[dims]

    def labels(self, cell: int) -> tuple[Any, ...]:
        """The coordinate label of ``cell`` along each dim."""
        if self.explicit is not None:
            return self.explicit[cell].coords
        index = self.coordinate_indices([cell])[0]
        return tuple(self.coords[d][int(i)] for d, i in zip(self.dims, index, strict=True))

    def describe(self, cell: int) -> str:
        """``"layer=3, head=1"``: a cell's coordinates for error messages."""
        return ", ".join(f"{d}={v}" for d, v in zip(self.dims, self.labels(cell), strict=True))

    def cell(self, cell: int) -> Cell:
        """Cell ``cell`` spelt out with its regions (the explicit, per-cell path).

        Raises:
            SpecError: a custom rule returned something that does not fit.
        """
        if self.explicit is not None:
            return self.explicit[cell]
        index = self.coordinate_indices([cell])[0]
        regions: list[Region] = []
        for part in self.parts:
            coords = {
                axis.name: axis.values[int(index[part.first + j])]
                for j, axis in enumerate(part.axes)
            }
            regions.extend(regions_of(part.spec, coords, self.sizes, self.positions))
        return Cell(self.labels(cell), tuple(regions))

    def cells(self, cells: Sequence[int] | np.ndarray | None = None) -> list[Cell]:
        """Cells spelt out (default: all of them; mind the size of large grids)."""
        chosen = range(self.n_cells) if cells is None else cells
        return [self.cell(int(i)) for i in chosen]

    def first_layers(self, cells: np.ndarray) -> np.ndarray:
        """``[len(cells), parts]``: the first layer each part patches in each cell."""
        flat = np.asarray(cells, dtype=np.int64)
        out = np.empty((flat.shape[0], len(self.parts)), dtype=np.int64)
        for k, part in enumerate(self.parts):
            j = part.axis_index("layer")
            if j is None or not part.vectorised:
                out[:, k] = part.layers[0]
                continue
            dim = part.first + j
            if self.rows is not None:
                column = self.rows[flat, dim]
            else:
                shape, strides = self._strides
                column = (flat // strides[dim]) % shape[dim]
            out[:, k] = np.asarray(part.axes[j].values, dtype=np.int64)[column]
        return out

    @property
    def sites(self) -> tuple[tuple[str, int], ...]:
        """Every ``(activation, layer)`` some cell may patch, in first-use order."""
        seen: dict[tuple[str, int], None] = {}
        if self.explicit is not None:
            for cell in self.explicit:
                for region in cell.regions:
                    seen.setdefault((region.activation, region.layer))
        for part in self.parts:
            for layer in part.layers:
                seen.setdefault((part.spec.activation, layer))
        return tuple(seen)

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The hook point of every site, in first-use order (what sources read)."""
        return tuple(dict.fromkeys(layout(a).hook_name(layer) for a, layer in self.sites))

    def with_rows(self, rows: np.ndarray | Sequence[Sequence[int]]) -> Grid:
        """The same grid restricted to explicit cells, given as coordinate indices per dim.

        Raises:
            SpecError: a row of the wrong length, not of ints, or outside the coordinates.
        """
        try:
            table = np.asarray(rows, dtype=np.int64).reshape(-1, len(self.dims))
        except (TypeError, ValueError, OverflowError) as err:
            raise SpecError(
                f"rows must be coordinate indices, one int per dim {self.dims}, got {rows!r}: {err}"
            ) from None
        if table.size and ((table < 0).any() or (table >= np.asarray(self.shape)).any()):
            raise SpecError(f"rows {table.tolist()} fall outside the grid of shape {self.shape}")
        return attrs.evolve(self, rows=table)


def repeated(values: Sequence[Any]) -> list[Any]:
    """The values that occur more than once in ``values`` (in first-repeat order; works for
    unhashable values too).

    Example:
        >>> repeated([1, 2, 1, 3, 2]), repeated([[0], [0]])
        ([1, 2], [[0]])
    """
    out: list[Any] = []
    try:
        seen: set[Any] = set()
        for v in values:
            if v in seen and v not in out:
                out.append(v)
            seen.add(v)
    except TypeError:  # unhashable labels
        out = []
        for i, v in enumerate(values):
            if v in values[:i] and v not in out:
                out.append(v)
    return out


def check_labels(
    dims: Sequence[str], coords: Mapping[str, Sequence[Any]], what: str, parts: str = ""
) -> None:
    """Refuse a labelling with a repeated dim or a repeated coordinate along some dim.

    Args:
        dims: Result dims.
        coords: Coordinate labels per dim.
        what: What is labelled, for errors (``"spec 'resid_pre'"``).
        parts: Extra context for errors (which parts own which dims).

    Raises:
        SpecError: naming the repeated dim or the dim and its repeated coordinates.

    Example:
        >>> check_labels(("layer", "pos"), {"layer": (0, 1), "pos": (3, 3)}, "spec 'x'")
        Traceback (most recent call last):
        ...
        patchspec.errors.SpecError: spec 'x' would label dim 'pos' with the coordinate 3 more than once (coordinates (3, 3)); every cell needs its own label
    """
    clashes = repeated(list(dims))
    if clashes:
        raise SpecError(
            f"{what} would have the dim {clashes[0]!r} twice (dims {tuple(dims)}){parts}; every "
            "result dim needs its own name"
        )
    for dim in dims:
        twice = repeated(list(coords[dim]))
        if twice:
            listed = ", ".join(repr(v) for v in twice)
            raise SpecError(
                f"{what} would label dim {dim!r} with the coordinate{'s' if len(twice) > 1 else ''} "
                f"{listed} more than once (coordinates {tuple(coords[dim])}){parts}; every cell "
                "needs its own label"
            )


def explicit_grid(
    dims: Sequence[str],
    coords: Mapping[str, tuple[Any, ...]],
    cells: Sequence[Cell],
    sizes: Sizes,
    receiver: Receiver = "corrupted",
) -> Grid:
    """A grid of hand-built cells, each with its own regions."""
    return Grid(
        dims=tuple(dims),
        coords=dict(coords),
        parts=(),
        receiver=receiver,
        sizes=sizes,
        explicit=tuple(cells),
    )


def _axis_kind(spec: PatchSpec, axis: str, values: tuple[Any, ...]) -> AxisKind:
    if axis == SOURCE_AXIS:
        return "source"
    if axis == spec.parameter_axis:  # coordinates: the field's values; values: the sources
        return "parameter"
    if axis not in spec.layout.patch_dims:
        return "custom"
    return "named" if values and isinstance(values[0], str) else "index"


def _fixed(spec: PatchSpec, sizes: Sizes, positions: Positions | None) -> tuple[tuple[str, DimIndex], ...]:
    """The selection of every unswept activation dim (its restriction, or all)."""
    out: list[tuple[str, DimIndex]] = []
    for dim in spec.layout.dims[1:]:
        selector = spec.restriction(dim)
        if dim in spec.axes or selector is None:
            out.append((dim, None))
        elif is_named(selector):
            names: Any = selector
            out.append(
                (dim, named_index(spec.label, dim, names, positions, spec.receiver, "restriction"))
            )
        else:
            out.append((dim, resolve(spec.label, dim, selector, sizes.size(dim), "restriction")))
    return tuple(out)


def _part(
    spec: PatchSpec, dims: tuple[str, ...], first: int, sizes: Sizes, positions: Positions | None
) -> Part:
    axes = []
    tables: dict[int, tuple[tuple[int, ...], ...]] = {}
    for j, (name, dim) in enumerate(zip(spec.axes, dims, strict=True)):
        values = axis_values(spec, name, sizes, positions)
        kind = _axis_kind(spec, name, values)
        if kind == "source":
            labels: tuple[Any, ...] = source_labels(values)
        elif kind == "parameter":
            labels = tuple(getattr(v, name) for v in values)
        else:
            labels = values
        axes.append(Axis(name, dim, kind, tuple(values), tuple(labels)))
        if kind == "named" and positions is not None:
            table = positions.of(spec.receiver)
            tables[j] = tuple(table[n] for n in values)
    layer_axis = spec.axes.index("layer") if "layer" in spec.axes else None
    if spec.rule is not None:
        layers = tuple(range(sizes.n_layers))  # a rule may pick any layer
        fixed: tuple[tuple[str, DimIndex], ...] = ()
    else:
        if layer_axis is not None:
            layers = tuple(sorted(set(axes[layer_axis].values)))
        else:
            selector = spec.restriction("layer")
            layers = (
                tuple(range(sizes.n_layers))
                if selector is None
                else tuple(sorted(set(resolve(spec.label, "layer", selector, sizes.n_layers, "restriction"))))
            )
        fixed = _fixed(spec, sizes, positions)
    unswept = (d for d in spec.layout.dims[1:] if d not in spec.axes)
    named = any(a.kind == "named" for a in axes) or any(
        is_named(spec.restriction(d)) for d in unswept
    )
    return Part(spec, tuple(axes), first, layers, fixed, tables, named)


def compile(spec: AnySpec, sizes: Sizes, *, positions: Positions | None = None) -> Grid:
    """The grid of ``spec`` for a model and input of these sizes (cached).

    Args:
        spec: A :class:`~patchspec.PatchSpec` or :class:`~patchspec.JointSpec`.
        sizes: Sizes of the model and inputs.
        positions: Named positions (see :func:`~patchspec.plan.resolve_positions`). With them,
            a swept position axis without a restriction sweeps the names, in the order given.

    Raises:
        SpecError: a restriction falls outside its dim, selects nothing, or names one index
            twice (``layer=[1, -1]`` on a 2-layer model); a named position is unknown or given
            without ``positions``; or the grid would repeat a dim or a coordinate (a last check:
            specs refuse what causes it when they are built).

    Example:
        >>> from patchspec import catalog
        >>> sizes = Sizes(n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64,
        ...               d_mlp=3072, batch=1, seq=64)
        >>> grid = compile(catalog.HEAD_PATTERN_DEST_SRC, sizes)
        >>> grid.dims, grid.n_cells
        (('layer', 'head', 'dest_pos', 'src_pos'), 589824)
    """
    return _compile(spec, sizes, positions)


@functools.lru_cache(maxsize=256)
def _compile(spec: AnySpec, sizes: Sizes, positions: Positions | None) -> Grid:
    part_dims = spec.part_dims if isinstance(spec, JointSpec) else (spec.axes,)
    parts = []
    first = 0
    for part, dims in zip(spec.parts, part_dims, strict=True):
        parts.append(_part(part, dims, first, sizes, positions))
        first += len(dims)
    coords = {axis.dim: axis.labels for part in parts for axis in part.axes}
    owners = (
        " (parts: "
        + "; ".join(f"{p.spec.label!r} -> {', '.join(a.dim for a in p.axes) or 'no dims'}" for p in parts)
        + ")"
        if len(parts) > 1
        else ""
    )
    check_labels(spec.dims, coords, f"spec {spec.label!r}", owners)
    reserved = [d for d in spec.dims if d in RESERVED_DIMS]
    if reserved:
        raise SpecError(
            f"spec {spec.label!r} has the dim {reserved[0]!r}, which the runner adds to results; "
            "choose another axis name"
        )
    grid = Grid(
        dims=spec.dims,
        coords=coords,
        parts=tuple(parts),
        receiver=spec.receiver,
        sizes=sizes,
        positions=positions,
    )
    if not grid.vectorised and grid.n_cells:
        _check_rules(grid)
    return grid


def _check_rules(grid: Grid) -> None:
    """Call every custom rule on every cell now, so a bad output fails before any pass."""
    for part in grid.parts:
        if part.vectorised:
            continue
        for combo in itertools.product(*(axis.values for axis in part.axes)):
            regions_of(part.spec, dict(zip(part.spec.axes, combo, strict=True)), grid.sizes, grid.positions)
