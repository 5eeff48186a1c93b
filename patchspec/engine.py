"""Executors: turn a :class:`~patchspec.plan.Plan` into one metric value per cell.

The *reference* executor runs one full forward pass per cell through the model's own
``run_with_hooks``. It is deliberately plain: it exists to prove faster executors exact.
Executors are registered by name in :data:`ENGINES`; every public entry point takes
``engine=`` to pick one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from patchspec.errors import HookError
from patchspec.layouts import layout
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
        self, model: Any, plan: Plan, runs: Runs, evaluate: Evaluate, *, progress: bool, **options: Any
    ) -> torch.Tensor: ...


def region_mask(region: Region, sizes: Sizes, device: torch.device) -> torch.Tensor:
    """Boolean mask of ``region`` over its activation.

    The batch dim has size 1 (broadcast over prompts) unless some dim is selected per prompt
    (:class:`~patchspec.plan.PerExample`), in which case it has ``sizes.batch`` entries.
    """
    dims = layout(region.activation).dims
    shape = [1] + [sizes.size(d) for d in dims[1:]]
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    for axis, (_dim, selection) in enumerate(region.index, start=1):
        if selection is None:
            continue
        view = [1] * len(shape)
        view[axis] = shape[axis]
        if isinstance(selection, PerExample):
            keep = torch.zeros(sizes.batch, shape[axis], dtype=torch.bool, device=device)
            for b, indices in enumerate(selection.values):
                keep[b, list(indices)] = True
            view[0] = sizes.batch
        else:
            keep = torch.zeros(shape[axis], dtype=torch.bool, device=device)
            keep[list(selection)] = True
        mask = mask & keep.view(view)
    return mask


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
    assert mask is not None
    if layout(region.activation).writer == "resid_mid":
        pre_name, attn_out_name = writer_hooks(region.hook_name)
        seen: dict[str, torch.Tensor] = {}

        def read_resid_pre(act: torch.Tensor, hook: Any) -> None:
            seen["resid_pre"] = act

        def write_attn_out(act: torch.Tensor, hook: Any) -> torch.Tensor:
            # resid_mid = resid_pre + attn_out, so this attn_out makes resid_mid == values here.
            target = values.to(act.dtype) - seen["resid_pre"]
            return torch.where(mask, target, act)

        return [(pre_name, read_resid_pre), (attn_out_name, write_attn_out)]

    def overwrite(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.where(mask, values.to(act.dtype), act)

    return [(region.hook_name, overwrite)]


def source_values(region: Region, runs: Runs) -> torch.Tensor:
    """The full tensor a region takes its patched values from."""
    return region.source.values(region.hook_name, runs)


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
        for cell in tqdm(plan.cells, desc="patching (reference)", unit="cell", disable=not progress):
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


