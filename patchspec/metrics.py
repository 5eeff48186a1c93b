"""Metrics: functions of a patched run's logits that say how far it moved.

Built-ins (logit difference, probability, log-probability, loss, KL to the clean run) are
:class:`Metric` values. Each reads one position by default (the last) and declares it in
``positions`` so an executor may unembed only there. ``reduce="mean"`` (default) gives a scalar;
``reduce="none"`` gives one value per prompt, which adds an ``example`` dim to results.

Any plain callable ``logits -> scalar | [batch]`` is accepted too, and so is a list or a
mapping of metrics, evaluated on the same forward passes (results get a ``metric`` dim).

The built-ins are *rowwise*: they compute one value per row of the logits, so an executor can
evaluate a whole block of ``cells x batch`` rows at once (:meth:`Evaluator.many`). Custom
metrics may do the same with the helpers :func:`at` (logits at a position, whatever positions
the logits hold) and :func:`tile` (per-prompt data repeated for every stacked copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import torch
from jaxtyping import Float

from patchspec.errors import MetricError

Reduce = Literal["mean", "none"]
Logits = Float[torch.Tensor, "batch pos vocab"]
TokenLike = int | str | Sequence[int | str] | torch.Tensor
PosLike = int | Sequence[int]
#: What a sweep accepts as its metric: one metric, or a list or mapping of them.
MetricArg = Any


@attrs.frozen
class MetricContext:
    """What a metric may read besides the patched logits.

    Attributes:
        model: The model (for token look-ups).
        clean_logits: Full logits of the unpatched clean run, ``[batch, pos, vocab]``.
        corrupted_logits: Full logits of the unpatched corrupted run.
        tokens: Tokens of the run that receives the patch, ``[batch, pos]``.
        logit_positions: The positions the patched logits' ``pos`` dim holds, in order, when an
            executor computed logits only where the metric reads (``None``: all positions).
    """

    model: Any
    clean_logits: torch.Tensor | None
    corrupted_logits: torch.Tensor | None
    tokens: torch.Tensor
    logit_positions: tuple[int, ...] | None = None

    @property
    def batch(self) -> int:
        """Number of prompts."""
        return int(self.tokens.shape[0])

    @property
    def seq(self) -> int:
        """Sequence length of the full logits."""
        return int(self.tokens.shape[1])


@attrs.frozen(eq=False)
class Metric:
    """A named metric.

    Attributes:
        name: Name of the result array.
        fn: ``(logits, context) -> [batch]`` per-example values (or anything, for ``reduce=None``).
        positions: Positions of the logits the metric reads (``None``: all of them). When every
            metric of a sweep declares them, an executor may pass logits holding only those
            positions (``context.logit_positions`` says which); read them with :func:`at`.
        reduce: ``"mean"`` over prompts, ``"none"`` to keep them, ``None`` to leave ``fn``'s output.
        rowwise: ``fn`` gives one value per row of any number of stacked copies of the batch
            (``[copies * batch, ...]`` logits; per-prompt data tiled with :func:`tile`), so a
            whole block of cells is evaluated in one call.
    """

    name: str
    fn: Callable[[torch.Tensor, MetricContext], torch.Tensor]
    positions: tuple[int, ...] | None = None
    reduce: Reduce | None = "mean"
    rowwise: bool = False

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
    return Metric(
        name=name if name != "<lambda>" else "metric",
        fn=lambda logits, _: metric(logits),
        reduce=None,
    )


def as_metrics(metric: Any) -> tuple[tuple[Metric, ...], bool]:
    """One metric, a sequence or a mapping of metrics -> ``(metrics, has_metric_dim)``.

    A mapping names its metrics by its keys; a sequence by the metrics' own names. Results of
    a sequence or mapping (even of one metric) get a ``metric`` dim.

    Example:
        >>> ms, stacked = as_metrics({"ld": logit_diff(3, 5), "p": prob(3)})
        >>> [m.name for m in ms], stacked
        (['ld', 'p'], True)

    Raises:
        MetricError: an entry is not callable, the collection is empty, or names repeat.
    """
    if isinstance(metric, Mapping):
        found = tuple(attrs.evolve(as_metric(m), name=str(k)) for k, m in metric.items())
    elif isinstance(metric, list | tuple):
        found = tuple(as_metric(m) for m in metric)
    else:
        return (as_metric(metric),), False
    if not found:
        raise MetricError(f"a collection of metrics needs at least one metric, got {metric!r}")
    names = [m.name for m in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MetricError(
            f"metrics evaluated together need distinct names; {repeated} repeat in {names} "
            "(pass a mapping {name: metric} to name them)"
        )
    return found, True


def tile(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-prompt ``values`` (``[batch, ...]``) repeated copy-major to ``rows`` rows.

    Example:
        >>> tile(torch.tensor([1, 2]), 6).tolist()
        [1, 2, 1, 2, 1, 2]

    Raises:
        MetricError: ``rows`` is not a multiple of the batch size.
    """
    batch = values.shape[0]
    if rows == batch:
        return values
    if batch == 0 or rows % batch:
        raise MetricError(f"cannot tile {batch} per-prompt values to {rows} rows")
    return values.repeat(rows // batch, *([1] * (values.ndim - 1)))


def _token_ids(model: Any, tokens: TokenLike, batch: int, what: str) -> torch.Tensor:
    """Token ids as a ``[batch]`` long tensor; strings are looked up in the model's vocabulary."""

    def one(t: int | str) -> int:
        if isinstance(t, str):
            try:
                return int(model.to_single_token(t))
            except Exception as err:
                raise MetricError(
                    f"{what} token {t!r} is not a single token of the model: {err}"
                ) from None
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
        raise MetricError(
            f"{what} has {ids.numel()} tokens but there are {batch} prompts; give one or one per prompt"
        )
    return ids


def _positions(pos: PosLike) -> tuple[int, ...]:
    return (pos,) if isinstance(pos, int) else tuple(int(p) for p in pos)


def _select(
    logits: torch.Tensor, pos: PosLike, seq: int, held: tuple[int, ...] | None, batch: int
) -> torch.Tensor:
    """Logits at ``pos`` for every row; ``held`` are the positions the ``pos`` dim holds."""

    def index(p: int) -> int:
        if not -seq <= p < seq:
            raise MetricError(f"position {p} is outside the sequence of {seq} tokens")
        if held is None:
            return p % seq
        try:
            return held.index(p % seq)
        except ValueError:
            raise MetricError(
                f"position {p} was not computed (the logits hold positions {list(held)}); "
                "declare every position a metric reads in its `positions`"
            ) from None

    if isinstance(pos, int):
        return logits[:, index(pos)]
    rows = logits.shape[0]
    if len(pos) != batch:
        raise MetricError(
            f"pos={list(pos)} gives {len(pos)} positions but there are {batch} prompts; give one "
            "position, or one per prompt"
        )
    per_prompt = torch.tensor([index(int(p)) for p in pos], device=logits.device)
    return logits[torch.arange(rows, device=logits.device), tile(per_prompt, rows)]


def at(logits: torch.Tensor, pos: PosLike, context: MetricContext) -> torch.Tensor:
    """Patched logits at ``pos`` (one position, or one per prompt): ``[rows, vocab]``.

    Works on full logits and on logits an executor computed only at the metric's declared
    positions (``context.logit_positions``), for one or many stacked copies of the batch.
    """
    seq = context.seq if context.logit_positions is not None else int(logits.shape[1])
    return _select(logits, pos, seq, context.logit_positions, context.batch)


def logit_diff(
    answer: TokenLike, wrong: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean"
) -> Metric:
    """Logit of ``answer`` minus logit of ``wrong`` at ``pos``.

    Example:
        >>> m = logit_diff(answer=3, wrong=5)
        >>> m.name, m.positions
        ('logit_diff', (-1,))
    """

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        here = at(logits, pos, ctx)
        rows = here.shape[0]
        good = tile(_token_ids(ctx.model, answer, ctx.batch, "answer").to(here.device), rows)
        bad = tile(_token_ids(ctx.model, wrong, ctx.batch, "wrong").to(here.device), rows)
        return (
            (here.gather(1, good.unsqueeze(1)) - here.gather(1, bad.unsqueeze(1)))
            .squeeze(1)
            .float()
        )

    return Metric("logit_diff", fn, _positions(pos), reduce, rowwise=True)


def logprob(answer: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Log-probability of ``answer`` at ``pos``.

    Example:
        >>> logprob(3).positions
        (-1,)
    """

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        here = at(logits, pos, ctx).float().log_softmax(-1)
        good = tile(
            _token_ids(ctx.model, answer, ctx.batch, "answer").to(here.device), here.shape[0]
        )
        return here.gather(1, good.unsqueeze(1)).squeeze(1)

    return Metric("logprob", fn, _positions(pos), reduce, rowwise=True)


def prob(answer: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Probability of ``answer`` at ``pos``.

    Example:
        >>> prob(3, pos=[4, 5]).positions
        (4, 5)
    """
    inner = logprob(answer, pos=pos, reduce="none").fn
    return Metric(
        "prob", lambda logits, ctx: inner(logits, ctx).exp(), _positions(pos), reduce, rowwise=True
    )


def loss(*, reduce: Reduce = "mean") -> Metric:
    """Next-token cross-entropy of the patched run's own tokens, averaged over positions.

    Example:
        >>> loss().positions is None
        True
    """

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        if ctx.logit_positions is not None:
            raise MetricError("loss reads every position; it needs full logits")
        logp = logits[:, :-1].float().log_softmax(-1)
        target = tile(ctx.tokens[:, 1:].to(logp.device), logp.shape[0])
        return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1)

    return Metric("loss", fn, None, reduce, rowwise=True)


def kl_to_clean(*, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """KL divergence ``KL(clean || patched)`` of the next-token distribution at ``pos``.

    Example:
        >>> kl_to_clean().name
        'kl_to_clean'
    """

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        if ctx.clean_logits is None:
            raise MetricError("kl_to_clean needs the clean run's logits; pass clean prompts")
        patched = at(logits, pos, ctx).float().log_softmax(-1)
        clean = _select(ctx.clean_logits, pos, int(ctx.clean_logits.shape[1]), None, ctx.batch)
        clean = tile(clean.float().log_softmax(-1).to(patched.device), patched.shape[0])
        return (clean.exp() * (clean - patched)).sum(-1)

    return Metric("kl_to_clean", fn, _positions(pos), reduce, rowwise=True)


def _check_value(
    value: torch.Tensor, batch: int, name: str, where: str | Callable[[], str]
) -> torch.Tensor:
    """A finite scalar or a finite ``[batch]`` vector, as float, else :class:`MetricError`.

    ``where`` (or its result, when it is a callable) names the cell in the error.
    """

    def place() -> str:
        return where if isinstance(where, str) else where()

    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != batch):
        raise MetricError(
            f"metric {name!r} returned shape {tuple(value.shape)} at {place()}; it must return "
            f"a scalar or one value per prompt (shape ({batch},))"
        )
    if not bool(torch.isfinite(value).all()):
        raise MetricError(
            f"metric {name!r} returned a non-finite value {value.tolist()} at {place()}"
        )
    return value.detach().float()


class Evaluator:
    """Evaluates one or more metrics on patched logits: what every estimator calls.

    Call it with one cell's full logits ``[batch, pos, vocab]``, or hand a whole block of
    ``len(cells)`` cells stacked copy-major (``[len(cells) * batch, pos, vocab]``) to
    :meth:`many`. ``positions`` are the positions every metric reads (``None`` when some metric
    reads all of them): an estimator may compute the final norm and the unembedding only at
    :meth:`logit_positions` and pass :meth:`many` logits whose ``pos`` dim holds exactly those.

    Args:
        metrics: The metrics, evaluated on the same logits.
        context: What the metrics may read besides the logits.
        stacked: Stack the metrics' values on a dim after the cell dim (a ``metric`` dim), even
            for one metric; otherwise there must be exactly one metric.
        describe: Turns a cell into a description for error messages.

    Example:
        >>> ev = Evaluator([logit_diff(3, 5)], context)  # doctest: +SKIP
        >>> ev(model(tokens), "the corrupted baseline")  # doctest: +SKIP
        tensor(0.1234)
    """

    def __init__(
        self,
        metrics: Sequence[Metric],
        context: MetricContext,
        *,
        stacked: bool = False,
        describe: Callable[[Any], str] = str,
    ) -> None:
        self.metrics = tuple(metrics)
        if not self.metrics or (not stacked and len(self.metrics) != 1):
            raise MetricError(f"expected one metric (or stacked=True), got {len(self.metrics)}")
        self.context = context
        self.stacked = stacked
        self.describe = describe
        declared = [m.positions for m in self.metrics]
        self.positions: tuple[int, ...] | None = (
            None
            if any(p is None for p in declared)
            else tuple(dict.fromkeys(p for ps in declared if ps is not None for p in ps))
        )
        self._contexts: dict[tuple[int, ...] | None, MetricContext] = {None: context}

    @property
    def names(self) -> tuple[str, ...]:
        """The metrics' names (the coordinates of the ``metric`` dim)."""
        return tuple(m.name for m in self.metrics)

    def logit_positions(self, seq: int) -> tuple[int, ...] | None:
        """The sorted, non-negative positions the metrics read, or ``None`` for all.

        Example:
            >>> ev = Evaluator([logit_diff(3, 5)], MetricContext(None, None, None, torch.zeros(1, 6)))
            >>> ev.logit_positions(6)
            (5,)
        """
        if self.positions is None:
            return None
        return tuple(sorted({int(p) % seq for p in self.positions}))

    def _context(self, positions: tuple[int, ...] | None) -> MetricContext:
        if positions not in self._contexts:
            self._contexts[positions] = attrs.evolve(self.context, logit_positions=positions)
        return self._contexts[positions]

    def _combine(
        self, values: list[torch.Tensor], dim: int, where: Callable[[], str]
    ) -> torch.Tensor:
        if not self.stacked:
            return values[0]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            found = ", ".join(
                f"{m.name!r}: {tuple(v.shape)}" for m, v in zip(self.metrics, values, strict=True)
            )
            raise MetricError(
                f"metrics evaluated together must all return a scalar or all one value per "
                f"prompt; at {where()} they returned {found}"
            )
        return torch.stack(values, dim=dim)

    def __call__(self, logits: torch.Tensor, cell: Any) -> torch.Tensor:
        """The value(s) for one cell's full logits ``[batch, pos, vocab]``.

        ``cell`` is a :class:`~patchspec.plan.Cell` or a description such as
        ``"the clean baseline"``; it names the cell in errors.
        """
        where = cell if isinstance(cell, str) else self.describe(cell)
        values = [
            _check_value(
                torch.as_tensor(m.bind(self.context)(logits)), self.context.batch, m.name, where
            )
            for m in self.metrics
        ]
        return self._combine(values, 0, lambda: where)

    def many(
        self,
        logits: Float[torch.Tensor, "copies_batch pos vocab"],
        cells: Sequence[Any],
        positions: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """The values of ``len(cells)`` cells whose logits are stacked copy-major in ``logits``.

        Rowwise metrics are evaluated on the whole block at once, others cell by cell.
        ``positions`` says which positions the logits hold (``None``: all).

        Raises:
            MetricError: a metric returned the wrong shape or a non-finite value (the message
                names the first such cell).
        """
        context = self._context(positions)
        copies, batch = len(cells), self.context.batch
        per_metric: list[torch.Tensor] = []
        for metric in self.metrics:
            if metric.rowwise and metric.reduce in ("mean", "none"):
                rows = torch.as_tensor(metric.fn(logits, context))
                if tuple(rows.shape) != (copies * batch,):
                    raise MetricError(
                        f"rowwise metric {metric.name!r} returned shape {tuple(rows.shape)} for "
                        f"{copies} stacked copies of {batch} prompts; it must return one value "
                        f"per row ({copies * batch},)"
                    )
                block = rows.view(copies, batch)
                value = (block.mean(-1) if metric.reduce == "mean" else block).detach().float()
                bad = ~torch.isfinite(value.view(copies, -1)).all(-1)
                if bool(bad.any()):
                    k = int(bad.nonzero()[0, 0])
                    _check_value(value[k], batch, metric.name, self.describe(cells[k]))
            else:
                bound = metric.bind(context)
                parts = logits.unflatten(0, (copies, -1))
                value = torch.stack(
                    [
                        _check_value(
                            torch.as_tensor(bound(part)),
                            batch,
                            metric.name,
                            functools.partial(self.describe, cell),
                        )
                        for part, cell in zip(parts, cells, strict=True)
                    ]
                )
            per_metric.append(value)
        return self._combine(per_metric, 1, lambda: self.describe(cells[0]))
