"""The session of a sweep: the two unpatched runs it compares, and what they cache.

:class:`Session` turns prompts into right-padded tokens with the real length of every prompt,
checks that clean and corrupted inputs line up, and caches exactly the activations the sweep's
grids read, each run at most once; it also records the replay of each receiving run once for
all the sweep's specs. It is what value sources read (the :class:`patchspec.sources.Runs`
protocol).

**Padding.** Patched forward passes carry no attention mask. In a causal model that is exact
only for *right* padding: a real token never attends to the padding after it, and its position
index is the same as in the prompt alone. So every input is kept right-padded, and padding is
told from real tokens by lengths or masks, never by comparing tokens to the pad id (on GPT-2
the pad, end and start tokens are one id, which a real prompt may hold):

* text prompts are tokenized one at a time, exactly as ``model.to_tokens(prompt)`` gives them,
  and padded on the right; the tokenizer's ``padding_side`` is not used, since the results
  must equal the same prompts run one at a time;
* token tensors (or lists of token lists) may come with their attention mask, as a mapping
  ``{"input_ids": tokens, "attention_mask": mask}`` (a tokenizer's ``BatchEncoding`` is one);
  a mask must be right-padded (ones, then zeros); left-padded masks are refused;
* token tensors without a mask are all real tokens (a warning says so when they end in the pad
  id, which may be padding the caller meant).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch
from jaxtyping import Float, Int

from patchspec.errors import InputError, did_you_mean, warn
from patchspec.layouts import POSITION_DIMS
from patchspec.model.adapter import ModelAdapter
from patchspec.model.replay import Replay
from patchspec.sources import Clean, Corrupted, Receiver, Resample

if TYPE_CHECKING:
    from patchspec.model.lean import LeanReplay
    from patchspec.plan.grid import Grid
    from patchspec.plan.positions import Positions

Tokens = Int[torch.Tensor, "batch pos"]
#: What a sweep takes as prompts: text, token ids, or token ids with their attention mask.
Prompts = str | list[str] | Tokens | Mapping[str, Any]


@attrs.frozen(eq=False)
class Inputs:
    """One run's prompts as right-padded tokens, with the real length of each prompt.

    Attributes:
        tokens: ``[batch, pos]`` token ids (``torch.long``), right-padded.
        lengths: The number of real tokens of each prompt.
        texts: The prompts, when they were given as text.
        masked: Whether the lengths were given (text, a mask, token lists); ``False`` for a
            token tensor without a mask, whose tokens are all real.
    """

    tokens: torch.Tensor
    lengths: tuple[int, ...]
    texts: list[str] | None = None
    masked: bool = True

    @property
    def batch(self) -> int:
        """Number of prompts."""
        return int(self.tokens.shape[0])

    @property
    def seq(self) -> int:
        """Width of the padded tokens."""
        return int(self.tokens.shape[1])

    def mask(self) -> torch.Tensor:
        """``[batch, pos]``: True at real tokens, False at padding."""
        device = self.tokens.device
        return torch.arange(self.seq, device=device) < torch.tensor(
            self.lengths, device=device
        ).unsqueeze(1)

    def fit(self, width: int, pad: int) -> Inputs:
        """The same prompts right-padded (or trimmed of padding) to ``width`` positions."""
        if width == self.seq:
            return self
        if width < self.seq:
            return attrs.evolve(self, tokens=self.tokens[:, :width].contiguous())
        extra = self.tokens.new_full((self.batch, width - self.seq), pad)
        return attrs.evolve(self, tokens=torch.cat([self.tokens, extra], dim=1))


def pad_id(model: Any) -> int | None:
    """The tokenizer's pad token id (``None`` without a tokenizer or pad token)."""
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return None if pad is None else int(pad)


def pad_value(model: Any) -> int:
    """The id written at padding: the pad token, else the end token, else 0.

    Which id it is changes no number (padding sits after every real token and is masked out of
    every metric and mean); it only shows in token labels.
    """
    tokenizer = getattr(model, "tokenizer", None)
    for value in (pad_id(model), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, numbers.Integral):
            return int(value)
    return 0


def _context_size(model: Any) -> int | None:
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n_ctx) if isinstance(n_ctx, numbers.Integral) and int(n_ctx) > 0 else None


def _vocab_size(model: Any) -> int | None:
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    return int(d_vocab) if isinstance(d_vocab, numbers.Integral) and int(d_vocab) > 0 else None


def _tokenize(model: Any, text: str) -> list[int]:
    """One prompt's tokens exactly as ``model.to_tokens(text)`` gives them, untruncated."""
    try:
        tokens = model.to_tokens(text, truncate=False)
    except TypeError:  # a model whose to_tokens takes no ``truncate``
        tokens = model.to_tokens(text)
    return [int(t) for t in torch.as_tensor(tokens).reshape(-1).tolist()]


def _text_inputs(model: Any, prompts: str | Sequence[str], what: str) -> Inputs:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if getattr(model, "tokenizer", None) is None:
        raise InputError(f"{what} prompts are strings but the model has no tokenizer; pass tokens")
    rows = []
    for b, text in enumerate(texts):
        if not text.strip():
            raise InputError(
                f"{what} prompt {b} is an empty string ({text!r}); every prompt needs at least "
                "one token"
            )
        rows.append(_tokenize(model, text))
    for b, row in enumerate(rows):
        if not row:
            raise InputError(f"{what} prompt {b} ({texts[b]!r}) gives no tokens")
    inputs = _ragged(rows, pad_value(model), what)
    return attrs.evolve(inputs, texts=texts)


def _ragged(rows: Sequence[Sequence[int]], pad: int, what: str) -> Inputs:
    """Token lists of different lengths, right-padded, with their lengths."""
    lengths = tuple(len(r) for r in rows)
    width = max(lengths)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return Inputs(tokens, lengths)


def _integer_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` (a tensor, array or nested list of ints) as an integer tensor."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise InputError(
                f"{what} must be integer token ids, got a numpy array of dtype {value.dtype}"
            )
        value = torch.from_numpy(value.astype(np.int64))
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"{what} must be a [batch, pos] tensor of token ids, got {type(value).__name__}"
            ) from None
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise InputError(
            f"{what} tokens must be integers (token ids of any integer dtype), got dtype "
            f"{value.dtype}"
        )
    return value


def _check_mask(mask: Any, shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The real length of each row of a right-padded attention mask."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    mask = torch.as_tensor(mask)
    if mask.ndim == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != shape:
        raise InputError(
            f"{what} attention_mask has shape {tuple(mask.shape)} but its tokens have shape "
            f"{shape}; give one mask entry per token"
        )
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise InputError(f"{what} attention_mask must be 0/1 or bool, got dtype {mask.dtype}")
    values = mask.to(torch.long).cpu()
    if not bool(((values == 0) | (values == 1)).all()):
        bad = sorted(set(values.unique().tolist()) - {0, 1})
        raise InputError(f"{what} attention_mask must hold only 0 and 1, found {bad}")
    lengths = values.sum(1)
    for b, row in enumerate(values.tolist()):
        n = int(lengths[b])
        if n == 0:
            raise InputError(f"{what} prompt {b} has no real tokens (its attention mask is all 0)")
        if row[:n] == [1] * n:
            continue
        first = row.index(1)
        if first > 0 and row[first : first + n] == [1] * n:
            raise InputError(
                f"{what} prompt {b} is left-padded (its attention mask starts with {first} "
                "zeros); patched forward passes carry no attention mask, which is exact only "
                "for right padding: pad on the right (tokenizer.padding_side = 'right') or pass "
                "the prompts as text"
            )
        raise InputError(
            f"{what} prompt {b} has an attention mask with holes ({row}); a mask must be ones "
            "then zeros (right padding)"
        )
    return tuple(int(n) for n in lengths)


def _token_inputs(model: Any, prompts: Any, what: str) -> Inputs:
    """Token ids (a tensor, an array, token lists, or a mapping with a mask) as inputs."""
    lengths: tuple[int, ...] | None = None
    given = prompts
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            keys = ", ".join(map(repr, prompts)) or "none"
            raise InputError(
                f"{what} given as a mapping must hold 'input_ids' (and optionally "
                f"'attention_mask'), got keys {keys}"
            )
        unknown = sorted(set(map(str, prompts)) - {"input_ids", "attention_mask", "token_type_ids"})
        if unknown:
            raise InputError(
                f"{what} mapping has keys {unknown} patchspec does not use; give 'input_ids' and "
                "'attention_mask'"
            )
        prompts, mask = prompts["input_ids"], prompts.get("attention_mask")
    else:
        mask = None
    if isinstance(prompts, list | tuple) and prompts and all(
        isinstance(r, list | tuple) or (isinstance(r, torch.Tensor | np.ndarray) and r.ndim == 1)
        for r in prompts
    ):
        for b, row in enumerate(prompts):
            if not len(row):
                raise InputError(f"{what} prompt {b} has no tokens")
        rows = [_integer_tensor(r, f"{what} prompt {b}").reshape(-1) for b, r in enumerate(prompts)]
        if len({len(r) for r in rows}) > 1 and mask is None:  # ragged lists: their own lengths
            _check_ids(rows, model, what)
            return _ragged([r.tolist() for r in rows], pad_value(model), what)
        prompts = torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.long)
    if isinstance(prompts, list | tuple) and not prompts:
        raise InputError(f"{what} has no prompts (got an empty {type(given).__name__})")
    tokens = _integer_tensor(prompts, what)
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2:
        raise InputError(f"{what} tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise InputError(f"{what} has no prompts (tokens of shape {tuple(tokens.shape)})")
    if tokens.shape[1] == 0:
        raise InputError(f"{what} prompts have no tokens (tokens of shape {tuple(tokens.shape)})")
    if mask is not None:
        lengths = _check_mask(mask, tuple(tokens.shape), what)
    tokens = tokens.to(torch.long)
    if lengths is None:
        lengths = (int(tokens.shape[1]),) * int(tokens.shape[0])
        _warn_unmasked_padding(model, tokens, what)
    else:  # padding may hold anything (-100, ...): write a valid id there
        inputs = Inputs(tokens, lengths)
        tokens = torch.where(inputs.mask(), tokens, torch.full_like(tokens, pad_value(model)))
    _check_ids([tokens[b, :n] for b, n in enumerate(lengths)], model, what)
    return Inputs(tokens, lengths, masked=mask is not None)


def _check_ids(rows: Sequence[torch.Tensor], model: Any, what: str) -> None:
    """Every real token id is inside the vocabulary."""
    d_vocab = _vocab_size(model)
    for b, row in enumerate(rows):
        bad = (row < 0) if d_vocab is None else (row < 0) | (row >= d_vocab)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            valid = "non-negative" if d_vocab is None else f"0..{d_vocab - 1} (d_vocab={d_vocab})"
            raise InputError(
                f"{what} prompt {b} has token id {int(row[i])} at position {i}; token ids must "
                f"be {valid}"
            )


def _warn_unmasked_padding(model: Any, tokens: torch.Tensor, what: str) -> None:
    pad = pad_id(model)
    if pad is None:
        return
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    starts = tokens[:, 0].eq(pad).nonzero().flatten().tolist() if pad != bos else []
    if starts:
        warn(
            f"{what} prompts {starts} start with the pad token id {pad}; tokens given without an "
            "attention mask are all read as real tokens. Left padding cannot be run exactly "
            "(patched passes carry no attention mask): pad on the right, or pass the prompts as "
            "text"
        )
    ends = tokens[:, -1].eq(pad).nonzero().flatten().tolist()
    if ends:
        warn(
            f"{what} prompts {ends} end in the pad token id {pad}; tokens given without an "
            "attention mask are all read as real tokens. If they are padding, pass "
            f"{{'input_ids': tokens, 'attention_mask': mask}} (e.g. the tokenizer's own output) "
            "or the prompts as text"
        )


def read_inputs(model: Any, prompts: Any, what: str) -> Inputs:
    """One run's prompts as right-padded tokens with their real lengths (on the model's device).

    Args:
        model: A TransformerLens model (or anything with ``to_tokens`` and ``cfg``).
        prompts: A string, a list of strings, a ``[batch, pos]`` (or ``[pos]``) tensor or array
            of token ids of any integer dtype, a list of token lists (of different lengths:
            right-padded), or a mapping ``{"input_ids": ..., "attention_mask": ...}``.
        what: Names the input in errors (``"clean"``).

    Raises:
        InputError: no prompts, an empty prompt, non-integer tokens, ids outside the vocabulary,
            a mask of the wrong shape, with holes or left-padded, or prompts longer than the
            model's context (``cfg.n_ctx``).

    Example:
        >>> from patchspec.tiny import tiny_model
        >>> model = tiny_model(["a", "b", "c"])
        >>> inputs = read_inputs(model, ["a b c", "a"], "clean")
        >>> inputs.tokens.tolist(), inputs.lengths
        ([[0, 3, 4, 5], [0, 3, 1, 1]], (4, 2))
    """
    if prompt_texts(prompts) is not None:
        inputs = _text_inputs(model, prompts, what)
    elif isinstance(prompts, Mapping | torch.Tensor | np.ndarray | list | tuple):
        inputs = _token_inputs(model, prompts, what)
    else:
        raise InputError(
            f"{what} must be a string, a list of strings, a [batch, pos] token tensor or a "
            f"mapping {{'input_ids': ..., 'attention_mask': ...}}, got {type(prompts).__name__}"
        )
    _check_context(model, inputs, what)
    return attrs.evolve(inputs, tokens=inputs.tokens.to(ModelAdapter.of(model).device))


def _check_context(model: Any, inputs: Inputs, what: str) -> None:
    n_ctx = _context_size(model)
    longest = max(inputs.lengths)
    if n_ctx is not None and longest > n_ctx:
        b = inputs.lengths.index(longest)
        raise InputError(
            f"{what} prompt {b} has {longest} tokens, more than the model's context of {n_ctx} "
            "tokens (cfg.n_ctx); shorten it"
        )


def to_tokens(model: Any, prompts: Prompts, what: str) -> Tokens:
    """Tokens of ``prompts`` on the model's device, shaped ``[batch, pos]``, right-padded.

    Raises:
        InputError: see :func:`read_inputs`.
    """
    return read_inputs(model, prompts, what).tokens


def prompt_texts(prompts: Any) -> list[str] | None:
    """The prompts as a list of strings when they were given as text, else ``None``."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    return None


def pad_to(model: Any, tokens: Tokens, length: int) -> Tokens:
    """``tokens`` right-padded with the tokenizer's pad token to ``length`` positions.

    Raises:
        InputError: padding is needed but the tokenizer has no pad token.
    """
    missing = length - tokens.shape[1]
    if missing <= 0:
        return tokens
    pad = pad_id(model)
    if pad is None:
        raise InputError(
            "prompts of different token lengths must be padded, but the tokenizer has no pad "
            "token; set model.tokenizer.pad_token or pass padded tokens"
        )
    return torch.nn.functional.pad(tokens, (0, missing), value=pad)


class Session:
    """Clean and corrupted inputs with lazily cached logits and activations.

    Both runs are right-padded to one width (the longest real prompt of either); the real
    length of every prompt is kept (:meth:`lengths`, :meth:`mask`), so padding never enters a
    metric, a mean or a named position.

    Args:
        model: A TransformerLens model (``TransformerBridge``) or its adapter.
        clean: Clean prompts or tokens (``None`` when only ``clean_cache`` is known); see
            :func:`read_inputs` for what is accepted.
        corrupted: Corrupted prompts or tokens.
        hook_names: The hook points whose activations sources may read.
        clean_cache: Pre-computed clean activations (e.g. an ``ActivationCache``).
        reference: Reference datasets for ``Mean(over=...)``.
        tensors: Run-time tensors that sources name by key (bases, directions, SAEs; see
            :mod:`patchspec.interventions`).

    Raises:
        InputError: unusable prompts (see :func:`read_inputs`), clean and corrupted inputs
            with different numbers of prompts, or token tensors of different shapes given
            without masks.
    """

    def __init__(
        self,
        model: Any,
        clean: Prompts | None,
        corrupted: Prompts,
        *,
        hook_names: Iterable[str] = (),
        clean_cache: Mapping[str, torch.Tensor] | None = None,
        reference: Prompts | Mapping[str, Prompts] | None = None,
        tensors: Mapping[str, Any] | None = None,
    ) -> None:
        self.adapter = ModelAdapter.of(model)
        if tensors is not None and not isinstance(tensors, Mapping):
            raise InputError(
                f"tensors must be a dict {{name: tensor}}, got {type(tensors).__name__}"
            )
        self.tensors: dict[str, Any] = dict(tensors or {})
        self.model = model = self.adapter.model
        inputs: dict[Receiver, Inputs] = {"corrupted": read_inputs(model, corrupted, "corrupted")}
        if clean is not None:
            inputs["clean"] = read_inputs(model, clean, "clean")
            if inputs["clean"].batch != inputs["corrupted"].batch:
                raise InputError(
                    f"clean has {inputs['clean'].batch} prompts but corrupted has "
                    f"{inputs['corrupted'].batch}; give one corrupted prompt per clean prompt"
                )
            shapes = {k: tuple(v.tokens.shape) for k, v in inputs.items()}
            if not any(v.masked for v in inputs.values()) and len(set(shapes.values())) > 1:
                raise InputError(
                    f"clean and corrupted tokens must have the same shape, got clean "
                    f"{shapes['clean']} and corrupted {shapes['corrupted']}; pad them, pass "
                    "attention masks ({'input_ids': tokens, 'attention_mask': mask}) or text"
                )
        # One width for both runs: the longest real prompt (columns of padding only are dropped).
        width = max(max(i.lengths) for i in inputs.values())
        if clean_cache is not None:
            width = max(i.seq for i in inputs.values())  # the cache was made at the given width
        pad = pad_value(model)
        self._inputs = {k: v.fit(width, pad) for k, v in inputs.items()}
        self.corrupted_tokens = self._inputs["corrupted"].tokens
        self.clean_tokens = self._inputs["clean"].tokens if "clean" in self._inputs else None
        self.hook_names = set(hook_names)
        self._caches: dict[Receiver, Mapping[str, torch.Tensor]] = {}
        self._logits: dict[Receiver, torch.Tensor] = {}
        if clean_cache is not None:
            self._caches["clean"] = clean_cache
        if reference is None or (isinstance(reference, Mapping) and "input_ids" not in reference):
            self._references: dict[str, Prompts] = dict(reference or {})
        else:
            self._references = {"reference": reference}
        self._reference_caches: dict[str, dict[str, torch.Tensor]] = {}
        self._reference_read: dict[str, Inputs] = {}
        self._memo: dict[Any, torch.Tensor] = {}
        self._replays: dict[Receiver, Replay | None] = {}
        self._leans: dict[Receiver, Any] = {}

    @property
    def batch(self) -> int:
        """Number of prompts."""
        return int(self.corrupted_tokens.shape[0])

    @property
    def seq(self) -> int:
        """Sequence length in tokens (the padded width)."""
        return int(self.corrupted_tokens.shape[1])

    def tokens(self, which: Receiver) -> Tokens:
        """The tokens of one run."""
        tokens = self.clean_tokens if which == "clean" else self.corrupted_tokens
        if tokens is None:
            raise InputError(f"the {which} tokens are not known to this sweep")
        return tokens

    def has(self, which: Receiver) -> bool:
        """Whether the tokens of ``which`` are known (clean ones may be given only as a cache)."""
        return (self.clean_tokens if which == "clean" else self.corrupted_tokens) is not None

    def texts(self, which: Receiver) -> list[str] | None:
        """The prompts of one run when they were given as text."""
        inputs = self._inputs.get(which)
        return None if inputs is None else inputs.texts

    def _run(self, which: Receiver) -> None:
        logits, cache, replay = self.adapter.run_recording(self.tokens(which), self.hook_names)
        self._logits[which] = logits
        self._caches.setdefault(which, cache)
        self._replays[which] = replay

    def logits(self, which: Receiver) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits of the unpatched run (computed once)."""
        if which not in self._logits:
            self._run(which)
        return self._logits[which]

    def replay(self, which: Receiver) -> Replay | None:
        """The checked replay of one receiving run, recorded during its unpatched pass."""
        if which not in self._replays:
            self._run(which)
        return self._replays[which]

    def lean(self, which: Receiver) -> LeanReplay | None:
        """The checked lean replay of one receiving run (:mod:`patchspec.model.lean`), or
        ``None`` when the model's blocks are not of a kind it models."""
        if which not in self._leans:
            self._leans[which] = self.adapter.lean(self.replay(which), self.tokens(which), self.logits(which))
        lean: LeanReplay | None = self._leans[which]
        return lean

    def position_axes(self, hook_name: str) -> tuple[int, ...]:
        """Axes of the activation at ``hook_name`` that index token positions."""
        return self.adapter.position_axes(hook_name)

    def activation(self, which: Receiver, hook_name: str) -> torch.Tensor:
        """One cached activation of the unpatched run (computed once per run)."""
        if which not in self._caches:
            self._run(which)
        try:
            return self._caches[which][hook_name]
        except KeyError:
            raise InputError(
                f"the {which} cache has no activation {hook_name!r}; cache it with "
                "model.run_with_cache(tokens) without a names_filter that drops it"
            ) from None

    # --- what value sources, metrics and named positions read ---------------------------------
    def memo(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, computed once per sweep for each hashable ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def lengths(self, which: Receiver) -> tuple[int, ...]:
        """The number of real (unpadded) tokens of each prompt of one run.

        Text prompts count their own tokens; token tensors count their attention mask's ones
        (all their tokens without a mask). Padding is never told by comparing tokens to the
        pad id.
        """
        if which not in self._inputs:
            raise InputError(f"the {which} tokens are not known to this sweep")
        return self._inputs[which].lengths

    def mask(self, which: Receiver) -> torch.Tensor:
        """``[batch, pos]``: True at real tokens, False at padding."""
        self.lengths(which)
        return self._inputs[which].mask()

    def real_mask(self, which: Receiver) -> torch.Tensor | None:
        """``[batch, pos]``: True at real tokens, False at padding; ``None`` when unpadded."""
        if all(n == self.seq for n in self.lengths(which)):
            return None
        return self.mask(which)

    def length_mismatches(self) -> tuple[tuple[int, int, int], ...]:
        """``(prompt, clean length, corrupted length)`` of every prompt whose runs differ."""
        if not self.has("clean"):
            return ()
        pairs = zip(self.lengths("clean"), self.lengths("corrupted"), strict=True)
        return tuple((b, c, k) for b, (c, k) in enumerate(pairs) if c != k)

    def warn_length_mismatches(self) -> None:
        """Warn (:class:`~patchspec.PatchSpecWarning`) when clean and corrupted prompts differ
        in real length: integer positions then compare token ``i`` with token ``i``."""
        found = self.length_mismatches()
        if not found:
            return
        listed = "; ".join(f"prompt {b}: clean {c}, corrupted {k} tokens" for b, c, k in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        warn(
            f"clean and corrupted prompts differ in length ({listed}{more}); integer positions "
            "patch token i with token i, so past the shorter prompt one run is padding. Name the "
            "positions with a pair of tables, positions=(clean_table, corrupted_table), to line "
            "them up"
        )

    def check_alignment(self, grid: Grid) -> None:
        """Refuse a grid whose integer positions patch padding into a real token.

        Two cases, both before any forward pass: a fixed integer position (``.sel(pos=-1)``
        on an unswept position dim) that is padding in some prompt of the receiving run (the
        patch would change nothing there: name the position, e.g. ``"END"``), and a donor run
        (``Clean``, ``Corrupted``, ``Resample``) whose prompt is padding at a position that is
        a real token of the receiving prompt (its padding would be written into real tokens).
        Named positions are aligned per prompt and always pass; swept integer positions past a
        prompt's end patch only padding and pass (those cells leave that prompt unchanged).

        Raises:
            InputError: naming the spec, position, prompt and both lengths.
        """
        if not self.has(grid.receiver):
            return
        into = self.lengths(grid.receiver)
        if any(n != self.seq for n in into):
            _refuse_counting_from_the_padded_end(grid, into, self.seq)
        for label, sources, columns, fixed in _written_columns(grid, self.seq):
            for b, n in enumerate(into):
                outside = sorted(c for c in fixed if c >= n)
                if outside:
                    raise InputError(
                        f"spec {label!r} patches position {outside[0]}, which is padding in "
                        f"{grid.receiver} prompt {b} ({n} real tokens), so the patch changes "
                        "nothing there; name the position per prompt instead (positions="
                        "{'END': -1} and .sel(pos='END'), or patchspec.find_positions)"
                    )
            for source in sources:
                donors = self._donors(source)
                if donors is None:
                    continue
                run, prompt = donors
                have = self.lengths(run)
                for b, n in enumerate(into):
                    d = prompt[b]
                    bad = sorted(c for c in columns if have[d] <= c < n)
                    if bad:
                        raise InputError(
                            f"spec {label!r} writes {source.label} values into "
                            f"{grid.receiver} prompt {b} ({n} real tokens) at position {bad[0]}, "
                            f"but {run} prompt {d} has {have[d]} real tokens, so position {bad[0]} is "
                            f"padding there; restrict the positions to 0..{have[d] - 1}, give "
                            "prompts of equal length, or name positions with a pair of tables "
                            "positions=(clean_table, corrupted_table)"
                        )

    def _donors(self, source: Any) -> tuple[Receiver, tuple[int, ...]] | None:
        """The run and prompt a source reads at the same index, per receiving prompt."""
        batch = range(self.batch)
        if isinstance(source, Clean | Corrupted):
            run: Receiver = "clean" if isinstance(source, Clean) else "corrupted"
            return (run, tuple(batch)) if self.has(run) else None
        if isinstance(source, Resample) and self.batch >= 2:
            run = source.donor or source.receiver
            return (run, source.permutation(self.batch)) if self.has(run) else None
        donor = getattr(source, "donor", None)
        if source.interchange and donor in ("clean", "corrupted") and getattr(source, "source_pos", None) is None:
            return (donor, tuple(batch)) if self.has(donor) else None  # Subspace, SAELatent
        return None

    def reference(self, name: str, hook_name: str) -> torch.Tensor:
        """The activation at ``hook_name`` of the reference dataset ``name`` (run once).

        Raises:
            InputError: no reference dataset of that name was passed to the sweep.
        """
        if name not in self._reference_caches:
            tokens = self._reference_inputs(name).tokens
            _, self._reference_caches[name] = self.adapter.run_with_cache(tokens, self.hook_names)
        try:
            return self._reference_caches[name][hook_name]
        except KeyError:
            raise InputError(
                f"the reference dataset {name!r} has no activation {hook_name!r}"
            ) from None

    def reference_mask(self, name: str) -> torch.Tensor | None:
        """``[batch, pos]`` real tokens of the reference dataset ``name``; ``None`` when unpadded."""
        inputs = self._reference_inputs(name)
        return None if all(n == inputs.seq for n in inputs.lengths) else inputs.mask()

    def _reference_inputs(self, name: str) -> Inputs:
        if name in self._reference_read:
            return self._reference_read[name]
        if name not in self._references:
            given = ", ".join(map(repr, self._references)) or "none"
            raise InputError(
                f"Mean(over={name!r}) needs a reference dataset {name!r}; pass "
                f"reference=tokens (named 'reference') or reference={{{name!r}: tokens}} to "
                f"run() (given: {given})"
            )
        read = read_inputs(self.model, self._references[name], f"reference {name!r}")
        self._reference_read[name] = read
        return read

    def tensor(self, name: str) -> Any:
        """The run-time tensor (or SAE) given as ``run(..., tensors={name: ...})``.

        Raises:
            InputError: none of that name was given (naming those that were).
        """
        if name not in self.tensors:
            given = ", ".join(map(repr, self.tensors)) or "none"
            raise InputError(
                f"no tensor {name!r} was given; pass run(..., tensors={{{name!r}: tensor}}) "
                f"(given: {given}){did_you_mean(name, list(self.tensors))}"
            )
        return self.tensors[name]

    def check_reference(self, name: str) -> None:
        """Raise unless the reference dataset ``name`` was given with the prompts' token length.

        Raises:
            InputError: no such dataset, or its prompts have another token length.
        """
        seq = self._reference_inputs(name).seq
        if seq != self.seq:
            raise InputError(
                f"reference dataset {name!r} has prompts of {seq} tokens, but the sweep's "
                f"prompts have {self.seq}; a mean over a reference dataset needs prompts of the "
                "same token length"
            )

def _negative_entry(selector: Any) -> int | None:
    """The first negative int of a restriction (an int, a list of ints, or slice bounds)."""
    if isinstance(selector, slice):
        entries = [selector.start, selector.stop]
    elif isinstance(selector, tuple | list):
        entries = list(selector)
    else:
        entries = [selector]
    return next((e for e in entries if isinstance(e, int) and not isinstance(e, bool) and e < 0), None)


def _refuse_counting_from_the_padded_end(grid: Grid, lengths: Sequence[int], seq: int) -> None:
    """A negative position index means a column of the padded batch, not each prompt's own end:
    with prompts of different lengths it would silently patch padding, so it is refused."""
    short = next(b for b, n in enumerate(lengths) if n != seq)
    for part in grid.parts:
        for dim in part.layout.dims:
            if dim not in POSITION_DIMS:
                continue
            entry = _negative_entry(part.spec.restriction(dim))
            if entry is not None:
                raise InputError(
                    f"spec {part.spec.label!r} restricts {dim}={part.spec.restriction(dim)!r}: "
                    f"{entry} counts from the end of the padded batch (column {seq + entry}), "
                    f"but {grid.receiver} prompt {short} has {lengths[short]} real tokens of "
                    f"{seq}, so that column is padding there. Name the position per prompt "
                    "instead: positions={'END': -1} and .sel(pos='END') (or "
                    "patchspec.find_positions), or use non-negative indices"
                )


def _written_columns(
    grid: Grid, seq: int
) -> list[tuple[str, tuple[Any, ...], frozenset[int], frozenset[int]]]:
    """Per part: its label, sources, the integer positions it may write, and those written by
    a fixed (unswept) selection; named (per-prompt) selections are left out."""
    from patchspec.plan.cells import PerExample, is_named
    from patchspec.plan.positions import Aligned

    everything = frozenset(range(seq))
    out: list[tuple[str, tuple[Any, ...], frozenset[int], frozenset[int]]] = []
    if grid.explicit is not None or not grid.vectorised:
        cells = grid.explicit if grid.explicit is not None else grid.cells()
        for cell in cells:
            for region in cell.regions:
                if isinstance(region.source, Aligned):  # named positions, moved per prompt
                    continue
                written: set[int] = set()
                for dim, sel in region.index:
                    if dim not in POSITION_DIMS or isinstance(sel, PerExample):
                        continue
                    written |= everything if sel is None else {int(i) for i in sel}
                out.append((region.activation, (region.source,), frozenset(written), frozenset()))
        return out
    for part in grid.parts:
        sources = part.spec.sources
        swept: set[int] = set()
        fixed: set[int] = set()
        for axis in part.axes:
            if axis.name in POSITION_DIMS and axis.kind == "index":
                swept |= {int(v) for v in axis.values}
        for dim, sel in part.fixed:
            if dim not in POSITION_DIMS or dim in part.spec.axes:
                continue
            if isinstance(sel, PerExample) or is_named(part.spec.restriction(dim)):
                continue  # named: resolved per prompt of each run, aligned between runs
            if sel is None:
                swept |= everything
            else:
                fixed |= {int(i) for i in sel}
        named = any(a.kind == "named" for a in part.axes if a.name in POSITION_DIMS)
        if named and not swept and not fixed:
            continue
        out.append((part.spec.label, sources, frozenset(swept | fixed), frozenset(fixed)))
    return out


def metric_inputs(session: Session, positions: Positions | None = None) -> dict[str, Any]:
    """What metrics know about each run's prompts: tokens, lengths and named positions.

    Example:
        >>> from patchspec.tiny import tiny_model
        >>> model = tiny_model(["a", "b"])
        >>> metric_inputs(Session(model, ["a b", "a"], ["b a", "b"]))["corrupted"].lengths
        (3, 2)
    """
    from patchspec.metrics import RunInputs

    out: dict[str, Any] = {}
    for run in ("corrupted", "clean"):
        if session.has(run):  # type: ignore[arg-type]
            table = {} if positions is None else positions.of(run)  # type: ignore[arg-type]
            out[run] = RunInputs(
                tokens=session.tokens(run),  # type: ignore[arg-type]
                lengths=session.lengths(run),  # type: ignore[arg-type]
                named={k: tuple(v) for k, v in table.items()},
            )
    return out
