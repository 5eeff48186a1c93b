"""Attribution patching (AtP): a first-order estimate of every cell of a grid from one gradient pass.

Patching a cell replaces the receiving run's activation ``a`` by the source's ``a'`` on the
elements the cell writes. To first order the metric moves by

    delta(cell) = sum over the cell's elements of (a' - a) * dM/da,

with the gradient taken on the receiving run (Nanda 2023, "Attribution patching"; Syed, Rager
and Conmy 2023; Kramar et al. 2024, "AtP*"). So denoising (clean values into the corrupted run)
estimates ``(clean - corrupted) . dM/dact`` at the corrupted run, noising the reverse, and
ablations (zero, mean, resample, noise) use their own values through the same
:meth:`~patchspec.sources.Source.values` the exact engines write.

The elements a cell writes are exactly the batched engine's masks
(:func:`patchspec.execute.batched.chunk_writes`), so every activation of the catalogue is
covered with no code per activation, and a coarse cell is the sum of its fine cells (the
estimate is linear in the mask). The sum over a factored mask is one ``einsum`` per write, on
the device, for a whole chunk of cells: no host sync per cell. The value reported for a cell is
the receiving run's metric plus ``delta``, the same quantity exact patching reports, so
``exact - atp`` is the estimate's error.

Cost: one forward and one backward pass per metric for the whole grid (the backward passes share
the forward), plus the contractions.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from patchspec.attribution.gradients import (
    Gradients,
    check_differentiable,
    gradient_point,
    metric_gradients,
)
from patchspec.execute.batched import chunk_writes, source_combine, source_values
from patchspec.execute.masks import Mask
from patchspec.execute.protocols import Chunk, Task
from patchspec.layouts import layout
from patchspec.options import optional_memory, parse_memory
from patchspec.sources import Source

#: Default budget for one chunk's contraction (float32 elements are 4 bytes).
DEFAULT_MEMORY = 2**28
_LETTERS = "cdefghij"


def contract(mask: Mask, product: torch.Tensor) -> torch.Tensor:
    """``[K, batch]``: for each copy ``k``, the sum of ``product`` over the elements ``mask``
    selects for it, per example.

    ``product`` is ``[batch, ...]`` (the activation's shape); the mask's factors are folded in
    one ``einsum`` (factors shared by every copy first), never expanded to a dense
    ``[K, batch, ...]`` tensor.

    Example:
        >>> from patchspec.execute.masks import scatter
        >>> m = Mask(torch.ones(2, dtype=torch.bool), ((1, scatter(np.array([[0], [2]]), 3, torch.device("cpu"))),), 2)
        >>> contract(m, torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[1.],
                [3.]])
    """
    ndim = product.ndim
    copies = int(mask.active.shape[0])
    batch = int(product.shape[0])
    letters = _LETTERS[: ndim - 1]
    operands: list[torch.Tensor] = []
    subscripts: list[str] = []
    for axis, keep in mask.keeps():
        factor = keep.to(product.dtype)
        if factor.shape[0] == 1:  # shared by every copy: fold into the product
            view = [factor.shape[1]] + [1] * (ndim - 1)
            view[axis] = factor.shape[2]
            product = product * factor.reshape(view)
        elif factor.shape[1] == 1:
            operands.append(factor[:, 0])
            subscripts.append("k" + letters[axis - 1])
        else:
            operands.append(factor)
            subscripts.append("kb" + letters[axis - 1])
    if operands:
        spec = ",".join(["b" + letters, *subscripts]) + "->kb"
        out = torch.einsum(spec, product, *operands)
    else:
        out = product.reshape(batch, -1).sum(-1).expand(copies, batch)
    return out * mask.active.to(out.dtype)[:, None]


def written_values(task: Task, source: Source, hook_name: str) -> torch.Tensor:
    """What a write of ``source`` puts at ``hook_name`` of the unpatched receiving run, the
    activation's full shape: its values, or for a functional source (``Subspace``, ``Add``,
    ``SAELatent``: :meth:`~patchspec.sources.Source.combine`) their combination with the
    receiving activation, as the exact engines compute it."""
    values = source_values(task, source, hook_name)
    combine = source_combine(task, source, hook_name)
    if combine is None:
        return values
    return combine(task.session.activation(task.grid.receiver, hook_name), values)


def _key(source: Source) -> Hashable:
    try:
        hash(source)
    except TypeError:
        return id(source)
    return source


def _elements(activation: str, sizes: Any) -> int:
    return math.prod(sizes.size(d) for d in layout(activation).dims[1:])


@attrs.frozen
class AtP:
    """Attribution patching: every cell of a grid estimated from one gradient pass.

    Args:
        max_memory: Budget of one chunk's contraction (bytes or ``"1GB"``; default 256 MiB).

    Example:
        >>> catalog.HEAD_OUT_BY_POS.run(model, clean, corrupted, metric, estimator="atp")  # doctest: +SKIP
    """

    name: ClassVar[str] = "atp"
    exact: ClassVar[bool] = False
    max_memory: str | int | float | None = attrs.field(default=None, validator=optional_memory)

    # --- what subclasses change ------------------------------------------------------------
    def gradients(self, task: Task) -> Gradients:
        """The gradient at every point the grid writes, on the unpatched receiving run."""
        points = [gradient_point(task.adapter, a, layer) for a, layer in task.grid.sites]
        return metric_gradients(task, points)

    def point_gradient(
        self,
        task: Task,
        activation: str,
        layer: int,
        source: Source,
        metric: int,
        dropped: int | None = None,
    ) -> torch.Tensor:
        """The gradient a write of ``source``'s values into ``activation`` is linearised with
        (``dropped``: the layer whose residual write's gradient is dropped, for GradDrop)."""
        point = gradient_point(task.adapter, activation, layer)
        return self.gradient_at(task, point, layer, metric, dropped)

    def gradient_at(
        self, task: Task, point: str, layer: int, metric: int, dropped: int | None = None
    ) -> torch.Tensor:
        """The gradient of metric ``metric`` at hook point ``point`` (of layer ``layer``)."""
        grads: Gradients = self._gradients(task)
        return grads.grads[metric][point]

    # --- the estimator protocol ------------------------------------------------------------
    def chunks(self, task: Task) -> list[Chunk]:
        """The task's cells in chunks whose contraction fits :attr:`max_memory`.

        Raises:
            MetricError: a metric is not differentiable (checked before any gradient pass).
        """
        check_differentiable(task)
        budget = DEFAULT_MEMORY if self.max_memory is None else parse_memory(self.max_memory)
        limit = max(1, budget // (4 * task.grid.sizes.batch * self.cell_elements(task)))
        cells = task.cells
        return [Chunk(cells[i : i + limit]) for i in range(0, len(cells), limit)]

    def _gradients(self, task: Task) -> Gradients:
        if "gradients" not in task.memo:
            task.memo["gradients"] = self.gradients(task)
        return task.memo["gradients"]  # type: ignore[no-any-return]

    def product(
        self,
        task: Task,
        activation: str,
        layer: int,
        source: Source,
        metric: int,
        dropped: int | None = None,
    ) -> torch.Tensor:
        """``(source - receiving) * gradient`` at one write, ``[batch, ...]`` float32 (kept per task)."""
        key = ("product", activation, layer, _key(source), metric, dropped)
        if key not in task.memo:
            hook_name = task.adapter.hook_name(activation, layer)
            new = written_values(task, source, hook_name).float()
            old = task.session.activation(task.grid.receiver, hook_name).float()
            grad = self.point_gradient(task, activation, layer, source, metric, dropped)
            task.memo[key] = (new - old) * grad
        return task.memo[key]  # type: ignore[no-any-return]

    def write_delta(
        self,
        task: Task,
        activation: str,
        layer: int,
        source: Source,
        mask: Mask,
        metric: int,
        dropped: int | None = None,
    ) -> torch.Tensor:
        """``[K, batch]``: the first-order change of metric ``metric`` from one write."""
        return contract(mask, self.product(task, activation, layer, source, metric, dropped))

    def cell_elements(self, task: Task) -> int:
        """The most float32 values one cell's contraction touches (per example)."""
        sizes = task.grid.sizes
        return max((_elements(a, sizes) for a, _layer in task.grid.sites), default=1)

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        """The estimates of one chunk's cells: the receiving run's metric plus the first-order
        change, ``[cells]``, ``[cells, example]``, ``[cells, metric]`` or ``[cells, metric,
        example]`` as the evaluator gives exact values.

        Raises:
            HookError: a hook of the gradient pass did not fire exactly once.
            MetricError: a metric is not differentiable, or returned the wrong shape or a
                non-finite value.
        """
        grads = self._gradients(task)
        device = task.adapter.device
        writes = chunk_writes(task.grid, np.asarray(chunk.cells), device, task.memo)
        out = []
        for m, value in enumerate(grads.values):
            delta = torch.zeros((len(chunk), task.grid.sizes.batch), device=device)
            for activation, layer, source, mask in writes:
                change = self.write_delta(task, activation, layer, source, mask, m)
                delta = delta + change.to(delta.device)
            value = value.to(device)
            out.append(value + (delta.sum(1) if value.ndim == 0 else delta))
        if not task.evaluate.stacked:
            return out[0]
        return torch.stack(out, dim=1)


def point_names(task: Task) -> Sequence[str]:
    """The gradient points of every site of the task's grid (deduplicated, in order)."""
    return list(
        dict.fromkeys(gradient_point(task.adapter, a, layer) for a, layer in task.grid.sites)
    )
