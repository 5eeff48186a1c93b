"""The exact batched estimator: many cells per forward pass, each started at the patched layer.

TransformerLens runs one full forward pass per patched cell. The work a sweep needs is far
smaller: a cell that patches layer ``L`` only changes layers ``L`` and later, and cells of the
same layer can share one forward pass. This estimator

1. groups the task's cells by the first block they patch (:mod:`patchspec.execute.schedule`);
2. replays the receiving run from that block (:class:`patchspec.model.replay.Replay`, recorded
   once per session and checked once per model and input shape against the model's own
   forward; a model that cannot be replayed runs full forward passes instead);
3. for a chunk of ``K`` cells, stacks ``K`` copies of the batch (copy-major: row ``k * batch +
   b`` is prompt ``b`` of cell ``k``) with hooks that overwrite each copy's own region
   (``torch.where`` over the chunk's vectorised masks, :mod:`patchspec.execute.masks`), then the
   final norm and the unembedding, only at the positions the metric reads;
4. evaluates the metric on the whole block of logits at once.

Example:
    >>> from patchspec import catalog
    >>> catalog.HEAD_OUT_BY_POS.run(model, clean, corrupted, metric, cells_per_batch=64)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from patchspec.errors import PatchSpecError
from patchspec.execute.hooks import FireCounter, Hook, ordered, write_phase
from patchspec.execute.masks import Write, part_writes, region_writes
from patchspec.execute.protocols import Chunk, Task
from patchspec.execute.schedule import (
    choose_cells_per_batch,
    chunks_by_start,
    chunks_by_suffix,
)
from patchspec.execute.writer import write_hooks
from patchspec.layouts import layout
from patchspec.model.adapter import ModelAdapter
from patchspec.model.lean import LeanReplay
from patchspec.options import flag, optional_count, optional_memory
from patchspec.plan.cells import Region, regions_of
from patchspec.plan.grid import Grid
from patchspec.sources import Combine, Source

log = logging.getLogger(__name__)


@attrs.define
class Stats:
    """What one batched sweep did (kept in ``task.memo["stats"]`` and logged at debug level)."""

    cells: int = 0
    forwards: int = 0
    replayed: int = 0
    full: int = 0
    largest: int = 0
    cells_per_batch: int = 0
    lean: int = 0  # of the replayed passes, those through the lean blocks
    positions: int = 0  # token positions recomputed lean (rows x positions x blocks)


def _start_table(adapter: ModelAdapter, activation: str, n_layers: int) -> np.ndarray:
    blocks = [adapter.block(activation, layer) for layer in range(n_layers)]
    return np.asarray([-1 if b is None else b for b in blocks], dtype=np.int64)


def _first_block(adapter: ModelAdapter, regions: Sequence[Region]) -> int:
    blocks = [adapter.block(r.activation, r.layer) for r in regions]
    if not blocks or any(b is None for b in blocks):
        return -1
    return min(b for b in blocks if b is not None)


def start_layers(task: Task) -> np.ndarray:
    """The first block each of ``task.cells`` patches (``-1``: a full pass is needed)."""
    grid, adapter = task.grid, task.adapter
    if grid.vectorised:
        first = grid.first_layers(task.cells)
        starts = np.empty(first.shape, dtype=np.int64)
        for k, part in enumerate(grid.parts):
            starts[:, k] = _start_table(adapter, part.spec.activation, grid.sizes.n_layers)[first[:, k]]
        if not grid.parts:
            return np.full(len(task.cells), -1, dtype=np.int64)
        return np.where((starts < 0).any(1), -1, starts.min(1))
    return np.asarray(
        [_first_block(adapter, grid.cell(int(i)).regions) for i in task.cells], dtype=np.int64
    )


def chunk_writes(grid: Grid, cells: np.ndarray, device: torch.device, memo: dict[Hashable, Any]) -> list[Write]:
    """Every write of a chunk of cells: vectorised per part, explicit for rules and lists."""
    sizes = grid.sizes
    if grid.explicit is not None:
        return region_writes([grid.explicit[int(i)].regions for i in cells], sizes, device)
    writes: list[Write] = []
    for part in grid.parts:
        if part.vectorised:
            writes += part_writes(grid, part, cells, sizes, device, memo)
            continue
        per_cell = []
        for row in grid.coordinate_indices(cells):
            coords = {a.name: a.values[int(row[part.first + j])] for j, a in enumerate(part.axes)}
            per_cell.append(regions_of(part.spec, coords, sizes, grid.positions))
        writes += region_writes(per_cell, sizes, device)
    return writes


def _per_task(task: Task, what: str, source: Source, hook_name: str, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per task for this source and hook point."""
    try:
        key: Hashable = (what, source, hook_name)
        hash(key)
    except TypeError:  # an unhashable custom source
        key = (what, id(source), hook_name)
    if key not in task.memo:
        task.memo[key] = make()
    return task.memo[key]


def source_values(task: Task, source: Source, hook_name: str) -> torch.Tensor:
    """The full tensor ``source`` gives at ``hook_name``, computed once per task."""
    values: torch.Tensor = _per_task(
        task, "values", source, hook_name, lambda: source.values(hook_name, task.session)
    )
    return values


def source_combine(task: Task, source: Source, hook_name: str) -> Combine | None:
    """``source.combine`` at ``hook_name`` (``None``: a plain overwrite), made once per task."""
    combine: Combine | None = _per_task(
        task, "combine", source, hook_name, lambda: source.combine(hook_name, task.session)
    )
    return combine


#: Dims whose positions a patch changes from on (a pattern's source positions are read, not
#: changed: patching ``pattern[dest, src]`` changes the output at ``dest`` only).
_CHANGED_DIMS = ("pos", "dest_pos")


def _changed_axes(activation: str) -> tuple[int, ...]:
    return tuple(i for i, d in enumerate(layout(activation).dims) if d in _CHANGED_DIMS)


def changed_positions(task: Task, source: Source, hook_name: str, axis: int) -> torch.Tensor:
    """``[seq]``: where what ``source`` writes at ``hook_name`` differs from the receiving
    run's own activation, computed once per task (on the model's device).

    Elsewhere the written values are the receiving run's own (clean and corrupted prompts that
    share their first tokens; at layer 0 every position whose token is the same), so writing
    them changes nothing. All True whenever that cannot be shown (a combine that mixes
    positions, an activation not cached).
    """
    seq = task.grid.sizes.seq
    device = task.adapter.device

    def compute() -> torch.Tensor:
        everywhere = torch.ones(seq, dtype=torch.bool, device=device)
        combine = source_combine(task, source, hook_name)
        if combine is not None and not source.positionwise:
            return everywhere
        try:
            receiving = task.session.activation(task.grid.receiver, hook_name)
        except PatchSpecError:
            return everywhere
        values = source_values(task, source, hook_name)
        with torch.inference_mode():
            try:
                written = values.to(receiving.dtype)
                if combine is not None:
                    written = combine(receiving.unsqueeze(0), written)[0]
                written = torch.broadcast_to(written, receiving.shape)
            except (RuntimeError, ValueError, TypeError):
                return everywhere
            if receiving.shape[axis] != seq:
                return everywhere
            return (written != receiving).movedim(axis, 0).reshape(seq, -1).any(1).to(device)

    changed: torch.Tensor = _per_task(task, f"changed-{axis}", source, hook_name, compute)
    return changed


def first_positions(task: Task, writes: Sequence[Write]) -> torch.Tensor:
    """``[cells]``: the first position each of ``task.cells`` changes (``seq``: none that the
    metric reads), from the cells' masks (``writes`` of all of them at once): the first
    position a cell writes where the written value is not the receiving run's own."""
    seq = task.grid.sizes.seq
    device = task.adapter.device
    out = torch.full((len(task.cells),), seq, dtype=torch.long, device=device)
    for activation, layer, source, mask in writes:
        axes = _changed_axes(activation)
        active = mask.active.to(device)
        if not axes:
            first = torch.zeros_like(out)
        else:
            axis = axes[0]
            changed = changed_positions(task, source, task.adapter.hook_name(activation, layer), axis)
            keep = next((k for a, k in mask.keeps() if a == axis), None)
            rows = changed[None] if keep is None else keep.to(device).any(1) & changed  # [K | 1, seq]
            has = rows.any(1)
            first = torch.where(has, rows.to(torch.int8).argmax(1), seq).expand(len(out))
        out = torch.minimum(out, torch.where(active, first, seq))
    positions = task.evaluate.logit_positions(seq)
    last = seq - 1 if positions is None else max(int(t) for t in positions)
    return torch.where(out > last, seq, out)


def _suffix(tensor: torch.Tensor, axes: Sequence[int], first: int, seq: int) -> torch.Tensor:
    """``tensor`` from position ``first`` on along ``axes`` (those of full length ``seq``)."""
    for axis in axes:
        if tensor.shape[axis] == seq:
            tensor = tensor.narrow(axis, first, seq - first)
    return tensor


def _has_own_hooks(model: Any) -> bool:
    """Whether hooks are registered on the model's hook points outside patchspec's passes."""
    return any(
        len(getattr(point, "_forward_hooks", ())) or len(getattr(point, "_forward_pre_hooks", ()))
        for point in getattr(model, "hook_dict", {}).values()
    )


@attrs.frozen
class BatchedEstimator:
    """Exact patching, many cells per forward pass (see the module docstring).

    Args:
        cells_per_batch: Cells per forward pass (default: from the memory budget).
        max_memory: Memory budget of one pass, bytes or a string such as ``"2GB"``.
        start_at_layer: Start each pass at its cells' first patched block (``False``: run every
            block, as the reference estimator does).
        lean: Replay with lean blocks from each chunk's first changed position where the model
            allows (:mod:`patchspec.model.lean`; ``False``: through the model's own blocks, at
            every position).
    """

    name: ClassVar[str] = "batched"
    exact: ClassVar[bool] = True
    cells_per_batch: int | None = attrs.field(default=None, validator=optional_count)
    max_memory: str | int | float | None = attrs.field(default=None, validator=optional_memory)
    start_at_layer: bool = attrs.field(default=True, validator=flag)
    lean: bool = attrs.field(default=True, validator=flag)

    def cells_per_pass(self, task: Task, rows: int | None = None) -> int:
        """``K``: the most cells one forward pass holds for this task, recomputing ``rows``
        positions (default: all)."""
        adapter = task.adapter
        positions = task.evaluate.logit_positions(task.grid.sizes.seq)
        return choose_cells_per_batch(
            task.grid.sizes,
            d_vocab=adapter.d_vocab,
            n_positions=task.grid.sizes.seq if positions is None else len(positions),
            device=adapter.device,
            dtype=adapter.dtype,
            cells_per_batch=self.cells_per_batch,
            max_memory=self.max_memory,
            rows=rows,
        )

    def lean_replay(self, task: Task) -> LeanReplay | None:
        """The lean replay this task's chunks run on (``None``: the model's own blocks)."""
        if "lean" not in task.memo:
            lean = task.session.lean(task.grid.receiver) if self.lean and self.start_at_layer else None
            if lean is not None:
                adapter = task.adapter
                names = {
                    name
                    for activation, layer in task.grid.sites
                    for name in adapter.write_points(activation, layer)
                    if name.startswith("blocks.")
                }
                if not lean.supports(names):
                    log.info(
                        "batched engine: %s patches hook points the lean replay does not model "
                        "(%s); replaying the model's own blocks at every position",
                        task.label, ", ".join(sorted(n for n in names if not lean.supports([n]))[:4]),
                    )
                    lean = None
                elif _has_own_hooks(adapter.model):
                    log.info(
                        "batched engine: the model has hooks of its own registered; replaying "
                        "its own blocks so that they fire"
                    )
                    lean = None
            task.memo["lean"] = lean
        lean_replay: LeanReplay | None = task.memo["lean"]
        return lean_replay

    def chunks(self, task: Task) -> list[Chunk]:
        """The task's cells grouped by start layer (and, replayed lean, by the first position
        they change), in chunks of at most ``K``."""
        if self.start_at_layer:
            starts = start_layers(task)
        else:
            starts = np.full(len(task.cells), -1, dtype=np.int64)
        limit = self.cells_per_pass(task)
        stats = task.memo.setdefault("stats", Stats())
        stats.cells, stats.cells_per_batch = len(task.cells), limit
        if not (starts >= 0).any() or self.lean_replay(task) is None:
            return chunks_by_start(task.cells, starts, limit)
        sizes = task.grid.sizes
        writes = chunk_writes(task.grid, task.cells, task.adapter.device, task.memo)
        firsts = first_positions(task, writes).cpu().numpy()
        capacities: dict[int, int] = {}

        def capacity(rows: int) -> int:
            if rows not in capacities:
                capacities[rows] = self.cells_per_pass(task, rows)
            return capacities[rows]

        return chunks_by_suffix(task.cells, starts, firsts, seq=sizes.seq, capacity=capacity)

    def hooks(self, task: Task, chunk: Chunk, first: int = 0) -> list[Hook]:
        """The hooks that patch ``len(chunk)`` stacked copies, copy ``k`` as cell ``chunk.cells[k]``,
        on activations that hold positions ``first``.. only (lean suffix replay)."""
        adapter = task.adapter
        seq = task.grid.sizes.seq
        hooks: list[Hook] = []
        for activation, layer, source, mask in chunk_writes(
            task.grid, chunk.cells, adapter.device, task.memo
        ):
            hook_name = adapter.hook_name(activation, layer)
            values = source_values(task, source, hook_name)
            dense = mask.dense()
            if first:
                axes = _changed_axes(activation)
                values = _suffix(values, axes, first, seq)
                dense = _suffix(dense, [a + 1 for a in axes], first, seq)
            hooks += write_hooks(
                adapter.write_points(activation, layer),
                layout(activation).writer,
                values,
                dense,
                copies=len(chunk),
                phase=write_phase(source, derived=layout(activation).writer == "resid_mid"),
                combine=source_combine(task, source, hook_name),
            )
        return ordered(hooks)

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        """The values of one chunk's cells, from one forward pass of ``len(chunk)`` copies.

        Raises:
            HookError: a hook did not fire exactly once.
            MetricError: the metric returned the wrong shape or a non-finite value.
        """
        adapter, session = task.adapter, task.session
        copies = len(chunk)
        positions = task.evaluate.logit_positions(task.grid.sizes.seq)
        stats = task.memo.setdefault("stats", Stats())
        seq = task.grid.sizes.seq
        with torch.inference_mode():
            counter = FireCounter()
            lean = self.lean_replay(task) if chunk.start is not None else None
            ran = True
            if lean is not None and chunk.start is not None:
                first = min(chunk.first, seq)
                # A chunk from the sequence's end changes nothing the metric reads: no hooks.
                ran = first < seq
                hooks = counter.counted(self.hooks(task, chunk, first)) if ran else []
                logits = lean.run(chunk.start, copies, positions, hooks, first)
                stats.lean += int(ran)
                stats.replayed += int(ran)
                stats.positions += copies * task.grid.sizes.batch * (seq - first) * (
                    task.grid.sizes.n_layers - chunk.start
                )
            else:
                hooks = counter.counted(self.hooks(task, chunk))
                replay = session.replay(task.grid.receiver) if chunk.start is not None else None
                if replay is not None and chunk.start is not None:
                    with adapter.hooks(hooks):
                        logits = replay.run(chunk.start, copies, positions)
                    stats.replayed += 1
                else:
                    tokens = session.tokens(task.grid.receiver).repeat(copies, 1)
                    logits = adapter.run_with_hooks(tokens, hooks)
                    if positions is not None:
                        logits = logits[:, list(positions)]
                    stats.full += 1
            counter.check()
            stats.forwards += int(ran)
            stats.largest = max(stats.largest, copies)
            return task.evaluate.many(logits, [int(i) for i in chunk.cells], positions)
