"""Metrics: functions of a patched run's logits that say how far it moved.

Built-ins (logit difference, probability, log-probability, loss, KL to the clean run) are
:class:`Metric` values. Each reads one position per prompt and declares it in ``positions`` so
an executor may unembed only there. ``reduce="mean"`` (default) gives a scalar;
``reduce="none"`` gives one value per prompt, which adds an ``example`` dim to results.

**Positions are per prompt.** Prompts of different lengths are right-padded, so "the last
position" is a different column in each prompt. A position a metric reads (``pos=``) is

* a negative int, counted from *each prompt's own end*: the default ``pos=-1`` is each prompt's
  last real token (on unpadded prompts, the last column, as always);
* a non-negative int, the same token index in every prompt (it must be a real token of each);
* a name: ``"END"`` (each prompt's last real token) or any name of the sweep's ``positions=``
  table, resolved per prompt of the run being measured;
* a list (or 1-D tensor or array) of such positions, one per prompt.

A position that is padding in some prompt is a :class:`~patchspec.MetricError` before any
forward pass, naming the prompt and its length. :func:`loss` averages only over each prompt's
real next-token targets, so a prompt's loss does not depend on what it is batched with.

Any plain callable ``logits -> scalar | [batch]`` is accepted too, and so is a list or a
mapping of metrics, evaluated on the same forward passes (results get a ``metric`` dim). A
plain callable sees the padded logits: on padded prompts ``logits[:, -1]`` is padding for the
shorter ones (a warning says so); use :func:`at` in a :class:`Metric` instead.

The built-ins are *rowwise*: they compute one value per row of the logits, so an executor can
evaluate a whole block of ``cells x batch`` rows at once (:meth:`Evaluator.many`). Custom
metrics may do the same with the helpers :func:`at` (logits at a position of each prompt,
whatever positions the logits hold) and :func:`tile` (per-prompt data repeated for every
stacked copy).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import attrs
import numpy as np
import torch
from jaxtyping import Float

from patchspec.errors import MetricError, PatchSpecError, did_you_mean, warn

Reduce = Literal["mean", "none"]
REDUCES = ("mean", "none")
Logits = Float[torch.Tensor, "batch pos vocab"]
TokenLike = int | str | Sequence[int | str] | torch.Tensor
PosLike = int | str | Sequence[int | str] | torch.Tensor
#: One declared position: an int or a name for every prompt, or a tuple of one per prompt.
PosEntry: TypeAlias = int | str | tuple[int | str, ...]
#: What a sweep accepts as its metric: one metric, or a list or mapping of metrics.
MetricArg = Any
#: The built-in name of each prompt's last real token (a ``positions=`` table may override it).
END = "END"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _plain_integers(value: Any, refusal: str) -> Any:
    """numpy and torch integer arrays and scalars as Python ints (lists of them); other values
    unchanged. ``refusal`` starts the error for arrays of another dtype."""
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in "iu":
            raise MetricError(f"{refusal}, got dtype {value.dtype}")
        return value.tolist()
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise MetricError(f"{refusal}, got dtype {value.dtype}")
        return value.tolist()
    return value


def pos_entry(pos: Any, what: str = "pos") -> PosEntry:
    """One metric position normalised: an int, a name, or a tuple of one per prompt.

    numpy and torch integers count as ints; a list, tuple, 1-D tensor or array gives one
    position per prompt.

    Example:
        >>> pos_entry(-1), pos_entry("END"), pos_entry([3, "S2"])
        (-1, 'END', (3, 'S2'))

    Raises:
        MetricError: anything else (a float, a bool, an empty name or list).
    """
    pos = _plain_integers(pos, f"{what} must hold integer positions")
    if _is_int(pos):
        return int(pos)
    if isinstance(pos, str):
        if not pos:
            raise MetricError(f"{what} must be an int, a position name or one per prompt, got ''")
        return pos
    if isinstance(pos, list | tuple):
        if not pos:
            raise MetricError(f"{what}=[] gives no positions; give one, or one per prompt")
        entries: list[int | str] = []
        for p in pos:
            if isinstance(p, str) and p:
                entries.append(p)
            elif _is_int(p):
                entries.append(int(p))
            else:
                raise MetricError(
                    f"{what}={list(pos)!r}: every entry must be an int or a position name, got "
                    f"{p!r} ({type(p).__name__})"
                )
        return tuple(entries)
    raise MetricError(
        f"{what} must be an int (negative counts from each prompt's own end), a position name "
        f"such as 'END', or one per prompt, got {pos!r} ({type(pos).__name__})"
    )


def _positions_field(value: Any) -> tuple[PosEntry, ...] | None:
    if value is None:
        return None
    if _is_int(value) or isinstance(value, str):
        return (pos_entry(value, "positions"),)
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise MetricError(
            f"Metric.positions must be None (all positions) or a tuple of positions, got "
            f"{value!r}"
        )
    return tuple(pos_entry(p, "positions") for p in value)


def _reduce(inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and value not in REDUCES:
        raise MetricError(
            f"reduce must be 'mean' (one value over prompts) or 'none' (one value per prompt), "
            f"got {value!r}{did_you_mean(str(value), REDUCES)}"
        )


@attrs.frozen(eq=False)
class RunInputs:
    """What metrics know about one run's prompts.

    Attributes:
        tokens: The run's tokens, ``[batch, pos]`` (right-padded).
        lengths: The real token count of each prompt.
        named: ``name -> token index per prompt`` of the sweep's named positions in this run.
    """

    tokens: torch.Tensor
    lengths: tuple[int, ...]
    named: Mapping[str, tuple[int, ...]] = attrs.field(factory=dict)


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
        receiver: The run whose (patched) logits are measured.
        inputs: Per run (``"clean"``, ``"corrupted"``): its tokens, the real length of each
            prompt and its named positions. Without it every token is real.
    """

    model: Any
    clean_logits: torch.Tensor | None
    corrupted_logits: torch.Tensor | None
    tokens: torch.Tensor
    logit_positions: tuple[int, ...] | None = None
    receiver: str = "corrupted"
    inputs: Mapping[str, RunInputs] = attrs.field(factory=dict)

    @property
    def batch(self) -> int:
        """Number of prompts."""
        return int(self.tokens.shape[0])

    @property
    def seq(self) -> int:
        """Sequence length of the full logits."""
        return int(self.tokens.shape[1])

    def run_inputs(self, run: str | None = None) -> RunInputs:
        """The inputs of ``run`` (default: the receiving run); all tokens real if unknown."""
        run = self.receiver if run is None else run
        if run in self.inputs:
            return self.inputs[run]
        tokens = self.tokens
        return RunInputs(tokens, (int(tokens.shape[1]),) * int(tokens.shape[0]))

    @property
    def lengths(self) -> tuple[int, ...]:
        """The real token count of each prompt of the receiving run."""
        return self.run_inputs().lengths

    def for_run(self, run: str) -> MetricContext:
        """The same context measuring ``run`` (its tokens, lengths and named positions)."""
        if run == self.receiver and self.logit_positions is None:
            return self
        tokens = self.inputs[run].tokens if run in self.inputs else self.tokens
        return attrs.evolve(self, receiver=run, tokens=tokens, logit_positions=None)

    def baseline(self, run: str) -> MetricContext:
        """The context that measures the unpatched ``run``'s logits as a baseline.

        A baseline is the value the metric takes when every activation is patched from that
        run, so it is measured as the receiving run is (its tokens, lengths and positions: a
        token-reading metric such as :func:`loss` scores the receiving run's tokens). That is
        defined when both runs have the same real length in every prompt; otherwise the run is
        measured on its own terms (its own tokens, ends and named positions).
        """
        mine, own = self.inputs.get(self.receiver), self.inputs.get(run)
        if run == self.receiver or mine is None or own is None or mine.lengths == own.lengths:
            return self.for_run(self.receiver)
        return self.for_run(run)

    def columns(self, pos: PosLike, run: str | None = None) -> tuple[int, ...]:
        """The token index ``pos`` reads in each prompt of ``run`` (default: the receiver).

        Example:
            >>> tokens = torch.zeros(2, 6, dtype=torch.long)
            >>> ctx = MetricContext(None, None, None, tokens,
            ...                     inputs={"corrupted": RunInputs(tokens, (4, 6))})
            >>> ctx.columns(-1), ctx.columns("END"), ctx.columns([1, -2])
            ((3, 5), (3, 5), (1, 4))

        Raises:
            MetricError: a position that is padding or outside a prompt, an unknown name, or
                a per-prompt list of the wrong length.
        """
        run = self.receiver if run is None else run
        return _columns(pos_entry(pos), self.run_inputs(run), run)


def _columns(entry: PosEntry, inputs: RunInputs, run: str) -> tuple[int, ...]:
    lengths = inputs.lengths
    if isinstance(entry, tuple):
        if len(entry) != len(lengths):
            raise MetricError(
                f"pos={list(entry)} gives {len(entry)} positions but there are {len(lengths)} "
                "prompts; give one position, or one per prompt"
            )
        return tuple(_column(e, b, inputs, run) for b, e in enumerate(entry))
    return tuple(_column(entry, b, inputs, run) for b in range(len(lengths)))


def _column(entry: int | str, b: int, inputs: RunInputs, run: str) -> int:
    n = inputs.lengths[b]
    if isinstance(entry, str):
        if entry in inputs.named:
            return int(inputs.named[entry][b])
        if entry == END:
            return n - 1
        names = [*inputs.named, END]
        raise MetricError(
            f"pos={entry!r} is not a named position; valid: {', '.join(map(repr, names))} "
            f"(the sweep's positions= table, and 'END'){did_you_mean(entry, names)}"
        )
    if -n <= entry < n:
        return entry % n
    seq = int(inputs.tokens.shape[1])
    where = "padding" if n <= entry < seq else "outside the prompt"
    raise MetricError(
        f"position {entry} is {where} in {run} prompt {b}, which has {n} real tokens (valid: "
        f"{-n}..{n - 1}, negative counting from the prompt's own end; or a name such as 'END')"
    )


@attrs.frozen(eq=False)
class Metric:
    """A named metric.

    Attributes:
        name: Name of the result array.
        fn: ``(logits, context) -> [batch]`` per-example values (or anything, for ``reduce=None``).
        positions: Positions of the logits the metric reads (``None``: all of them), each an
            int or a name for every prompt, or a tuple of one per prompt (see the module
            docstring). When every metric of a sweep declares them, an executor may pass logits
            holding only those positions, the union over prompts (``context.logit_positions``
            says which); read them with :func:`at`.
        reduce: ``"mean"`` over prompts, ``"none"`` to keep them, ``None`` to leave ``fn``'s output.
        rowwise: ``fn`` gives one value per row of any number of stacked copies of the batch
            (``[copies * batch, ...]`` logits; per-prompt data tiled with :func:`tile`), so a
            whole block of cells is evaluated in one call.
        check: Called with each run's context (no logits) before any forward pass; raises
            :class:`~patchspec.MetricError` for arguments that do not fit the prompts or model
            (the built-ins check their token ids and positions).

    Raises:
        MetricError: ``reduce`` is not ``"mean"``, ``"none"`` or ``None``, or ``positions``
            is not a tuple of positions.
    """

    name: str
    fn: Callable[[torch.Tensor, MetricContext], torch.Tensor]
    positions: tuple[PosEntry, ...] | None = attrs.field(default=None, converter=_positions_field)
    reduce: Reduce | None = attrs.field(default="mean", validator=_reduce)
    rowwise: bool = False
    check: Callable[[MetricContext], None] | None = attrs.field(default=None, repr=False)

    def bind(self, context: MetricContext) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function ``logits -> value`` for one sweep."""

        def bound(logits: torch.Tensor) -> torch.Tensor:
            value = _as_value(_call(self, logits, context, "a cell"), self.name)
            return value.mean() if self.reduce == "mean" else value

        return bound

    @property
    def per_example(self) -> bool:
        """Whether results get an ``example`` dim (``None``: decided by the output shape)."""
        return self.reduce == "none"

    def validate(self, context: MetricContext) -> None:
        """Check the metric against one run's prompts before any forward pass.

        Every declared position must be a real token of every prompt of the run measured
        (``context.receiver``), and :attr:`check` must pass.

        Raises:
            MetricError: naming the metric, the position and the prompt.
        """
        try:
            for entry in self.positions or ():
                _columns(entry, context.run_inputs(), context.receiver)
            if self.check is not None:
                self.check(context)
        except MetricError as err:
            raise MetricError(
                f"metric {self.name!r} measured on the {context.receiver} run: {err}"
            ) from None

    def __call__(self, logits: torch.Tensor, context: MetricContext) -> torch.Tensor:
        return self.bind(context)(logits)


def _call(
    metric: Metric, logits: torch.Tensor, context: MetricContext, where: str | Callable[[], str]
) -> Any:
    """``metric.fn(logits, context)``; an exception of the metric's own becomes a
    :class:`MetricError` naming the metric and the cell (out-of-memory errors pass through, so
    an executor can split the chunk)."""
    try:
        return metric.fn(logits, context)
    except (PatchSpecError, torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as err:
        place = where if isinstance(where, str) else where()
        raise MetricError(
            f"metric {metric.name!r} raised {type(err).__name__} at {place}: {err}"
        ) from err


def _as_value(value: Any, name: str, where: str | Callable[[], str] | None = None) -> torch.Tensor:
    """A metric's output as a tensor (python and numpy numbers too), else :class:`MetricError`."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Real | np.ndarray | np.generic) and not isinstance(value, bool):
        array = np.asarray(value)
        if array.dtype.kind in "iuf":
            return torch.as_tensor(array)
    place = "" if where is None else f" at {where if isinstance(where, str) else where()}"
    raise MetricError(
        f"metric {name!r} returned {type(value).__name__} ({value!r:.60}){place}; it must return "
        "a tensor: a scalar, or one value per prompt"
    )


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


def validate_metrics(metrics: Sequence[Metric], contexts: Sequence[MetricContext]) -> None:
    """Check every metric against every run it is measured on, before any forward pass.

    A plain callable (a :class:`Metric` declaring no positions, not rowwise) on padded prompts
    gets a :class:`~patchspec.PatchSpecWarning`: it sees the padded logits, where column -1 is
    padding for the shorter prompts.

    Raises:
        MetricError: see :meth:`Metric.validate`.
    """
    for metric in metrics:
        for context in contexts:
            metric.validate(context)
    padded = [
        (c.receiver, b, n)
        for c in contexts
        for b, n in enumerate(c.lengths)
        if n != c.seq
    ]
    plain = [m.name for m in metrics if m.positions is None and m.check is None and not m.rowwise]
    if padded and plain:
        run, b, n = padded[0]
        warn(
            f"metrics {plain} are plain functions of the padded logits, but the prompts are "
            f"padded ({run} prompt {b} has {n} real tokens of {contexts[0].seq}), so "
            "logits[:, -1] is padding there; use a built-in metric (pos=-1 is each prompt's "
            "last real token) or a Metric reading metrics.at(logits, -1, context)"
        )


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


# --- token ids ---------------------------------------------------------------------------------
TokenEntry: TypeAlias = int | str | tuple[int | str, ...]


def token_entry(tokens: Any, what: str) -> TokenEntry:
    """Answer tokens normalised: an id or a string, or a tuple of one per prompt.

    Ids must be non-negative ints (numpy and torch integers included); strings are looked up in
    the model's vocabulary when the sweep starts.

    Example:
        >>> token_entry(np.int64(3), "answer"), token_entry(["Mary", 4], "answer")
        (3, ('Mary', 4))

    Raises:
        MetricError: a negative id, a float, a bool, or an empty list.
    """

    def one(t: Any) -> int | str:
        if isinstance(t, str):
            if not t:
                raise MetricError(f"{what} token '' is empty; give a token string or an id")
            return t
        if not _is_int(t):
            raise MetricError(
                f"{what} must be a token id (int), a token string, or one per prompt, got "
                f"{t!r} ({type(t).__name__})"
            )
        if int(t) < 0:
            raise MetricError(f"{what} token id {int(t)} is negative; token ids are 0..d_vocab-1")
        return int(t)

    if isinstance(tokens, torch.Tensor) and tokens.ndim > 1:
        tokens = tokens.flatten()
    tokens = _plain_integers(tokens, f"{what} token ids must be integers")
    if isinstance(tokens, list | tuple):
        if not tokens:
            raise MetricError(f"{what}=[] gives no tokens; give one, or one per prompt")
        return tuple(one(t) for t in tokens)
    return one(tokens)


def _token_id(model: Any, token: int | str, what: str) -> int:
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if isinstance(token, str):
        if model is None or not hasattr(model, "to_single_token"):
            raise MetricError(f"{what} token {token!r} is a string but the model cannot look it up")
        try:
            found = int(model.to_single_token(token))
        except Exception as err:
            raise MetricError(f"{what} token {token!r} is not a single token of the model: {err}") from None
        tokenizer = getattr(model, "tokenizer", None)
        unk, unk_token = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
        if unk is not None and found == int(unk) and token != unk_token:
            raise MetricError(
                f"{what} token {token!r} is not in the model's vocabulary (the tokenizer maps it "
                f"to its unknown token {unk_token!r}, id {found})"
            )
        return found
    size = int(d_vocab) if isinstance(d_vocab, numbers.Integral) else None
    if size is not None and token >= size:
        raise MetricError(
            f"{what} token id {token} is outside the vocabulary (d_vocab={size}: valid "
            f"0..{size - 1})"
        )
    return int(token)


def _token_ids(model: Any, tokens: TokenLike | TokenEntry, batch: int, what: str) -> torch.Tensor:
    """Token ids as a ``[batch]`` long tensor; strings are looked up in the model's vocabulary.

    Raises:
        MetricError: an id outside the vocabulary, a string that is not one token, or a number
            of tokens that is neither one nor one per prompt.
    """
    entry = token_entry(tokens, what)
    if isinstance(entry, tuple):
        if len(entry) == 1:
            entry = entry[0]
        elif len(entry) != batch:
            raise MetricError(
                f"{what} has {len(entry)} tokens but there are {batch} prompts; give one or one "
                "per prompt"
            )
    if isinstance(entry, tuple):
        return torch.tensor([_token_id(model, t, what) for t in entry], dtype=torch.long)
    return torch.tensor([_token_id(model, entry, what)], dtype=torch.long).expand(batch)


def _ids(
    model: Any,
    entry: TokenEntry,
    batch: int,
    what: str,
    memo: dict[Any, torch.Tensor],
    device: torch.device | None = None,
) -> torch.Tensor:
    """The ``[batch]`` ids of ``entry``, made once per model, batch and device (so a sweep
    moves them to the device once, not once per chunk)."""
    key = (id(model), batch, None if device is None else str(device))
    if key not in memo:
        with torch.inference_mode(False):  # kept across passes: usable by gradient passes too
            memo[key] = _token_ids(model, entry, batch, what).to(device or "cpu")
    return memo[key]


@functools.lru_cache(maxsize=256)
def _device_index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``, made once (not per chunk) and outside
    inference mode, so gradient passes may index with it too."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.long, device=device)


# --- reading positions -------------------------------------------------------------------------
def at(logits: torch.Tensor, pos: PosLike, context: MetricContext) -> torch.Tensor:
    """Patched logits at ``pos`` of each prompt: ``[rows, vocab]``.

    ``pos`` is resolved per prompt of the run measured (see the module docstring: ``-1`` is
    each prompt's last real token). Works on full logits and on logits an executor computed
    only at the metric's declared positions (``context.logit_positions``), for one or many
    stacked copies of the batch.

    Example:
        >>> tokens = torch.zeros(2, 3, dtype=torch.long)
        >>> ctx = MetricContext(None, None, None, tokens,
        ...                     inputs={"corrupted": RunInputs(tokens, (2, 3))})
        >>> logits = torch.arange(6.0).view(2, 3, 1)   # logits[b, p] = 3 * b + p
        >>> at(logits, -1, ctx).flatten().tolist()      # prompt 0 ends at 1, prompt 1 at 2
        [1.0, 5.0]

    Raises:
        MetricError: a position that is padding, outside a prompt, or was not computed.
    """
    columns = context.columns(pos)
    return _gather(logits, columns, context.logit_positions)


def _gather(logits: torch.Tensor, columns: tuple[int, ...], held: tuple[int, ...] | None) -> torch.Tensor:
    if held is not None:
        try:
            columns = tuple(held.index(c) for c in columns)
        except ValueError:
            missing = next(c for c in columns if c not in held)
            raise MetricError(
                f"position {missing} was not computed (the logits hold positions {list(held)}); "
                "declare every position a metric reads in its `positions`"
            ) from None
    if len(set(columns)) == 1:
        return logits[:, columns[0]]
    rows = logits.shape[0]
    per_prompt = _device_index(columns, logits.device)
    return logits[torch.arange(rows, device=logits.device), tile(per_prompt, rows)]


def _check_answers(*answers: tuple[str, TokenEntry]) -> Callable[[MetricContext], None]:
    def check(context: MetricContext) -> None:
        for what, entry in answers:
            _token_ids(context.model, entry, context.batch, what)

    return check


def _pos_arg(pos: Any) -> PosEntry:
    return pos_entry(pos)


def _reduce_arg(reduce: Any) -> Reduce:
    _reduce(None, None, reduce)
    if reduce is None:
        raise MetricError("reduce must be 'mean' (one value over prompts) or 'none' (one value per prompt), got None")
    return reduce  # type: ignore[no-any-return]


def logit_diff(
    answer: TokenLike, wrong: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean"
) -> Metric:
    """Logit of ``answer`` minus logit of ``wrong`` at ``pos`` (each prompt's last real token).

    Args:
        answer: The right token: an id or a string, or one per prompt.
        wrong: The wrong token, likewise.
        pos: Where to read: an int (negative: from each prompt's own end), a name (``"END"`` or
            one of the sweep's ``positions=``), or one per prompt.
        reduce: ``"mean"`` over prompts or ``"none"``.

    Raises:
        MetricError: a bad token, position or ``reduce`` (when the metric is built; ids beyond
            the vocabulary, unknown strings, names and padding when the sweep starts).

    Example:
        >>> m = logit_diff(answer=3, wrong=5)
        >>> m.name, m.positions
        ('logit_diff', (-1,))
    """
    good_entry, bad_entry = token_entry(answer, "answer"), token_entry(wrong, "wrong")
    where, how = _pos_arg(pos), _reduce_arg(reduce)
    memo: dict[Any, torch.Tensor] = {}
    memo_wrong: dict[Any, torch.Tensor] = {}

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        here = _gather(logits, _columns(where, ctx.run_inputs(), ctx.receiver), ctx.logit_positions)
        rows = here.shape[0]
        good = tile(_ids(ctx.model, good_entry, ctx.batch, "answer", memo, here.device), rows)
        bad = tile(_ids(ctx.model, bad_entry, ctx.batch, "wrong", memo_wrong, here.device), rows)
        return (
            (here.gather(1, good.unsqueeze(1)) - here.gather(1, bad.unsqueeze(1)))
            .squeeze(1)
            .float()
        )

    check = _check_answers(("answer", good_entry), ("wrong", bad_entry))
    return Metric("logit_diff", fn, (where,), how, rowwise=True, check=check)


def logprob(answer: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Log-probability of ``answer`` at ``pos`` (each prompt's last real token by default).

    Example:
        >>> logprob(3).positions
        (-1,)
    """
    good_entry = token_entry(answer, "answer")
    where, how = _pos_arg(pos), _reduce_arg(reduce)
    memo: dict[Any, torch.Tensor] = {}

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        columns = _columns(where, ctx.run_inputs(), ctx.receiver)
        here = _gather(logits, columns, ctx.logit_positions).float().log_softmax(-1)
        good = tile(_ids(ctx.model, good_entry, ctx.batch, "answer", memo, here.device), here.shape[0])
        return here.gather(1, good.unsqueeze(1)).squeeze(1)

    return Metric("logprob", fn, (where,), how, rowwise=True, check=_check_answers(("answer", good_entry)))


def prob(answer: TokenLike, *, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """Probability of ``answer`` at ``pos`` (each prompt's last real token by default).

    Example:
        >>> prob(3, pos=[4, 5]).positions   # one position per prompt
        ((4, 5),)
    """
    inner = logprob(answer, pos=pos, reduce="none")
    return Metric(
        "prob",
        lambda logits, ctx: inner.fn(logits, ctx).exp(),
        inner.positions,
        _reduce_arg(reduce),
        rowwise=True,
        check=inner.check,
    )


def loss(*, reduce: Reduce = "mean") -> Metric:
    """Next-token cross-entropy of the patched run's own tokens, averaged over each prompt's
    real targets (padding is left out, so a prompt's loss does not depend on its batch).

    Example:
        >>> loss().positions is None
        True
    """
    how = _reduce_arg(reduce)

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        if ctx.logit_positions is not None:
            raise MetricError("loss reads every position; it needs full logits")
        logp = logits[:, :-1].float().log_softmax(-1)
        rows = logp.shape[0]
        target = tile(ctx.tokens[:, 1:].to(logp.device), rows)
        lengths = _device_index(tuple(ctx.lengths), logp.device)
        real = torch.arange(logp.shape[1], device=logp.device) < (lengths - 1).unsqueeze(1)
        weight = tile(real, rows).to(logp.dtype)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (nll * weight).sum(-1) / weight.sum(-1)

    def check(ctx: MetricContext) -> None:
        short = [b for b, n in enumerate(ctx.lengths) if n < 2]
        if short:
            raise MetricError(
                f"loss needs at least two real tokens per prompt (one next-token target), but "
                f"{ctx.receiver} prompt {short[0]} has {ctx.lengths[short[0]]}"
            )

    return Metric("loss", fn, None, how, rowwise=True, check=check)


def kl_to_clean(*, pos: PosLike = -1, reduce: Reduce = "mean") -> Metric:
    """KL divergence ``KL(clean || patched)`` of the next-token distribution at ``pos``.

    The patched run is read at ``pos`` of each of its prompts, the clean run at ``pos`` of each
    clean prompt (the same token when they have the same length).

    Example:
        >>> kl_to_clean().name
        'kl_to_clean'
    """
    where, how = _pos_arg(pos), _reduce_arg(reduce)

    def fn(logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        if ctx.clean_logits is None:
            raise MetricError("kl_to_clean needs the clean run's logits; pass clean prompts")
        columns = _columns(where, ctx.run_inputs(), ctx.receiver)
        patched = _gather(logits, columns, ctx.logit_positions).float().log_softmax(-1)
        clean_columns = _columns(where, ctx.run_inputs("clean"), "clean")
        clean = _gather(ctx.clean_logits, clean_columns, None)
        clean = tile(clean.float().log_softmax(-1).to(patched.device), patched.shape[0])
        return (clean.exp() * (clean - patched)).sum(-1)

    def check(ctx: MetricContext) -> None:
        if "clean" in ctx.inputs:
            _columns(where, ctx.inputs["clean"], "clean")

    return Metric("kl_to_clean", fn, (where,), how, rowwise=True, check=check)


def _evaluate(
    metric: Metric, logits: torch.Tensor, context: MetricContext, where: str | Callable[[], str]
) -> torch.Tensor:
    """One metric's value on one cell's logits, reduced as it says."""
    value = _as_value(_call(metric, logits, context, where), metric.name, where)
    return value.mean() if metric.reduce == "mean" else value


def _check_value(
    value: Any, batch: int, name: str, where: str | Callable[[], str], *, finite: bool = True
) -> torch.Tensor:
    """A finite scalar or a finite ``[batch]`` vector, as float, else :class:`MetricError`.

    ``where`` (or its result, when it is a callable) names the cell in the error. With
    ``finite=False`` only the shape is checked (no read of the values, so no host sync): the
    caller checks finiteness later (:meth:`Evaluator.check_pending`).
    """

    def place() -> str:
        return where if isinstance(where, str) else where()

    value = _as_value(value, name, where)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != batch):
        raise MetricError(
            f"metric {name!r} returned shape {tuple(value.shape)} at {place()}; it must return "
            f"a scalar or one value per prompt (shape ({batch},))"
        )
    if finite and not bool(torch.isfinite(value).all()):
        raise MetricError(
            f"metric {name!r} returned a non-finite value {value.tolist()} at {place()}"
        )
    return value.detach().float()


def _first_non_finite(value: torch.Tensor) -> int | None:
    """The first cell (leading dim) of ``value`` holding a non-finite entry, or ``None``."""
    bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


class Evaluator:
    """Evaluates one or more metrics on patched logits: what every estimator calls.

    Call it with one cell's full logits ``[batch, pos, vocab]``, or hand a whole block of
    ``len(cells)`` cells stacked copy-major (``[len(cells) * batch, pos, vocab]``) to
    :meth:`many`. ``positions`` are the positions every metric reads (``None`` when some metric
    reads all of them): an estimator may compute the final norm and the unembedding only at
    :meth:`logit_positions` (their union over the prompts of the run measured) and pass
    :meth:`many` logits whose ``pos`` dim holds exactly those.

    Args:
        metrics: The metrics, evaluated on the same logits.
        context: What the metrics may read besides the logits (its ``receiver`` is the run
            whose patched logits are measured).
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
        self.positions: tuple[PosEntry, ...] | None = (
            None
            if any(p is None for p in declared)
            else tuple(dict.fromkeys(p for ps in declared if ps is not None for p in ps))
        )
        self._contexts: dict[tuple[int, ...] | None, MetricContext] = {None: context}
        self._deferring = 0
        self._pending: list[tuple[torch.Tensor, Sequence[Any]]] = []

    @property
    def names(self) -> tuple[str, ...]:
        """The metrics' names (the coordinates of the ``metric`` dim)."""
        return tuple(m.name for m in self.metrics)

    def logit_positions(self, seq: int | None = None) -> tuple[int, ...] | None:
        """The sorted token indices the metrics read in some prompt, or ``None`` for all.

        Each declared position is resolved per prompt of the run measured (``-1``: each
        prompt's last real token), and the union is taken.

        Example:
            >>> tokens = torch.zeros(2, 6, dtype=torch.long)
            >>> ctx = MetricContext(None, None, None, tokens,
            ...                     inputs={"corrupted": RunInputs(tokens, (4, 6))})
            >>> Evaluator([logit_diff(3, 5)], ctx).logit_positions(6)
            (3, 5)

        Raises:
            MetricError: a declared position is padding or outside some prompt.
        """
        if self.positions is None:
            return None
        inputs = self.context.run_inputs()
        return tuple(
            sorted({c for p in self.positions for c in _columns(p, inputs, self.context.receiver)})
        )

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

    def _run_of(self, logits: torch.Tensor) -> str:
        """The run whose unpatched logits these are (else the receiving run)."""
        ctx = self.context
        if logits is ctx.clean_logits:
            return "clean"
        if logits is ctx.corrupted_logits:
            return "corrupted"
        return ctx.receiver

    def __call__(self, logits: torch.Tensor, cell: Any, *, run: str | None = None) -> torch.Tensor:
        """The value(s) for one cell's full logits ``[batch, pos, vocab]``.

        ``cell`` is a :class:`~patchspec.plan.Cell` or a description such as
        ``"the clean baseline"``; it names the cell in errors. ``run`` is the run the logits
        belong to (default: the run of the unpatched logits passed, else the receiving run);
        a baseline is measured as :meth:`MetricContext.baseline` says.
        """
        where = cell if isinstance(cell, str) else self.describe(cell)
        context = self.context.baseline(run or self._run_of(logits))
        values = [
            _check_value(_evaluate(m, logits, context, where), context.batch, m.name, where)
            for m in self.metrics
        ]
        return self._combine(values, 0, lambda: where)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside the block, :meth:`many` checks shapes but not finiteness (which needs the
        values on the host: one sync per chunk); the caller then calls :meth:`check_pending`
        with the chunk's values once they are on the host. Executors use it so that a chunk's
        results are read once, and nothing else syncs on the hot path.
        """
        self._deferring += 1
        self._pending = []
        try:
            yield
        finally:
            self._deferring -= 1

    def check_pending(self, values: torch.Tensor, host: torch.Tensor | None = None) -> None:
        """Check the finiteness :meth:`many` deferred (see :meth:`deferring`), raising the same
        :class:`MetricError` it would have raised, naming the first bad cell.

        Args:
            values: What the estimator returned for the chunk.
            host: ``values`` already copied to the host (read instead of ``values`` when it
                is :meth:`many`'s own output, so the check costs no transfer of its own).
        """
        pending, self._pending = self._pending, []
        for out, cells in pending:
            block = host if host is not None and out is values else out
            self._raise_non_finite(block.detach().cpu(), cells)

    def _raise_non_finite(self, block: torch.Tensor, cells: Sequence[Any]) -> None:
        for i, metric in enumerate(self.metrics):
            value = block[:, i] if self.stacked else block
            k = _first_non_finite(value)
            if k is not None:
                raise MetricError(
                    f"metric {metric.name!r} returned a non-finite value {value[k].tolist()} at "
                    f"{self.describe(cells[k])}"
                )

    def many(
        self,
        logits: Float[torch.Tensor, "copies_batch pos vocab"],
        cells: Sequence[Any],
        positions: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """The values of ``len(cells)`` cells whose logits are stacked copy-major in ``logits``.

        Rowwise metrics are evaluated on the whole block at once, others cell by cell (a plain
        callable's value for one cell's prompts cannot be told apart from another's in a
        block, so it is called once per cell). ``positions`` says which positions the logits
        hold (``None``: all). Nothing here reads the values on the host inside
        :meth:`deferring`; outside it, the finiteness check is one sync per call.

        Raises:
            MetricError: a metric returned the wrong shape or a non-finite value (the message
                names the first such cell; inside :meth:`deferring`, the non-finite one is
                raised by :meth:`check_pending`).
        """
        context = self._context(positions)
        copies, batch = len(cells), self.context.batch
        check = not self._deferring
        per_metric: list[torch.Tensor] = []
        for metric in self.metrics:
            if metric.rowwise and metric.reduce in ("mean", "none"):
                first = functools.partial(self.describe, cells[0])
                rows = _as_value(_call(metric, logits, context, first), metric.name, first)
                if tuple(rows.shape) != (copies * batch,):
                    raise MetricError(
                        f"rowwise metric {metric.name!r} returned shape {tuple(rows.shape)} for "
                        f"{copies} stacked copies of {batch} prompts; it must return one value "
                        f"per row ({copies * batch},)"
                    )
                block = rows.view(copies, batch)
                value = (block.mean(-1) if metric.reduce == "mean" else block).detach().float()
                k = _first_non_finite(value) if check else None
                if k is not None:
                    _check_value(value[k], batch, metric.name, self.describe(cells[k]))
            else:
                parts = logits.unflatten(0, (copies, -1))
                value = torch.stack(
                    [
                        _check_value(
                            _evaluate(metric, part, context, where),
                            batch,
                            metric.name,
                            where,
                            finite=check,
                        )
                        for part, cell in zip(parts, cells, strict=True)
                        for where in [functools.partial(self.describe, cell)]
                    ]
                )
            per_metric.append(value)
        out = self._combine(per_metric, 1, lambda: self.describe(cells[0]))
        if not check:
            self._pending.append((out, list(cells)))
        return out
