"""Executors: turn a :class:`~patchspec.plan.Plan` into one metric value per cell.

The *reference* executor runs one full forward pass per cell through the model's own
``run_with_hooks``. It is deliberately plain: it exists to prove faster executors exact.
The *batched* executor (:mod:`patchspec.batched`, the default) folds many cells into one
forward pass and starts it at the patched layer. Executors are registered by name in
:data:`ENGINES`; every public entry point takes ``engine=`` to pick one.

The contract between an engine and the metric
---------------------------------------------
An engine receives ``evaluate``, a callable ``evaluate(logits, cell) -> value`` taking one
cell's **full** logits ``[batch, pos, vocab]`` (any plain callable works with every engine).
It may also carry two optional attributes, read with :func:`logit_positions` and
:func:`evaluate_cells`:

* ``many(logits, cells, positions)``: evaluates a whole block at once. ``logits`` is
  ``[len(cells) * batch, pos, vocab]``, one copy of the batch per cell in ``cells`` order;
  ``positions`` is ``None`` (full logits) or the positions the ``pos`` dim holds. It returns
  the stacked values ``[len(cells), ...]``.
* ``positions``: the token positions the metric reads (ints, negative ones counting from the
  end), or ``None`` for all. When it is set on a callable that has ``many``, an engine may
  compute the final norm and the unembedding only at those positions and pass ``many``
  logits whose ``pos`` dim holds exactly ``logit_positions(evaluate, seq)`` (sorted,
  non-negative), in that order, with ``positions`` set to that tuple.

``evaluate(logits, cell)`` itself always gets full logits (the reference executor calls only
that); an evaluate callable without ``many`` gets one cell's slice of the block at a time.
:class:`patchspec.metrics.Evaluator` implements all of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from patchspec.errors import HookError
from patchspec.layouts import Writer, layout
from patchspec.plan import Cell, PerExample, Plan, Region, Sizes
from patchspec.runs import Runs

log = logging.getLogger(__name__)

#: Evaluates the metric on one cell's logits ``[batch, pos, vocab]``; ``cell`` names it in errors.
Evaluate = Callable[[torch.Tensor, Cell], torch.Tensor]
Hook = tuple[str, Callable[..., Any]]

_GATES = {
    "hook_result": "set_use_attn_result(True)",
    "hook_q_input": "set_use_split_qkv_input(True)",
    "hook_k_input": "set_use_split_qkv_input(True)",
    "hook_v_input": "set_use_split_qkv_input(True)",
    "hook_attn_in": "set_use_attn_in(True)",
    "hook_mlp_in": "set_use_hook_mlp_in(True)",
}


class Engine(Protocol):
    """An executor: the metric values of every cell of ``plan``, stacked on a leading dim."""

    def __call__(
        self,
        model: Any,
        plan: Plan,
        runs: Runs,
        evaluate: Evaluate,
        *,
        progress: bool,
        **options: Any,
    ) -> torch.Tensor: ...


def region_masks(
    regions: Sequence[Region | None], sizes: Sizes, device: torch.device | str
) -> Bool[torch.Tensor, "cell batch *dims"]:
    """Boolean masks of several regions of one activation, stacked on a leading cell dim.

    Entry ``k`` is the mask of ``regions[k]`` (all False where it is ``None``). The batch dim
    has size 1 (broadcast over prompts) unless some region selects a dim per prompt
    (:class:`~patchspec.plan.PerExample`), and so does every other dim that no region
    restricts: the masks broadcast against the activation, they are not expanded to it.

    Example:
        >>> masks = region_masks([region_a, region_b], sizes, "cpu")  # doctest: +SKIP
        >>> torch.where(masks, clean.unsqueeze(0), act.unsqueeze(0))  # doctest: +SKIP
    """
    activation = next((r.activation for r in regions if r is not None), None)
    n = len(regions)
    if activation is None:
        return torch.zeros((n, 1), dtype=torch.bool, device=device)
    dims = layout(activation).dims[1:]
    present = [(k, r) for k, r in enumerate(regions) if r is not None]
    rows = 1
    for _k, region in present:
        if any(isinstance(selection, PerExample) for _dim, selection in region.index):
            rows = sizes.batch
    mask = torch.ones((n, rows) + (1,) * len(dims), dtype=torch.bool)
    mask[[k for k, r in enumerate(regions) if r is None]] = False
    for axis, dim in enumerate(dims):
        selections = [(k, region.index[axis][1]) for k, region in present]
        if all(selection is None for _k, selection in selections):
            continue
        size = sizes.size(dim)
        keep = torch.zeros((n, rows, size), dtype=torch.bool)
        cells: list[int] = []
        prompts: list[int] = []
        indices: list[int] = []
        for k, selection in selections:
            if selection is None:
                keep[k] = True
            elif isinstance(selection, PerExample):
                for b, values in enumerate(selection.values):
                    cells += [k] * len(values)
                    prompts += [b] * len(values)
                    indices += values
            else:
                for b in range(rows):
                    cells += [k] * len(selection)
                    prompts += [b] * len(selection)
                    indices += selection
        keep[cells, prompts, indices] = True
        view = [n, rows] + [1] * len(dims)
        view[axis + 2] = size
        mask = mask & keep.view(view)
    return mask.to(device)


def region_mask(region: Region, sizes: Sizes, device: torch.device | str) -> torch.Tensor:
    """Boolean mask of ``region`` over its activation.

    The batch dim has size 1 (broadcast over prompts) unless some dim is selected per prompt
    (:class:`~patchspec.plan.PerExample`), in which case it has ``sizes.batch`` entries.
    """
    mask = region_masks([region], sizes, device)[0]
    return mask.expand(mask.shape[0], *sizes.shape(region.activation)[1:])


def check_hooks(model: Any, plan: Plan) -> None:
    """Fail before any forward pass when a hook point is missing or gated behind a flag.

    Raises:
        HookError: a hook the plan needs is unknown to the model or needs a ``set_use_*`` flag.
    """
    hook_dict = getattr(model, "hook_dict", {})
    for name in plan.hook_names:
        for needed in writer_hooks(name):
            if needed not in hook_dict:
                raise HookError(
                    f"the model has no hook point {needed!r} (architecture "
                    f"{getattr(model.cfg, 'architecture', None) or type(model).__name__}); "
                    "this activation cannot be patched on it"
                )
            leaf = needed.rsplit(".", 1)[-1]
            if leaf in _GATES and not _gate_open(model, leaf):
                raise HookError(
                    f"hook {needed!r} is gated: call model.{_GATES[leaf]} before patching it"
                )


def _gate_open(model: Any, leaf: str) -> bool:
    flag = {
        "hook_result": "use_attn_result",
        "hook_attn_in": "use_attn_in",
        "hook_mlp_in": "use_hook_mlp_in",
    }.get(leaf, "use_split_qkv_input")
    return bool(getattr(model.cfg, flag, False))


def writer_hooks(hook_name: str) -> tuple[str, ...]:
    """The hook points a region at ``hook_name`` registers (two for ``resid_mid``)."""
    if ".hook_resid_mid" in hook_name:
        block = hook_name.rsplit(".", 1)[0]
        return (f"{block}.hook_resid_pre", f"{block}.hook_attn_out")
    return (hook_name,)


class FireCounter:
    """Counts how often each registered hook fires, to prove every patch was applied."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so that each call is counted under ``name``."""
        key = f"{name}#{len(self.counts)}"
        self.counts[key] = 0

        def counted(act: torch.Tensor, hook: Any) -> Any:
            self.counts[key] += 1
            return fn(act, hook)

        return counted

    def check(self, times: int = 1) -> None:
        """Raise unless every wrapped hook fired exactly ``times`` times.

        Raises:
            HookError: a hook fired a different number of times.
        """
        for key, count in self.counts.items():
            if count != times:
                name = key.rsplit("#", 1)[0]
                raise HookError(
                    f"hook {name!r} fired {count} times in one forward pass, expected {times}; "
                    "its patch was not applied as planned (does this model run that hook point?)"
                )


def write_hooks(
    hook_name: str,
    writer: Writer,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    copies: int = 1,
) -> list[Hook]:
    """Forward hooks that write ``values`` into the activation at ``hook_name`` where ``mask``.

    The activation holds ``copies`` copies of the batch stacked on its first dim
    (``[copies * batch, ...]``, copy-major); it is viewed as ``[copies, batch, ...]``, against
    which ``mask`` (``[copies, 1 | batch, ...]``) and ``values`` (``[batch, ...]`` or
    ``[copies, batch, ...]``) broadcast. A ``resid_mid`` writer reads ``resid_pre`` and rewrites
    ``attn_out`` of the same block so that the residual stream itself takes the values.
    """
    cast: dict[torch.dtype, torch.Tensor] = {}

    def target(act: torch.Tensor) -> torch.Tensor:
        if act.dtype not in cast:
            cast[act.dtype] = values.to(act.dtype)
        return cast[act.dtype]

    def write(act: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, new, act.unflatten(0, (copies, -1))).flatten(0, 1)

    if writer == "resid_mid":
        pre_name, attn_out_name = writer_hooks(hook_name)
        seen: dict[str, torch.Tensor] = {}

        def read_resid_pre(act: torch.Tensor, hook: Any) -> None:
            seen["resid_pre"] = act

        def write_attn_out(act: torch.Tensor, hook: Any) -> torch.Tensor:
            # resid_mid = resid_pre + attn_out, so this attn_out makes resid_mid == values here.
            resid_pre = seen.pop("resid_pre").unflatten(0, (copies, -1))
            return write(act, target(act) - resid_pre)

        return [(pre_name, read_resid_pre), (attn_out_name, write_attn_out)]

    def overwrite(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return write(act, target(act))

    return [(hook_name, overwrite)]


def region_hooks(
    region: Region,
    values: torch.Tensor,
    mask: torch.Tensor | None,
) -> list[Hook]:
    """Forward hooks that write ``values`` into ``region`` (``mask`` selects the region)."""
    if region.setter is not None:
        setter, index = region.setter, list(region.setter_index)

        def set_with_setter(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return setter(act.clone(), index, values)

        return [(region.hook_name, set_with_setter)]
    if mask is None:
        raise ValueError(f"region at {region.hook_name!r} has neither a setter nor a mask")
    writer = layout(region.activation).writer
    return write_hooks(region.hook_name, writer, values, mask.unsqueeze(0))


def source_values(region: Region, runs: Runs) -> torch.Tensor:
    """The full tensor a region takes its patched values from."""
    return region.source.values(region.hook_name, runs)


def logit_positions(evaluate: Any, seq: int) -> tuple[int, ...] | None:
    """The sorted, non-negative positions ``evaluate`` reads, or ``None`` when it reads all.

    Example:
        >>> class Last:
        ...     positions = (-1,)
        >>> logit_positions(Last(), seq=6)
        (5,)
    """
    positions = getattr(evaluate, "positions", None)
    if positions is None:
        return None
    return tuple(sorted({int(p) % seq for p in positions}))


def evaluate_cells(
    evaluate: Any,
    logits: Float[torch.Tensor, "copies_batch pos vocab"],
    cells: Sequence[Cell],
    positions: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The values of ``len(cells)`` cells whose logits are stacked copy-major in ``logits``.

    Uses ``evaluate.many`` when it exists, else calls ``evaluate`` on each cell's slice (which
    needs full logits: ``positions`` must then be ``None``).
    """
    many = getattr(evaluate, "many", None)
    if many is not None:
        return many(logits, cells, positions)
    if positions is not None:
        raise ValueError("an evaluate callable without .many() needs full logits")
    parts = logits.unflatten(0, (len(cells), -1))
    return torch.stack([evaluate(part, cell) for part, cell in zip(parts, cells, strict=True)])


def run_reference(
    model: Any,
    plan: Plan,
    runs: Runs,
    evaluate: Evaluate,
    *,
    progress: bool = False,
    **options: Any,
) -> torch.Tensor:
    """One full forward pass per cell, through ``model.run_with_hooks``.

    Returns:
        The metric value of every cell, stacked on a leading cell dim.
    """
    if options:
        raise TypeError(f"the reference engine takes no options, got {sorted(options)}")
    sizes = Sizes.of(model, runs.batch, runs.seq)
    device = runs.corrupted_tokens.device
    tokens = runs.tokens(plan.receiver)
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for cell in tqdm(
            plan.cells, desc="patching (reference)", unit="cell", disable=not progress
        ):
            hooks: list[Hook] = []
            counter = FireCounter()
            for region in cell.regions:
                mask = None if region.setter is not None else region_mask(region, sizes, device)
                for name, fn in region_hooks(region, source_values(region, runs), mask):
                    hooks.append((name, counter.wrap(name, fn)))
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            counter.check()
            out.append(evaluate(logits, cell))
    log.debug("reference engine: %d cells, %d forwards", len(plan.cells), len(plan.cells))
    return torch.stack(out) if out else torch.empty(0)


ENGINES: dict[str, Engine] = {"reference": run_reference}


def get_engine(name: str) -> Engine:
    """Look up an executor by name.

    Raises:
        ValueError: unknown engine name.
    """
    from patchspec.errors import PatchSpecError, did_you_mean

    if name not in ENGINES:
        raise PatchSpecError(
            f"unknown engine {name!r}; valid engines are {', '.join(ENGINES)}{did_you_mean(name, ENGINES)}"
        )
    return ENGINES[name]


def describe_cell(plan: Plan, cell: Cell) -> str:
    """``"layer=3, head=1"``: a cell's coordinates for error messages."""
    return ", ".join(f"{d}={v}" for d, v in zip(plan.dims, cell.coords, strict=True))
