"""Drop-in twins of ``transformer_lens.patching``: same names, signatures and outputs.

Replace ``import transformer_lens.patching as patching`` with ``import patchspec.compat as
patching`` and nothing changes but the executor (patchspec's, batched by default) and clearer
errors. Every function here is generated from :data:`patchspec.catalog.TABLE`.

One deliberate difference: ``get_act_patch_resid_mid`` patches the residual stream itself.
On TransformerLens 4.3's ``TransformerBridge``, ``hook_resid_mid`` is the second layer norm's
input, so TransformerLens's own function only changes what the MLP reads and returns the same
numbers as ``get_act_patch_mlp_out``. Here, patching every position of ``resid_mid`` restores
the clean run exactly, as it did on ``HookedTransformer``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import einops
import pandas as pd
import torch
import transformer_lens.patching as _tl
from transformer_lens.patching import (
    PatchingResult,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    make_df_from_ranges,
)

from patchspec.catalog import STACKS, TABLE, Entry, Stack
from patchspec.engine import check_hooks, get_engine
from patchspec.errors import PatchSpecError, SpecError
from patchspec.layouts import LAYOUTS, layout
from patchspec.plan import Cell, Region, Sizes, explicit_plan
from patchspec.runs import Runs, check_eval_mode
from patchspec.sources import Clean

__all__ = [
    "PatchingResult",
    "generic_activation_patch",
    "layer_head_dest_src_pos_pattern_patch_setter",
    "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter",
    "layer_head_vector_patch_setter",
    "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
    "make_df_from_ranges",
]

#: TransformerLens's setters, by the activation dims (after ``batch``) their index entries
#: after ``layer`` select, in order. Any other setter is called as it is, cell by cell.
SETTER_DIMS: dict[Callable[..., Any], tuple[int, ...]] = {
    layer_pos_patch_setter: (1,),
    layer_pos_head_vector_patch_setter: (1, 2),
    layer_head_vector_patch_setter: (2,),
    layer_head_pattern_patch_setter: (1,),
    layer_head_pos_pattern_patch_setter: (1, 2),
    layer_head_dest_src_pos_pattern_patch_setter: (1, 2, 3),
}

#: TransformerLens's axis spellings -> patchspec's, for the sizes of ``index_axis_names``.
_TL_AXES = {"layer": "layer", "pos": "pos", "head_index": "head", "head": "head", "src_pos": "src_pos", "dest_pos": "dest_pos"}


def _region(activation: str, setter: Callable[..., Any], index: Sequence[int]) -> Region:
    """The region a TransformerLens ``(setter, index)`` pair patches."""
    layer = int(index[0])
    dims = SETTER_DIMS.get(setter)
    if dims is None:
        return Region(activation, layer, (), Clean(), setter=setter, setter_index=tuple(index))
    act_dims = layout(activation).dims
    if len(index) - 1 != len(dims):
        raise SpecError(
            f"{setter.__name__} expects an index of {len(dims) + 1} entries (layer first), got {list(index)}"
        )
    chosen = {act_dims[d]: (int(i),) for d, i in zip(dims, index[1:], strict=True)}
    per_dim = tuple((d, chosen.get(d)) for d in act_dims[1:])
    return Region(activation, layer, per_dim, Clean())


def _axis_size(name: str, activation: str, sizes: Sizes) -> int:
    if name not in _TL_AXES:
        raise SpecError(f"unknown index axis {name!r}; valid axes are {', '.join(_TL_AXES)}")
    dim = _TL_AXES[name]
    if dim == "head" and activation in ("k", "v"):
        dim = "kv_head"
    return sizes.size(dim)


def generic_activation_patch(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    patching_metric: Callable[[torch.Tensor], torch.Tensor] | Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    patch_setter: Callable[..., Any],
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: pd.DataFrame | None = None,
    return_index_df: bool = False,
    *,
    reduce: str = "scalar",
    baseline: bool = False,
    engine: str | None = None,
    progress: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, pd.DataFrame] | PatchingResult:
    """Drop-in for ``transformer_lens.patching.generic_activation_patch``.

    Patches ``activation_name`` cell by cell with ``patch_setter`` (one of TransformerLens's six
    setters, run as a vectorised region, or any callable ``(act, index, clean_act) -> act``) over
    the product of ``index_axis_names`` or the rows of ``index_df`` (layer first), and returns
    exactly what TransformerLens returns: a tensor shaped like the axes (or flat, one entry per
    ``index_df`` row), optionally with the index frame, or a ``PatchingResult`` under
    ``reduce="none"``/``"mean"`` with per-example metrics, ``baseline=True`` or a metric mapping.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run (``model.run_with_cache(clean_tokens)[1]``).
        patching_metric: ``logits -> scalar`` (or ``[batch]`` under ``reduce``), or a mapping.
        patch_setter: How one index patches the activation.
        activation_name: Activation to patch, as in ``get_act_name`` (``"z"``, ``"resid_pre"``).
        index_axis_names: Axes to sweep fully (``layer`` first).
        index_df: Explicit rows of indices instead (``layer`` first); output is flat.
        return_index_df: Also return the index frame (tensor output only).
        reduce: ``"scalar"``, ``"mean"`` or ``"none"``, as in TransformerLens.
        baseline: Also evaluate the unpatched corrupted run.
        engine: patchspec executor (``"batched"`` by default, or ``"reference"``).
        progress: Show a progress bar, as TransformerLens does.

    Returns:
        The same value TransformerLens returns for these arguments.

    Raises:
        PatchSpecError: unknown activation or axis, a metric of the wrong shape, a model in
            training mode, or a hook that did not fire.
    """
    if reduce not in ("scalar", "mean", "none"):
        raise PatchSpecError(f"reduce must be one of ('scalar', 'mean', 'none'), got {reduce!r}")
    if activation_name not in LAYOUTS:
        layout(activation_name)  # raises with the list of valid names
    check_eval_mode(model)
    metrics = dict(patching_metric) if isinstance(patching_metric, Mapping) else {"metric": patching_metric}
    if not metrics:
        raise PatchSpecError("patching_metric mapping must contain at least one metric")
    want_result = isinstance(patching_metric, Mapping) or reduce == "none" or baseline
    if want_result and return_index_df:
        raise PatchSpecError("return_index_df only applies to the tensor return; a PatchingResult carries index_df")
    runs = Runs(model, None, corrupted_tokens, clean_cache=clean_cache)
    sizes = Sizes.of(model, runs.batch, runs.seq)
    flat = index_df is not None
    if index_df is None:
        if index_axis_names is None:
            raise PatchSpecError("give index_axis_names or index_df")
        ranges = [_axis_size(name, activation_name, sizes) for name in index_axis_names]
        index_df = make_df_from_ranges(ranges, list(index_axis_names))
        rows: list[tuple[int, ...]] = list(itertools.product(*(range(r) for r in ranges)))
        cell_shape: tuple[int, ...] = tuple(ranges)
    else:
        if index_axis_names is not None:
            raise PatchSpecError("give index_axis_names or index_df, not both")
        rows = [tuple(int(v) for v in row) for row in index_df.itertuples(index=False)]
        cell_shape = (len(rows),)
    cells = [Cell(coords=row, regions=(_region(activation_name, patch_setter, row),)) for row in rows]
    p = explicit_plan(("cell",), {"cell": tuple(range(len(cells)))}, cells)
    check_hooks(model, p)
    batch = runs.batch
    per_example = reduce != "scalar"

    def evaluate(logits: torch.Tensor, cell: Cell | None = None) -> torch.Tensor:
        out = []
        for name, fn in metrics.items():
            value = torch.as_tensor(fn(logits))
            if per_example and (value.ndim != 1 or value.shape[0] != batch):
                raise PatchSpecError(
                    f"patching_metric {name!r} must return a [batch] tensor of length {batch} under "
                    f"reduce={reduce!r}, got shape {tuple(value.shape)}"
                )
            if not per_example and value.ndim != 0:
                raise PatchSpecError(
                    f"patching_metric {name!r} must return a scalar under reduce='scalar', got shape "
                    f"{tuple(value.shape)}; return a [batch] tensor and pass reduce='mean' or reduce='none'"
                )
            out.append(value.detach())
        return torch.stack(out).float()

    values = get_engine(_engine(engine))(model, p, runs, evaluate, progress=progress)
    store = values.to(getattr(model.cfg, "device", None) or values.device)
    store = store.movedim(0, 1).reshape((len(metrics), *cell_shape, *((batch,) if per_example else ())))
    base = None
    if baseline:
        with torch.inference_mode():
            base = evaluate(runs.logits("corrupted"))
    if reduce == "mean":
        store = store.mean(dim=-1)
        base = None if base is None else base.mean(dim=-1)
    if not want_result:
        return (store[0], index_df) if return_index_df else store[0]
    has_axis = isinstance(patching_metric, Mapping)
    return PatchingResult(
        values=store if has_axis else store[0],
        axis_names=[] if flat else list(index_axis_names or []),
        index_df=index_df,
        metric_names=list(metrics),
        reduced=reduce != "none",
        baseline=None if base is None else (base if has_axis else base[0]),
        has_metric_axis=has_axis,
    )


def _engine(engine: str | None) -> str:
    from patchspec.sweep import _engine_name

    return _engine_name(engine)


_SETTERS = {fn.__name__: fn for fn in SETTER_DIMS}


def _docstring(entry: Entry) -> str:
    dims = ", ".join(entry.spec.axes)
    tl_shape = ", ".join(entry.tl_axes)
    return f"""Patch {entry.what}: drop-in for ``transformer_lens.patching.{entry.tl_function}``.

    Same signature and output as TransformerLens: a tensor of shape [{tl_shape}]
    (result dims: {dims}). The labelled equivalent is ``patchspec.catalog.{_spec_name(entry)}``:
    ``{entry.spec!r}``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [{tl_shape}], or a ``PatchingResult`` as in TransformerLens.
    """


def _spec_name(entry: Entry) -> str:
    from patchspec import catalog

    return next(k for k, v in catalog.SPECS.items() if v is entry.spec)


def _make(entry: Entry) -> Callable[..., Any]:
    setter = _SETTERS[entry.tl_setter]

    def patch(
        model: Any,
        corrupted_tokens: torch.Tensor,
        clean_cache: Any,
        patching_metric: Any,
        **kwargs: Any,
    ) -> Any:
        if "index_df" not in kwargs:
            kwargs.setdefault("index_axis_names", entry.tl_axes)
        return generic_activation_patch(
            model, corrupted_tokens, clean_cache, patching_metric, setter, entry.tl_activation, **kwargs
        )

    patch.__name__ = patch.__qualname__ = entry.tl_function
    patch.__doc__ = _docstring(entry)
    patch.__module__ = __name__
    return patch


def _stack_docstring(stack: Stack) -> str:
    parts = ", ".join(f"``{name}``" for name in stack.entries)
    return f"""Patch {stack.what}: drop-in for ``transformer_lens.patching.{stack.tl_function}``.

    Runs {parts} and stacks them on a leading ``patch_type`` axis: a tensor of shape
    [{", ".join(stack.tl_axes)}] (result dims: {", ".join(stack.tl_axes)}). As in TransformerLens,
    key/value sweeps of grouped-query models are zero-padded to ``n_heads``: those zeros are
    padding, not measurements. The labelled equivalent is a :class:`patchspec.Sweep` of the
    same specs, which returns one variable per spec and never pads.

    Returns:
        Tensor of shape [{", ".join(stack.tl_axes)}], or a ``PatchingResult`` with a
        ``patch_type`` axis when ``reduce``/``baseline`` are given, as in TransformerLens.
    """


def _make_stack(stack: Stack) -> Callable[..., Any]:
    def patch(model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any, **kwargs: Any) -> Any:
        fns = [globals()[name] for name in stack.entries]
        axis_names = [BY_NAME[name].tl_axes for name in stack.entries]
        want_base = bool(kwargs.pop("baseline", False))
        results = []
        for i, (fn, axes) in enumerate(zip(fns, axis_names, strict=True)):
            out = fn(model, corrupted_tokens, clean_cache, metric, baseline=want_base and i == 0, **kwargs)
            if want_base and isinstance(out, torch.Tensor):
                out = _tl._wrap_tensor_result(out, axes)
            results.append(out)
        if all(isinstance(r, torch.Tensor) for r in results):
            if len(results) == 5:
                n_heads = results[0].size(-1)
                for i in (2, 3):  # GQA keys/values: zero-padded to n_heads, as TransformerLens does
                    results[i] = torch.nn.functional.pad(results[i], (0, n_heads - results[i].size(-1)))
                if results[4].ndim == 3:
                    results[4] = einops.rearrange(results[4], "layer head pos -> layer pos head")
            return torch.stack(results, dim=0)
        type_names = _tl._BLOCK_TYPES if len(results) == 3 else _tl._HEAD_TYPES
        return _tl._stack_patch_types(
            results, axis_order=stack.tl_axes[1:], n_heads=model.cfg.n_heads if len(results) == 5 else 0, type_names=type_names
        )

    patch.__name__ = patch.__qualname__ = stack.tl_function
    patch.__doc__ = _stack_docstring(stack)
    patch.__module__ = __name__
    return patch


BY_NAME: dict[str, Entry] = {entry.tl_function: entry for entry in TABLE}

for _entry in TABLE:
    globals()[_entry.tl_function] = _make(_entry)
    __all__.append(_entry.tl_function)
for _stack in STACKS:
    globals()[_stack.tl_function] = _make_stack(_stack)
    __all__.append(_stack.tl_function)
