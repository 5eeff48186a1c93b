"""From a spec and the model's sizes to the list of cells a sweep runs.

A :class:`Plan` is the product of a spec's axes, in result order; each :class:`Cell` carries
its coordinates and the :class:`Region` s it patches: an activation at one layer plus an index
per activation dim. Every region is a product of per-dim selections, so it is a boolean mask
over the activation and many cells can share one batched forward pass.

Positions may be *named* (``"S2"``, ``"END"``) with one token index per prompt: the sweep's
``positions=`` table is resolved by :func:`resolve_positions`, and a named selection becomes a
:class:`PerExample` selection of the position dim. A swept ``source`` axis gives each cell its
own value source.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import attrs

from patchspec.errors import InputError, SpecError, did_you_mean
from patchspec.layouts import DIM_SIZES, layout
from patchspec.sources import Clean, Corrupted, Receiver, Source, source_labels
from patchspec.spec import POSITION_DIMS, SOURCE_AXIS, AnySpec, JointSpec, PatchSpec, Slice


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
    positions: Positions | None = None

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


# --- named positions ---------------------------------------------------------------------------
#: A user's table of named positions: ``{"S2": [3, 4], "END": -1}`` (one index per prompt, or
#: one for all) or a pandas DataFrame with one column per name and one row per prompt.
PositionTable: TypeAlias = Mapping[str, Any] | Any


@attrs.frozen(eq=False)
class Positions:
    """Named positions resolved to token indices of both (padded) runs.

    Attributes:
        names: The names, in the order the user gave them (the default sweep order).
        clean: ``name -> index per prompt`` into the clean run's tokens.
        corrupted: ``name -> index per prompt`` into the corrupted run's tokens.
        labels: ``name -> token label`` for results (the clean tokens at the name, distinct
            ones joined by ``|``); filled in by the sweep.
    """

    names: tuple[str, ...]
    clean: Mapping[str, tuple[int, ...]]
    corrupted: Mapping[str, tuple[int, ...]]
    labels: Mapping[str, str] = attrs.field(factory=dict)

    def of(self, run: Receiver) -> Mapping[str, tuple[int, ...]]:
        """The indices in one run."""
        return self.clean if run == "clean" else self.corrupted

    def moves(self, donor: Receiver, receiver: Receiver) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per prompt, ``(receiver index, donor index)`` of every name whose index differs."""
        into, out = self.of(receiver), self.of(donor)
        batch = len(next(iter(into.values())))
        return tuple(
            tuple(
                dict.fromkeys(
                    (into[n][b], out[n][b]) for n in self.names if into[n][b] != out[n][b]
                )
            )
            for b in range(batch)
        )


def _table(table: PositionTable, batch: int, what: str) -> dict[str, list[Any]]:
    """A user's position table as ``name -> one entry per prompt``."""
    if hasattr(table, "columns") and hasattr(table, "to_dict"):  # a pandas DataFrame
        table = {str(column): table[column].tolist() for column in table.columns}
    if not isinstance(table, Mapping):
        raise InputError(
            f"{what} must map each name to one index per prompt (a dict or a pandas DataFrame "
            f"with one column per name), got {type(table).__name__}"
        )
    out: dict[str, list[Any]] = {}
    for name, value in table.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"{what}: position names must be non-empty strings, got {name!r}")
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, int | numbers.Integral) and not isinstance(value, bool):
            value = [value] * batch
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise InputError(
                f"{what}[{name!r}] must be an int or a list of one int per prompt, got {value!r}"
            )
        if len(value) != batch:
            raise InputError(
                f"{what}[{name!r}] has {len(value)} entries but there are {batch} prompts; "
                "give one index per prompt"
            )
        out[name] = list(value)
    if not out:
        raise InputError(f"{what} names no positions")
    return out


def _resolve_named(
    table: Mapping[str, list[Any]],
    lengths: Sequence[int],
    offsets: Sequence[int],
    what: str,
    run: str,
) -> dict[str, tuple[int, ...]]:
    resolved: dict[str, tuple[int, ...]] = {}
    for name, values in table.items():
        indices = []
        for b, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | numbers.Integral):
                raise InputError(f"{what}[{name!r}][{b}] = {value!r} must be an int token index")
            n = lengths[b]
            if not -n <= int(value) < n:
                raise InputError(
                    f"{what}[{name!r}][{b}] = {value} is outside {run} prompt {b}, which has "
                    f"{n} tokens (valid: {-n}..{n - 1}, negative counting from its own end)"
                )
            indices.append(int(value) % n + offsets[b])
        resolved[name] = tuple(indices)
    return resolved


def resolve_positions(
    positions: PositionTable | tuple[PositionTable, PositionTable] | None,
    *,
    lengths: Mapping[Receiver, Sequence[int]],
    offsets: Mapping[Receiver, Sequence[int]] | None = None,
) -> Positions | None:
    """Resolve a user's named positions to token indices of both runs.

    An index counts tokens of each prompt on its own (as ``model.to_tokens(prompt)`` gives
    them, BOS included); a negative one counts from that prompt's own end, so ``"END": -1`` is
    each prompt's last real token. ``offsets`` (left padding) shift every index of a prompt.

    Args:
        positions: One table for both runs, or a pair ``(clean_table, corrupted_table)``.
        lengths: The real token count of each prompt of each run (see ``Runs.lengths``).
        offsets: Leading pad tokens of each prompt of each run (default none: right padding).

    Returns:
        The resolved :class:`Positions`, or ``None`` when ``positions`` is ``None``.

    Raises:
        InputError: a table of the wrong size, a non-int index, an index outside its prompt,
            or clean and corrupted tables that name different positions.

    Example:
        >>> p = resolve_positions({"S2": [3, 4], "END": -1}, lengths={"clean": [6, 8], "corrupted": [6, 8]})
        >>> p.names, p.clean["END"]
        (('S2', 'END'), (5, 7))
    """
    if positions is None:
        return None
    runs: tuple[Receiver, Receiver] = ("clean", "corrupted")
    pair = isinstance(positions, tuple | list)
    if pair and len(positions) != 2:
        raise InputError(
            f"positions= is one table for both runs or a pair (clean, corrupted), got "
            f"{len(positions)} tables"
        )
    tables = positions if pair else (positions, positions)
    batch = len(lengths["corrupted"])
    parsed = {
        run: _table(table, batch, f"{run} positions" if pair else "positions")
        for run, table in zip(runs, tables, strict=True)
    }
    clean_names, corrupted_names = list(parsed["clean"]), list(parsed["corrupted"])
    if set(clean_names) != set(corrupted_names):
        only_clean = sorted(set(clean_names) - set(corrupted_names))
        only_corrupted = sorted(set(corrupted_names) - set(clean_names))
        raise InputError(
            "clean and corrupted positions must name the same positions; only in clean: "
            f"{only_clean}, only in corrupted: {only_corrupted}"
        )
    zero = {run: [0] * batch for run in runs}
    shift = {**zero, **dict(offsets or {})}
    resolved = {
        run: _resolve_named(
            parsed[run], lengths[run], shift[run], f"{run} positions" if pair else "positions", run
        )
        for run in runs
    }
    out = Positions(tuple(clean_names), resolved["clean"], resolved["corrupted"])
    pairs: tuple[tuple[Receiver, Receiver], ...] = (("clean", "corrupted"), ("corrupted", "clean"))
    for donor, receiver in pairs:
        for b, moves in enumerate(out.moves(donor, receiver)):
            targets = [r for r, _ in moves]
            if len(set(targets)) != len(targets):
                raise InputError(
                    f"prompt {b}: two names sit at the same {receiver} index but at different "
                    f"{donor} indices ({list(moves)}); names at one token must match in both runs"
                )
    return out


def _is_named(selector: Any) -> bool:
    if isinstance(selector, str):
        return True
    return isinstance(selector, tuple | list) and bool(selector) and isinstance(selector[0], str)


def _named_index(
    label: str,
    dim: str,
    selector: str | Sequence[str],
    positions: Positions | None,
    run: Receiver,
    what: str,
) -> DimIndex:
    names = (selector,) if isinstance(selector, str) else tuple(selector)
    if dim not in POSITION_DIMS:
        raise SpecError(
            f"{what} {dim}={selector!r} in spec {label!r}: only position dims take names"
        )
    if positions is None:
        raise SpecError(
            f"{what} {dim}={selector!r} in spec {label!r} names a position, but the sweep got no "
            f"positions; pass positions={{{names[0]!r}: [one index per prompt]}} to run()"
        )
    table = positions.of(run)
    for name in names:
        if not isinstance(name, str):
            raise SpecError(f"{what} {dim}={selector!r} in spec {label!r} mixes names and ints")
        if name not in table:
            raise SpecError(
                f"{what} {dim}={name!r} in spec {label!r} is not a named position; the named "
                f"positions are {', '.join(positions.names)}{did_you_mean(name, positions.names)}"
            )
    batch = len(table[names[0]])
    per_prompt = tuple(tuple(dict.fromkeys(table[n][b] for n in names)) for b in range(batch))
    if all(p == per_prompt[0] for p in per_prompt):
        return per_prompt[0]
    return PerExample(per_prompt)


@attrs.frozen
class Aligned(Source):
    """A donor source read at each named position's *donor* index (internal).

    When a named position sits at different token indices in the clean and corrupted runs,
    the receiving run's index of a name gets the donor's activation at the donor's index of the
    same name; every other index reads the donor at the same index.
    """

    kind: ClassVar[str] = "aligned"
    inner: Source
    axes: tuple[int, ...]
    moves: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def receiver(self) -> Receiver:
        """The inner source's receiver."""
        return self.inner.receiver

    @property
    def label(self) -> str:
        """The inner source's label."""
        return self.inner.label

    def values(self, hook_name: str, runs: Any) -> Any:
        """The inner values, gathered along the position axes."""
        import torch

        values = self.inner.values(hook_name, runs)

        def compute() -> torch.Tensor:
            batch = values.shape[0]
            seq = values.shape[self.axes[0]]
            index = torch.arange(seq).repeat(batch, 1)
            for b, moves in enumerate(self.moves):
                for target, origin in moves:
                    index[b, target] = origin
            out = values
            for axis in self.axes:
                view = [batch] + [1] * (values.ndim - 1)
                view[axis] = seq
                gather = index.to(values.device).view(view).expand(out.shape)
                out = torch.gather(out, axis, gather)
            return out

        return runs.memo((self, hook_name), compute)


def _axis_values(
    spec: PatchSpec, axis: str, sizes: Sizes, positions: Positions | None = None
) -> tuple[Any, ...]:
    """The coordinates a spec sweeps along ``axis`` (sources for the ``source`` axis)."""
    selector = spec.restriction(axis)
    dims = spec.layout.patch_dims
    if axis == SOURCE_AXIS:
        return spec.sources
    if axis not in dims:  # a custom-rule axis: its values are listed explicitly
        if selector is None or isinstance(selector, Slice):
            raise SpecError(f"custom-rule axis {axis!r} of spec {spec.label!r} lists no values")
        return selector if isinstance(selector, tuple) else (selector,)
    if axis in POSITION_DIMS and positions is not None and selector is None:
        return positions.names
    if _is_named(selector):
        names = (selector,) if isinstance(selector, str) else tuple(selector)  # type: ignore[arg-type]
        _named_index(spec.label, axis, names, positions, spec.receiver, "restriction")
        return names
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


def regions_of(
    spec: PatchSpec,
    cell: Mapping[str, Any],
    sizes: Sizes,
    positions: Positions | None = None,
) -> tuple[Region, ...]:
    """The regions one cell of ``spec`` patches.

    Args:
        spec: The spec.
        cell: The cell's coordinates by axis (a swept ``source`` axis holds the source itself).
        sizes: Sizes of the model and inputs.
        positions: Resolved named positions, when the sweep got any.

    Raises:
        SpecError: a custom rule returned an unknown dim or an index that does not fit, or a
            named position is unknown.
    """
    lay = spec.layout
    source = cell[SOURCE_AXIS] if SOURCE_AXIS in spec.axes else spec.source
    if spec.rule is None:
        index: dict[str, Any] = {axis: cell[axis] for axis in spec.axes if axis != SOURCE_AXIS}
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
    named = False
    per_dim: list[tuple[str, DimIndex]] = []
    for dim in lay.dims[1:]:
        if dim not in index:
            per_dim.append((dim, None))
        elif _is_named(index[dim]):
            named = True
            per_dim.append(
                (dim, _named_index(spec.label, dim, index[dim], positions, spec.receiver, what))
            )
        else:
            per_dim.append((dim, _resolve(spec.label, dim, index[dim], sizes.size(dim), what)))
    if named and positions is not None and isinstance(source, Clean | Corrupted):
        donor: Receiver = "clean" if isinstance(source, Clean) else "corrupted"
        moves = positions.moves(donor, source.receiver)
        if any(moves):
            axes = tuple(i for i, d in enumerate(lay.dims) if d in POSITION_DIMS)
            source = Aligned(source, axes, moves)
    return tuple(Region(spec.activation, layer, tuple(per_dim), source) for layer in layers)


def plan(spec: AnySpec, sizes: Sizes, *, positions: Positions | None = None) -> Plan:
    """All cells of ``spec`` for a model and input of these sizes, in result order.

    Args:
        spec: A :class:`~patchspec.PatchSpec` or :class:`~patchspec.JointSpec`.
        sizes: Sizes of the model and inputs.
        positions: Named positions (see :func:`resolve_positions`). With them, a swept position
            axis without a restriction sweeps the names, in the order given.

    Raises:
        SpecError: a restriction falls outside its dim, a rule output does not fit, or a named
            position is unknown or given without ``positions``.
    """
    parts = spec.parts
    part_dims = spec.part_dims if isinstance(spec, JointSpec) else (spec.axes,)
    coords: dict[str, tuple[Any, ...]] = {}
    per_part: list[list[tuple[tuple[Any, ...], tuple[Region, ...]]]] = []
    for part, dims in zip(parts, part_dims, strict=True):
        values = [_axis_values(part, axis, sizes, positions) for axis in part.axes]
        labels = [
            source_labels(vals) if axis == SOURCE_AXIS else vals
            for axis, vals in zip(part.axes, values, strict=True)
        ]
        for dim, vals in zip(dims, labels, strict=True):
            coords[dim] = vals
        part_cells = []
        for combo, label in zip(
            itertools.product(*values), itertools.product(*labels), strict=True
        ):
            cell = dict(zip(part.axes, combo, strict=True))
            part_cells.append((label, regions_of(part, cell, sizes, positions)))
        per_part.append(part_cells)
    cells = tuple(
        Cell(
            coords=tuple(itertools.chain.from_iterable(c for c, _ in combo)),
            regions=tuple(itertools.chain.from_iterable(r for _, r in combo)),
        )
        for combo in itertools.product(*per_part)
    )
    return Plan(
        dims=spec.dims, coords=coords, cells=cells, receiver=spec.receiver, positions=positions
    )


def explicit_plan(
    dims: Sequence[str],
    coords: Mapping[str, tuple[Any, ...]],
    cells: Sequence[Cell],
    receiver: Receiver = "corrupted",
) -> Plan:
    """A plan from hand-built cells (used by the drop-in functions for ``index_df`` rows)."""
    return Plan(dims=tuple(dims), coords=dict(coords), cells=tuple(cells), receiver=receiver)
