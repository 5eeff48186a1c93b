"""The model adapter: everything patchspec knows about a model, in one place.

Sizes, hook names and their gates, how a patch of each activation is written (the
``resid_mid`` rewrite), which block a hook lives in, the replay of blocks ``L``..end, the
unpatched runs with their caches, and a fingerprint of the weights for provenance. Nothing
else in patchspec reads ``model.cfg`` or parses a hook name.

To support a model whose hooks differ, register layouts with hook templates
(:func:`patchspec.layouts.register_layout`) or subclass :class:`ModelAdapter` and pass the
adapter wherever a model is taken (``spec.run(adapter, ...)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from patchspec.errors import HookError, InputError
from patchspec.layouts import LAYOUTS, Layout, layout
from patchspec.model.replay import Replay

if TYPE_CHECKING:
    from patchspec.model.lean import LeanReplay
from patchspec.plan.sizes import Sizes

log = logging.getLogger(__name__)

Hook = tuple[str, Callable[..., Any]]

#: Hook leaves that only run once a ``model.cfg`` flag is on, and the call that turns it on.
GATES: dict[str, tuple[str, str]] = {
    "hook_result": ("use_attn_result", "set_use_attn_result(True)"),
    "hook_q_input": ("use_split_qkv_input", "set_use_split_qkv_input(True)"),
    "hook_k_input": ("use_split_qkv_input", "set_use_split_qkv_input(True)"),
    "hook_v_input": ("use_split_qkv_input", "set_use_split_qkv_input(True)"),
    "hook_attn_in": ("use_attn_in", "set_use_attn_in(True)"),
    "hook_mlp_in": ("use_hook_mlp_in", "set_use_hook_mlp_in(True)"),
}

#: Number of values read from each parameter for the cheap fingerprint.
SAMPLE = 64

_ADAPTERS: weakref.WeakKeyDictionary[Any, ModelAdapter] = weakref.WeakKeyDictionary()
#: One re-entrant lock per model object: its hooks are state shared by every thread.
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
#: Guards the two tables above.
_TABLES = threading.Lock()


class ModelAdapter:
    """A TransformerLens model (``TransformerBridge``) as patchspec uses it.

    Args:
        model: The model.

    Example:
        >>> adapter = ModelAdapter.of(model)  # doctest: +SKIP
        >>> adapter.write_points("resid_mid", 1)  # doctest: +SKIP
        ('blocks.1.hook_resid_pre', 'blocks.1.hook_attn_out')
    """

    def __init__(self, model: Any) -> None:
        if isinstance(model, ModelAdapter):
            raise InputError("ModelAdapter takes a model, not another adapter")
        if not hasattr(model, "cfg") or not callable(model):
            raise InputError(
                f"expected a TransformerLens model (TransformerBridge), got {type(model).__name__}"
            )
        self.model = model
        self._verified: dict[tuple[Any, ...], bool] = {}
        #: Per input shape: the hook points the lean replay got wrong (``None``: not usable).
        self._lean: dict[tuple[Any, ...], frozenset[str] | None] = {}
        self._hashes: tuple[tuple[Any, ...], str] | None = None
        self._layouts: dict[str, Layout] = {}

    @classmethod
    def of(cls, model: Any) -> ModelAdapter:
        """The adapter of ``model`` (``model`` itself when it is one).

        The adapter of a model object is made once and kept while the model lives, so the check
        that replaying its blocks reproduces its forward pass runs once per input shape.
        """
        if isinstance(model, ModelAdapter):
            return model
        with _TABLES:
            try:
                adapter = _ADAPTERS.get(model)
            except TypeError:  # not weak-referenceable
                return cls(model)
            if adapter is None:
                adapter = cls(model)
                with contextlib.suppress(TypeError):
                    _ADAPTERS[model] = adapter
            return adapter

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model's lock for the block: sweeps of one model from several threads run
        one after the other (their hooks would otherwise fire on each other's passes).

        The lock belongs to the model object, whichever adapter wraps it, and is re-entrant:
        a sweep started inside another on the same thread (e.g. from a metric) does not wait.
        """
        with _TABLES:
            try:
                lock = _LOCKS.setdefault(self.model, threading.RLock())
            except TypeError:  # not weak-referenceable: one lock per adapter
                lock = self.__dict__.setdefault("_lock", threading.RLock())
        if not lock.acquire(blocking=False):
            log.debug("model %s is busy in another thread; waiting for it", self.name)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # --- what the model is --------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        """The model's TransformerLens config."""
        return self.model.cfg

    @property
    def name(self) -> str:
        """The model's name, for provenance."""
        return str(getattr(self.cfg, "model_name", None) or type(self.model).__name__)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (falls back to ``model.cfg.device``)."""
        try:
            return next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            return torch.device(getattr(self.cfg, "device", None) or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point parameters."""
        params = getattr(self.model, "parameters", lambda: iter(()))()
        return next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    @property
    def d_vocab(self) -> int:
        """Vocabulary size (0 when unknown)."""
        return int(getattr(self.cfg, "d_vocab", 0) or 0)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or ``None``."""
        return getattr(self.model, "tokenizer", None)

    def sizes(self, batch: int, seq: int) -> Sizes:
        """Sizes of every dim for inputs of ``batch`` prompts of ``seq`` tokens."""
        cfg = self.cfg
        return Sizes(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            d_model=cfg.d_model,
            d_head=cfg.d_head,
            d_mlp=getattr(cfg, "d_mlp", None) or 4 * cfg.d_model,
            batch=batch,
            seq=seq,
        )

    def check_eval_mode(self) -> None:
        """Refuse a model in training mode (dropout would make every cell random).

        Raises:
            InputError: some module of the model is in training mode.
        """
        # TransformerLens's wording ("evaluation mode"), which code may match on; the wrapped
        # HuggingFace model counts too.
        found: dict[int, str] = {}
        roots = (("", self.model), ("original_model", getattr(self.model, "original_model", None)))
        for prefix, root in roots:
            if not isinstance(root, torch.nn.Module):
                continue
            for name, module in root.named_modules():
                if module.training:
                    found.setdefault(id(module), ".".join(p for p in (prefix, name) if p) or "<root>")
        training = list(found.values())
        if training:
            more = f" and {len(training) - 3} more" if len(training) > 3 else ""
            raise InputError(
                "patching requires the model and all submodules to be in evaluation mode; found "
                f"training mode at {', '.join(training[:3])}{more}. Call model.eval() before "
                "patching"
            )

    # --- hooks --------------------------------------------------------------------------------
    def hook_name(self, activation: str, layer: int) -> str:
        """The hook point holding ``activation`` at ``layer``."""
        row = layout(activation)
        name = row.hook_name(layer)
        self._layouts[name] = row
        return name

    def write_points(self, activation: str, layer: int) -> tuple[str, ...]:
        """The hook points a patch of ``activation`` at ``layer`` registers, in order.

        ``resid_mid`` is written by reading ``resid_pre`` and rewriting ``attn_out`` of the same
        block (TransformerBridge's ``hook_resid_mid`` only feeds the second norm).
        """
        name = self.hook_name(activation, layer)
        if layout(activation).writer == "resid_mid":
            block = name.rsplit(".", 1)[0]
            return (f"{block}.hook_resid_pre", f"{block}.hook_attn_out")
        return (name,)

    def block(self, activation: str, layer: int) -> int | None:
        """The first block a patch of ``activation`` at ``layer`` touches (``None``: outside
        the block stack, so a pass cannot start late)."""
        blocks = [_block_index(name) for name in self.write_points(activation, layer)]
        if any(b is None for b in blocks):
            return None
        return min(b for b in blocks if b is not None)

    def position_axes(self, hook_name: str) -> tuple[int, ...]:
        """Axes of the activation at ``hook_name`` that index token positions."""
        row = self._layouts.get(hook_name) or layout_of(hook_name)
        return row.position_dims if row is not None else (1,)

    def check_hooks(self, sites: Iterable[tuple[str, int]]) -> None:
        """Fail before any forward pass when a hook point is missing or gated behind a flag.

        Args:
            sites: ``(activation, layer)`` pairs; each one's hook (which sources read) and its
                write points are checked.

        Raises:
            HookError: a hook is unknown to the model or needs a ``set_use_*`` flag.
        """
        hook_dict = getattr(self.model, "hook_dict", {})
        names: list[str] = []
        for activation, layer in sites:
            names.append(self.hook_name(activation, layer))
            names.extend(self.write_points(activation, layer))
        for name in dict.fromkeys(names):
            if name not in hook_dict:
                architecture = getattr(self.cfg, "architecture", None) or type(self.model).__name__
                raise HookError(
                    f"the model has no hook point {name!r} (architecture {architecture}); this "
                    "activation cannot be patched on it"
                )
            leaf = name.rsplit(".", 1)[-1]
            row = self._layouts.get(name)
            gate = GATES.get(leaf) or (
                (row.gate, f"set_{row.gate}(True)") if row is not None and row.gate else None
            )
            if gate is not None and not bool(getattr(self.cfg, gate[0], False)):
                raise HookError(f"hook {name!r} is gated: call model.{gate[1]} before patching it")

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[Hook]) -> Iterator[None]:
        """Register forward hooks for the duration of the block."""
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            yield

    # --- runs ---------------------------------------------------------------------------------
    def run_with_hooks(
        self, tokens: Int[torch.Tensor, "batch pos"], fwd_hooks: Sequence[Hook]
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits of one full forward pass with ``fwd_hooks`` registered."""
        return self.model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))

    def run_with_cache(
        self, tokens: Int[torch.Tensor, "batch pos"], hook_names: Iterable[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the activations at ``hook_names`` of one unpatched pass (detached)."""
        names = set(hook_names)
        logits, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        return logits.detach(), {k: v.detach() for k, v in cache.items()}

    def run_recording(
        self, tokens: Int[torch.Tensor, "batch pos"], hook_names: Iterable[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Replay | None]:
        """:meth:`run_with_cache`, also recording every block's inputs for a replay.

        Returns:
            The logits, the activations, and the checked replay of this pass (``None`` when the
            model cannot be replayed exactly).
        """
        with Replay.recording(self.model) as recorder:
            logits, cache = self.run_with_cache(tokens, hook_names)
        return logits, cache, self.checked(recorder.replay(int(tokens.shape[0])), logits)

    def checked(self, replay: Replay | None, logits: torch.Tensor) -> Replay | None:
        """``replay`` if replaying it reproduces ``logits`` (the model's own pass), else ``None``.

        The check runs once per input shape, dtype and device.
        """
        if replay is None:
            return None
        key = (replay.batch, *tuple(logits.shape[1:2]), logits.dtype, logits.device)
        if key not in self._verified:
            self._verified[key] = replay.matches(logits, 0)
            if not self._verified[key]:
                log.debug(
                    "replaying recorded block inputs of %s does not reproduce its forward pass; "
                    "falling back to full forward passes",
                    type(self.model).__name__,
                )
        return replay if self._verified[key] else None

    def lean(self, replay: Replay | None, tokens: torch.Tensor, logits: torch.Tensor) -> LeanReplay | None:
        """The lean replay of a recorded pass (:mod:`patchspec.model.lean`), or ``None``.

        The first time per input shape, dtype and device every hook point it models is checked
        against the model's own ``run_with_cache`` (one extra unpatched pass); later passes of
        that shape check the logits only.
        """
        if replay is None:
            return None
        from patchspec.model import lean as lean_module

        key = (replay.batch, *tuple(logits.shape[1:2]), logits.dtype, logits.device)
        if key in self._lean and self._lean[key] is None:
            return None
        every = lean_module.hook_points(len(self.model.blocks))
        cache = None
        if key not in self._lean:
            hook_dict = getattr(self.model, "hook_dict", {})  # rebuilt by the bridge on each read
            _, cache = self.run_with_cache(tokens, [n for n in every if n in hook_dict])
        built = lean_module.build(self.model, replay, logits, cache)
        if built is None:
            self._lean[key] = None
            return None
        if key not in self._lean:
            self._lean[key] = every - built.supported
        built.drop(self._lean[key] or ())
        return built

    # --- provenance ---------------------------------------------------------------------------
    def fingerprint(self, *, full: bool = False) -> dict[str, str]:
        """Provenance of the weights: a cheap fingerprint, and the full SHA-256 if asked.

        The fingerprint hashes every parameter's name, shape and dtype and up to
        :data:`SAMPLE` evenly spaced values of it (one transfer from the device in all); the
        full hash reads every byte (about 1 GB/s) and is kept until a parameter changes.
        """
        params = list(getattr(self.model, "named_parameters", lambda: iter(()))())
        hasher = hashlib.sha256()
        samples = []
        for name, p in params:
            hasher.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLE)
            samples.append(flat[::step][:SAMPLE].float())
        if samples:
            hasher.update(torch.cat(samples).cpu().numpy().tobytes())
        out = {"model": self.name, "model_fingerprint": hasher.hexdigest()}
        if full:
            out["model_weights_sha256"] = self.weights_hash()
        return out

    def weights_hash(self) -> str:
        """SHA-256 of the parameters (names, shapes, dtypes and bytes), kept until one changes."""
        from patchspec.results import weights_hash

        params = list(self.model.named_parameters())
        key = tuple((name, id(p), p.data_ptr(), p._version) for name, p in params)
        if self._hashes is None or self._hashes[0] != key:
            self._hashes = (key, weights_hash(self.model))
        return self._hashes[1]


def _block_index(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def layout_of(hook_name: str) -> Layout | None:
    """The layout whose hook at some layer is ``hook_name``, or ``None``."""
    index = _block_index(hook_name)
    for row in LAYOUTS.values():
        if index is not None and row.hook_name(index) == hook_name:
            return row
    return None
