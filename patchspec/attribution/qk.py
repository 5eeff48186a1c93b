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

On models with rotary position embeddings (Llama, Qwen2, ...) the bridge's ``hook_q`` and
``hook_k`` hold queries and keys *before* the rotation. The rotation is linear in each position's
query or key, so a patch's change is rotated with the same ``cos``/``sin`` the model used (kept
from the layer's ``hook_cos``/``hook_sin`` in the gradient pass; HF's rotate-half form, over the
first ``cos.shape[-1]`` dimensions for partial rotary) and the scores are rebuilt from the
rotated ``hook_rot_q``/``hook_rot_k``. Both steps are checked once per layer on the receiving
run (the rotation of ``hook_q`` must reproduce ``hook_rot_q``, and ``q . k / scale`` the
scores); a model whose attention is another function of its queries and keys (another rotary
convention, soft-capping, norms after the rotation) is refused with an error saying so.

GradDrop, the other half of AtP*, is :class:`~patchspec.attribution.graddrop.GradDrop`
(``estimator="graddrop"``), built on this class.

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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (``[..., batch, pos, head, d_head]``) with the model's
    ``cos`` and ``sin`` (``[batch or 1, pos, rotary_dim]``): HF's rotate-half form on the first
    ``rotary_dim`` dimensions, the rest passed through.

    Example:
        >>> import math
        >>> x = torch.tensor([[[[1.0, 0.0]]]])       # batch 1, pos 1, head 1, d_head 2
        >>> angle = torch.tensor([[[0.5, 0.5]]])
        >>> [round(v, 6) for v in rotate(x, angle.cos(), angle.sin()).squeeze().tolist()]
        [0.877583, 0.479426]
    """
    from transformers.models.llama.modeling_llama import rotate_half

    width = cos.shape[-1]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    head, rest = x[..., :width], x[..., width:]
    return torch.cat([head * cos + rotate_half(head) * sin, rest], dim=-1)


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
        names = {a: task.adapter.hook_name(a, layer) for a in ("q", "k", "attn_scores", "pattern")}
        if getattr(task.adapter.cfg, "positional_embedding_type", None) == "rotary":
            prefix = names["q"].rsplit(".", 1)[0]
            rotary = {a: f"{prefix}.hook_{a}" for a in ("rot_q", "rot_k", "cos", "sin")}
            hook_dict = getattr(task.adapter.model, "hook_dict", {})
            missing = [n for n in rotary.values() if n not in hook_dict]
            if missing:
                raise InputError(
                    f"estimator='atp*' rotates patched queries and keys as the model does, but "
                    f"this rotary model has no hook points {missing} to read the rotation from; "
                    "use estimator='atp' for this model"
                )
            names.update(rotary)
        return names

    def _qk_points(self, task: Task) -> list[str]:
        points: list[str] = []
        for layer in sorted({layer for a, layer in task.grid.sites if a in QK}):
            points += self._names(task, layer).values()
        return points

    def gradients(self, task: Task) -> Gradients:
        """AtP's gradient pass, also keeping q, k, the scores and dM/dpattern where needed (and
        the rotated q, k and the rotation's cos, sin on rotary models)."""
        points = [gradient_point(task.adapter, a, layer) for a, layer in task.grid.sites]
        return metric_gradients(task, points + self._qk_points(task))

    def cell_elements(self, task: Task) -> int:
        """AtP's, or a head's scores (``heads x T x T``, three copies) for a query/key cell."""
        sizes = task.grid.sizes
        plain = AtP.cell_elements(self, task)
        if any(a in QK for a, _layer in task.grid.sites):
            return max(plain, 3 * sizes.n_heads * sizes.seq * sizes.seq)
        return plain

    def _layer(self, task: Task, layer: int) -> dict[str, torch.Tensor]:
        """``q``, ``k`` (rotated where the model rotates them, repeated to the query heads),
        scores and pattern of one layer (and ``cos``, ``sin`` on rotary models), checked."""
        key = ("qk", layer)
        if key not in task.memo:
            grads = self._gradients(task)
            names = self._names(task, layer)
            acts = {a: grads.activations[n].float() for a, n in names.items()}
            q, k, scores = acts["q"], acts["k"], acts["attn_scores"]
            # the model computed these in its own precision: allow its rounding, not more
            slack = 1e-3 + 4 * torch.finfo(grads.activations[names["q"]].dtype).eps
            if "cos" in acts:
                for side in ("q", "k"):
                    rotated, recorded = rotate(acts[side], acts["cos"], acts["sin"]), acts[f"rot_{side}"]
                    tolerance = slack * (1.0 + float(recorded.abs().max()))
                    if not bool(((rotated - recorded).abs() <= tolerance).all()):
                        raise InputError(
                            f"estimator='atp*' rotates patched {side} as q * cos + "
                            f"rotate_half(q) * sin, but at layer {layer} that rotation of "
                            f"{names[side]!r} is not the model's {names['rot_' + side]!r} "
                            "(another rotary convention?); use estimator='atp' for this model"
                        )
                q, k = acts["rot_q"], acts["rot_k"]
            group = q.shape[2] // k.shape[2]
            k = k.repeat_interleave(group, dim=2)
            scale = _scale(task.adapter.cfg)
            rebuilt = torch.einsum("bdhe,bshe->bhds", q, k) / scale
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            tolerance = slack * (1.0 + float(scores[..., causal].abs().max()))
            if not bool(((rebuilt - scores)[..., causal].abs() <= tolerance).all()):
                raise InputError(
                    f"estimator='atp*' recomputes attention scores as q . k / scale, but at layer "
                    f"{layer} the model's {names['attn_scores']!r} is not that function of "
                    f"{names['q']!r} and {names['k']!r} (soft-capping, or norms after the "
                    "rotation?); use estimator='atp' for this model"
                )
            out = {"q": q, "k": k, "scores": scores, "pattern": acts["pattern"]}
            if "cos" in acts:
                out.update(cos=acts["cos"], sin=acts["sin"])
            task.memo[key] = out
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
        """The QK fix for query, key and score writes; plain AtP for the others."""
        if activation not in QK:
            return AtP.write_delta(self, task, activation, layer, source, mask, metric, dropped)
        acts = self._layer(task, layer)
        q, k, scores, pattern = acts["q"], acts["k"], acts["scores"], acts["pattern"]
        hook_name = task.adapter.hook_name(activation, layer)
        new = written_values(task, source, hook_name).float()
        old = task.session.activation(task.grid.receiver, hook_name).float()
        change = mask.dense().to(new.dtype) * (new - old)  # [K, batch, ...]
        if activation in ("q", "k") and "cos" in acts:  # the rotation is linear in q and k
            change = rotate(change, acts["cos"], acts["sin"])
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
        point = self._names(task, layer)["pattern"]
        grads = self.gradient_at(task, point, layer, metric, dropped)
        return ((patched - pattern) * grads).flatten(2).sum(-1)
