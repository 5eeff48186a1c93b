"""The batched executor: many cells per forward pass, each pass started at the patched layer.

TransformerLens runs one full forward pass per patched cell. The work a sweep needs is far
smaller: a cell that patches layer ``L`` only changes layers ``L`` and later, and cells of the
same layer can share one forward pass. This executor

1. groups the cells of a plan by the first block they patch (their *start layer*);
2. runs the receiving input once, unpatched, recording what every block receives (the hidden
   state and whatever else the block's forward takes: attention mask, position ids, rotary
   cos/sin) with forward pre-hooks;
3. for a chunk of ``K`` cells starting at layer ``L``, repeats the recorded input of block ``L``
   ``K`` times (copy-major: row ``k * batch + b`` is prompt ``b`` of cell ``k``), runs only
   blocks ``L``..end with hooks that overwrite each copy's own region
   (``torch.where(mask_k, source, act)`` over stacked per-cell masks, no per-cell Python in the
   hooks), then the final norm and the unembedding, only at the positions the metric reads;
4. evaluates the metric on the whole block of logits (see the contract in
   :mod:`patchspec.engine`).

The replay of recorded block inputs is checked once per model and input shape against the
model's own forward pass; a model that cannot be run this way (no ``blocks``, ``ln_final`` or
``unembed``; logits changed after the unembedding; a block input that does not expand) falls
back to full forward passes of the repeated input, which is logged at debug level.
TransformerBridge's own ``start_at_layer`` is not used: it still runs the earlier blocks.

``K`` comes from a memory budget (``max_memory="2GB"``; by default half the free CUDA memory,
or 1 GiB on the CPU, where forwards are also kept to about 2,048 tokens because larger ones
gain nothing there) or from ``cells_per_batch``; a chunk that runs out of memory is split in two and
retried. Results do not depend on ``K``.

Example:
    >>> from patchspec import catalog
    >>> catalog.HEAD_OUT_BY_POS.run(model, clean, corrupted, metric, cells_per_batch=64)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

import attrs
import torch
from tqdm.auto import tqdm

from patchspec.engine import (
    ENGINES,
    Engine,
    Evaluate,
    FireCounter,
    Hook,
    evaluate_cells,
    logit_positions,
    region_masks,
    source_values,
    write_hooks,
    writer_hooks,
)
from patchspec.errors import PatchSpecError
from patchspec.layouts import layout
from patchspec.plan import Cell, Plan, Region, Sizes
from patchspec.runs import Runs
from patchspec.sources import Receiver

log = logging.getLogger(__name__)

#: Memory budget on the CPU when none is given.
CPU_BUDGET = 1 << 30
#: Share of the free accelerator memory used when no budget is given.
CUDA_SHARE = 0.5
#: On the CPU, a forward of more tokens than this is no faster per token (cache misses).
CPU_TOKENS_PER_FORWARD = 2048

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def parse_memory(value: str | int | float) -> int:
    """A memory size in bytes, from bytes or a string such as ``"2GB"``, ``"512 MiB"``.

    Example:
        >>> parse_memory("2GB"), parse_memory("1.5 KiB"), parse_memory(4096)
        (2000000000, 1536, 4096)

    Raises:
        PatchSpecError: not a positive size.
    """
    if isinstance(value, bool):
        number, unit = None, ""
    elif isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        number, unit = (float(match.group(1)), match.group(2).lower()) if match else (None, "")
    else:
        number, unit = None, ""
    if number is None or unit not in _UNITS or not number > 0:
        raise PatchSpecError(
            f"max_memory={value!r} is not a memory size; give a positive number of bytes or a "
            f"string such as '2GB', '512MiB' (units: {', '.join(u for u in _UNITS if u)})"
        )
    return max(1, int(number * _UNITS[unit]))


def default_budget(device: torch.device) -> int:
    """Bytes a chunk may use when no budget is given.

    Half the free CUDA memory; on other devices 1 GiB, or a quarter of the available memory
    when that is less (read with ``psutil`` when it is installed).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_SHARE)
    try:
        import psutil
    except ImportError:
        return CPU_BUDGET
    return int(min(CPU_BUDGET, psutil.virtual_memory().available // 4))


def bytes_per_cell(model: Any, sizes: Sizes, n_positions: int, itemsize: int) -> int:
    """A generous estimate of the memory one cell (one copy of the batch) adds to a forward.

    Counts the live activations of one block (residual stream, attention scores and pattern,
    MLP hidden layer, patched copies), the logits at ``n_positions`` positions and the float32
    temporaries of the metric.
    """
    seq = sizes.seq
    vocab = int(getattr(model.cfg, "d_vocab", 0) or 0)
    block = seq * (16 * sizes.d_model + 4 * sizes.d_mlp + 6 * sizes.n_heads * seq) * itemsize
    logits = n_positions * vocab * (itemsize + 8)
    return sizes.batch * (block + logits)


def choose_cells_per_batch(
    model: Any,
    sizes: Sizes,
    *,
    n_positions: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
) -> int:
    """How many cells share one forward pass.

    ``cells_per_batch`` when given (capped by ``max_memory`` if that is given too); otherwise as
    many as the memory budget allows (``max_memory``, or :func:`default_budget`), and on the CPU
    without an explicit budget no more than :data:`CPU_TOKENS_PER_FORWARD` tokens per pass.

    Example:
        >>> choose_cells_per_batch(model, sizes, n_positions=1, device=torch.device("cpu"),
        ...                        max_memory="64MB")  # doctest: +SKIP
        37

    Raises:
        PatchSpecError: ``cells_per_batch`` is not a positive int, or ``max_memory`` is no size.
    """
    if cells_per_batch is not None and (
        isinstance(cells_per_batch, bool)
        or not isinstance(cells_per_batch, int)
        or cells_per_batch < 1
    ):
        raise PatchSpecError(f"cells_per_batch must be a positive int, got {cells_per_batch!r}")
    per_cell = max(
        1, bytes_per_cell(model, sizes, n_positions, torch.empty((), dtype=dtype).element_size())
    )
    if max_memory is not None:
        by_memory = max(1, parse_memory(max_memory) // per_cell)
        return by_memory if cells_per_batch is None else min(cells_per_batch, by_memory)
    if cells_per_batch is not None:
        return cells_per_batch
    copies = max(1, default_budget(device) // per_cell)
    if device.type == "cpu":
        copies = min(copies, max(1, CPU_TOKENS_PER_FORWARD // max(1, sizes.batch * sizes.seq)))
    return copies


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


class Replay:
    """Runs blocks ``L``..end of a model from the inputs they received in a recorded pass.

    Built by :meth:`capture`; :meth:`run` then computes the logits of ``copies`` stacked
    copies of the recorded batch, starting at any recorded block. Hooks registered on the
    model's hook points fire as in a full forward pass, for the blocks that run.
    """

    def __init__(self, model: Any, inputs: dict[int, _Inputs], batch: int) -> None:
        self.model = model
        self.inputs = inputs
        self.batch = batch
        self._expanded: dict[tuple[int, int], tuple[tuple[Any, ...], dict[str, Any]]] = {}

    @classmethod
    def capture(cls, model: Any, tokens: torch.Tensor) -> tuple[Replay | None, torch.Tensor]:
        """Run ``tokens`` once, unpatched, recording every block's inputs.

        Returns:
            The replay (``None`` when the model has no usable block stack) and the logits of
            the unpatched pass.
        """
        blocks = getattr(model, "blocks", None)
        usable = (
            isinstance(blocks, torch.nn.ModuleList)
            and len(blocks) > 0
            and isinstance(getattr(model, "ln_final", None), torch.nn.Module)
            and isinstance(getattr(model, "unembed", None), torch.nn.Module)
        )
        if not usable or blocks is None:
            log.debug(
                "batched engine: %s has no blocks/ln_final/unembed to replay", type(model).__name__
            )
            return None, model(tokens)
        recorded: dict[int, _Inputs] = {}

        def recorder(index: int) -> Callable[..., None]:
            def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    recorded[index] = _Inputs(args[1:], dict(kwargs), args[0].clone(), False)
                elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                    recorded[index] = _Inputs(args, rest, kwargs["hidden_states"].clone(), True)

            return record

        handles = [
            b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)
        ]
        try:
            logits = model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        if len(recorded) != len(blocks):
            log.debug(
                "batched engine: recorded inputs of %d of %d blocks; replay disabled",
                len(recorded),
                len(blocks),
            )
            return None, logits
        return cls(model, recorded, int(tokens.shape[0])), logits

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


#: Models whose replay was checked, per (batch, seq, dtype, device): whether it matched.
_VERIFIED: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], bool]] = weakref.WeakKeyDictionary()


#: The replay of each receiving run of a sweep (a Sweep's specs share one recorded pass).
_REPLAYS: weakref.WeakKeyDictionary[Any, dict[str, Replay | None]] = weakref.WeakKeyDictionary()


def _weak_entry(table: weakref.WeakKeyDictionary[Any, dict[Any, Any]], key: Any) -> dict[Any, Any]:
    try:
        return table.setdefault(key, {})
    except TypeError:  # not weak-referenceable: nothing is kept
        return {}


def _replay_for(model: Any, runs: Runs, receiver: Receiver) -> Replay | None:
    """The checked replay of one receiving run, recorded once per sweep."""
    per_runs = _weak_entry(_REPLAYS, runs)
    if receiver not in per_runs:
        per_runs[receiver] = _checked_replay(model, runs.tokens(receiver))
    return per_runs[receiver]


def _checked_replay(model: Any, tokens: torch.Tensor) -> Replay | None:
    replay, logits = Replay.capture(model, tokens)
    if replay is None:
        return None
    key = (tuple(tokens.shape), logits.dtype, logits.device)
    known = _weak_entry(_VERIFIED, model)
    if key not in known:
        known[key] = replay.matches(logits, 0)
        if not known[key]:
            log.debug(
                "batched engine: replaying recorded block inputs of %s does not reproduce its "
                "forward pass; falling back to full forward passes",
                type(model).__name__,
            )
    return replay if known[key] else None


@functools.lru_cache(maxsize=4096)
def _hook_name(activation: str, layer: int) -> str:
    return layout(activation).hook_name(layer)


@functools.lru_cache(maxsize=4096)
def _first_block(hook_name: str) -> int | None:
    layers = []
    for name in writer_hooks(hook_name):
        match = _BLOCK.match(name)
        if match is None:
            return None
        layers.append(int(match.group(1)))
    return min(layers)


def start_layer(cell: Cell) -> int | None:
    """The first block a cell patches (``None`` when a hook is outside the block stack)."""
    layers = [_first_block(_hook_name(r.activation, r.layer)) for r in cell.regions]
    if not layers or None in layers:
        return None
    return min(layer for layer in layers if layer is not None)


class _Values:
    """Source values, computed once per (source, hook) for the whole sweep."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self._cache: dict[Hashable, torch.Tensor] = {}

    def __call__(self, region: Region) -> torch.Tensor:
        try:
            key: Hashable = (region.source, region.activation, region.layer)
            hash(key)
        except TypeError:
            key = (id(region.source), region.activation, region.layer)
        if key not in self._cache:
            self._cache[key] = source_values(region, self.runs)
        return self._cache[key]


def _setter_hook(hook_name: str, regions: Sequence[Region | None], values: _Values) -> Hook:
    """A hook applying user-written TransformerLens patch setters, copy by copy."""
    copies = len(regions)
    sources = [None if r is None else values(r) for r in regions]

    def set_each(act: torch.Tensor, hook: Any) -> torch.Tensor:
        parts = act.unflatten(0, (copies, -1))
        out = []
        for part, region, source in zip(parts, regions, sources, strict=True):
            if region is None or region.setter is None:
                out.append(part)
            else:
                out.append(region.setter(part.clone(), list(region.setter_index), source))
        return torch.cat(out)

    return (hook_name, set_each)


def chunk_hooks(
    cells: Sequence[Cell], sizes: Sizes, values: _Values, device: torch.device
) -> list[Hook]:
    """The hooks that patch ``len(cells)`` stacked copies of the batch, copy ``k`` as ``cells[k]``.

    Regions are gathered into *slots*: the ``n``-th region a cell patches at a hook point. Each
    slot is one vectorised hook over all copies (masks of copies without it are all False), so
    hooks at the same point apply in the order each cell lists its regions.
    """
    copies = len(cells)
    slots: dict[tuple[str, bool, int], list[Region | None]] = {}
    for k, cell in enumerate(cells):
        seen: dict[tuple[str, bool], int] = {}
        for region in cell.regions:
            kind = (_hook_name(region.activation, region.layer), region.setter is not None)
            nth = seen.get(kind, 0)
            seen[kind] = nth + 1
            slots.setdefault((*kind, nth), [None] * copies)[k] = region
    hooks: list[Hook] = []
    for (hook_name, with_setter, _nth), regions in slots.items():
        if with_setter:
            hooks.append(_setter_hook(hook_name, regions, values))
            continue
        present = [r for r in regions if r is not None]
        masks = region_masks(regions, sizes, device)
        per_copy = [None if r is None else values(r) for r in regions]
        distinct = {id(v): v for v in per_copy if v is not None}
        if len(distinct) == 1:
            source = next(iter(distinct.values()))
        else:
            first = next(iter(distinct.values()))
            source = torch.stack(
                [first.new_zeros(()).expand_as(first) if v is None else v for v in per_copy]
            )
        hooks += write_hooks(
            hook_name, layout(present[0].activation).writer, source, masks, copies=copies
        )
    return hooks


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


@attrs.define
class Stats:
    """What one batched run did (in the debug log record's ``stats`` attribute)."""

    cells: int = 0
    forwards: int = 0
    replayed: int = 0
    full: int = 0
    largest: int = 0
    splits: int = 0
    cells_per_batch: int = 0


def run_batched(
    model: Any,
    plan: Plan,
    runs: Runs,
    evaluate: Evaluate,
    *,
    progress: bool = False,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
    start_at_layer: bool = True,
) -> torch.Tensor:
    """Many cells per forward pass, each pass started at the patched layer.

    Args:
        model: A TransformerLens model (``TransformerBridge``) in eval mode.
        plan: The cells to run.
        runs: The unpatched runs (tokens and caches).
        evaluate: The metric (see the contract in :mod:`patchspec.engine`).
        progress: Show a progress bar in cells.
        cells_per_batch: Cells per forward pass (default: from the memory budget).
        max_memory: Memory budget of one pass, bytes or a string such as ``"2GB"`` (default:
            half the free CUDA memory, or 1 GiB on the CPU).
        start_at_layer: Start each pass at its cells' first patched block (``False``: run
            every block, as the reference executor does).

    Returns:
        The metric value of every cell, stacked on a leading cell dim, equal to
        :func:`patchspec.engine.run_reference`'s.

    Raises:
        HookError: a hook did not fire exactly once in a forward pass.
        MetricError: the metric returned the wrong shape or a non-finite value.
        PatchSpecError: a bad ``cells_per_batch`` or ``max_memory``.

    Example:
        >>> values = run_batched(model, plan, runs, evaluate, cells_per_batch=32)  # doctest: +SKIP
    """
    sizes = Sizes.of(model, runs.batch, runs.seq)
    tokens = runs.tokens(plan.receiver)
    device = tokens.device
    cells = plan.cells
    positions = logit_positions(evaluate, sizes.seq) if hasattr(evaluate, "many") else None
    groups: dict[int | None, list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault(start_layer(cell), []).append(i)
    stats = Stats(cells=len(cells))
    if not cells:
        return torch.empty(0)
    with torch.inference_mode():
        layers = [layer for layer in groups if layer is not None]
        replay = _replay_for(model, runs, plan.receiver) if start_at_layer and layers else None
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        copies = choose_cells_per_batch(
            model,
            sizes,
            n_positions=sizes.seq if positions is None else len(positions),
            device=device,
            dtype=dtype,
            cells_per_batch=cells_per_batch,
            max_memory=max_memory,
        )
        stats.cells_per_batch = copies
        values = _Values(runs)
        out: list[torch.Tensor | None] = [None] * len(cells)
        state = {"copies": copies}

        def forward(layer: int | None, chunk: list[int]) -> torch.Tensor:
            chunk_cells = [cells[i] for i in chunk]
            counter = FireCounter()
            hooks = [
                (name, counter.wrap(name, fn))
                for name, fn in chunk_hooks(chunk_cells, sizes, values, device)
            ]
            if replay is not None and layer is not None:
                with model.hooks(fwd_hooks=hooks):
                    logits = replay.run(layer, len(chunk), positions)
                stats.replayed += 1
            else:
                logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
                if positions is not None:
                    logits = logits[:, list(positions)]
                stats.full += 1
            counter.check()
            stats.forwards += 1
            stats.largest = max(stats.largest, len(chunk))
            return evaluate_cells(evaluate, logits, chunk_cells, positions)

        def run_chunk(layer: int | None, chunk: list[int]) -> None:
            try:
                result = forward(layer, chunk)
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err) or len(chunk) == 1:
                    raise
                half = len(chunk) // 2
                state["copies"] = min(state["copies"], half)
                stats.splits += 1
                log.debug(
                    "batched engine: out of memory with %d cells per pass; splitting", len(chunk)
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                run_chunk(layer, chunk[:half])
                run_chunk(layer, chunk[half:])
                return
            for i, value in zip(chunk, result, strict=True):
                out[i] = value
            bar.update(len(chunk))

        with tqdm(
            total=len(cells), desc="patching (batched)", unit="cell", disable=not progress
        ) as bar:
            for layer in sorted(groups, key=lambda x: (x is None, x or 0)):
                pending = groups[layer]
                while pending:  # chunks of at most K cells, as even as possible
                    chunks = -(-len(pending) // state["copies"])
                    size = -(-len(pending) // chunks)
                    run_chunk(layer, pending[:size])
                    pending = pending[size:]
    log.debug(
        "batched engine: %d cells in %d forward passes (%d started at the patched layer, %d "
        "full), up to %d cells per pass, %d out-of-memory splits",
        stats.cells,
        stats.forwards,
        stats.replayed,
        stats.full,
        stats.largest,
        stats.splits,
        extra={"stats": stats},
    )
    return torch.stack([v for v in out if v is not None])


ENGINES["batched"] = cast(Engine, run_batched)
