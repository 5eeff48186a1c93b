"""Gradients of the metric with respect to the activations a grid writes, for every example at once.

The runner works under ``torch.inference_mode``; attribution needs a pass with autograd on.
:func:`metric_gradients` runs the receiving run's tokens once through the model with hooks that
keep each requested hook point's output in the graph (optionally overwriting it first, for
integrated gradients), evaluates each metric differentiably and takes one backward per metric
(``torch.autograd.grad`` on the kept activations only: no parameter receives a gradient).

Examples are independent rows of one batch, so the gradient of ``metric.sum()`` over a
per-example metric gives every example's own gradient in one backward; a mean-reduced metric's
gradient already carries the ``1 / batch`` of its mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from patchspec.errors import MetricError
from patchspec.execute.hooks import FireCounter, Hook
from patchspec.execute.protocols import Task
from patchspec.layouts import layout
from patchspec.metrics import Evaluator, MetricContext, _as_value, _call, _check_value

#: Turns the activation a hook point produced into the tensor the model continues with (for
#: integrated gradients: the interpolated activation).
Overwrite = Callable[[torch.Tensor], torch.Tensor]


def gradient_point(adapter: Any, activation: str, layer: int) -> str:
    """The hook point whose gradient a patch of ``activation`` at ``layer`` is linearised at.

    It is the activation's own hook, except for ``resid_mid``, which is written through the
    block's ``attn_out`` (``resid_mid = resid_pre + attn_out``, so the metric's gradient with
    respect to the residual stream there is its gradient with respect to ``attn_out``).
    """
    points = adapter.write_points(activation, layer)
    return points[1] if layout(activation).writer == "resid_mid" else points[0]


@attrs.frozen(eq=False)
class Gradients:
    """One gradient pass: per metric, the gradient at each hook point, and the metric's value.

    Attributes:
        grads: ``grads[m][hook_name]``: ``[batch, ...]`` gradient of metric ``m`` (float32).
        values: ``values[m]``: the metric's value on the pass (``[]`` or ``[batch]``, float32).
        activations: The activation at each hook point of the pass (detached).
    """

    grads: tuple[Mapping[str, torch.Tensor], ...]
    values: tuple[torch.Tensor, ...]
    activations: Mapping[str, torch.Tensor] = attrs.field(factory=dict)


def gradient_context(context: MetricContext) -> MetricContext:
    """``context`` with its unpatched logits as ordinary tensors (made under inference mode,
    they could not be saved for a backward pass, e.g. by :func:`~patchspec.metrics.kl_to_clean`)."""

    def plain(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not t.is_inference():
            return t
        with torch.inference_mode(False):
            return t.clone()

    return attrs.evolve(
        context,
        clean_logits=plain(context.clean_logits),
        corrupted_logits=plain(context.corrupted_logits),
    )


def differentiable_values(
    evaluate: Evaluator, logits: torch.Tensor, where: str
) -> list[torch.Tensor]:
    """Each metric's value on ``logits`` with its autograd graph (reduced as it says).

    Raises:
        MetricError: a metric's value is not differentiable in the logits (it was detached,
            or computed through ``argmax``, comparisons or integer casts), naming it.
    """
    context = gradient_context(evaluate.context)
    out = []
    for metric in evaluate.metrics:
        value = _as_value(_call(metric, logits, context, where), metric.name, where)
        if metric.reduce == "mean":
            value = value.mean()
        if not value.is_floating_point() or value.grad_fn is None:
            raise MetricError(
                f"metric {metric.name!r} is not differentiable in the logits (its value has no "
                "gradient: it is detached or computed through argmax, comparisons or integer "
                "casts), so attribution patching cannot use it; use a differentiable metric "
                "such as metrics.logit_diff, or estimator='exact'"
            )
        out.append(value)
    return out


def check_differentiable(task: Task) -> None:
    """Refuse a metric that is not differentiable, on the receiving run's unpatched logits
    (already computed for the baselines) before any gradient pass.

    Raises:
        MetricError: see :func:`differentiable_values`.
    """
    logits = task.session.logits(task.grid.receiver)
    with torch.inference_mode(False), torch.enable_grad():
        probe = logits.detach().clone().requires_grad_(True)
        differentiable_values(task.evaluate, probe, "the differentiability check")


def metric_gradients(
    task: Task,
    points: Sequence[str],
    overwrite: Mapping[str, Overwrite] | None = None,
) -> Gradients:
    """One forward pass of the receiving run with autograd on, and one backward per metric.

    Args:
        task: The task (its receiving run's tokens, the adapter, the evaluator).
        points: Hook points whose gradients are wanted.
        overwrite: Per hook point, a function of the activation there returning the tensor the
            model continues with (default: the activation itself).

    Returns:
        The gradients at ``points`` and the metrics' values.

    Raises:
        HookError: a hook did not fire exactly once.
        MetricError: a metric is not differentiable, or returned the wrong shape or a
            non-finite value.
    """
    adapter, session = task.adapter, task.session
    tokens = session.tokens(task.grid.receiver)
    overwrite = overwrite or {}
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., torch.Tensor]:
        def hook(act: torch.Tensor, hook: object) -> torch.Tensor:
            if not act.requires_grad:  # frozen weights: make the activation a leaf of the graph
                act = act.detach().requires_grad_(True)
            out = overwrite[name](act) if name in overwrite else act.clone()
            kept[name] = out
            return out

        return hook

    counter = FireCounter()
    names = list(dict.fromkeys(points))
    hooks: list[Hook] = counter.counted([(name, keep(name)) for name in names])
    with torch.inference_mode(False), torch.enable_grad():
        logits = adapter.run_with_hooks(tokens, hooks)
        counter.check()
        values = differentiable_values(task.evaluate, logits, "the gradient pass")
        inputs = [kept[name] for name in names]
        grads: list[dict[str, torch.Tensor]] = []
        for m, value in enumerate(values):
            if not inputs:
                grads.append({})
                continue
            got = torch.autograd.grad(
                value.sum(), inputs, retain_graph=m + 1 < len(values), allow_unused=True
            )
            grads.append(
                {
                    name: (torch.zeros_like(x) if g is None else g).detach().float()
                    for name, x, g in zip(names, inputs, got, strict=True)
                }
            )
    batch = int(tokens.shape[0])
    checked = tuple(
        _check_value(v.detach(), batch, m.name, "the gradient pass")
        for m, v in zip(task.evaluate.metrics, values, strict=True)
    )
    return Gradients(tuple(grads), checked, {k: v.detach() for k, v in kept.items()})
