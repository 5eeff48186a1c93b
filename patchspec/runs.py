"""The two unpatched runs a sweep compares: tokens, logits and cached activations.

:class:`Runs` turns prompts into tokens, checks that clean and corrupted inputs line up, and
caches exactly the activations a plan reads, each run at most once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from jaxtyping import Float, Int

from patchspec.errors import InputError
from patchspec.sources import Receiver

Tokens = Int[torch.Tensor, "batch pos"]
Prompts = str | list[str] | Tokens


def model_device(model: Any) -> torch.device:
    """The device of the model's parameters (falls back to ``model.cfg.device``)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(model.cfg, "device", None) or "cpu")


def check_eval_mode(model: Any) -> None:
    """Refuse a model in training mode (dropout would make every cell random).

    Raises:
        InputError: some module of the model is in training mode.
    """
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        raise InputError(
            f"the model is in training mode ({shown}); call model.eval() before patching"
        )


def to_tokens(model: Any, prompts: Prompts, what: str) -> Tokens:
    """Tokens of ``prompts`` on the model's device, shaped ``[batch, pos]``.

    Raises:
        InputError: the prompts are neither strings nor an integer tensor.
    """
    if isinstance(prompts, str | list) and all(isinstance(p, str) for p in _as_list(prompts)):
        if getattr(model, "tokenizer", None) is None:
            raise InputError(f"{what} prompts are strings but the model has no tokenizer; pass tokens")
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
    return tokens.to(model_device(model))


def _as_list(prompts: str | list[Any]) -> list[Any]:
    return [prompts] if isinstance(prompts, str) else prompts


class Runs:
    """Clean and corrupted inputs with lazily cached logits and activations.

    Args:
        model: A TransformerLens model (``TransformerBridge``).
        clean: Clean prompts or tokens (``None`` when only ``clean_cache`` is known).
        corrupted: Corrupted prompts or tokens.
        hook_names: The hook points whose activations sources may read.
        clean_cache: Pre-computed clean activations (e.g. an ``ActivationCache``).
    """

    def __init__(
        self,
        model: Any,
        clean: Prompts | None,
        corrupted: Prompts,
        *,
        hook_names: Iterable[str] = (),
        clean_cache: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.corrupted_tokens = to_tokens(model, corrupted, "corrupted")
        self.clean_tokens = None if clean is None else to_tokens(model, clean, "clean")
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

    def _run(self, which: Receiver) -> None:
        names = self.hook_names
        logits, cache = self.model.run_with_cache(
            self.tokens(which), names_filter=lambda name: name in names
        )
        self._logits[which] = logits.detach()
        self._caches.setdefault(which, {k: v.detach() for k, v in cache.items()})

    def logits(self, which: Receiver) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits of the unpatched run (computed once)."""
        if which not in self._logits:
            self._run(which)
        return self._logits[which]

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

    def clean(self, hook_name: str) -> torch.Tensor:
        """The clean run's activation at ``hook_name``."""
        return self.activation("clean", hook_name)

    def corrupted(self, hook_name: str) -> torch.Tensor:
        """The corrupted run's activation at ``hook_name``."""
        return self.activation("corrupted", hook_name)
