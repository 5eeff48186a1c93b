"""The exact reference estimator: an independent oracle, one plain forward pass per cell.

Each cell is spelt out with its regions (:meth:`patchspec.plan.grid.Grid.cell`) and written by
plain tensor indexing, ``act[b, i, j, ...] = values[b, i, j, ...]`` over the outer product of
each dim's indices, the way TransformerLens's patch setters write, through the model's own
``run_with_hooks``. It shares no mask or writer code with the batched estimator, so "batched
== reference" checks the batched engine's masks and writers as well as its replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import attrs
import torch

from patchspec.execute.hooks import READ, FireCounter, Hook, ordered, phased, write_phase
from patchspec.execute.protocols import Chunk, Task
from patchspec.layouts import layout
from patchspec.model.adapter import ModelAdapter
from patchspec.plan.cells import PerExample, Region
from patchspec.sources import Combine


def _indices(region: Region, shape: torch.Size, device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Advanced-index tuples covering the region: one for all prompts, or one per prompt."""
    ndim = len(shape)

    def along(axis: int, values: list[int] | range) -> torch.Tensor:
        view = [1] * ndim
        view[axis] = -1
        return torch.tensor(list(values), dtype=torch.long, device=device).view(view)

    per_prompt = any(isinstance(sel, PerExample) for _d, sel in region.index)
    prompts: list[list[int] | range] = (
        [[b] for b in range(shape[0])] if per_prompt else [range(shape[0])]
    )
    for rows in prompts:
        index = [along(0, rows)]
        for axis, (_dim, sel) in enumerate(region.index, start=1):
            if sel is None:
                index.append(along(axis, range(shape[axis])))
            elif isinstance(sel, PerExample):
                index.append(along(axis, list(sel.values[rows[0]])))
            else:
                index.append(along(axis, list(sel)))
        yield tuple(index)


def indexing_hooks(
    adapter: ModelAdapter, region: Region, values: torch.Tensor, combine: Combine | None = None
) -> list[Hook]:
    """Hooks writing ``values`` into ``region`` by plain indexing (``resid_mid``: via attn_out).

    With a ``combine`` (see :meth:`patchspec.sources.Source.combine`) the values written are
    ``combine(act, values)`` of the whole activation as it arrives, indexed like plain values.
    """
    points = adapter.write_points(region.activation, region.layer)
    derived = layout(region.activation).writer == "resid_mid"
    phase = write_phase(region.source, derived=derived)

    def assign(act: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        new = new.to(act.dtype)
        for index in _indices(region, act.shape, act.device):
            out[index] = new[index]
        return out

    if derived:
        seen: dict[str, torch.Tensor] = {}

        def read(act: torch.Tensor, hook: object) -> None:
            seen["resid_pre"] = act.clone()

        def write(act: torch.Tensor, hook: object) -> torch.Tensor:
            resid_pre = seen.pop("resid_pre")
            target = values.to(act.dtype)
            if combine is not None:  # the residual resid_mid = resid_pre + attn_out
                target = combine(resid_pre + act, target)
            return assign(act, target - resid_pre)

        return [(points[0], phased(read, READ)), (points[1], phased(write, phase))]

    def overwrite(act: torch.Tensor, hook: object) -> torch.Tensor:
        if combine is not None:
            return assign(act, combine(act.clone(), values.to(act.dtype)))
        return assign(act, values)

    return [(points[0], phased(overwrite, phase))]


@attrs.frozen
class ReferenceEstimator:
    """Exact patching, one full forward pass per cell, written by plain indexing."""

    name: ClassVar[str] = "reference"
    exact: ClassVar[bool] = True

    def chunks(self, task: Task) -> list[Chunk]:
        """One chunk per cell."""
        return [Chunk(task.cells[i : i + 1]) for i in range(len(task.cells))]

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        """The values of ``chunk``'s cells, one forward pass each.

        Raises:
            HookError: a hook did not fire exactly once.
            MetricError: the metric returned the wrong shape or a non-finite value.
        """
        session, adapter = task.session, task.adapter
        tokens = session.tokens(task.grid.receiver)
        out = []
        with torch.inference_mode():
            for flat in chunk.cells:
                cell = task.grid.cell(int(flat))
                counter = FireCounter()
                hooks: list[Hook] = []
                for region in cell.regions:
                    values = region.source.values(region.hook_name, session)
                    combine = region.source.combine(region.hook_name, session)
                    hooks += indexing_hooks(adapter, region, values, combine)
                logits = adapter.run_with_hooks(tokens, counter.counted(ordered(hooks)))
                counter.check()
                out.append(task.evaluate(logits, int(flat)))
        return torch.stack(out)
