"""AtP* (Kramar et al. 2024), the QK fix: query, key and score cells linearised from the pattern on.

Plain AtP linearises through the attention softmax, which fails where it saturates: a query or
key patch that moves a head's attention from one position to another changes the pattern by a
lot where the softmax's gradient is tiny. The QK fix recomputes the pattern *exactly* under the
patch and linearises only from the pattern onward:

    delta(cell) = sum over (head, dest, src) of (softmax(s + ds) - softmax(s)) * dM/dpattern,

where ``ds`` is the exact change of the attention scores: ``dq . k / scale`` for a query cell,
``q . dk / scale`` for a key cell (a key/value head feeds every query head of its group), and the
patched scores themselves for an ``attn_scores`` cell. The change is bilinear, so the key side
costs ``O(T^2)`` per head and cell, not a forward pass. Every other write of the grid is plain
AtP. The gradient pass also keeps ``q``, ``k``, the scores and ``dM/dpattern`` of each layer a
query, key or score cell patches.

It needs the scores to be ``q . k / scale`` at the model's ``hook_q``/``hook_k`` (checked once per
layer on the receiving run): models with rotary position embeddings rotate queries and keys
after those hooks, and are refused with an error saying so.

GradDrop, the other half of AtP*, is not implemented here.

Cost: AtP's one forward and one backward pass, plus ``O(T^2)`` work per head and cell.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import einops
import torch

from patchspec.attribution.atp import AtP, written_values
from patchspec.attribution.gradients import Gradients, gradient_point, metric_gradients
from patchspec.errors import InputError
from patchspec.execute.masks import Mask
from patchspec.execute.protocols import Task
from patchspec.sources import Source

#: Activations whose cells the QK fix recomputes the pattern for.
QK = ("q", "k", "attn_scores")


def _scale(cfg: object) -> float:
    scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
    if scale > 0:
        return scale
    if getattr(cfg, "use_attn_scale", True):
        return float(getattr(cfg, "d_head", 1)) ** 0.5
    return 1.0


@attrs.frozen
class AtPStar(AtP):
    """AtP with the QK fix for query, key and attention-score cells (see the module docstring).

    Args:
        max_memory: Budget of one chunk's work.

    Example:
        >>> catalog.HEAD_Q_BY_POS.run(model, clean, corrupted, metric, estimator="atp*")  # doctest: +SKIP
    """

    name: ClassVar[str] = "atp*"

    def _names(self, task: Task, layer: int) -> dict[str, str]:
        return {a: task.adapter.hook_name(a, layer) for a in ("q", "k", "attn_scores", "pattern")}

    def gradients(self, task: Task) -> Gradients:
        """AtP's gradient pass, also keeping q, k, the scores and dM/dpattern where needed."""
        points = [gradient_point(task.adapter, a, layer) for a, layer in task.grid.sites]
        for layer in sorted({layer for a, layer in task.grid.sites if a in QK}):
            points += self._names(task, layer).values()
        return metric_gradients(task, points)

    def cell_elements(self, task: Task) -> int:
        """AtP's, or a head's scores (``heads x T x T``, three copies) for a query/key cell."""
        sizes = task.grid.sizes
        plain = AtP.cell_elements(self, task)
        if any(a in QK for a, _layer in task.grid.sites):
            return max(plain, 3 * sizes.n_heads * sizes.seq * sizes.seq)
        return plain

    def _layer(
        self, task: Task, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q``, ``k`` (repeated to the query heads), scores and pattern of one layer, checked."""
        key = ("qk", layer)
        if key not in task.memo:
            grads = self._gradients(task)
            names = self._names(task, layer)
            acts = {a: grads.activations[n].float() for a, n in names.items()}
            q, k, scores, pattern = acts["q"], acts["k"], acts["attn_scores"], acts["pattern"]
            group = q.shape[2] // k.shape[2]
            k = k.repeat_interleave(group, dim=2)
            scale = _scale(task.adapter.cfg)
            rebuilt = torch.einsum("bdhe,bshe->bhds", q, k) / scale
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            tolerance = 1e-3 * (1.0 + float(scores[..., causal].abs().max()))
            if not bool(((rebuilt - scores)[..., causal].abs() <= tolerance).all()):
                raise InputError(
                    f"estimator='atp*' recomputes attention scores as q . k / scale, but at layer "
                    f"{layer} the model's {names['attn_scores']!r} is not that function of "
                    f"{names['q']!r} and {names['k']!r} (rotary position embeddings are applied "
                    "after those hooks?); use estimator='atp' for this model"
                )
            task.memo[key] = (q, k, scores, pattern.float())
        return task.memo[key]  # type: ignore[no-any-return]

    def write_delta(
        self, task: Task, activation: str, layer: int, source: Source, mask: Mask, metric: int
    ) -> torch.Tensor:
        """The QK fix for query, key and score writes; plain AtP for the others."""
        if activation not in QK:
            return AtP.write_delta(self, task, activation, layer, source, mask, metric)
        q, k, scores, pattern = self._layer(task, layer)
        hook_name = task.adapter.hook_name(activation, layer)
        new = written_values(task, source, hook_name).float()
        old = task.session.activation(task.grid.receiver, hook_name).float()
        change = mask.dense().to(new.dtype) * (new - old)  # [K, batch, ...]
        scale = _scale(task.adapter.cfg)
        if activation == "q":
            shift = torch.einsum("kbdhe,bshe->kbhds", change, k) / scale
        elif activation == "k":
            group = q.shape[2] // change.shape[3]
            change = einops.repeat(change, "k b s g e -> k b s (g r) e", r=group)
            shift = torch.einsum("bdhe,kbshe->kbhds", q, change) / scale
        else:
            shift = change
        patched = torch.softmax(scores + shift, dim=-1)
        grads = self._gradients(task).grads[metric][self._names(task, layer)["pattern"]]
        return ((patched - pattern) * grads).flatten(2).sum(-1)
