"""From a spec and the model's sizes to the list of cells a sweep runs.

A :class:`Plan` is the product of a spec's axes, in result order; each :class:`Cell` carries
its coordinates and the :class:`Region` s it patches: an activation at one layer plus an index
per activation dim. Every region is a product of per-dim selections, so it is a boolean mask
over the activation and many cells can share one batched forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs

from patchspec.errors import SpecError
from patchspec.layouts import DIM_SIZES, layout
from patchspec.sources import Receiver, Source
from patchspec.spec import AnySpec, JointSpec, PatchSpec, Slice



@attrs.frozen
class PerExample:
    """A dim's selection that differs by prompt: ``values[b]`` are the indices for prompt ``b``.

    Used for named positions (``"S2"``, ``"END"``) that sit at different token indices.
    """

    values: tuple[tuple[int, ...], ...]


#: One dim's selection inside a region: ``None`` (all), a tuple of indices, or one per prompt.
DimIndex: TypeAlias = tuple[int, ...] | PerExample | None


@attrs.frozen
class Sizes:
    """Sizes of every dim, read from the model config and the inputs."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    batch: int
    seq: int

    @classmethod
    def of(cls, model: Any, batch: int, seq: int) -> Sizes:
        """Read sizes from a TransformerLens model's ``cfg`` and the input shape."""
        cfg = model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            d_model=cfg.d_model,
            d_head=cfg.d_head,
            d_mlp=d_mlp,
            batch=batch,
            seq=seq,
        )

    def size(self, dim: str) -> int:
        """The size of a named dim (``layer`` included)."""
        table = {
            "layer": self.n_layers,
            "batch": self.batch,
            "pos": self.seq,
            "dest_pos": self.seq,
            "src_pos": self.seq,
            "head": self.n_heads,
            "kv_head": self.n_kv_heads,
            "neuron": self.d_mlp,
            "d_model": self.d_model,
            "d_head": self.d_head,
        }
        return table[dim]

    def shape(self, activation: str) -> tuple[int, ...]:
        """The full shape of ``activation`` at one layer."""
        return tuple(self.size(d) for d in layout(activation).dims)


def _size_origin(dim: str) -> str:
    return "model.cfg.n_layers" if dim == "layer" else DIM_SIZES.get(dim, dim)


@attrs.frozen(eq=False)
class Region:
    """One patched region: an activation at one layer, selected per dim.

    Attributes:
        activation: Activation name.
        layer: Block index.
        index: ``(dim, selection)`` for each activation dim but ``batch``; ``None`` means all.
        source: Where the patched values come from.
        setter: Optional TransformerLens-style patch setter ``(act, setter_index, src) -> act``,
            used instead of ``index`` by the drop-in functions for user-written setters.
        setter_index: The index list passed to ``setter``.
    """

    activation: str
    layer: int
    index: tuple[tuple[str, DimIndex], ...]
    source: Source
    setter: Callable[..., Any] | None = None
    setter_index: tuple[Any, ...] = ()

    @property
    def hook_name(self) -> str:
        """The hook point holding this region's activation."""
        return layout(self.activation).hook_name(self.layer)


@attrs.frozen(eq=False)
class Cell:
    """One point of a sweep: its coordinates (one per result dim) and what it patches."""

    coords: tuple[Any, ...]
    regions: tuple[Region, ...]


@attrs.frozen(eq=False)
class Plan:
    """The cells of a sweep, in C order over ``dims``."""

    dims: tuple[str, ...]
    coords: Mapping[str, tuple[Any, ...]]
    cells: tuple[Cell, ...]
    receiver: Receiver

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of coordinates along each dim."""
        return tuple(len(self.coords[d]) for d in self.dims)

    @property
    def hook_names(self) -> tuple[str, ...]:
        """Every hook point some cell patches, in first-use order."""
        seen: dict[str, None] = {}
        for cell in self.cells:
            for region in cell.regions:
                seen.setdefault(region.hook_name)
        return tuple(seen)


def _normalise_int(spec_label: str, dim: str, value: int, size: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} {dim}={value!r} must be an int")
    if not -size <= value < size:
        raise SpecError(
            f"{what} {dim}={value} in spec {spec_label!r} is outside the valid range "
            f"{-size}..{size - 1} ({dim} has {size} entries: {_size_origin(dim)})"
        )
    return value % size


def _axis_values(spec: PatchSpec, axis: str, sizes: Sizes) -> tuple[Any, ...]:
    """The coordinates a spec sweeps along ``axis``."""
    selector = spec.restriction(axis)
    dims = spec.layout.patch_dims
    if axis not in dims:  # a custom-rule axis: its values are listed explicitly
        assert selector is not None and not isinstance(selector, Slice)
        return selector if isinstance(selector, tuple) else (selector,)
    size = sizes.size(axis)
    if selector is None:
        return tuple(range(size))
    return _resolve(spec.label, axis, selector, size, "restriction")


def _resolve(label: str, dim: str, selector: Any, size: int, what: str) -> tuple[int, ...]:
    if isinstance(selector, Slice):
        values = selector.indices(size)
        if not values:
            raise SpecError(
                f"{what} {dim}={selector!r} in spec {label!r} selects nothing "
                f"({dim} has {size} entries)"
            )
        return values
    if isinstance(selector, slice):
        return _resolve(label, dim, Slice(selector.start, selector.stop, selector.step), size, what)
    if isinstance(selector, int) and not isinstance(selector, bool):
        return (_normalise_int(label, dim, selector, size, what),)
    if isinstance(selector, range | list | tuple):
        values = tuple(_normalise_int(label, dim, v, size, what) for v in selector)
        if not values:
            raise SpecError(f"{what} {dim}={selector!r} in spec {label!r} selects nothing")
        return values
    if hasattr(selector, "tolist"):  # tensors and arrays
        return _resolve(label, dim, selector.tolist(), size, what)
    raise SpecError(
        f"{what} {dim}={selector!r} in spec {label!r} must be an int, a list of ints or a slice"
    )


def regions_of(spec: PatchSpec, cell: Mapping[str, Any], sizes: Sizes) -> tuple[Region, ...]:
    """The regions one cell of ``spec`` patches.

    Raises:
        SpecError: a custom rule returned an unknown dim or an index that does not fit.
    """
    lay = spec.layout
    if spec.rule is None:
        index: dict[str, Any] = {axis: cell[axis] for axis in spec.axes}
        what = "restriction"
    else:
        out = spec.rule(dict(cell))
        if not isinstance(out, Mapping):
            raise SpecError(
                f"rule of spec {spec.label!r} must return a mapping of dim -> index, "
                f"got {type(out).__name__} for cell {dict(cell)}"
            )
        for key in out:
            if key not in lay.patch_dims:
                raise SpecError(
                    f"rule of spec {spec.label!r} returned dim {key!r} for cell {dict(cell)}; "
                    f"valid dims of {spec.activation!r} are {', '.join(lay.patch_dims)}"
                )
        index = dict(out)
        what = f"rule output for cell {dict(cell)}:"
    for key, selector in spec.restrictions:
        if key in lay.patch_dims and key not in spec.axes and key not in index:
            index[key] = selector
    layers = (
        _resolve(spec.label, "layer", index.pop("layer"), sizes.n_layers, what)
        if "layer" in index
        else tuple(range(sizes.n_layers))
    )
    per_dim = tuple(
        (dim, _resolve(spec.label, dim, index[dim], sizes.size(dim), what) if dim in index else None)
        for dim in lay.dims
        if dim != "batch"
    )
    return tuple(Region(spec.activation, layer, per_dim, spec.source) for layer in layers)


def plan(spec: AnySpec, sizes: Sizes) -> Plan:
    """All cells of ``spec`` for a model and input of these sizes, in result order.

    Raises:
        SpecError: a restriction falls outside its dim, or a rule output does not fit.
    """
    parts = spec.parts
    part_dims = spec.part_dims if isinstance(spec, JointSpec) else (spec.axes,)
    coords: dict[str, tuple[Any, ...]] = {}
    per_part: list[list[tuple[tuple[Any, ...], tuple[Region, ...]]]] = []
    for part, dims in zip(parts, part_dims, strict=True):
        values = [_axis_values(part, axis, sizes) for axis in part.axes]
        for dim, vals in zip(dims, values, strict=True):
            coords[dim] = vals
        cells = []
        for combo in itertools.product(*values):
            cell = dict(zip(part.axes, combo, strict=True))
            cells.append((combo, regions_of(part, cell, sizes)))
        per_part.append(cells)
    cells = tuple(
        Cell(
            coords=tuple(itertools.chain.from_iterable(c for c, _ in combo)),
            regions=tuple(itertools.chain.from_iterable(r for _, r in combo)),
        )
        for combo in itertools.product(*per_part)
    )
    return Plan(
        dims=spec.dims, coords=coords, cells=cells, receiver=parts[0].source.receiver
    )


def explicit_plan(
    dims: Sequence[str],
    coords: Mapping[str, tuple[Any, ...]],
    cells: Sequence[Cell],
    receiver: Receiver = "corrupted",
) -> Plan:
    """A plan from hand-built cells (used by the drop-in functions for ``index_df`` rows)."""
    return Plan(dims=tuple(dims), coords=dict(coords), cells=tuple(cells), receiver=receiver)
