"""The session of a sweep: the two unpatched runs it compares, and what they cache.

:class:`Session` turns prompts into tokens, checks that clean and corrupted inputs line up,
measures padding, and caches exactly the activations the sweep's grids read, each run at most
once; it also records the replay of each receiving run once for all the sweep's specs. It is
what value sources read (the :class:`patchspec.sources.Runs` protocol).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from jaxtyping import Float, Int

from patchspec.errors import InputError
from patchspec.model.adapter import ModelAdapter
from patchspec.model.replay import Replay
from patchspec.sources import Receiver

Tokens = Int[torch.Tensor, "batch pos"]
Prompts = str | list[str] | Tokens


def to_tokens(model: Any, prompts: Prompts, what: str) -> Tokens:
    """Tokens of ``prompts`` on the model's device, shaped ``[batch, pos]``.

    Raises:
        InputError: the prompts are neither strings nor an integer tensor.
    """
    if isinstance(prompts, str | list) and all(isinstance(p, str) for p in _as_list(prompts)):
        if getattr(model, "tokenizer", None) is None:
            raise InputError(f"{what} prompts are strings but the model has no tokenizer; pass tokens")
        if isinstance(prompts, list) and len(prompts) > 1:
            # Right padding keeps every real token of a causal model exactly as unpadded, with
            # no attention mask (patched forwards pass none); see pad_to and Session.real_mask.
            tokens = model.to_tokens(prompts, padding_side="right")
        else:
            tokens = model.to_tokens(prompts)
    elif isinstance(prompts, torch.Tensor):
        tokens = prompts
    else:
        raise InputError(
            f"{what} must be a string, a list of strings or a [batch, pos] token tensor, "
            f"got {type(prompts).__name__}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InputError(f"{what} tokens must be integers, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2:
        raise InputError(f"{what} tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    return tokens.to(ModelAdapter.of(model).device)


def _as_list(prompts: str | list[Any]) -> list[Any]:
    return [prompts] if isinstance(prompts, str) else prompts


def prompt_texts(prompts: Any) -> list[str] | None:
    """The prompts as a list of strings when they were given as text, else ``None``."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    return None


def _pad_id(model: Any) -> int | None:
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return None if pad is None else int(pad)


def pad_to(model: Any, tokens: Tokens, length: int) -> Tokens:
    """``tokens`` right-padded with the tokenizer's pad token to ``length`` positions.

    Raises:
        InputError: padding is needed but the tokenizer has no pad token.
    """
    missing = length - tokens.shape[1]
    if missing <= 0:
        return tokens
    pad = _pad_id(model)
    if pad is None:
        raise InputError(
            "prompts of different token lengths must be padded, but the tokenizer has no pad "
            "token; set model.tokenizer.pad_token or pass padded tokens"
        )
    return torch.nn.functional.pad(tokens, (0, missing), value=pad)


class Session:
    """Clean and corrupted inputs with lazily cached logits and activations.

    Args:
        model: A TransformerLens model (``TransformerBridge``) or its adapter.
        clean: Clean prompts or tokens (``None`` when only ``clean_cache`` is known).
        corrupted: Corrupted prompts or tokens.
        hook_names: The hook points whose activations sources may read.
        clean_cache: Pre-computed clean activations (e.g. an ``ActivationCache``).
        reference: Reference datasets for ``Mean(over=...)``.

    Raises:
        InputError: prompts of the wrong type, or clean and corrupted inputs of different
            shapes.
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
    ) -> None:
        self.adapter = ModelAdapter.of(model)
        self.model = model = self.adapter.model
        self.corrupted_tokens = to_tokens(model, corrupted, "corrupted")
        self.clean_tokens = None if clean is None else to_tokens(model, clean, "clean")
        self._text: dict[Receiver, list[str]] = {}
        for which, prompts in (("corrupted", corrupted), ("clean", clean)):
            texts = prompt_texts(prompts)
            if texts is not None:
                self._text[which] = texts  # type: ignore[index]
        if len(self._text) == 2 and self.clean_tokens is not None:
            # Text prompts padded separately may differ in length; pad both to the longer.
            length = max(self.clean_tokens.shape[1], self.corrupted_tokens.shape[1])
            self.clean_tokens = pad_to(model, self.clean_tokens, length)
            self.corrupted_tokens = pad_to(model, self.corrupted_tokens, length)
        if self.clean_tokens is not None and self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise InputError(
                f"clean and corrupted tokens must have the same shape, got clean "
                f"{tuple(self.clean_tokens.shape)} and corrupted {tuple(self.corrupted_tokens.shape)}; "
                "pad or choose prompts of equal token length"
            )
        self.hook_names = set(hook_names)
        self._caches: dict[Receiver, Mapping[str, torch.Tensor]] = {}
        self._logits: dict[Receiver, torch.Tensor] = {}
        if clean_cache is not None:
            self._caches["clean"] = clean_cache
        if reference is None or isinstance(reference, Mapping):
            self._references: dict[str, Prompts] = dict(reference or {})
        else:
            self._references = {"reference": reference}
        self._reference_caches: dict[str, dict[str, torch.Tensor]] = {}
        self._memo: dict[Any, torch.Tensor] = {}
        self._lengths: dict[Receiver, tuple[int, ...]] = {}
        self._replays: dict[Receiver, Replay | None] = {}

    @property
    def batch(self) -> int:
        """Number of prompts."""
        return int(self.corrupted_tokens.shape[0])

    @property
    def seq(self) -> int:
        """Sequence length in tokens."""
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

    # --- what value sources and named positions read ------------------------------------------
    def memo(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, computed once per sweep for each hashable ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def lengths(self, which: Receiver) -> tuple[int, ...]:
        """The number of real (unpadded) tokens of each prompt of one run.

        Text prompts are tokenized one by one; token tensors are read as right-padded with the
        tokenizer's pad token (trailing pad tokens are padding).

        Raises:
            InputError: the tokens are left-padded (patched forwards pass no attention mask, so
                left-padded prompts would be computed wrongly).
        """
        if which not in self._lengths:
            self._lengths[which] = self._measure(which)
        return self._lengths[which]

    def _measure(self, which: Receiver) -> tuple[int, ...]:
        tokens = self.tokens(which)
        seq = int(tokens.shape[1])
        if which in self._text:
            return tuple(min(seq, int(self.model.to_tokens(p).shape[1])) for p in self._text[which])
        pad = _pad_id(self.model)
        if pad is None:
            return (seq,) * int(tokens.shape[0])
        real = tokens.ne(pad).cpu()
        lengths = []
        for b, row in enumerate(real.tolist()):
            last = max((i for i, r in enumerate(row) if r), default=-1) + 1
            first = row.index(True) if True in row else 0
            bos = getattr(getattr(self.model, "tokenizer", None), "bos_token_id", None)
            if first > 1 or (first == 1 and bos != pad):
                raise InputError(
                    f"{which} prompt {b} is left-padded ({first} leading pad tokens, pad id "
                    f"{pad}); patched forward passes run without an attention mask, so pad "
                    "on the right (tokenizer.padding_side = 'right') or pass the prompts as text"
                )
            lengths.append(last)
        return tuple(lengths)

    def real_mask(self, which: Receiver) -> torch.Tensor | None:
        """``[batch, pos]``: True at real tokens, False at padding; ``None`` when unpadded."""
        if which not in self._text and _pad_id(self.model) is None:
            return None
        lengths = self.lengths(which)
        if all(n == self.seq for n in lengths):
            return None
        device = self.tokens(which).device
        positions = torch.arange(self.seq, device=device)
        return positions < torch.tensor(lengths, device=device).unsqueeze(1)

    def reference(self, name: str, hook_name: str) -> torch.Tensor:
        """The activation at ``hook_name`` of the reference dataset ``name`` (run once).

        Raises:
            InputError: no reference dataset of that name was passed to the sweep.
        """
        if name not in self._reference_caches:
            tokens = self._reference_tokens(name)
            _, self._reference_caches[name] = self.adapter.run_with_cache(tokens, self.hook_names)
        try:
            return self._reference_caches[name][hook_name]
        except KeyError:
            raise InputError(
                f"the reference dataset {name!r} has no activation {hook_name!r}"
            ) from None

    def _reference_tokens(self, name: str) -> Tokens:
        if name not in self._references:
            given = ", ".join(map(repr, self._references)) or "none"
            raise InputError(
                f"Mean(over={name!r}) needs a reference dataset {name!r}; pass "
                f"reference=tokens (named 'reference') or reference={{{name!r}: tokens}} to "
                f"run() (given: {given})"
            )
        return to_tokens(self.model, self._references[name], f"reference {name!r}")

    def check_reference(self, name: str) -> None:
        """Raise unless the reference dataset ``name`` was given with the prompts' token length.

        Raises:
            InputError: no such dataset, or its prompts have another token length.
        """
        seq = int(self._reference_tokens(name).shape[1])
        if seq != self.seq:
            raise InputError(
                f"reference dataset {name!r} has prompts of {seq} tokens, but the sweep's "
                f"prompts have {self.seq}; a mean over a reference dataset needs prompts of the "
                "same token length"
            )
