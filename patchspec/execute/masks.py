"""Masks of a chunk of cells, built vectorised: one scatter per dim, on the model's device.

A chunk of ``K`` cells patches ``K`` stacked copies of the batch. For each part of a grid and
each layer it patches, the region of copy ``k`` is a product of per-dim selections, so its mask
is kept in factored form (:class:`Mask`): which copies patch this layer at all, and for each
restricted dim a ``[K | 1, rows, size]`` boolean factor (``rows`` is the batch when a selection
differs per prompt, else 1). :meth:`Mask.dense` multiplies the factors out into a mask that
broadcasts against the activation ``[K, batch, ...]``, without ever expanding the unrestricted
dims. Nothing here loops over cells in Python; cells spelt out explicitly (custom rules,
explicit cell lists) go through :func:`region_writes`, which loops over their regions once to
gather index lists and then scatters per dim too.

This is the batched engine's code only: the reference estimator writes each cell by plain
indexing and shares none of it, so "batched == reference" checks these masks.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from patchspec.layouts import layout
from patchspec.plan.cells import PerExample, Region
from patchspec.plan.grid import Grid, Part
from patchspec.plan.sizes import Sizes
from patchspec.sources import Source


@attrs.frozen(eq=False)
class Mask:
    """A chunk's mask over one activation, factored per dim.

    Attributes:
        active: ``[K]``: whether each copy patches here at all.
        factors: ``(axis, keep)`` per restricted activation axis (``axis >= 1``), with ``keep``
            of shape ``[K | 1, rows, size]``.
        ndim: The activation's number of dims (batch included).
    """

    active: torch.Tensor
    factors: tuple[tuple[int, torch.Tensor], ...]
    ndim: int
    packed: torch.Tensor | None = None
    blocks: tuple[tuple[int, int, int], ...] = ()

    def keeps(self) -> list[tuple[int, torch.Tensor]]:
        """Every factor, the packed ones (``[K, 1, sum of sizes]``, one block per axis) sliced out."""
        out = list(self.factors)
        if self.packed is not None:
            out += [(axis, self.packed[:, :, s : s + n]) for axis, s, n in self.blocks]
        return out

    def dense(self) -> torch.Tensor:
        """``[K, rows, ...]``: True where copy ``k`` takes patched values; broadcasts against
        the activation viewed as ``[K, batch, ...]`` (unrestricted dims have size 1)."""
        copies = int(self.active.shape[0])
        mask = self.active.view(copies, *([1] * self.ndim))
        for axis, keep in self.keeps():
            view = [keep.shape[0], keep.shape[1]] + [1] * (self.ndim - 1)
            view[axis + 1] = keep.shape[2]
            mask = mask & keep.view(view)
        return mask


#: One write of a chunk: an activation at a layer takes ``source``'s values where ``mask``.
Write = tuple[str, int, Source, Mask]


def _one_hot(index: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., size]`` booleans, True at ``index[...]`` (one scatter)."""
    out = torch.zeros((*index.shape, size), dtype=torch.bool, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), True)


@functools.lru_cache(maxsize=64)
def _row_starts(copies: int, size: int) -> np.ndarray:
    return (np.arange(copies, dtype=np.int64) * size)[:, None]


def scatter(at: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """``[K, 1, size]`` booleans, True at ``at[k, :]`` for each ``k`` (one scatter).

    On the CPU the scatter runs in numpy (a third of torch's per-call overhead, which dominates
    chunks of a few dozen cells); on an accelerator it runs there, from the indices alone.
    """
    copies = at.shape[0]
    if device.type == "cpu":
        out = np.zeros(copies * size, dtype=bool)
        out[at + _row_starts(copies, size)] = True
        return torch.from_numpy(out.reshape(copies, 1, size))
    index = torch.from_numpy(at).to(device, non_blocking=True)
    packed = torch.zeros((copies, 1, size), dtype=torch.bool, device=device)
    return packed.scatter_(2, index.unsqueeze(1), True)


def _fixed_factor(selection: tuple[int, ...] | PerExample, size: int, device: torch.device) -> torch.Tensor:
    """``[1, rows, size]`` for a selection shared by every cell of a part."""
    if isinstance(selection, PerExample):
        keep = torch.zeros((1, len(selection.values), size), dtype=torch.bool)
        for b, values in enumerate(selection.values):
            keep[0, b, list(values)] = True
    else:
        keep = torch.zeros((1, 1, size), dtype=torch.bool)
        keep[0, 0, list(selection)] = True
    return keep.to(device)


@attrs.frozen(eq=False)
class _PartLayout:
    """What building one part's masks needs, prepared once per task.

    Swept index axes are scattered together into one ``[K, sum of sizes]`` buffer (one scatter
    for all of them); named-position axes, whose selection differs per prompt, get a scatter
    each; fixed selections are built once.
    """

    columns: np.ndarray  # grid dims of the swept index axes (activation-axis order), then layer
    lookup: np.ndarray  # every axis's coordinate values plus its block's start, concatenated
    starts: np.ndarray  # where each axis's coordinates begin in ``lookup``
    blocks: tuple[tuple[int, int, int], ...]  # (activation axis, start, size) per index axis
    total: int
    named: tuple[tuple[int, int, torch.Tensor, int], ...]  # (axis, grid dim, table, size)
    fixed: tuple[tuple[int, torch.Tensor], ...]
    layer_column: int | None
    source_column: int | None
    name: str
    ndim: int


def _prepare(part: Part, sizes: Sizes, device: torch.device) -> _PartLayout:
    columns: list[int] = []
    values: list[np.ndarray] = []
    blocks: list[tuple[int, int, int]] = []
    named: list[tuple[int, int, torch.Tensor, int]] = []
    fixed: list[tuple[int, torch.Tensor]] = []
    start = 0
    for axis_no, dim in enumerate(part.layout.dims[1:], start=1):
        j = part.axis_index(dim)
        size = sizes.size(dim)
        if j is not None and part.axes[j].kind == "named":
            table = torch.as_tensor(part.tables[j], device=device)  # [names, batch]
            named.append((axis_no, part.first + j, table, size))
        elif j is not None:
            columns.append(part.first + j)
            values.append(np.asarray(part.axes[j].values, dtype=np.int64) + start)
            blocks.append((axis_no, start, size))
            start += size
        else:
            selection = dict(part.fixed)[dim]
            if selection is not None:
                fixed.append((axis_no, _fixed_factor(selection, size, device)))
    layer_j = part.axis_index("layer")
    source_j = next(
        (j for j, axis in enumerate(part.axes) if axis.kind in ("source", "parameter")), None
    )
    if layer_j is not None:  # gathered with the index axes, after them, with no offset
        columns.append(part.first + layer_j)
        values.append(np.asarray(part.axes[layer_j].values, dtype=np.int64))
    return _PartLayout(
        columns=np.asarray(columns, dtype=np.int64),
        lookup=np.concatenate(values) if values else np.zeros(0, dtype=np.int64),
        starts=np.cumsum([0] + [len(v) for v in values[:-1]]).astype(np.int64),
        blocks=tuple(blocks),
        total=start,
        named=tuple(named),
        fixed=tuple(fixed),
        layer_column=None if layer_j is None else part.first + layer_j,
        source_column=None if source_j is None else part.first + source_j,
        name=part.layout.name,
        ndim=len(part.layout.dims),
    )


def _groups(column: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
    """``(value, which rows)`` per distinct value; ``None`` rows when every row has it."""
    first = column[0]
    if first == column[-1] and (column == first).all():
        return [(int(first), None)]
    return [(int(v), column == v) for v in np.unique(column)]


def part_writes(
    grid: Grid,
    part: Part,
    cells: np.ndarray,
    sizes: Sizes,
    device: torch.device,
    memo: dict[Hashable, Any],
) -> list[Write]:
    """The writes of one (rule-free) part for a chunk of cells.

    Args:
        grid: The grid.
        part: One of its parts.
        cells: Flat indices of the chunk's cells.
        sizes: Sizes of the model and inputs.
        device: Where masks are built.
        memo: Per-task cache (the part's prepared layout).
    """
    prep: _PartLayout | None = memo.get(id(part))
    if prep is None:
        prep = memo[id(part)] = _prepare(part, sizes, device)
    copies = cells.shape[0]
    picked = prep.lookup[grid.columns(cells, prep.columns) + prep.starts]
    packed = None
    if prep.blocks:
        packed = scatter(picked[:, : len(prep.blocks)], prep.total, device)
    factors = prep.fixed
    if prep.named:
        named = []
        for axis, column, table, size in prep.named:
            at = grid.columns(cells, np.asarray([column]))[:, 0]
            rows = table[torch.from_numpy(np.ascontiguousarray(at)).to(device, non_blocking=True)]
            named.append((axis, _one_hot(rows, size)))
        factors = (*named, *factors)
    if prep.layer_column is None:
        layers: list[tuple[int, np.ndarray | None]] = [(layer, None) for layer in part.layers]
    else:
        layers = _groups(picked[:, -1])
    if prep.source_column is None:
        key = ("source", id(part))
        if key not in memo:
            memo[key] = part.source(part.spec.source, grid.positions)
        sources: list[tuple[Source, np.ndarray | None]] = [(memo[key], None)]
    else:
        listed = part.axes[prep.source_column - part.first].values
        by_source = grid.columns(cells, np.asarray([prep.source_column]))[:, 0]
        sources = [(listed[s], rows) for s, rows in _groups(by_source)]
    writes: list[Write] = []
    for layer, at_layer in layers:
        for source, of_source in sources:
            if at_layer is None and of_source is None:
                active = memo.get(("all", copies))
                if active is None:
                    active = memo[("all", copies)] = torch.ones(copies, dtype=torch.bool, device=device)
            else:
                chosen = np.ones(copies, dtype=bool)
                for sel in (at_layer, of_source):
                    if sel is not None:
                        chosen &= sel
                active = torch.from_numpy(chosen).to(device, non_blocking=True)
            mask = Mask(active, factors, prep.ndim, packed, prep.blocks)
            if prep.source_column is not None:
                source = part.source(source, grid.positions)
            writes.append((prep.name, layer, source, mask))
    return writes


def region_writes(
    cells: Sequence[Sequence[Region]], sizes: Sizes, device: torch.device
) -> list[Write]:
    """The writes of explicitly listed regions, copy ``k`` patching ``cells[k]``.

    Regions are gathered into *slots*: the ``n``-th region a cell patches at an (activation,
    layer) with a given source. Each slot is one write over all copies (copies without it are
    inactive), so writes at the same hook apply in the order each cell lists its regions.
    """
    copies = len(cells)
    slots: dict[tuple[str, int, int, Hashable], list[Region | None]] = {}
    sources: dict[Hashable, Source] = {}
    for k, regions in enumerate(cells):
        seen: dict[tuple[str, int, Hashable], int] = {}
        for region in regions:
            try:
                source_key: Hashable = region.source
                hash(source_key)
            except TypeError:
                source_key = id(region.source)
            sources[source_key] = region.source
            kind = (region.activation, region.layer, source_key)
            nth = seen.get(kind, 0)
            seen[kind] = nth + 1
            slots.setdefault((region.activation, region.layer, nth, source_key), [None] * copies)[k] = region
    writes: list[Write] = []
    for (activation, layer, _nth, source_key), slot in slots.items():
        dims = layout(activation).dims
        present = [(k, r) for k, r in enumerate(slot) if r is not None]
        rows = sizes.batch if any(
            isinstance(sel, PerExample) for _k, r in present for _d, sel in r.index
        ) else 1
        # Index lists are gathered here (the cells are listed one by one), then every mask of
        # the slot is made on the device by one scatter from one copy of the flat indices:
        # no boolean mask is built on the host and copied.
        flat: list[int] = [k for k, _r in present]
        layouts: list[tuple[int, int, int]] = []  # (axis, start in flat, number of indices)
        for axis_no, dim in enumerate(dims[1:], start=1):
            selections = [(k, r.index[axis_no - 1][1]) for k, r in present]
            if all(sel is None for _k, sel in selections):
                continue
            size = sizes.size(dim)
            begin = len(flat)
            for k, sel in selections:
                if sel is None:
                    flat += range((k * rows) * size, (k * rows + rows) * size)
                elif isinstance(sel, PerExample):
                    for b, values in enumerate(sel.values):
                        flat += [(k * rows + b) * size + v for v in values]
                else:
                    for b in range(rows):
                        flat += [(k * rows + b) * size + v for v in sel]
            layouts.append((axis_no, begin, len(flat) - begin))
        index = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
        active = _scatter_flat(index[: len(present)], copies, device).view(copies)
        factors: list[tuple[int, torch.Tensor]] = []
        for axis_no, begin, count in layouts:
            size = sizes.size(dims[axis_no])
            keep = _scatter_flat(index[begin : begin + count], copies * rows * size, device)
            factors.append((axis_no, keep.view(copies, rows, size)))
        mask = Mask(active, tuple(factors), len(dims))
        writes.append((activation, layer, sources[source_key], mask))
    return writes


def _scatter_flat(index: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """``[size]`` booleans on ``device``, True at ``index`` (one scatter, no host read)."""
    out = torch.zeros(size, dtype=torch.bool, device=device)
    return out.index_fill_(0, index, True)
