"""GradDrop (Kramar et al. 2024, "AtP*", section 3.1.2): an unsigned ranking score robust to
cancellation between a node's direct and indirect effects.

AtP can miss a node whose effect through one path is cancelled by its effect through another:
the sum is near zero even though each path matters. GradDrop recomputes the AtP estimate ``L``
times, once per layer ``l`` of the model with the gradient flowing through that layer's
residual-stream write (its ``attn_out`` and ``mlp_out``) set to zero on the way back, and
combines the estimates as the paper's equation 11 does:

    score(cell) = 1 / (L - 1) * sum over layers l of | AtP_l(cell) |,

per example (the mean over examples for a mean-reduced metric: the paper's expectation of the
absolute value). ``AtP_l`` is the cell's first-order change with gradients taken under layer
``l``'s drop; for a layer before the cell's own it is plain AtP (the dropped write is upstream),
and for a node writing through layer ``l`` itself it is 0 (its own path is dropped), so for most
nodes the sum has ``L - 1`` non-zero terms, hence the normalisation. If dropping some layer's
gradient removes a path that cancelled the others, that term is large and the score shows it.

This is AtP* as the paper defines it: query, key and score cells use the QK fix
(:class:`~patchspec.attribution.qk.AtPStar`), and every estimate ``AtP_l`` uses the gradients of
the dropped pass. A ``resid_mid`` cell is linearised at the residual stream itself (the gradient
reaching the block's ``attn_out`` write, after the drop), so dropping its own block still keeps
its skip path.

The result is **not an estimate of the effect**: it is unsigned, not in the metric's units of a
change, and never the patched metric's value. It has the dims and coordinates of the exact
result, with ``attrs["estimator"] = "graddrop"``, ``attrs["exact"] = False`` and
``attrs["quantity"] = "score"`` (with ``formula`` and ``meaning``), so ``.patch.effect()``
refuses it, :func:`patchspec.verify` ranks by it as it is, and
:func:`patchspec.stats.agreement` / :func:`patchspec.plot.plot_agreement` compare it with the
exact result's ``|effect|``.

Cost: one forward pass with autograd on and, per metric, one backward pass for plain AtP plus one
per layer from the grid's lowest layer to the last (at most ``L + 1``; they share the forward),
plus ``L`` contractions per write and chunk of cells (the layers before a cell's own reuse the
plain one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from patchspec.attribution.gradients import (
    Gradients,
    differentiable_values,
    gradient_point,
)
from patchspec.attribution.qk import QK, AtPStar
from patchspec.errors import InputError
from patchspec.execute.batched import chunk_writes
from patchspec.execute.hooks import FireCounter, Hook
from patchspec.execute.protocols import Chunk, Task
from patchspec.layouts import layout
from patchspec.metrics import _check_value
from patchspec.sources import Source

#: ``attrs["quantity"]`` of a GradDrop result.
SCORE = "score"
#: Suffix of the key under which a write point's gradient *after* its drop gate is kept.
AFTER = "#after-drop"

RESULT_ATTRS: Mapping[str, str] = {
    "quantity": SCORE,
    "formula": "1/(L-1) * sum over layers l of |AtP with layer l's residual write's gradient "
    "dropped|",
    "meaning": "unsigned ranking score (GradDrop, Kramar et al. 2024): how much a cell may "
    "matter, robust to cancelling paths; not an estimate of the effect or of its sign",
}


class _Switch:
    """Which layer's residual write drops its gradient in the current backward pass."""

    layer: int | None = None


class _DropGradient(torch.autograd.Function):
    """Identity forward; backward passes the gradient on, or zeros when its layer is dropped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, switch: _Switch, layer: int) -> torch.Tensor:
        ctx.switch, ctx.layer = switch, layer
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.switch.layer == ctx.layer:
            return torch.zeros_like(grad), None, None
        return grad, None, None


@attrs.frozen(eq=False)
class DropGradients:
    """The plain gradient pass and, per dropped layer, the gradients under that drop.

    Attributes:
        plain: Gradients with nothing dropped (and the metrics' values, the activations).
        dropped: ``dropped[l][m][point]``: gradient of metric ``m`` at ``point`` with layer
            ``l``'s residual write's gradient dropped (only points of layers ``<= l``: later
            points are unaffected by the drop, and read from :attr:`plain`).
    """

    plain: Gradients
    dropped: Mapping[int, tuple[Mapping[str, torch.Tensor], ...]]


def residual_writes(adapter: Any, layer: int) -> list[str]:
    """The hook points of block ``layer``'s writes to the residual stream that the model has
    (``attn_out`` and ``mlp_out``; attention-only models have no ``mlp_out``)."""
    hook_dict = getattr(adapter.model, "hook_dict", {})
    names = [adapter.hook_name(a, layer) for a in ("attn_out", "mlp_out")]
    return [n for n in names if not hook_dict or n in hook_dict]


def drop_gradients(
    task: Task,
    points: Sequence[tuple[str, int]],
    n_layers: int,
    keep: Sequence[str] = (),
) -> DropGradients:
    """One forward pass with autograd on and, per metric, a plain backward and one backward per
    layer from the lowest point's layer on, with that layer's residual writes' gradient dropped.

    Args:
        task: The task.
        points: ``(hook point, layer)`` pairs whose gradients are wanted; a name ending in
            :data:`AFTER` is the gradient after the drop gate of that write point.
        n_layers: The model's number of layers.
        keep: Hook points whose activations (not gradients) are wanted too.

    Raises:
        HookError: a hook did not fire exactly once.
        MetricError: a metric is not differentiable, or returned the wrong shape or a
            non-finite value.
    """
    adapter, session = task.adapter, task.session
    tokens = session.tokens(task.grid.receiver)
    wanted = list(dict.fromkeys(points))
    lowest = min((layer for _name, layer in wanted), default=n_layers)
    drops = list(range(max(lowest, 0), n_layers))
    gates = {name: layer for layer in drops for name in residual_writes(adapter, layer)}
    # a point after a gate that is never dropped is the point itself
    wanted = [
        (name if name.removesuffix(AFTER) in gates else name.removesuffix(AFTER), layer)
        for name, layer in wanted
    ]
    before = {name for name, _layer in wanted if not name.endswith(AFTER)} | set(keep)
    switch = _Switch()
    kept: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., torch.Tensor]:
        def hook(act: torch.Tensor, hook: object) -> torch.Tensor:
            if not act.requires_grad:  # frozen weights: make the activation a leaf of the graph
                act = act.detach().requires_grad_(True)
            out = act.clone() if name in before else act
            kept[name] = out
            if name in gates:  # the gate clones too: the point before it keeps its own tensor
                out = _DropGradient.apply(out, switch, gates[name])
                kept[name + AFTER] = out
            return out

        return hook

    names = list(dict.fromkeys([*before, *gates]))
    counter = FireCounter()
    hooks: list[Hook] = counter.counted([(name, hook_for(name)) for name in names])
    with torch.inference_mode(False), torch.enable_grad():
        logits = adapter.run_with_hooks(tokens, hooks)
        counter.check()
        values = differentiable_values(task.evaluate, logits, "the GradDrop gradient pass")

        def backward(value: torch.Tensor, keys: list[str], last: bool) -> dict[str, torch.Tensor]:
            inputs = [kept[k] for k in keys]
            if not inputs:
                return {}
            got = torch.autograd.grad(value.sum(), inputs, retain_graph=not last, allow_unused=True)
            return {
                k: (torch.zeros_like(x) if g is None else g).detach().float()
                for k, x, g in zip(keys, inputs, got, strict=True)
            }

        plain: list[dict[str, torch.Tensor]] = []
        dropped: dict[int, list[dict[str, torch.Tensor]]] = {layer: [] for layer in drops}
        keys = [name for name, _layer in wanted]
        for m, value in enumerate(values):
            final = m + 1 == len(values)
            switch.layer = None
            plain.append(backward(value, keys, final and not drops))
            for i, layer in enumerate(drops):
                switch.layer = layer
                under = [name for name, at in wanted if at <= layer]
                dropped[layer].append(backward(value, under, final and i + 1 == len(drops)))
        switch.layer = None
    batch = int(tokens.shape[0])
    checked = tuple(
        _check_value(v.detach(), batch, m.name, "the GradDrop gradient pass")
        for m, v in zip(task.evaluate.metrics, values, strict=True)
    )
    activations = {k: v.detach() for k, v in kept.items() if not k.endswith(AFTER)}
    return DropGradients(
        Gradients(tuple(plain), checked, activations),
        {layer: tuple(g) for layer, g in dropped.items()},
    )


@attrs.frozen
class GradDrop(AtPStar):
    """AtP* (Kramar et al. 2024): the QK fix and GradDrop, an unsigned ranking score per cell
    (see the module docstring; ``estimator="graddrop"``).

    Args:
        max_memory: Budget of one chunk's work.

    Example:
        >>> catalog.HEAD_OUT_BY_POS.run(model, clean, corrupted, metric, estimator="graddrop")  # doctest: +SKIP
    """

    name: ClassVar[str] = "graddrop"
    #: Merged into the result's attrs by the runner: the values are a score, not an effect.
    result_attrs: ClassVar[Mapping[str, str]] = RESULT_ATTRS

    def _points(self, task: Task) -> tuple[list[tuple[str, int]], list[str]]:
        """The gradient points (with their layers) and the activations the QK fix reads."""
        points = []
        for activation, layer in task.grid.sites:
            point = gradient_point(task.adapter, activation, layer)
            if layout(activation).writer == "resid_mid":
                point += AFTER
            points.append((point, layer))
        keep = self._qk_points(task)
        for layer in sorted({layer for a, layer in task.grid.sites if a in QK}):
            points.append((self._names(task, layer)["pattern"], layer))
        return points, keep

    def _drop_gradients(self, task: Task) -> DropGradients:
        if "graddrop" not in task.memo:
            points, keep = self._points(task)
            task.memo["graddrop"] = drop_gradients(
                task, points, int(task.adapter.cfg.n_layers), keep
            )
        return task.memo["graddrop"]  # type: ignore[no-any-return]

    def gradients(self, task: Task) -> Gradients:
        """The plain pass of :func:`drop_gradients` (values, activations, AtP's gradients)."""
        return self._drop_gradients(task).plain

    def point_gradient(
        self,
        task: Task,
        activation: str,
        layer: int,
        source: Source,
        metric: int,
        dropped: int | None = None,
    ) -> torch.Tensor:
        """The gradient at the write's point under ``dropped``'s drop (``resid_mid``: at the
        residual stream, after its block's ``attn_out`` gate)."""
        point = gradient_point(task.adapter, activation, layer)
        if layout(activation).writer == "resid_mid":
            point += AFTER
        return self.gradient_at(task, point, layer, metric, dropped)

    def gradient_at(
        self, task: Task, point: str, layer: int, metric: int, dropped: int | None = None
    ) -> torch.Tensor:
        """The gradient at ``point`` of layer ``layer`` with layer ``dropped``'s residual
        write's gradient dropped (plain where ``dropped`` is ``None`` or before ``layer``)."""
        grads = self._drop_gradients(task)
        if dropped is None or dropped < layer:
            plain = grads.plain.grads[metric]
        else:
            plain = grads.dropped[dropped][metric]
        return plain[point] if point in plain else plain[point.removesuffix(AFTER)]

    def chunks(self, task: Task) -> list[Chunk]:
        """AtP*'s chunks, after checking the model has at least 2 layers.

        Raises:
            InputError: a one-layer model (the score averages over ``L - 1`` layers).
            MetricError: a metric is not differentiable.
        """
        layers = int(task.adapter.cfg.n_layers)
        if layers < 2:
            raise InputError(
                f"estimator='graddrop' averages AtP over the L - 1 = {layers - 1} layers whose "
                "gradient it drops besides a node's own, so it needs a model with at least 2 "
                "layers; use estimator='atp*' or 'atp'"
            )
        return AtPStar.chunks(self, task)

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        """The GradDrop scores of one chunk's cells, shaped as AtP's estimates (``[cells]``,
        ``[cells, example]``, ``[cells, metric]`` or ``[cells, metric, example]``), each
        ``>= 0``.

        Raises:
            HookError: a hook of the gradient pass did not fire exactly once.
            MetricError: a metric is not differentiable, or returned the wrong shape or a
                non-finite value.
        """
        grads = self._drop_gradients(task)
        layers = int(task.adapter.cfg.n_layers)
        device = task.adapter.device
        writes = chunk_writes(task.grid, np.asarray(chunk.cells), device, task.memo)
        first = min((layer for _a, layer, _s, _m in writes), default=layers)
        shape = (len(chunk), task.grid.sizes.batch)
        out = []
        for m, value in enumerate(grads.plain.values):

            def delta(dropped: int | None, m: int = m) -> torch.Tensor:
                total = torch.zeros(shape, device=device)
                for activation, layer, source, mask in writes:
                    change = self.write_delta(task, activation, layer, source, mask, m, dropped)
                    total = total + change.to(device)
                return total

            # layers before every write of the chunk drop an upstream write: plain AtP there
            score = delta(None).abs() * min(first, layers)
            for dropped in range(max(first, 0), layers):
                score = score + delta(dropped).abs()
            score = score / (layers - 1)
            out.append(score.sum(1) if value.ndim == 0 else score)
        if not task.evaluate.stacked:
            return out[0]
        return torch.stack(out, dim=1)


__all__ = ["AFTER", "RESULT_ATTRS", "SCORE", "DropGradients", "GradDrop", "drop_gradients"]
