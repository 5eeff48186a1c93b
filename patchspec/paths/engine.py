"""The exact batched path engine: many (sender, receiver) rows per forward pass.

Path patching (Wang et al. 2022, "Interpretability in the Wild"; Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching") asks how much of a sender's effect reaches the
metric *through one receiver*. A sender writes ``delta = source - receiving`` into the residual
stream (for a head: its ``z`` difference times ``W_O``). The receiver (a head's query, key or
value input, an MLP's input, or the final residual) reads the residual stream *before its own
LayerNorm*; the patched run is the receiving run with ``delta_r`` added to the receiver's own
copy of its input only, everything downstream of the receiver recomputed:

* **direct**: ``delta_r = delta`` (only the sender -> receiver edge carries the patched value;
  every other reader of the sender's write sees the receiving run's value);
* **through MLPs**: ``delta_r`` is the change of the receiver's residual input when the sender is
  patched, every attention layer is frozen at the receiving run and only MLPs recompute (a first
  pass, batched over senders), so the paths sender -> MLPs -> receiver count as well.

Rows sharing a receiver layer share one forward pass, replayed from that layer
(:class:`patchspec.model.replay.Replay`), ``rows`` stacked copies of the batch (copy-major); a
receiver of the final residual needs no block at all (final norm and unembedding only). Chunks
are sized from a memory budget. A query/key/value receiver's patched projection
``ln1(x + delta) @ W + b`` is computed here and written at ``hook_q``/``hook_k``/``hook_v``
(checked once per layer against the model's own projection); where that check fails, the
per-head inputs of the attention (``hook_q_input`` ...) are patched instead, which need
``cfg.use_split_qkv_input``: :func:`split_qkv_input` turns it on and restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from jaxtyping import Float

from patchspec.errors import HookError, InputError
from patchspec.execute.hooks import FireCounter, Hook
from patchspec.execute.schedule import CPU_TOKENS_PER_FORWARD, bytes_per_cell, default_budget
from patchspec.model.adapter import ModelAdapter
from patchspec.options import parse_memory
from patchspec.plan.sizes import Sizes

#: Activations a sender may be.
SENDERS = ("z", "attn_out", "mlp_out", "resid_pre")
#: Inputs a receiver may be.
RECEIVERS = ("q", "k", "v", "mlp_in", "logits")
#: How the sender's effect reaches the receiver.
THROUGH = ("direct", "mlp")

Activations = Callable[[str], torch.Tensor]

#: Compute a query/key/value receiver's patched projection directly (``ln1(x + delta) @ W + b``,
#: checked once per receiver layer against the model's own ``hook_q``/``hook_k``/``hook_v``)
#: instead of through the gated per-head inputs; ``False`` forces the per-head inputs.
PROJECT = True


@attrs.frozen
class Sender:
    """One sender: an activation at a layer, one head of it (``z``) and one position or all."""

    activation: str
    layer: int
    head: int | None = None
    pos: int | None = None

    @property
    def stage(self) -> int:
        """Where it writes in the residual stream: ``2 * layer`` before block ``layer``'s
        attention, ``+1`` after its attention, ``+2`` after its MLP."""
        return (
            2 * self.layer + {"resid_pre": 0, "z": 1, "attn_out": 1, "mlp_out": 2}[self.activation]
        )


@attrs.frozen
class Target:
    """One receiver: a head's query/key/value input, an MLP's input, or the final residual."""

    kind: str
    layer: int = 0
    head: int | None = None

    def stage(self, n_layers: int) -> int:
        """Where it reads the residual stream (see :attr:`Sender.stage`)."""
        if self.kind == "logits":
            return 2 * n_layers
        return 2 * self.layer + (1 if self.kind == "mlp_in" else 0)

    def hook_name(self, n_layers: int) -> str:
        """The hook point of its (pre-LayerNorm) input."""
        if self.kind in ("q", "k", "v"):
            return f"blocks.{self.layer}.attn.hook_{self.kind}_input"
        if self.kind == "mlp_in":
            return f"blocks.{self.layer}.hook_resid_mid"
        return f"blocks.{n_layers - 1}.hook_resid_post"


def reads(sender: Sender, target: Target, n_layers: int) -> bool:
    """Whether ``target`` reads what ``sender`` writes (it comes after it in the stream)."""
    return sender.stage <= target.stage(n_layers)


def residual_hook(stage: int, n_layers: int) -> str:
    """The hook holding the residual stream at ``stage`` (see :attr:`Sender.stage`)."""
    if stage >= 2 * n_layers:
        return f"blocks.{n_layers - 1}.hook_resid_post"
    layer, mid = divmod(stage, 2)
    return f"blocks.{layer}.hook_resid_mid" if mid else f"blocks.{layer}.hook_resid_pre"


def sender_hook(sender: Sender) -> str:
    """The hook whose source/receiving difference a sender writes."""
    if sender.activation == "z":
        return f"blocks.{sender.layer}.attn.hook_z"
    return f"blocks.{sender.layer}.hook_{sender.activation}"


def needed_hooks(
    senders: Sequence[Sender], targets: Sequence[Target], n_layers: int, through: str
) -> set[str]:
    """Every activation of the receiving run (and the source run: sender hooks) a sweep reads."""
    names = {sender_hook(s) for s in senders}
    names |= {residual_hook(t.stage(n_layers), n_layers) for t in targets if t.kind == "logits"}
    for t in targets:
        if t.kind in ("q", "k", "v"):
            names |= {f"blocks.{t.layer}.hook_resid_pre", f"blocks.{t.layer}.attn.hook_{t.kind}"}
    if through == "mlp":
        names |= {residual_hook(t.stage(n_layers), n_layers) for t in targets}
        names |= {f"blocks.{layer}.hook_attn_out" for layer in range(n_layers)}
        names |= {f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)}
    return names


@contextlib.contextmanager
def split_qkv_input(model: Any) -> Iterator[None]:
    """Turn on the per-head pre-LayerNorm query/key/value inputs for the block, restoring the
    caller's ``use_split_qkv_input`` and ``use_attn_in`` flags on exit (also on error).

    The two are exclusive in TransformerLens, so ``use_attn_in`` goes off first.
    """
    cfg = model.cfg
    saved_split = bool(getattr(cfg, "use_split_qkv_input", False))
    saved_attn_in = bool(getattr(cfg, "use_attn_in", False))
    try:
        if saved_attn_in:
            model.set_use_attn_in(False)
        if not saved_split:
            model.set_use_split_qkv_input(True)
        yield
    finally:
        if bool(getattr(cfg, "use_split_qkv_input", False)) != saved_split:
            model.set_use_split_qkv_input(saved_split)
        if saved_attn_in and not bool(getattr(cfg, "use_attn_in", False)):
            model.set_use_attn_in(True)


def sender_delta(
    model: Any, sender: Sender, source: Activations, receiving: Activations
) -> Float[torch.Tensor, "batch pos d_model"]:
    """What patching ``sender`` adds to the residual stream: ``source - receiving`` (a head's
    through its ``W_O``), at ``sender.pos`` only when it is given."""
    name = sender_hook(sender)
    if sender.activation == "z":
        w_o = model.blocks[sender.layer].attn.W_O[sender.head]
        delta = source(name)[:, :, sender.head] @ w_o - receiving(name)[:, :, sender.head] @ w_o
    else:
        delta = source(name) - receiving(name)
    if sender.pos is not None:
        keep = torch.zeros(delta.shape[1], 1, dtype=delta.dtype, device=delta.device)
        keep[sender.pos] = 1
        delta = delta * keep
    return delta


def rows_per_pass(
    adapter: ModelAdapter,
    sizes: Sizes,
    n_positions: int,
    max_memory: str | int | float | None,
    limit: int | None,
) -> int:
    """How many (sender, receiver) rows share one forward: the batched engine's per-cell memory
    estimate plus the per-head query/key/value inputs (``(n_heads + 2 n_kv_heads) d_model`` per
    token) and the row's residual difference."""
    itemsize = torch.empty((), dtype=adapter.dtype).element_size()
    per_row = bytes_per_cell(sizes, adapter.d_vocab, n_positions, itemsize)
    per_row += (
        sizes.batch
        * sizes.seq
        * sizes.d_model
        * itemsize
        * (sizes.n_heads + 2 * sizes.n_kv_heads + 2)
    )
    if max_memory is not None:
        by_memory = max(1, parse_memory(max_memory) // per_row)
        return by_memory if limit is None else min(limit, by_memory)
    if limit is not None:
        return limit
    rows = max(1, default_budget(adapter.device) // per_row)
    if adapter.device.type == "cpu":
        rows = min(rows, max(1, CPU_TOKENS_PER_FORWARD // max(1, sizes.batch * sizes.seq)))
    return rows


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@attrs.define
class PathRun:
    """One sweep of paths: the model, the two runs' activations and how the logits are read.

    Attributes:
        adapter: The model adapter.
        tokens: Tokens of the receiving run (for full passes when there is no replay).
        replay: The receiving run's replay (``None``: full forward passes).
        source: Activations of the run the patched values come from, by hook name.
        receiving: Activations of the receiving run, by hook name.
        evaluate: ``(logits [rows * batch, pos, vocab], rows) -> [rows, ...]`` values.
        positions: The positions the metric reads (``None``: all).
        rows: Rows per forward pass (see :func:`rows_per_pass`).
        stats: Forward passes run, by kind.
    """

    adapter: ModelAdapter
    tokens: torch.Tensor
    replay: Any
    source: Activations
    receiving: Activations
    evaluate: Callable[[torch.Tensor, int], torch.Tensor]
    positions: tuple[int, ...] | None
    rows: int
    stats: dict[str, int] = attrs.field(factory=lambda: {"forwards": 0, "mlp_passes": 0, "rows": 0})
    _projects: dict[tuple[str, int], bool] = attrs.field(factory=dict, init=False)

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def n_layers(self) -> int:
        return int(self.adapter.cfg.n_layers)

    def _forward(
        self, layer: int, copies: int, hooks: list[Hook], positions: tuple[int, ...] | None
    ) -> torch.Tensor:
        """Logits of ``copies`` stacked copies from block ``layer`` on, with ``hooks``; every
        hook must fire once."""
        counter = FireCounter()
        counted = counter.counted(hooks)
        if self.replay is not None:
            with self.adapter.hooks(counted):
                logits = self.replay.run(layer, copies, positions)
        else:
            logits = self.adapter.run_with_hooks(self.tokens.repeat(copies, 1), counted)
            if positions is not None:
                logits = logits[:, list(positions)]
        counter.check()
        self.stats["forwards"] += 1
        return logits

    # --- through MLPs: the receivers' inputs with attention frozen ------------------------------
    def mlp_deltas(
        self, senders: Sequence[Sender], stages: Sequence[int]
    ) -> dict[int, dict[int, torch.Tensor]]:
        """For each sender, the change of the residual stream at each of ``stages`` when the
        sender is patched, every attention output is frozen at the receiving run and MLPs
        recompute; batched over senders, one pass per chunk from the earliest sender's block."""
        out: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(len(senders))}
        n = self.n_layers
        order = sorted(range(len(senders)), key=lambda i: senders[i].layer)
        for chunk in _chunks(order, self.rows):
            start = min(senders[i].layer for i in chunk)
            wanted = sorted({s for s in stages if any(senders[i].stage <= s for i in chunk)})
            if not wanted:
                continue
            deltas = [
                sender_delta(self.model, senders[i], self.source, self.receiving) for i in chunk
            ]
            copies = len(chunk)
            hooks: list[Hook] = []
            for layer in range(start, n):
                at = {
                    kind: [
                        k
                        for k, i in enumerate(chunk)
                        if senders[i].layer == layer and senders[i].activation in acts
                    ]
                    for kind, acts in (
                        ("resid_pre", ("resid_pre",)),
                        ("attn", ("z", "attn_out")),
                        ("mlp", ("mlp_out",)),
                    )
                }
                if at["resid_pre"]:
                    hooks.append(
                        (f"blocks.{layer}.hook_resid_pre", _adder(at["resid_pre"], deltas, copies))
                    )
                frozen = self.receiving(f"blocks.{layer}.hook_attn_out")
                hooks.append(
                    (f"blocks.{layer}.hook_attn_out", _setter(frozen, at["attn"], deltas, copies))
                )
                if at["mlp"]:
                    hooks.append(
                        (f"blocks.{layer}.hook_mlp_out", _adder(at["mlp"], deltas, copies))
                    )
            recorded: dict[int, torch.Tensor] = {}
            for stage in wanted:
                hooks.append((residual_hook(stage, n), _recorder(recorded, stage)))
            self._forward(start, copies, hooks, (0,))
            self.stats["mlp_passes"] += 1
            for stage in wanted:
                base = self.receiving(residual_hook(stage, n))
                change = recorded[stage].unflatten(0, (copies, -1)) - base
                for k, i in enumerate(chunk):
                    if senders[i].stage <= stage:
                        out[i][stage] = change[k]
        return out

    # --- the receivers ----------------------------------------------------------------------------
    def values(
        self, senders: Sequence[Sender], targets: Sequence[Target], through: str
    ) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
        """The metric of every (sender, target) pair whose target reads the sender.

        Returns:
            The measured pairs (sender index, target index) and their values ``[pairs, ...]``
            in that order (``None`` when no pair is measured).
        """
        n = self.n_layers
        pairs = [
            (i, j) for j, t in enumerate(targets) for i, s in enumerate(senders) if reads(s, t, n)
        ]
        if not pairs:
            return pairs, None
        # Through MLPs, senders go in chunks: a first pass gives each chunk's receiver inputs
        # (kept only while its rows run, so memory stays bounded), then the receivers' passes.
        if through == "mlp":
            order = sorted(range(len(senders)), key=lambda i: senders[i].layer)
            sender_groups = list(_chunks(order, self.rows))
        else:
            sender_groups = [list(range(len(senders)))]
        stages = sorted({t.stage(n) for t in targets})
        memo: dict[int, torch.Tensor] = {}
        changes: dict[int, dict[int, torch.Tensor]] = {}
        results: dict[int, torch.Tensor] = {}

        def delta(i: int, j: int) -> torch.Tensor:
            if through == "mlp":
                return changes[i][targets[j].stage(n)]
            if i not in memo:
                memo[i] = sender_delta(self.model, senders[i], self.source, self.receiving)
            return memo[i]

        split = any(
            t.kind in ("q", "k", "v") and not self.projects(t.kind, t.layer) for t in targets
        )
        with split_qkv_input(self.model) if split else contextlib.nullcontext():
            for group in sender_groups:
                if through == "mlp":
                    found = self.mlp_deltas([senders[i] for i in group], stages)
                    changes.clear()
                    changes.update({i: found[g] for g, i in enumerate(group)})

                mine = set(group)
                by_layer: dict[int, list[int]] = {}
                for k, (i, j) in enumerate(pairs):
                    if i in mine:
                        layer = n if targets[j].kind == "logits" else targets[j].layer
                        by_layer.setdefault(layer, []).append(k)
                for layer, members in sorted(by_layer.items()):
                    for chunk in _chunks(members, self.rows):
                        d = torch.stack([delta(*pairs[k]) for k in chunk])  # [rows, batch, pos, d]
                        chosen = [targets[pairs[k][1]] for k in chunk]
                        if layer == n:
                            logits = self._final(d)
                        else:
                            hooks = self._receiver_hooks(chosen, d)
                            logits = self._forward(layer, len(chunk), hooks, self.positions)
                        values = self.evaluate(logits, len(chunk))
                        self.stats["rows"] += len(chunk)
                        for k, v in zip(chunk, values, strict=True):
                            results[k] = v
        return pairs, torch.stack([results[k] for k in range(len(pairs))])

    def _final(self, d: torch.Tensor) -> torch.Tensor:
        """Logits with ``d`` added to the final residual (no block runs)."""
        hidden = self.receiving(residual_hook(2 * self.n_layers, self.n_layers)).unsqueeze(0) + d
        hidden = hidden.flatten(0, 1)
        if self.positions is not None:
            hidden = hidden[:, list(self.positions)]
        self.stats["forwards"] += 1
        return self.model.unembed(self.model.ln_final(hidden))  # type: ignore[no-any-return]

    def _receiver_hooks(self, chosen: Sequence[Target], d: torch.Tensor) -> list[Hook]:
        copies = len(chosen)
        hooks: list[Hook] = []
        for kind in ("q", "k", "v", "mlp_in"):
            rows = [k for k, t in enumerate(chosen) if t.kind == kind]
            if not rows:
                continue
            layer = chosen[rows[0]].layer
            heads = None if kind == "mlp_in" else [chosen[k].head for k in rows]
            if heads is not None and self.projects(kind, layer):
                x = self.receiving(f"blocks.{layer}.hook_resid_pre")
                projected = self._projection(kind, layer, x.unsqueeze(0) + d[rows], heads)
                name = f"blocks.{layer}.attn.hook_{kind}"
                hooks.append((name, _receiver_setter(rows, heads, projected, copies)))
                continue
            name = chosen[rows[0]].hook_name(self.n_layers)
            hooks.append((name, _receiver_adder(rows, heads, d[rows], copies)))
        return hooks

    # --- a query/key/value receiver's projection, computed here -----------------------------
    def projects(self, kind: str, layer: int) -> bool:
        """Whether the receiver's projection ``ln1(x) @ W + b`` reproduces the model's own
        ``hook_<kind>`` on the receiving run (checked once per kind and layer)."""
        key = (kind, layer)
        if key not in self._projects:
            self._projects[key] = PROJECT and self._check_projection(kind, layer)
        return self._projects[key]

    def _projection(
        self, kind: str, layer: int, x: torch.Tensor, heads: Sequence[int | None] | None = None
    ) -> torch.Tensor:
        """``ln1(x) @ W[head] + b[head]``: ``x`` ``[rows, batch, pos, d_model]`` gives
        ``[rows, batch, pos, d_head]`` (row ``k`` at ``heads[k]``), or every head when
        ``heads`` is ``None`` (``[..., pos, heads, d_head]``)."""
        block = self.model.blocks[layer]
        weight = getattr(block.attn, f"W_{kind.upper()}")
        bias = getattr(block.attn, f"b_{kind.upper()}", None)
        normed = block.ln1(x.reshape(-1, *x.shape[-2:])).reshape(x.shape)
        if heads is None:
            out = torch.einsum("...pd,ndh->...pnh", normed, weight.to(normed.dtype))
            return out if bias is None else out + bias.to(out.dtype)
        index = torch.as_tensor(list(heads), device=weight.device)
        w = weight[index].to(normed.dtype)  # [rows, d_model, d_head]
        out = torch.einsum("rbpd,rdh->rbph", normed, w)
        if bias is not None:
            out = out + bias[index].to(out.dtype)[:, None, None, :]
        return out

    def _check_projection(self, kind: str, layer: int) -> bool:
        try:
            x = self.receiving(f"blocks.{layer}.hook_resid_pre")
            want = self.receiving(f"blocks.{layer}.attn.hook_{kind}")
            got = self._projection(kind, layer, x)
        except Exception:  # any failure means: use the model's per-head inputs instead
            return False
        if got.shape != want.shape:
            return False
        eps = torch.finfo(want.dtype).eps
        scale = 1.0 + float(want.abs().max())
        return bool(((got - want).abs() <= scale * max(1e-5, 32 * eps)).all())


def _adder(
    rows: Sequence[int], deltas: Sequence[torch.Tensor], copies: int
) -> Callable[..., torch.Tensor]:
    """A hook adding ``deltas[k]`` to copy ``rows[k]`` of a residual-shaped activation."""
    stacked = torch.stack([deltas[k] for k in rows])

    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone().unflatten(0, (copies, -1))
        out[list(rows)] += stacked.to(out.dtype)
        return out.flatten(0, 1)

    return add


def _setter(
    frozen: torch.Tensor, rows: Sequence[int], deltas: Sequence[torch.Tensor], copies: int
) -> Callable[..., torch.Tensor]:
    """A hook replacing an attention output by the receiving run's, plus the deltas of ``rows``."""

    def freeze(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = frozen.to(act.dtype).unsqueeze(0).repeat(copies, *([1] * frozen.ndim))
        if rows:
            out[list(rows)] += torch.stack([deltas[k] for k in rows]).to(out.dtype)
        return out.flatten(0, 1)

    return freeze


def _recorder(store: dict[int, torch.Tensor], stage: int) -> Callable[..., None]:
    def record(act: torch.Tensor, hook: Any) -> None:
        store[stage] = act.detach().clone()

    return record


def _receiver_adder(
    rows: Sequence[int], heads: Sequence[int | None] | None, d: torch.Tensor, copies: int
) -> Callable[..., torch.Tensor]:
    """A hook adding ``d[k]`` to row ``rows[k]``'s input (at its head for per-head inputs)."""
    index = torch.as_tensor(list(rows), device=d.device)

    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone().unflatten(0, (copies, -1))
        if heads is None:
            out[index] += d.to(out.dtype)
        else:
            head_index = torch.as_tensor(list(heads), device=d.device)
            out[index, :, :, head_index] += d.to(out.dtype)
        return out.flatten(0, 1)

    return add


def _receiver_setter(
    rows: Sequence[int], heads: Sequence[int | None], values: torch.Tensor, copies: int
) -> Callable[..., torch.Tensor]:
    """A hook setting head ``heads[k]`` of copy ``rows[k]`` of a ``[.., pos, head, d_head]``
    projection to ``values[k]``."""
    index = torch.as_tensor(list(rows), device=values.device)
    head_index = torch.as_tensor(list(heads), device=values.device)

    def set_head(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone().unflatten(0, (copies, -1))
        out[index, :, :, head_index] = values.to(out.dtype)
        return out.flatten(0, 1)

    return set_head


def check_model(
    adapter: ModelAdapter, senders: Sequence[Sender], targets: Sequence[Target], through: str
) -> None:
    """Refuse, before any pass, models and nodes the engine cannot patch exactly.

    Raises:
        InputError: a block without attention, or a source head whose residual write is not
            ``z @ W_O`` (post-norm, scaled-residual or parallel blocks).
        HookError: a hook point the paths need is missing.
    """
    model = adapter.model
    n = int(adapter.cfg.n_layers)
    for layer in range(n):
        if getattr(model.blocks[layer], "attn", None) is None:
            raise InputError(
                f"blocks.{layer} has no attention component; path patching needs one in every block"
            )
    head_layers = {s.layer for s in senders if s.activation == "z"}
    if through == "mlp":
        head_layers |= set(range(n))  # attention is frozen through its residual write everywhere
    if head_layers:
        from transformer_lens.tools.analysis.attribution_patching import (
            _attention_write_obstruction,
        )

        detail = _attention_write_obstruction(model, head_layers)
        if detail is not None:
            raise InputError(
                f"per-head attention outputs are normalised or scaled before the residual add on this "
                f"architecture ({detail}); a head's residual write is not z @ W_O, so head senders "
                "are unsupported here; use attn_out senders"
            )
    # The gated per-head inputs are checked when used (every hook registered must fire).
    hook_dict: Mapping[str, Any] = getattr(model, "hook_dict", {})
    names = needed_hooks(senders, targets, n, through)
    names |= {t.hook_name(n) for t in targets if t.kind == "mlp_in"}
    missing = sorted(name for name in names if name not in hook_dict)
    if missing:
        raise HookError(
            f"the model has no hook point {missing[0]!r} (architecture "
            f"{getattr(adapter.cfg, 'architecture', None) or type(model).__name__}); these paths "
            "cannot be patched on it"
        )
