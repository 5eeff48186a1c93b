"""Integrated gradients on activations: AtP with the gradient averaged along the patch's path.

AtP linearises at the receiving run. Integrated gradients (Sundararajan et al. 2017, applied to
activations as in Marks et al. 2024 and Hanna et al. 2024, "EAP-IG") average the gradient along
the straight line from the receiving activation ``a`` to the source's ``a'``:

    delta(cell) = sum over the cell's elements of (a' - a) * mean_i dM/da (a + alpha_i (a' - a)),

with ``alpha_i = (i + 1/2) / ig_steps`` (the midpoint rule). Only the patched hook point is
interpolated, every element of it at once, so the estimates of all cells of one hook point
sum to the exact effect of patching that whole hook point as ``ig_steps`` grows (completeness;
the midpoint rule's error shrinks as ``1 / ig_steps**2``).

Cost: ``ig_steps`` forward and backward passes per hook point written (per source written
there), plus one forward pass for the receiving run's metric.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from patchspec.attribution.atp import AtP, _key, written_values
from patchspec.attribution.gradients import Gradients, gradient_point, metric_gradients
from patchspec.errors import OptionError
from patchspec.execute.protocols import Task
from patchspec.sources import Source


def _steps(inst: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"ig_steps must be a positive int (steps along the path), got {value!r}")


@attrs.frozen
class IntegratedGradients(AtP):
    """Integrated gradients along each patched hook point's path (see the module docstring).

    Args:
        ig_steps: Number of points along the path (midpoint rule).
        max_memory: Budget of one chunk's contraction.

    Example:
        >>> catalog.RESID_PRE.run(model, clean, corrupted, metric, estimator="ig", ig_steps=8)  # doctest: +SKIP
    """

    name: ClassVar[str] = "ig"
    ig_steps: int = attrs.field(default=8, validator=_steps, kw_only=True)

    def gradients(self, task: Task) -> Gradients:
        """The receiving run's metric values (no gradients: those are taken per path)."""
        return metric_gradients(task, [])

    def point_gradient(
        self,
        task: Task,
        activation: str,
        layer: int,
        source: Source,
        metric: int,
        dropped: int | None = None,
    ) -> torch.Tensor:
        """The gradient at ``activation``'s hook point averaged along the path to ``source``."""
        point = gradient_point(task.adapter, activation, layer)
        key = ("ig", point, _key(source))
        if key not in task.memo:
            hook_name = task.adapter.hook_name(activation, layer)
            new = written_values(task, source, hook_name)
            old = task.session.activation(task.grid.receiver, hook_name)
            diff = (new.float() - old.float()).detach()
            total: list[torch.Tensor] | None = None
            for i in range(self.ig_steps):
                alpha = (i + 0.5) / self.ig_steps

                def shift(act: torch.Tensor, alpha: float = alpha) -> torch.Tensor:
                    return act + (alpha * diff).to(act.dtype)

                grads = metric_gradients(task, [point], {point: shift}).grads
                step = [g[point] for g in grads]
                total = step if total is None else [t + s for t, s in zip(total, step, strict=True)]
            assert total is not None
            task.memo[key] = [t / self.ig_steps for t in total]
        return task.memo[key][metric]  # type: ignore[no-any-return]
