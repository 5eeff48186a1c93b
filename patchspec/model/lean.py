"""Lean replay: blocks ``L``..end recomputed from their weights, from the first changed position.

The bridge's own blocks run about 210 torch operations each (hook points, Python layer norms,
HF's Python GELU), and a replay through them recomputes every position. :class:`LeanReplay`
computes the same blocks in a few dozen operations straight from the weights, and exploits
causality: a patch at position ``p`` cannot change any position ``< p`` in any layer, so only
positions ``>= p`` are recomputed, their queries attending over the unpatched run's keys and
values for the prefix (*causal suffix replay*). In the last block only the positions the metric
reads are computed past the keys and values (*liveness*), and the attention runs as one fused
``scaled_dot_product_attention`` unless a hook needs the scores or the pattern.

Hooks are called at the model's own hook names (``blocks.3.attn.hook_z``...) on tensors that
hold only the recomputed positions: :meth:`LeanReplay.run` takes them as ``(name, fn)`` pairs,
like ``model.hooks``. A hook point it does not model (gated ones such as ``hook_result``, the
bridge's aliases such as ``blocks.3.hook_in``) makes :meth:`LeanReplay.supports` false, and
the caller replays through the bridge instead.

Two architectures are modelled: GPT-2 style blocks (LayerNorm, fused QKV, learned absolute
positions, GELU MLP) and Llama/Qwen2 style blocks (RMSNorm, rotary embeddings, grouped-query
attention, gated MLP). :func:`build` checks the lean blocks against the model before use: the
logits of the whole pass, of a suffix replay from a middle block and position, and every
modelled hook point's activation against ``run_with_cache``; a hook point that differs is
dropped from what the lean replay supports, and a model that differs anywhere else is not
replayed lean at all (the reason is logged at info level).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from patchspec.model.replay import Replay

log = logging.getLogger(__name__)

Hook = tuple[str, Callable[..., Any]]

#: The hook points of a block the lean replay models, by their leaf names.
LOCATIONS: tuple[str, ...] = (
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
def hook_points(n_layers: int) -> frozenset[str]:
    """Every hook point the lean replay models in a model of ``n_layers`` blocks.

    Example:
        >>> sorted(hook_points(1))[:2]
        ['blocks.0.attn.hook_attn_scores', 'blocks.0.attn.hook_k']
    """
    return frozenset(f"blocks.{i}.{leaf}" for i in range(n_layers) for leaf in LOCATIONS)


#: Hook points of a block that are computed at every recomputed position even in the last
#: block (the keys and values feed every later query; the input is what the block receives).
_ALL_ROWS = ("hook_resid_pre", "attn.hook_k", "attn.hook_v")


def _original(module: Any) -> Any:
    return getattr(module, "original_component", None)


#: Matrix products run on at least this many rows. BLAS libraries pick another kernel for a
#: few rows (measured with MKL on this project's CPUs: a row's result changes in the last bit
#: for 1-3, 5-7 and 9-11 rows, never from 12 on), which would make a cell's value depend on how
#: many cells share its pass; padding keeps a verified subset bit-identical to the same cells of
#: a full sweep.
MIN_ROWS = 16


def _padded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn``, computed on at least :data:`MIN_ROWS` rows."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows >= MIN_ROWS or rows == 0:
        return fn(x)
    flat = x.reshape(rows, x.shape[-1])
    out = fn(torch.cat((flat, flat.new_zeros(MIN_ROWS - rows, flat.shape[1]))))[:rows]
    return out.reshape(*x.shape[:-1], out.shape[-1])


@attrs.frozen(eq=False)
class _Linear:
    """``x W^T + b`` with ``W`` stored ``[out, in]`` (a view for HF's ``Conv1D``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, module: Any) -> _Linear | None:
        if isinstance(module, torch.nn.Linear):
            return cls(module.weight, module.bias)
        if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
            return cls(module.weight.t(), getattr(module, "bias", None))
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _padded(lambda rows: F.linear(rows, self.weight, self.bias), x)


def _cat_linear(parts: Sequence[_Linear]) -> _Linear:
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            b if b is not None else p.weight.new_zeros(p.weight.shape[0])
            for p, b in zip(parts, biases, strict=True)
        ])
    return _Linear(torch.cat([p.weight for p in parts]), bias)


@attrs.frozen(eq=False)
class _Block:
    """The weights of one block, as the lean forward uses them."""

    ln1: Callable[[torch.Tensor], torch.Tensor]
    ln2: Callable[[torch.Tensor], torch.Tensor]
    qkv: _Linear
    o: _Linear
    up: _Linear
    gate: _Linear | None
    down: _Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    rotary: bool


class Unsupported(Exception):
    """The model's blocks are not of a kind the lean replay models (the reason is the text)."""


def _blocks(model: Any) -> list[_Block]:
    cfg = model.cfg
    n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
    rotary = getattr(cfg, "positional_embedding_type", "standard") == "rotary"
    if rotary and (
        getattr(cfg, "rotary_interleaved_cos_sin", False) or getattr(cfg, "rotary_adjacent_pairs", False)
    ):
        raise Unsupported("interleaved rotary embeddings")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "use_attn_result",
                 "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in"):
        if getattr(cfg, flag, False):
            raise Unsupported(f"cfg.{flag} is on")
    out: list[_Block] = []
    for block in model.blocks:
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        norms = [_original(getattr(block, n, None)) for n in ("ln1", "ln2")]
        if attn is None or mlp is None or any(n is None for n in norms):
            raise Unsupported(f"{type(block).__name__} has no ln1/attn/ln2/mlp")
        if hasattr(attn, "qkv") and _Linear.of(_original(attn.qkv)) is not None:
            qkv = _Linear.of(_original(attn.qkv))
        else:
            parts = [_Linear.of(_original(getattr(attn, n, None))) for n in ("q", "k", "v")]
            if any(p is None for p in parts):
                raise Unsupported(f"{type(attn).__name__} has no q/k/v linears")
            qkv = _cat_linear([p for p in parts if p is not None])
        o = _Linear.of(_original(getattr(attn, "o", None)))
        up = _Linear.of(_original(getattr(mlp, "in", None)))
        down = _Linear.of(_original(getattr(mlp, "out", None)))
        gate_module = getattr(mlp, "gate", None)
        gate = _Linear.of(_original(gate_module)) if gate_module is not None else None
        hf_mlp = _original(mlp)
        act = getattr(hf_mlp, "act", None) or getattr(hf_mlp, "act_fn", None)
        if qkv is None or o is None or up is None or down is None or not callable(act):
            raise Unsupported(f"{type(hf_mlp).__name__}/{type(attn).__name__} weights not found")
        if gate_module is not None and gate is None:
            raise Unsupported("gated MLP without a linear gate")
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
        if qkv.weight.shape[0] != (n_heads + 2 * n_kv) * d_head:
            raise Unsupported(f"QKV width {qkv.weight.shape[0]} is not (heads + 2 kv heads) x d_head")
        out.append(_Block(norms[0], norms[1], qkv, o, up, gate, down, _activation(act), rotary))
    return out


def _activation(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF's activation module as one fused op where one computes the same function."""
    name = type(module).__name__
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name in ("SiLUActivation", "SiLU"):
        return F.silu
    if name in ("GELUActivation", "GELU") and getattr(module, "approximate", "none") == "none":
        return F.gelu
    return module  # type: ignore[no-any-return]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, heads, S, d_head]`` rotated (HF's ``rotate_half`` convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _mask_of(inputs: Any, batch: int, seq: int) -> torch.Tensor | None:
    """The additive ``[batch | 1, 1, seq, seq]`` attention mask a block received, if any."""
    for value in (*inputs.args, *inputs.kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim == 4 and tuple(value.shape[-2:]) == (seq, seq):
            if value.dtype == torch.bool:
                return torch.zeros(value.shape, dtype=inputs.hidden.dtype, device=value.device).masked_fill(
                    ~value, torch.finfo(inputs.hidden.dtype).min
                )
            return value
    return None


def _rotary_of(inputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    pe = inputs.kwargs.get("position_embeddings")
    if isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe):
        return pe[0], pe[1]
    return None


class LeanReplay:
    """Blocks ``L``..end of one recorded pass, recomputed lean from position ``p`` on.

    Built by :func:`build`. :meth:`run` computes the logits of ``copies`` stacked copies of the
    recorded batch (copy-major) with hooks called at the model's hook names; at positions it
    does not recompute they are the recorded pass's own logits (the model's, exactly).
    """

    def __init__(self, model: Any, replay: Replay, logits: torch.Tensor | None = None) -> None:
        self.model = model
        self.batch = replay.batch
        self.blocks = _blocks(model)
        first = replay.inputs[0]
        self.seq = int(first.hidden.shape[1])
        cfg = model.cfg
        self.n_heads, self.d_head = int(cfg.n_heads), int(cfg.d_head)
        self.n_kv = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        hf_attn = _original(model.blocks[0].attn)
        self.scale = float(getattr(hf_attn, "scaling", None) or self.d_head ** -0.5)
        self.masks: list[torch.Tensor | None] = []
        self.rotary: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for index in range(len(self.blocks)):
            inputs = replay.inputs[index]
            mask = _mask_of(inputs, self.batch, self.seq)
            if mask is not None and mask.shape[0] == self.batch and self.batch > 1 and bool(
                (mask == mask[:1]).all()
            ):
                mask = mask[:1]  # one mask for every prompt (plain causal): broadcast it
            self.masks.append(mask)
            rot = _rotary_of(inputs) if self.blocks[index].rotary else None
            if self.blocks[index].rotary and rot is None:
                raise Unsupported("a rotary block received no position embeddings")
            self.rotary.append(rot)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.hook_dict = model.hook_dict  # the bridge rebuilds its alias table on every read
        ln_final = _original(model.ln_final)
        unembed = _Linear.of(_original(model.unembed))
        if ln_final is not None and unembed is not None:
            # HF's own final norm and unembedding: the bridge's wrap them in Python hook points.
            def head(x: torch.Tensor) -> torch.Tensor:
                return unembed(ln_final(x))  # type: ignore[misc]
        else:
            def head(x: torch.Tensor) -> torch.Tensor:
                return model.unembed(model.ln_final(x))  # type: ignore[no-any-return]
        self._head = head
        self.supported: frozenset[str] = hook_points(len(self.blocks))
        # The unpatched pass: each block's input, keys and values (rotated), and the last output.
        self.hidden: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        with torch.inference_mode():
            x = first.hidden
            for index in range(len(self.blocks)):
                self.hidden.append(x)
                x = self._block(index, x, 0, {}, None, record=True)
            self.final = x
            #: The recorded pass's logits (the model's own when given), at every position.
            self.logits = logits if logits is not None else self._head(x)

    # --- what it can run --------------------------------------------------------------------
    def supports(self, names: Iterable[str]) -> bool:
        """Whether every hook point in ``names`` is one the lean replay models (and checked)."""
        return all(name in self.supported for name in names)

    def drop(self, names: Iterable[str]) -> None:
        """Stop supporting the hook points ``names`` (they did not match the model's own)."""
        self.supported = self.supported - set(names)

    # --- the forward ---------------------------------------------------------------------------
    def run(
        self,
        layer: int,
        copies: int,
        positions: Sequence[int] | None = None,
        hooks: Sequence[Hook] = (),
        first: int = 0,
    ) -> torch.Tensor:
        """Logits ``[copies * batch, len(positions) | seq, vocab]`` of blocks ``layer``..end.

        Args:
            layer: The first block recomputed.
            copies: Stacked copies of the batch (copy-major).
            positions: The positions whose logits are returned (all when ``None``).
            hooks: ``(hook name, fn)`` pairs, called as ``fn(act, hook_point)`` in order at each
                hook point, on tensors holding positions ``first``.. only.
            first: The first position recomputed; positions before it keep the recorded pass's
                values (exact when no hook changes anything before ``first``).
        """
        with torch.inference_mode():
            return self._run(layer, copies, positions, hooks, first)

    def _run(
        self, layer: int, copies: int, positions: Sequence[int] | None, hooks: Sequence[Hook], first: int
    ) -> torch.Tensor:
        table: dict[str, list[Callable[..., Any]]] = {}
        for name, fn in hooks:
            table.setdefault(name, []).append(fn)
        wanted = list(range(self.seq)) if positions is None else [int(t) for t in positions]
        suffix = [t - first for t in wanted if t >= first]
        n = len(self.blocks)
        final_rows: torch.Tensor | None = None
        if layer < n and suffix:
            x = self._expand(self.hidden[layer][:, first:], copies)
            last = n - 1
            # Liveness: the last block's rows past its keys/values, only where the metric reads,
            # unless a hook there reads them.
            narrow = positions is not None and not any(
                name.startswith(f"blocks.{last}.") and name.split(".", 2)[2] not in _ALL_ROWS
                for name in table
            )
            rows: list[int] | None = None
            for index in range(layer, n):
                rows = suffix if index == last and narrow else None
                x = self._block(index, x, first, table, rows)
            final_rows = x if rows is not None else x[:, self._index(suffix)]
        # Positions before ``first`` are unchanged: their logits are the recorded pass's own.
        unchanged = wanted if final_rows is None else [t for t in wanted if t < first]
        parts = []
        if unchanged:
            parts.append(self._expand(self.logits[:, self._index(unchanged)], copies))
        if final_rows is not None:
            parts.append(_padded(self._head, final_rows))
        logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if final_rows is not None and unchanged:
            order = sorted(range(len(wanted)), key=lambda i: (wanted[i] >= first, i))
            # ``logits`` holds the unchanged positions first; put them back in ``wanted`` order.
            inverse = [0] * len(order)
            for slot, i in enumerate(order):
                inverse[i] = slot
            logits = logits[:, self._index(inverse)]
        return logits

    def _index(self, rows: Sequence[int]) -> torch.Tensor:
        """``rows`` as an index tensor on the model's device, made once (no copy per pass)."""
        key = tuple(rows)
        if key not in self._indices:
            self._indices[key] = torch.tensor(key, dtype=torch.long, device=self.final.device)
        return self._indices[key]

    def _expand(self, x: torch.Tensor, copies: int) -> torch.Tensor:
        if copies == 1:
            return x
        return x.unsqueeze(0).expand(copies, *x.shape).reshape(copies * x.shape[0], *x.shape[1:])

    def _prefix(self, recorded: torch.Tensor, new: torch.Tensor, first: int) -> torch.Tensor:
        """``[N, heads, seq, d_head]``: the recorded prefix ``< first`` then ``new``'s positions."""
        if first == 0:
            return new
        copies = new.shape[0] // self.batch
        head = recorded[:, :, :first].unsqueeze(0).expand(copies, *recorded[:, :, :first].shape)
        tail = new.view(copies, self.batch, *new.shape[1:])
        return torch.cat((head, tail), dim=3).reshape(new.shape[0], new.shape[1], -1, new.shape[3])

    def _block(
        self,
        index: int,
        x: torch.Tensor,
        first: int,
        table: dict[str, list[Callable[..., Any]]],
        rows: Sequence[int] | None,
        *,
        record: bool = False,
    ) -> torch.Tensor:
        """Block ``index`` on ``x`` ``[N, S, d_model]`` (positions ``first``..), or only at the
        recomputed positions ``rows`` (indices into ``S``) past the keys and values."""
        w = self.blocks[index]
        prefix = f"blocks.{index}."
        hook_dict = self.hook_dict

        def at(leaf: str, act: torch.Tensor) -> torch.Tensor:
            fns = table.get(prefix + leaf)
            if fns:
                point = hook_dict.get(prefix + leaf)
                for fn in fns:
                    out = fn(act, point)
                    if out is not None:
                        act = out
            return act

        x = at("hook_resid_pre", x)
        n_rows, length = x.shape[0], x.shape[1]
        h = w.ln1(x)
        qkv = w.qkv(h)
        hq, hk = self.n_heads * self.d_head, self.n_kv * self.d_head
        q = qkv[..., :hq].view(n_rows, length, self.n_heads, self.d_head)
        k = qkv[..., hq : hq + hk].view(n_rows, length, self.n_kv, self.d_head)
        v = qkv[..., hq + hk :].view(n_rows, length, self.n_kv, self.d_head)
        pick = None if rows is None else self._index(rows)
        if pick is not None:
            q = q[:, pick]
        q, k, v = at("attn.hook_q", q), at("attn.hook_k", k), at("attn.hook_v", v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if w.rotary:
            cos, sin = self.rotary[index]  # type: ignore[misc]
            cos, sin = cos[:, first:].unsqueeze(1), sin[:, first:].unsqueeze(1)
            k = _rotate(k, cos.to(k.dtype), sin.to(k.dtype))
            if pick is not None:
                cos, sin = cos[:, :, pick], sin[:, :, pick]
            q = _rotate(q, cos.to(q.dtype), sin.to(q.dtype))
        if record:
            self.keys.append(k)
            self.values.append(v)
        else:
            k = self._prefix(self.keys[index], k, first)
            v = self._prefix(self.values[index], v, first)
        mask = self.masks[index]
        if mask is not None:
            mask = mask[:, :, first:]
            if pick is not None:
                mask = mask[:, :, pick]
            if mask.shape[0] > 1 and mask.shape[0] != n_rows:
                mask = self._expand(mask, n_rows // mask.shape[0])
            mask = mask.to(q.dtype)
        if (prefix + "attn.hook_attn_scores") in table or (prefix + "attn.hook_pattern") in table or record:
            if self.n_kv != self.n_heads:
                k_all = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v_all = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            else:
                k_all, v_all = k, v
            scores = torch.matmul(q, k_all.transpose(-2, -1)) * self.scale
            if mask is not None:
                scores = scores + mask
            scores = at("attn.hook_attn_scores", scores)
            pattern = at("attn.hook_pattern", torch.softmax(scores, dim=-1))
            z = torch.matmul(pattern, v_all)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_kv != self.n_heads,
                is_causal=False,
            )
        z = at("attn.hook_z", z.transpose(1, 2))
        attn_out = at("hook_attn_out", w.o(z.reshape(*z.shape[:2], -1)))
        if pick is not None:
            x = x[:, pick]
        mid = at("hook_resid_mid", x + attn_out)
        h2 = w.ln2(mid)
        if w.gate is not None:
            pre = at("mlp.hook_pre", w.gate(h2))
            post = at("mlp.hook_post", w.act(pre) * w.up(h2))
        else:
            pre = at("mlp.hook_pre", w.up(h2))
            post = at("mlp.hook_post", w.act(pre))
        out = at("hook_mlp_out", w.down(post))
        return at("hook_resid_post", mid + out)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to float tolerance; masked attention scores (``-inf`` or near the dtype's
    minimum) must be masked in both."""
    if got.shape != want.shape or not want.dtype.is_floating_point:
        return False
    info = torch.finfo(want.dtype)
    got, want = got.float(), want.float()
    masked = want <= info.min / 2
    if not bool(((got <= info.min / 2) == masked).all()):
        return False
    diff = (got - want).abs()[~masked]
    if diff.numel() == 0:
        return True
    scale = 1.0 + float(want[~masked].abs().max())
    return bool((diff <= scale * max(1e-4, 32 * info.eps)).all())


def build(model: Any, replay: Replay, logits: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> LeanReplay | None:
    """The lean replay of ``replay``'s pass, checked against the model (``None`` if it differs).

    Args:
        model: The model.
        replay: The recorded pass (block inputs).
        logits: The model's own logits of that pass.
        cache: The model's activations of that pass at every hook point in
            :data:`LOCATIONS` (checked one by one, with a suffix replay's logits: once per
            input shape), or ``None`` to check the whole pass's logits only.
    """
    try:
        lean = LeanReplay(model, replay, logits)
    except Unsupported as err:
        log.info("lean replay not used for %s: %s", type(model).__name__, err)
        return None
    except Exception as err:  # any other failure means: this model is not one we model
        log.info("lean replay not used for %s: building it failed (%r)", type(model).__name__, err)
        return None
    seq, n = lean.seq, len(lean.blocks)
    try:
        with torch.inference_mode():
            checks = [("the whole pass", lean.run(0, 1), logits)]
            if seq > 1 and cache is not None:
                mid, at = n // 2, seq // 2
                checks.append((f"a suffix replay from block {mid}, position {at}",
                               lean.run(mid, 2, None, (), at), logits.repeat(2, 1, 1)))
                checks.append(("the last position's logits", lean.run(mid, 1, [seq - 1], (), at),
                               logits[:, [seq - 1]]))
            if cache is not None:
                seen: dict[str, torch.Tensor] = {}
                names = [n for n in lean.supported if n in cache]

                def keep(name: str) -> Callable[..., None]:
                    def read(act: torch.Tensor, hook: Any) -> None:
                        seen[name] = act.clone()
                    return read

                lean.run(0, 1, None, [(name, keep(name)) for name in names])
                bad = [name for name in names if name not in seen or not _close(seen[name], cache[name])]
                missing = [name for name in lean.supported if name not in cache]
                if bad or missing:
                    log.info("lean replay: hook points %s differ from the model's; those patches "
                             "replay through the model's own blocks", sorted(bad + missing)[:6])
                    lean.drop(bad + missing)
    except Exception as err:
        log.info("lean replay not used for %s: running it failed (%r)", type(model).__name__, err)
        return None
    for what, got, want in checks:
        if not _close(got, want):
            log.info("lean replay not used for %s: %s does not reproduce the model's logits",
                     type(model).__name__, what)
            return None
    return lean
