"""Replaying blocks ``L``..end of a model from the inputs they received in a recorded pass.

A cell that patches layer ``L`` only changes layers ``L`` and later. :meth:`Replay.capture`
runs the receiving input once, unpatched, recording what every block receives (the hidden
state and whatever else the block's forward takes: attention mask, position ids, rotary
cos/sin) with forward pre-hooks; :meth:`Replay.run` then computes the logits of ``copies``
stacked copies of the batch (copy-major) from any recorded block on, with the model's hook
points firing as in a full pass for the blocks that run. TransformerBridge's own
``start_at_layer`` is not used: it still runs the earlier blocks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch

log = logging.getLogger(__name__)


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return isinstance(value, Cache)


def _expand(value: Any, copies: int, batch: int) -> Any:
    """A recorded block input for ``copies`` stacked copies of the batch.

    Tensors whose first dim is the batch are repeated copy-major; others (broadcast position
    tensors) are kept; key/value caches are dropped (the replay computes no cache).
    """
    if isinstance(value, torch.Tensor):
        if copies > 1 and value.ndim > 0 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(_expand(v, copies, batch) for v in value)
    if isinstance(value, list):
        return [_expand(v, copies, batch) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, copies, batch) for k, v in value.items()}
    if _is_cache(value):
        return None
    return value


@attrs.frozen
class _Inputs:
    """What one block received: positional and keyword arguments, hidden state apart."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden: torch.Tensor
    hidden_kw: bool  # passed as ``hidden_states=`` rather than first positional argument


class Recorder:
    """The block inputs seen during one forward pass (see :meth:`Replay.recording`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.usable = True
        self.inputs: dict[int, _Inputs] = {}

    def hook(self, index: int) -> Callable[..., None]:
        """A forward pre-hook recording what block ``index`` receives."""

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.inputs[index] = _Inputs(args[1:], dict(kwargs), args[0].clone(), False)
            elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.inputs[index] = _Inputs(args, rest, kwargs["hidden_states"].clone(), True)

        return record

    def replay(self, batch: int) -> Replay | None:
        """The replay of the recorded pass (``None`` when some block's input was not seen)."""
        if not self.usable:
            return None
        blocks = self.model.blocks
        if len(self.inputs) != len(blocks):
            log.debug(
                "recorded inputs of %d of %d blocks; replay disabled", len(self.inputs), len(blocks)
            )
            return None
        return Replay(self.model, dict(self.inputs), batch)


class Replay:
    """Runs blocks ``L``..end of a model from the inputs they received in a recorded pass.

    Built by :meth:`capture` or :meth:`recording`; :meth:`run` then computes the logits of ``copies`` stacked
    copies of the recorded batch, starting at any recorded block. Hooks registered on the
    model's hook points fire as in a full forward pass, for the blocks that run.
    """

    def __init__(self, model: Any, inputs: dict[int, _Inputs], batch: int) -> None:
        self.model = model
        self.inputs = inputs
        self.batch = batch
        self._expanded: dict[tuple[int, int], tuple[tuple[Any, ...], dict[str, Any]]] = {}

    @classmethod
    @contextlib.contextmanager
    def recording(cls, model: Any) -> Iterator[Recorder]:
        """Record every block's inputs during whatever forward pass runs inside the block.

        Example:
            >>> with Replay.recording(model) as recorder:  # doctest: +SKIP
            ...     logits = model(tokens)
            >>> replay = recorder.replay(batch=tokens.shape[0])  # doctest: +SKIP
        """
        recorder = Recorder(model)
        blocks = getattr(model, "blocks", None)
        usable = (
            isinstance(blocks, torch.nn.ModuleList)
            and len(blocks) > 0
            and isinstance(getattr(model, "ln_final", None), torch.nn.Module)
            and isinstance(getattr(model, "unembed", None), torch.nn.Module)
        )
        if not usable or blocks is None:
            log.debug("%s has no blocks/ln_final/unembed to replay", type(model).__name__)
            recorder.usable = False
            yield recorder
            return
        handles = [
            b.register_forward_pre_hook(recorder.hook(i), with_kwargs=True)
            for i, b in enumerate(blocks)
        ]
        try:
            yield recorder
        finally:
            for handle in handles:
                handle.remove()

    @classmethod
    def capture(cls, model: Any, tokens: torch.Tensor) -> tuple[Replay | None, torch.Tensor]:
        """Run ``tokens`` once, unpatched, recording every block's inputs.

        Returns:
            The replay (``None`` when the model has no usable block stack) and the logits of
            the unpatched pass.
        """
        with cls.recording(model) as recorder:
            logits = model(tokens)
        return recorder.replay(int(tokens.shape[0])), logits

    def _block_inputs(self, index: int, copies: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        key = (index, copies)
        if key not in self._expanded:
            recorded = self.inputs[index]
            args = _expand(recorded.args, copies, self.batch)
            kwargs = _expand(recorded.kwargs, copies, self.batch)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self._expanded[key] = (args, kwargs)
        return self._expanded[key]

    def run(self, layer: int, copies: int, positions: Sequence[int] | None = None) -> torch.Tensor:
        """Logits ``[copies * batch, pos, vocab]`` from block ``layer`` on, unembedded at
        ``positions`` only (all when ``None``)."""
        hidden = _expand(self.inputs[layer].hidden, copies, self.batch)
        for index in range(layer, len(self.model.blocks)):
            args, kwargs = self._block_inputs(index, copies)
            if self.inputs[index].hidden_kw:
                out = self.model.blocks[index](*args, hidden_states=hidden, **kwargs)
            else:
                out = self.model.blocks[index](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if positions is not None:
            hidden = hidden[:, list(positions)]
        return self.model.unembed(self.model.ln_final(hidden))

    def matches(self, logits: torch.Tensor, layer: int) -> bool:
        """Whether replaying two copies from ``layer`` reproduces the model's own ``logits``."""
        try:
            got = self.run(layer, 2)
        except Exception as err:  # any failure means: this model cannot be replayed
            log.debug("batched engine: replay from block %d failed (%r)", layer, err)
            return False
        want = logits.repeat(2, *([1] * (logits.ndim - 1)))
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return False
        eps = torch.finfo(want.dtype).eps if want.dtype.is_floating_point else 0.0
        scale = 1.0 + float(want.abs().max())
        return bool(((got - want).abs() <= scale * max(1e-4, 32 * eps)).all())
