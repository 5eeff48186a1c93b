"""Metrics: functions of a patched run's logits that say how far it moved.

Built-ins (logit difference, probability, log-probability, loss, KL to the clean run) are
:class:`Metric` values. Each reads one position by default (the last) and declares it in
``positions`` so an executor may unembed only there. ``reduce="mean"`` (default) gives a scalar;
``reduce="none"`` gives one value per prompt, which adds an ``example`` dim to results.

Any plain callable ``logits -> scalar | [batch]`` is accepted too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import torch
from jaxtyping import Float

from patchspec.errors import MetricError

Reduce = Literal["mean", "none"]
Logits = Float[torch.Tensor, "batch pos vocab"]
TokenLike = int | str | Sequence[int | str] | torch.Tensor
PosLike = int | Sequence[int]


@attrs.frozen
class MetricContext:
    """What a metric may read besides the patched logits."""

    model: Any
    clean_logits: torch.Tensor | None
    corrupted_logits: torch.Tensor | None
    tokens: torch.Tensor


@attrs.frozen(eq=False)
class Metric:
    """A named metric.

    Attributes:
        name: Name of the result array.
        fn: ``(logits, context) -> [batch]`` per-example values (or anything, for ``reduce=None``).
        positions: Positions of the logits the metric reads (``None``: all of them).
        reduce: ``"mean"`` over prompts, ``"none"`` to keep them, ``None`` to leave ``fn``'s output.
    """

    name: str
    fn: Callable[[torch.Tensor, MetricContext], torch.Tensor]
    positions: tuple[int, ...] | None = None
    reduce: Reduce | None = "mean"

    def bind(self, context: MetricContext) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function ``logits -> value`` for one sweep."""

        def bound(logits: torch.Tensor) -> torch.Tensor:
            value = torch.as_tensor(self.fn(logits, context))
            return value.mean() if self.reduce == "mean" else value

        return bound

    @property
    def per_example(self) -> bool:
        """Whether results get an ``example`` dim (``None``: decided by the output shape)."""
        return self.reduce == "none"

    def __call__(self, logits: torch.Tensor, context: MetricContext) -> torch.Tensor:
        return self.bind(context)(logits)


def as_metric(metric: Metric | Callable[[torch.Tensor], torch.Tensor]) -> Metric:
    """Wrap a plain callable ``logits -> scalar | [batch]`` as a :class:`Metric`.

    Raises:
        MetricError: ``metric`` is not callable.
    """
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise MetricError(f"metric must be callable (logits -> value), got {type(metric).__name__}")
    name = getattr(metric, "__name__", None) or type(metric).__name__
    return Metric(name=name if name != "<lambda>" else "metric", fn=lambda logits, _: metric(logits), reduce=None)


def _token_ids(model: Any, tokens: TokenLike, batch: int, what: str) -> torch.Tensor:
    """Token ids as a ``[batch]`` long tensor; strings are looked up in the model's vocabulary."""

    def one(t: int | str) -> int:
        if isinstance(t, str):
            try:
                return int(model.to_single_token(t))
            except Exception as err:
                raise MetricError(f"{what} token {t!r} is not a single token of the model: {err}") from None
        return int(t)

    if isinstance(tokens, torch.Tensor):
        ids = tokens.flatten().long()
    elif isinstance(tokens, int | str):
        ids = torch.tensor([one(tokens)])
    else:
        ids = torch.tensor([one(t) for t in tokens])
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise MetricError(f"{what} has {ids.numel()} tokens but there are {batch} prompts; give one or one per prompt")
    return ids


def _positions(pos: PosLike) -> tuple[int, ...]:
    return (pos,) if isinstance(pos, int) else tuple(int(p) for p in pos)


def _at(logits: torch.Tensor, pos: PosLike) -> torch.Tensor:
    """Logits at ``pos`` (one for all prompts or one per prompt): ``[batch, vocab]``."""
    if isinstance(pos, int):
        return logits[:, pos]
    index = torch.as_tensor(list(pos), device=logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), index]


def logit_diff(answer: TokenLike, wrong: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Logit of ``answer`` minus logit of ``wrong`` at ``pos``.

    Example:
        >>> m = logit_diff(answer=3, wrong=5)
        >>> m.name, m.positions
        ('logit_diff', (-1,))
    """

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        at = _at(logits, pos).float()
        batch = at.shape[0]
        good = _token_ids(ctx.model, answer, batch, "answer").to(at.device)
        bad = _token_ids(ctx.model, wrong, batch, "wrong").to(at.device)
        rows = torch.arange(batch, device=at.device)
        return at[rows, good] - at[rows, bad]

    return Metric("logit_diff", fn, _positions(pos), reduce)


def logprob(answer: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Log-probability of ``answer`` at ``pos``."""

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        at = _at(logits, pos).float().log_softmax(-1)
        good = _token_ids(ctx.model, answer, at.shape[0], "answer").to(at.device)
        return at[torch.arange(at.shape[0], device=at.device), good]

    return Metric("logprob", fn, _positions(pos), reduce)


def prob(answer: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Probability of ``answer`` at ``pos``."""
    inner = logprob(answer, pos=pos, reduce="none").fn
    return Metric("prob", lambda logits, ctx: inner(logits, ctx).exp(), _positions(pos), reduce)


def loss(*, reduce: Reduce = "mean") -> Metric:
    """Next-token cross-entropy of the patched run's own tokens, averaged over positions."""

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        logp = logits[:, :-1].float().log_softmax(-1)
        target = ctx.tokens[:, 1:].to(logp.device)
        return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1)

    return Metric("loss", fn, None, reduce)


def kl_to_clean(*, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """KL divergence ``KL(clean || patched)`` of the next-token distribution at ``pos``."""

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        if ctx.clean_logits is None:
            raise MetricError("kl_to_clean needs the clean run's logits; pass clean prompts")
        patched = _at(logits, pos).float().log_softmax(-1)
        clean = _at(ctx.clean_logits, pos).float().log_softmax(-1).to(patched.device)
        return (clean.exp() * (clean - patched)).sum(-1)

    return Metric("kl_to_clean", fn, _positions(pos), reduce)


def checked(
    bound: Callable[[torch.Tensor], torch.Tensor], batch: int, name: str
) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``bound`` with its output checked: a finite scalar or a finite ``[batch]`` vector.

    The wrapped function takes a description of the cell for error messages.
    """

    def evaluate(logits: torch.Tensor, where: str) -> torch.Tensor:
        value = torch.as_tensor(bound(logits))
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != batch):
            raise MetricError(
                f"metric {name!r} returned shape {tuple(value.shape)} at {where}; it must return "
                f"a scalar or one value per prompt (shape ({batch},))"
            )
        if not bool(torch.isfinite(value).all()):
            raise MetricError(f"metric {name!r} returned a non-finite value {value.tolist()} at {where}")
        return value.detach().float()

    return evaluate
