"""Drop-in twins of ``transformer_lens.patching``: same names, signatures and outputs.

Replace ``import transformer_lens.patching as patching`` with ``import patchspec.compat as
patching`` and nothing changes but the executor (patchspec's, batched by default) and clearer
errors. The functions at the bottom of this module are generated from
:data:`patchspec.catalog.TABLE` and :data:`patchspec.catalog.STACKS` by
``scripts/generate_compat.py`` (a test checks that they are up to date); every one goes
through :mod:`patchspec.runner`, like ``spec.run``. TransformerLens's patch setters are
translated here, once, into regions: its six setters by the activation dims they index, and
any other setter by probing which entries it writes; no setter reaches the core.

One deliberate difference: ``get_act_patch_resid_mid`` patches the residual stream itself.
On TransformerLens 4.3's ``TransformerBridge``, ``hook_resid_mid`` is the second layer norm's
input, so TransformerLens's own function only changes what the MLP reads and returns the same
numbers as ``get_act_patch_mlp_out``. Here, patching every position of ``resid_mid`` restores
the clean run exactly, as it did on ``HookedTransformer``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
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

from patchspec import runner
from patchspec.catalog import STACKS, TABLE, Entry, Stack
from patchspec.errors import MetricError, PatchSpecError, SpecError, did_you_mean
from patchspec.layouts import layout
from patchspec.metrics import Metric, _device_index
from patchspec.model.adapter import ModelAdapter
from patchspec.options import RunOptions
from patchspec.plan.cells import Cell, Region, normalise_int
from patchspec.plan.grid import Grid, compile, explicit_grid
from patchspec.plan.sizes import Sizes
from patchspec.sources import Clean, Receiver, Source
from patchspec.spec import PatchSpec

#: TransformerLens's setters, by the activation dims (after ``batch``) their index entries
#: after ``layer`` select, in order. Any other setter is probed (see :func:`probe_setter`).
SETTER_DIMS: dict[Callable[..., Any], tuple[int, ...]] = {
    layer_pos_patch_setter: (1,),
    layer_pos_head_vector_patch_setter: (1, 2),
    layer_head_vector_patch_setter: (2,),
    layer_head_pattern_patch_setter: (1,),
    layer_head_pos_pattern_patch_setter: (1, 2),
    layer_head_dest_src_pos_pattern_patch_setter: (1, 2, 3),
}

#: TransformerLens's axis spellings -> patchspec's, for the sizes of ``index_axis_names``.
TL_AXES = {
    "layer": "layer",
    "pos": "pos",
    "head_index": "head",
    "head": "head",
    "src_pos": "src_pos",
    "dest_pos": "dest_pos",
}
#: How TransformerLens renames result axes when it stacks them (``_RESULT_AXIS_RENAMES``).
STACK_RENAMES = {"head_index": "head", "dest_pos": "pos"}

BY_NAME: dict[str, Entry] = {entry.tl_function: entry for entry in TABLE}

log = logging.getLogger(__name__)


@attrs.frozen
class SetterValues(Source):
    """What a user-written TransformerLens setter writes at one index (internal to compat).

    TransformerLens calls ``setter(corrupted_activation, index, clean_activation)`` in the
    patched run; a drop-in cell patches one hook, so the activation it receives there is the
    unpatched corrupted run's, and the setter's output can be computed before the pass.
    """

    kind: ClassVar[str] = "setter"
    setter: Callable[..., Any]
    index: tuple[int, ...]

    def values(self, hook_name: str, runs: Any) -> torch.Tensor:
        """The setter's output on the unpatched activations."""
        corrupted = runs.activation("corrupted", hook_name)
        clean = runs.activation("clean", hook_name)
        return torch.as_tensor(self.setter(corrupted.clone(), list(self.index), clean))

    def needs(self) -> tuple[Receiver, ...]:
        """Both runs' caches."""
        return ("clean", "corrupted")


def probe_setter(
    activation: str, setter: Callable[..., Any], index: Sequence[int], sizes: Sizes
) -> Region:
    """The region a user-written patch setter writes for ``index``, found by calling it.

    The setter is called on two probes of distinct values (activation and clean activation of
    opposite signs, then swapped and scaled). A setter that copies the same product of per-dim
    selections from the clean activation in both (as every indexing setter does) patches that
    region from :class:`~patchspec.sources.Clean`. Any other setter (a blend, a maximum)
    patches the whole activation with its own output on the real activations
    (:class:`SetterValues`), which is exact: a drop-in cell patches one hook, whose input is
    the unpatched corrupted activation.

    Raises:
        SpecError: the setter returns a tensor of another shape.
    """
    dims = layout(activation).dims
    shape = (1, *sizes.shape(activation)[1:])
    count = int(np.prod(shape))
    ramp = torch.arange(1, count + 1, dtype=torch.float64).view(shape)
    name = getattr(setter, "__name__", repr(setter))
    regions = []
    copies = True
    for act, clean in ((ramp, -ramp), (-ramp, 2 * ramp + 0.5)):
        out = torch.as_tensor(setter(act.clone(), list(index), clean.clone()))
        if tuple(out.shape) != shape:
            raise SpecError(
                f"patch setter {name} returned shape {tuple(out.shape)} for index {list(index)}; "
                f"it must return the activation's shape {shape}"
            )
        written = out != act
        copies = copies and bool((out[written] == clean[written]).all())
        regions.append(written)
    region = _product(regions[0], dims) if copies and bool((regions[0] == regions[1]).all()) else None
    if region is None:
        every = tuple((dim, None) for dim in dims[1:])
        source = SetterValues(setter, tuple(int(i) for i in index))
        return Region(activation, int(index[0]), every, source)
    return Region(activation, int(index[0]), region, Clean())


def _product(written: torch.Tensor, dims: Sequence[str]) -> tuple[tuple[str, tuple[int, ...] | None], ...] | None:
    """``written`` as one selection per dim, or ``None`` when it is not such a product."""
    per_dim: list[tuple[str, tuple[int, ...] | None]] = []
    product = torch.ones_like(written)
    for axis, dim in enumerate(dims[1:], start=1):
        other = [a for a in range(written.ndim) if a != axis]
        chosen = written.any(dim=other) if other else written
        picked = tuple(int(i) for i in chosen.nonzero().flatten())
        view = [1] * written.ndim
        view[axis] = -1
        product = product & chosen.view(view)
        per_dim.append((dim, None if len(picked) == written.shape[axis] else picked))
    return tuple(per_dim) if bool((product == written).all()) else None


def _grid(
    activation: str, setter: Callable[..., Any], rows: Sequence[Sequence[int]], sizes: Sizes
) -> Grid:
    """The grid of TransformerLens's ``(setter, rows)``: a spec for its own setters, else probed
    regions, one explicit cell per row."""
    dims = SETTER_DIMS.get(setter)
    if dims is None:
        cells = [
            Cell((i,), (probe_setter(activation, setter, row, sizes),)) for i, row in enumerate(rows)
        ]
        return explicit_grid(("cell",), {"cell": tuple(range(len(cells)))}, cells, sizes)
    act_dims = layout(activation).dims
    axes = ("layer", *(act_dims[d] for d in dims))
    table = []
    for row in rows:
        if len(row) != len(axes):
            raise SpecError(
                f"{setter.__name__} expects an index of {len(axes)} entries (layer first), got "
                f"{list(row)}"
            )
        table.append(
            [
                normalise_int(activation, axis, int(v), sizes.size(axis), "index")
                for axis, v in zip(axes, row, strict=True)
            ]
        )
    spec = PatchSpec(activation, axes=axes)
    return compile(spec, sizes).with_rows(np.asarray(table, dtype=np.int64).reshape(-1, len(axes)))


def _axis_size(name: str, activation: str, sizes: Sizes) -> int:
    if name not in TL_AXES:
        raise SpecError(f"unknown index axis {name!r}; valid axes are {', '.join(TL_AXES)}")
    dim = TL_AXES[name]
    if dim == "head" and "kv_head" in layout(activation).dims:
        dim = "kv_head"
    return sizes.size(dim)


def _check_metric(name: str, value: Any, reduce: str, batch: int) -> None:
    if not isinstance(value, torch.Tensor | float | int) or isinstance(value, bool):
        raise PatchSpecError(
            f"patching_metric {name!r} must return a tensor (a scalar, or [batch] under "
            f"reduce='mean'/'none'), got {type(value).__name__}: {value!r:.80}"
        )
    value = torch.as_tensor(value)
    if reduce != "scalar" and (value.ndim != 1 or value.shape[0] != batch):
        raise PatchSpecError(
            f"patching_metric {name!r} must return a [batch] tensor of length {batch} under "
            f"reduce={reduce!r}, got shape {tuple(value.shape)}"
        )
    if reduce == "scalar" and value.ndim != 0:
        raise PatchSpecError(
            f"patching_metric {name!r} must return a scalar under reduce='scalar', got shape "
            f"{tuple(value.shape)}; return a [batch] tensor and pass reduce='mean' or reduce='none'"
        )


def generic_activation_patch(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    patching_metric: Callable[[torch.Tensor], torch.Tensor]
    | Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
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
    metric_positions: str | Sequence[int] = "auto",
) -> torch.Tensor | tuple[torch.Tensor, pd.DataFrame] | PatchingResult:
    """Drop-in for ``transformer_lens.patching.generic_activation_patch``.

    Patches ``activation_name`` cell by cell with ``patch_setter`` (one of TransformerLens's six
    setters, run as a vectorised spec, or any indexing callable ``(act, index, clean_act) ->
    act``, translated to a region by :func:`probe_setter`) over the product of
    ``index_axis_names`` or the rows of ``index_df`` (layer first), and returns exactly what
    TransformerLens returns: a tensor shaped like the axes (or flat, one entry per ``index_df``
    row), optionally with the index frame, or a ``PatchingResult`` under ``reduce="none"``/
    ``"mean"`` with per-example metrics, ``baseline=True`` or a metric mapping.

    The patched passes unembed only the positions the metric reads (see
    :func:`metric_positions`); the metric still receives ``[batch, pos, vocab]`` logits,
    holding the patched values there and NaN elsewhere.

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
        engine: patchspec estimator (``"batched"`` by default, or ``"reference"``).
        progress: Show a progress bar, as TransformerLens does.
        metric_positions: Which positions of the logits the metric reads: ``"auto"`` (found
            by probing the metric, :func:`metric_positions`), ``"all"`` (always unembed every
            position, as TransformerLens does), or a list of positions (negative counting from
            the end), trusted without probing.

    Returns:
        The same value TransformerLens returns for these arguments.

    Raises:
        PatchSpecError: unknown activation or axis, a metric of the wrong shape, a model in
            training mode, a bad ``metric_positions``, or a hook that did not fire.
    """
    metrics, want_result = _check_call(patching_metric, reduce, baseline, return_index_df)
    layout(activation_name)  # raises with the list of valid names
    job = _Job(activation_name, patch_setter, index_axis_names, index_df)
    (out,) = _sweeps(
        model,
        corrupted_tokens,
        clean_cache,
        patching_metric,
        metrics,
        [(job, baseline)],
        reduce=reduce,
        want_result=want_result,
        return_index_df=return_index_df,
        engine=engine,
        progress=progress,
        metric_positions=metric_positions,
    )
    return out


def _check_call(
    patching_metric: Any, reduce: str, baseline: bool, return_index_df: bool
) -> tuple[dict[str, Callable[[torch.Tensor], Any]], bool]:
    """The metrics by name, and whether a ``PatchingResult`` is returned; before any pass."""
    if reduce not in ("scalar", "mean", "none"):
        raise PatchSpecError(f"reduce must be one of ('scalar', 'mean', 'none'), got {reduce!r}")
    metrics = (
        dict(patching_metric) if isinstance(patching_metric, Mapping) else {"metric": patching_metric}
    )
    if not metrics:
        raise PatchSpecError("patching_metric mapping must contain at least one metric")
    for name, fn in metrics.items():
        if isinstance(fn, Metric) or not callable(fn):
            what = "a patchspec Metric" if isinstance(fn, Metric) else type(fn).__name__
            raise PatchSpecError(
                f"patching_metric {name!r} is {what}; the drop-in functions take what "
                "TransformerLens takes, a callable logits -> value (e.g. lambda logits: "
                "(logits[:, -1, a] - logits[:, -1, b]).mean()). To use patchspec metrics, run "
                "the catalogue spec instead: catalog.<SPEC>.run(model, clean, corrupted, metric)"
            )
    want_result = isinstance(patching_metric, Mapping) or reduce == "none" or baseline
    if want_result and return_index_df:
        raise PatchSpecError(
            "return_index_df only applies to the tensor return; a PatchingResult carries index_df"
        )
    return metrics, want_result


@attrs.frozen(eq=False)
class _Job:
    """One drop-in sweep: what TransformerLens's generic loop is given besides the model."""

    activation: str
    setter: Callable[..., Any]
    index_axis_names: Sequence[str] | None
    index_df: pd.DataFrame | None

    def __attrs_post_init__(self) -> None:
        if self.index_df is None and self.index_axis_names is None:
            raise PatchSpecError("give index_axis_names or index_df")
        if self.index_df is not None and self.index_axis_names is not None:
            raise PatchSpecError("give index_axis_names or index_df, not both")

    def plan(self, sizes: Sizes) -> tuple[Grid, pd.DataFrame, tuple[int, ...], bool]:
        """The grid, the index frame, the shape of the cells and whether the output is flat."""
        if self.index_df is None:
            names = list(self.index_axis_names or ())
            ranges = [_axis_size(name, self.activation, sizes) for name in names]
            index_df = make_df_from_ranges(ranges, names)
            rows: list[tuple[int, ...]] = list(itertools.product(*(range(r) for r in ranges)))
            return _grid(self.activation, self.setter, rows, sizes), index_df, tuple(ranges), False
        rows = [tuple(int(v) for v in row) for row in self.index_df.itertuples(index=False)]
        grid = _grid(self.activation, self.setter, rows, sizes)
        return grid, self.index_df, (len(rows),), True


def _sweeps(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    patching_metric: Any,
    metrics: Mapping[str, Callable[[torch.Tensor], Any]],
    jobs: Sequence[tuple[_Job, bool]],
    *,
    reduce: str,
    want_result: bool,
    return_index_df: bool,
    engine: str | None,
    progress: bool,
    metric_positions: str | Sequence[int],
) -> list[Any]:
    """Run ``jobs`` (each with whether it returns the baseline) on one session: the unpatched
    corrupted run is made once for all of them, after every grid is added."""
    _positions_arg(metric_positions)
    with ModelAdapter.of(model).exclusive():  # one sweep of a model at a time
        run = runner.prepare(
            model,
            None,
            corrupted_tokens,
            metrics,
            options=RunOptions(engine=engine, progress=progress),
            clean_cache=clean_cache,
        )
        sizes = run.sizes
        if not isinstance(metric_positions, str):  # in range, before any pass
            _explicit_positions(metric_positions, sizes.seq)
        plans = [job.plan(sizes) for job, _base in jobs]
        grids = [run.add(grid) for grid, *_rest in plans]  # every grid before the unpatched run
        batch = run.session.batch
        with torch.inference_mode():
            corrupted_logits = run.session.logits("corrupted")
            for name, fn in metrics.items():
                _check_metric(name, fn(corrupted_logits), reduce, batch)
        fast = _restricted_run(run, metrics, corrupted_logits, metric_positions)
        outs = []
        for (job, base_wanted), grid, (_g, index_df, cell_shape, flat) in zip(
            jobs, grids, plans, strict=True
        ):
            values, base = _run_grid(run, fast, grid, job.activation)
            outs.append(
                _output(
                    model, values, base, metrics, patching_metric, batch=batch, reduce=reduce,
                    want_result=want_result or base_wanted, return_index_df=return_index_df,
                    baseline=base_wanted, index_df=index_df, cell_shape=cell_shape, flat=flat,
                    axis_names=job.index_axis_names,
                )
            )
    return outs


def _run_grid(
    run: runner.Run, fast: runner.Run | None, grid: Grid, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The values and corrupted baseline of ``grid``: on the position-restricted run when
    there is one; should the metric read a position it was not given (a non-finite value or
    an error), the grid is run again with full logits, so no wrong number is returned."""
    if fast is not None:
        try:
            values, _evaluate, _clean, base = runner.run_grid(fast, grid, label)
            return values, base
        except MetricError as err:
            log.info(
                "compat: the metric failed on logits restricted to the positions it was found "
                "to read (%s); running %s again with every position unembedded",
                err,
                label,
            )
    values, _evaluate, _clean, base = runner.run_grid(run, grid, label)
    return values, base


def _output(
    model: Any,
    values: torch.Tensor,
    base: torch.Tensor,
    metrics: Mapping[str, Any],
    patching_metric: Any,
    *,
    batch: int,
    reduce: str,
    want_result: bool,
    return_index_df: bool,
    baseline: bool,
    index_df: pd.DataFrame,
    cell_shape: tuple[int, ...],
    flat: bool,
    axis_names: Sequence[str] | None,
) -> Any:
    """What TransformerLens returns, from one grid's values."""
    per_example = reduce != "scalar"
    store = values.float().to(getattr(model.cfg, "device", None) or values.device)
    store = store.movedim(0, 1).reshape(
        (len(metrics), *cell_shape, *((batch,) if per_example else ()))
    )
    base = base.float()
    if reduce == "mean":
        store = store.mean(dim=-1)
        base = base.mean(dim=-1)
    if not want_result:
        return (store[0], index_df) if return_index_df else store[0]
    has_axis = isinstance(patching_metric, Mapping)
    return PatchingResult(
        values=store if has_axis else store[0],
        axis_names=[] if flat else list(axis_names or []),
        index_df=index_df,
        metric_names=list(metrics),
        reduced=reduce != "none",
        baseline=None if not baseline else (base if has_axis else base[0]),
        has_metric_axis=has_axis,
    )


# --- position-restricted unembedding of TransformerLens metrics ----------------------------------
#: What ``metric_positions=`` accepts besides a list of positions.
POSITION_MODES = ("auto", "all")


def _positions_arg(value: Any) -> None:
    """Refuse a bad ``metric_positions`` before any pass."""
    if isinstance(value, str):
        if value not in POSITION_MODES:
            raise PatchSpecError(
                f"metric_positions must be 'auto', 'all' or a list of positions, got {value!r}"
                + did_you_mean(value, POSITION_MODES)
            )
        return
    entries = list(value) if isinstance(value, Sequence | np.ndarray | torch.Tensor) else None
    if not entries or not all(
        isinstance(p, int | np.integer) and not isinstance(p, bool) for p in entries
    ):
        raise PatchSpecError(
            "metric_positions must be 'auto', 'all' or a non-empty list of int positions (negative "
            f"counting from the end), got {value!r}"
        )


def _probe_equal(metric: Callable[[torch.Tensor], Any], logits: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether ``metric(logits)`` is bit-identical to ``want`` (an error or NaN counts as not)."""
    version = logits._version
    try:
        got = torch.as_tensor(metric(logits))
    except Exception:
        return False
    if logits._version != version:  # the metric wrote into its input: nothing can be told
        raise _Mutates
    return got.shape == want.shape and got.dtype == want.dtype and bool(torch.equal(got.to(want.device), want))


class _Mutates(Exception):
    """The metric modified the logits it was given."""


def metric_positions(
    metric: Callable[[torch.Tensor], Any], logits: Float[torch.Tensor, "batch pos vocab"]
) -> tuple[int, ...] | None:
    """The positions of ``logits`` a TransformerLens-style metric reads, found by probing it;
    ``None`` when it reads every position or cannot be probed.

    The metric is evaluated on the unpatched logits and on copies in which the positions it
    is taken not to read hold NaN, then ``+M`` and ``-M`` (``M`` a quarter of the dtype's
    largest value): a set of positions is accepted only when all three values are
    bit-identical to the unpatched one. The last position is tried first; otherwise each
    position is replaced by NaN alone to find those that reach the value, and that set is
    checked the same way. A metric that raises, returns a non-finite value, writes into its
    input or is not deterministic reads "every position".

    This is exact for metrics whose value is a function of the logits at a fixed set of
    positions (``logits[:, -1]``, ``logits[arange(batch), answer_pos]``, a loss over all
    positions), whatever the values there. A metric that *chooses* where to read from the
    values (reads position 0 only when some logit is above a threshold the probes do not
    cross) can defeat any probe: pass ``metric_positions="all"`` (or the positions) to the
    drop-in functions. As a second guard, the drop-ins fill the positions not read with NaN
    and run the sweep again with full logits if the metric then fails or is non-finite.

    Example:
        >>> logits = torch.randn(2, 5, 7)
        >>> metric_positions(lambda x: (x[:, -1, 3] - x[:, -1, 4]).mean(), logits)
        (4,)
        >>> metric_positions(lambda x: x[:, [1, 3], 0].sum(), logits)
        (1, 3)
        >>> metric_positions(lambda x: x.log_softmax(-1)[:, :-1, 0].mean(), logits)
        (0, 1, 2, 3)
        >>> metric_positions(lambda x: x.mean(), logits) is None
        True
    """
    if logits.ndim != 3 or logits.shape[1] < 2 or not logits.is_floating_point():
        return None
    seq = int(logits.shape[1])
    with torch.inference_mode(False), torch.no_grad():
        logits = logits.clone()
        try:
            want = torch.as_tensor(metric(logits))
        except Exception:
            return None
        if not bool(torch.isfinite(want).all()):
            return None
        big = torch.finfo(logits.dtype).max / 4
        fills = (float("nan"), big, -big)

        def reads_only(keep: Sequence[int]) -> bool:
            others = [p for p in range(seq) if p not in keep]
            for fill in fills:
                probe = logits.clone()
                probe[:, others] = fill
                if not _probe_equal(metric, probe, want):
                    return False
            return True

        try:
            if reads_only((seq - 1,)):
                return (seq - 1,)
            probe = logits.clone()
            read = []
            for p in range(seq):
                probe[:, p] = float("nan")
                if not _probe_equal(metric, probe, want):
                    read.append(p)
                probe[:, p] = logits[:, p]
            if not read or len(read) == seq or not reads_only(read):
                return None
        except _Mutates:
            return None
        return tuple(read)


def _held_positions(
    value: str | Sequence[int],
    metric: Callable[[torch.Tensor], Any],
    logits: torch.Tensor,
) -> tuple[int, ...] | None:
    """The positions a drop-in unembeds for ``metric`` (``None``: all of them)."""
    if isinstance(value, str):
        return None if value == "all" else metric_positions(metric, logits)
    held = _explicit_positions(value, int(logits.shape[1]))
    return None if len(held) == int(logits.shape[1]) else held


def _explicit_positions(value: Sequence[int], seq: int) -> tuple[int, ...]:
    """Given positions as sorted token indices; negative ones count from the end.

    Raises:
        PatchSpecError: a position outside the prompts.
    """
    for p in value:
        if not -seq <= int(p) < seq:
            raise PatchSpecError(
                f"metric_positions holds position {int(p)}, outside the {seq} positions of the "
                f"prompts (valid: {-seq}..{seq - 1})"
            )
    return tuple(sorted({int(p) % seq for p in value}))


def _tl_metric(name: str, fn: Callable[[torch.Tensor], Any], held: tuple[int, ...], seq: int) -> Metric:
    """``fn`` as a :class:`Metric` declaring ``held``: given logits at those positions only, it
    calls ``fn`` on ``[batch, seq, vocab]`` logits holding them there and NaN elsewhere (a
    fresh tensor per call: ``fn`` may keep or modify what it is given)."""

    def call(logits: torch.Tensor, context: Any) -> Any:
        at = context.logit_positions
        if at is None:
            return fn(logits)
        full = logits.new_full((logits.shape[0], seq, logits.shape[2]), float("nan"))
        return fn(full.index_copy_(1, _device_index(tuple(at), logits.device), logits))

    return Metric(name, call, held, reduce=None)


def _restricted_run(
    run: runner.Run,
    metrics: Mapping[str, Callable[[torch.Tensor], Any]],
    logits: torch.Tensor,
    value: str | Sequence[int],
) -> runner.Run | None:
    """``run`` with metrics that unembed only the positions they read, or ``None`` when some
    metric reads every position (or ``value`` is ``"all"``)."""
    seq = int(logits.shape[1])
    wrapped = []
    for name, fn in metrics.items():
        held = _held_positions(value, fn, logits)
        if held is None:
            log.debug("compat: metric %r reads every position; unembedding all of them", name)
            return None
        wrapped.append(_tl_metric(name, fn, held, seq))
    return attrs.evolve(run, metrics=tuple(wrapped))


_SETTERS = {fn.__name__: fn for fn in SETTER_DIMS}


def _patch_entry(
    name: str, model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any, **kwargs: Any
) -> Any:
    """Run the catalogue entry ``name`` as TransformerLens's partial of the same name does."""
    entry = BY_NAME[name]
    if "index_df" not in kwargs:
        kwargs.setdefault("index_axis_names", entry.tl_axes)
    return generic_activation_patch(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        _SETTERS[entry.tl_setter],
        entry.tl_activation,
        **kwargs,
    )


def _as_result(tensor: torch.Tensor, axis_names: Sequence[str]) -> PatchingResult:
    """A tensor sweep as a ``PatchingResult``, so it stacks with typed ones."""
    return PatchingResult(
        values=tensor,
        axis_names=list(axis_names),
        index_df=make_df_from_ranges(list(tensor.shape), list(axis_names)),
        metric_names=["metric"],
        reduced=True,
    )


def _align(
    values: torch.Tensor, names: Sequence[str], axis_order: Sequence[str], lead: int, n_heads: int
) -> torch.Tensor:
    """``values`` with its axes permuted to ``axis_order`` and its head axis zero-padded to
    ``n_heads`` (grouped-query keys/values), as TransformerLens stacks them."""
    renamed = [STACK_RENAMES.get(n, n) for n in names]
    if sorted(renamed) != sorted(axis_order):
        raise PatchSpecError(f"sweep axes {renamed} do not match {list(axis_order)}")
    perm = list(range(lead)) + [lead + renamed.index(n) for n in axis_order]
    tail = list(range(lead + len(renamed), values.ndim))
    out = values.permute(*perm, *tail)
    if "head" in axis_order:
        axis = lead + list(axis_order).index("head")
        missing = n_heads - out.shape[axis]
        if missing > 0:
            pad = list(out.shape)
            pad[axis] = missing
            out = torch.cat([out, out.new_zeros(pad)], dim=axis)
    return out


def _stack(
    stack: Stack, model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any, **kwargs: Any
) -> torch.Tensor | PatchingResult:
    """Run a ``*_every`` helper: its entries on one session (the unpatched corrupted run made
    once for all of them), aligned and stacked on ``patch_type``."""
    want_base = bool(kwargs.pop("baseline", False))
    axis_order = stack.tl_axes[1:]
    n_heads = int(model.cfg.n_heads) if "head" in axis_order else 0
    reduce = kwargs.pop("reduce", "scalar")
    return_index_df = bool(kwargs.pop("return_index_df", False))
    index_df = kwargs.pop("index_df", None)
    options = {k: kwargs.pop(k) for k in ("engine", "progress", "metric_positions") if k in kwargs}
    if kwargs:
        raise PatchSpecError(
            f"{stack.tl_function} got unexpected keyword arguments {sorted(kwargs)}; it takes "
            "reduce, baseline, index_df, return_index_df, engine, progress, metric_positions"
        )
    metrics, _result = _check_call(metric, reduce, want_base, return_index_df)
    want_result = isinstance(metric, Mapping) or reduce == "none"  # and the entry with the baseline
    jobs = []
    for i, name in enumerate(stack.entries):
        entry = BY_NAME[name]
        layout(entry.tl_activation)
        axes = None if index_df is not None else entry.tl_axes
        jobs.append(
            (_Job(entry.tl_activation, _SETTERS[entry.tl_setter], axes, index_df), want_base and i == 0)
        )
    outs = _sweeps(
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        metrics,
        jobs,
        reduce=reduce,
        want_result=want_result,
        return_index_df=return_index_df,
        engine=options.get("engine"),
        progress=options.get("progress", True),
        metric_positions=options.get("metric_positions", "auto"),
    )
    results: list[torch.Tensor | PatchingResult] = []
    for name, out in zip(stack.entries, outs, strict=True):
        if want_base and isinstance(out, torch.Tensor):
            out = _as_result(out, BY_NAME[name].tl_axes)
        results.append(out)
    if all(isinstance(r, torch.Tensor) for r in results):
        return torch.stack(
            [
                _align(r, BY_NAME[name].tl_axes, axis_order, 0, n_heads)
                for r, name in zip(results, stack.entries, strict=True)
                if isinstance(r, torch.Tensor)
            ]
        )
    typed = [r for r in results if isinstance(r, PatchingResult)]
    if len(typed) != len(results):
        raise PatchSpecError("cannot stack tensor and PatchingResult sweeps together")
    first = typed[0]
    lead = 1 if first.has_metric_axis else 0
    stacked = torch.stack(
        [_align(r.values, r.axis_names, axis_order, lead, n_heads) for r in typed], dim=lead
    )
    cell_shape = list(stacked.shape[lead : lead + 1 + len(axis_order)])
    return PatchingResult(
        values=stacked,
        axis_names=["patch_type", *axis_order],
        index_df=make_df_from_ranges(cell_shape, ["patch_type", *axis_order]),
        metric_names=list(first.metric_names),
        reduced=first.reduced,
        baseline=first.baseline,
        has_metric_axis=first.has_metric_axis,
        patch_type_names=list(stack.type_names),
    )


def _stack_named(name: str) -> Stack:
    return next(s for s in STACKS if s.tl_function == name)


# --- generated by scripts/generate_compat.py from patchspec.catalog; do not edit ---


def get_act_patch_resid_pre(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the residual stream at the start of each block, by position: drop-in for ``transformer_lens.patching.get_act_patch_resid_pre``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos]
    (result dims: layer, pos). The labelled equivalent is ``patchspec.catalog.RESID_PRE``:
    ``PatchSpec('resid_pre', axes=('layer', 'pos'), name='resid_pre')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_resid_pre', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_resid_mid(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the residual stream between attention and MLP, by position: drop-in for ``transformer_lens.patching.get_act_patch_resid_mid``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos]
    (result dims: layer, pos). The labelled equivalent is ``patchspec.catalog.RESID_MID``:
    ``PatchSpec('resid_mid', axes=('layer', 'pos'), name='resid_mid')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_resid_mid', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_out(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the output of each attention layer, by position: drop-in for ``transformer_lens.patching.get_act_patch_attn_out``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos]
    (result dims: layer, pos). The labelled equivalent is ``patchspec.catalog.ATTN_OUT``:
    ``PatchSpec('attn_out', axes=('layer', 'pos'), name='attn_out')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_out', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_mlp_out(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the output of each MLP layer, by position: drop-in for ``transformer_lens.patching.get_act_patch_mlp_out``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos]
    (result dims: layer, pos). The labelled equivalent is ``patchspec.catalog.MLP_OUT``:
    ``PatchSpec('mlp_out', axes=('layer', 'pos'), name='mlp_out')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_mlp_out', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_out_by_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the output (z) of each attention head, by position: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_out_by_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos, head]
    (result dims: layer, pos, head). The labelled equivalent is ``patchspec.catalog.HEAD_OUT_BY_POS``:
    ``PatchSpec('z', axes=('layer', 'pos', 'head'), name='head_out_by_pos')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_out_by_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_q_by_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the query of each attention head, by position: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_q_by_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos, head]
    (result dims: layer, pos, head). The labelled equivalent is ``patchspec.catalog.HEAD_Q_BY_POS``:
    ``PatchSpec('q', axes=('layer', 'pos', 'head'), name='head_q_by_pos')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_q_by_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_k_by_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the key of each key/value head, by position: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_k_by_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos, head]
    (result dims: layer, pos, kv_head). The labelled equivalent is ``patchspec.catalog.HEAD_K_BY_POS``:
    ``PatchSpec('k', axes=('layer', 'pos', 'kv_head'), name='head_k_by_pos')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_k_by_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_v_by_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the value of each key/value head, by position: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_v_by_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, pos, head]
    (result dims: layer, pos, kv_head). The labelled equivalent is ``patchspec.catalog.HEAD_V_BY_POS``:
    ``PatchSpec('v', axes=('layer', 'pos', 'kv_head'), name='head_v_by_pos')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, pos, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_v_by_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_pattern_by_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the attention pattern of each head, by destination position: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_pattern_by_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head_index, dest_pos]
    (result dims: layer, head, dest_pos). The labelled equivalent is ``patchspec.catalog.HEAD_PATTERN_BY_DEST``:
    ``PatchSpec('pattern', axes=('layer', 'head', 'dest_pos'), name='head_pattern_by_dest')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head_index, dest_pos], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_pattern_by_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_pattern_dest_src_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch each (destination, source) entry of each head's attention pattern: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_pattern_dest_src_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head_index, dest_pos, src_pos]
    (result dims: layer, head, dest_pos, src_pos). The labelled equivalent is ``patchspec.catalog.HEAD_PATTERN_DEST_SRC``:
    ``PatchSpec('pattern', axes=('layer', 'head', 'dest_pos', 'src_pos'), name='head_pattern_dest_src')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head_index, dest_pos, src_pos], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_pattern_dest_src_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_out_all_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the output (z) of each attention head, at all positions: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head]
    (result dims: layer, head). The labelled equivalent is ``patchspec.catalog.HEAD_OUT``:
    ``PatchSpec('z', axes=('layer', 'head'), name='head_out')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_out_all_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_q_all_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the query of each attention head, at all positions: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_q_all_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head]
    (result dims: layer, head). The labelled equivalent is ``patchspec.catalog.HEAD_Q``:
    ``PatchSpec('q', axes=('layer', 'head'), name='head_q')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_q_all_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_k_all_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the key of each key/value head, at all positions: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_k_all_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head]
    (result dims: layer, kv_head). The labelled equivalent is ``patchspec.catalog.HEAD_K``:
    ``PatchSpec('k', axes=('layer', 'kv_head'), name='head_k')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_k_all_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_v_all_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the value of each key/value head, at all positions: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_v_all_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head]
    (result dims: layer, kv_head). The labelled equivalent is ``patchspec.catalog.HEAD_V``:
    ``PatchSpec('v', axes=('layer', 'kv_head'), name='head_v')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_v_all_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_attn_head_pattern_all_pos(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: Any, **kwargs: Any
) -> Any:
    """Patch the whole attention pattern of each head: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_pattern_all_pos``.

    Same signature and output as TransformerLens: a tensor of shape [layer, head_index]
    (result dims: layer, head). The labelled equivalent is ``patchspec.catalog.HEAD_PATTERN``:
    ``PatchSpec('pattern', axes=('layer', 'head'), name='head_pattern')``.

    Args:
        model: A TransformerLens model in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Activations of the clean run.
        patching_metric: ``logits -> scalar`` (or ``[batch]`` with ``reduce``), or a mapping.
        **kwargs: ``reduce``, ``baseline``, ``index_df``, ``return_index_df``, ``engine``,
            ``progress``, ``metric_positions`` as in :func:`generic_activation_patch`.

    Returns:
        Tensor of shape [layer, head_index], or a ``PatchingResult`` as in TransformerLens.
    """
    return _patch_entry(
        'get_act_patch_attn_head_pattern_all_pos', model, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )


def get_act_patch_block_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any, **kwargs: Any
) -> Any:
    """Patch the residual stream, attention output and MLP output of every block, by position: drop-in for ``transformer_lens.patching.get_act_patch_block_every``.

    Runs ``get_act_patch_resid_pre``, ``get_act_patch_attn_out``, ``get_act_patch_mlp_out`` and stacks them on a leading ``patch_type`` axis: a tensor of shape
    [patch_type, layer, pos] (result dims: patch_type, layer, pos). As in TransformerLens, key/value sweeps of grouped-query
    models are zero-padded to ``n_heads``: those zeros are padding, not measurements. The
    labelled equivalent is a :class:`patchspec.Sweep` of the same specs, which returns one
    variable per spec and never pads.

    Returns:
        Tensor of shape [patch_type, layer, pos], or a ``PatchingResult`` with a ``patch_type`` axis when
        ``reduce``/``baseline`` are given, as in TransformerLens.
    """
    return _stack(
        _stack_named('get_act_patch_block_every'), model, corrupted_tokens, clean_cache, metric, **kwargs
    )


def get_act_patch_attn_head_all_pos_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any, **kwargs: Any
) -> Any:
    """Patch every head's output, query, key, value and pattern, at all positions: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_all_pos_every``.

    Runs ``get_act_patch_attn_head_out_all_pos``, ``get_act_patch_attn_head_q_all_pos``, ``get_act_patch_attn_head_k_all_pos``, ``get_act_patch_attn_head_v_all_pos``, ``get_act_patch_attn_head_pattern_all_pos`` and stacks them on a leading ``patch_type`` axis: a tensor of shape
    [patch_type, layer, head] (result dims: patch_type, layer, head). As in TransformerLens, key/value sweeps of grouped-query
    models are zero-padded to ``n_heads``: those zeros are padding, not measurements. The
    labelled equivalent is a :class:`patchspec.Sweep` of the same specs, which returns one
    variable per spec and never pads.

    Returns:
        Tensor of shape [patch_type, layer, head], or a ``PatchingResult`` with a ``patch_type`` axis when
        ``reduce``/``baseline`` are given, as in TransformerLens.
    """
    return _stack(
        _stack_named('get_act_patch_attn_head_all_pos_every'), model, corrupted_tokens, clean_cache, metric, **kwargs
    )


def get_act_patch_attn_head_by_pos_every(
    model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Any, **kwargs: Any
) -> Any:
    """Patch every head's output, query, key, value and pattern, by position: drop-in for ``transformer_lens.patching.get_act_patch_attn_head_by_pos_every``.

    Runs ``get_act_patch_attn_head_out_by_pos``, ``get_act_patch_attn_head_q_by_pos``, ``get_act_patch_attn_head_k_by_pos``, ``get_act_patch_attn_head_v_by_pos``, ``get_act_patch_attn_head_pattern_by_pos`` and stacks them on a leading ``patch_type`` axis: a tensor of shape
    [patch_type, layer, pos, head] (result dims: patch_type, layer, pos, head). As in TransformerLens, key/value sweeps of grouped-query
    models are zero-padded to ``n_heads``: those zeros are padding, not measurements. The
    labelled equivalent is a :class:`patchspec.Sweep` of the same specs, which returns one
    variable per spec and never pads.

    Returns:
        Tensor of shape [patch_type, layer, pos, head], or a ``PatchingResult`` with a ``patch_type`` axis when
        ``reduce``/``baseline`` are given, as in TransformerLens.
    """
    return _stack(
        _stack_named('get_act_patch_attn_head_by_pos_every'), model, corrupted_tokens, clean_cache, metric, **kwargs
    )


__all__ = [
    'PatchingResult',
    'generic_activation_patch',
    'get_act_patch_attn_head_all_pos_every',
    'get_act_patch_attn_head_by_pos_every',
    'get_act_patch_attn_head_k_all_pos',
    'get_act_patch_attn_head_k_by_pos',
    'get_act_patch_attn_head_out_all_pos',
    'get_act_patch_attn_head_out_by_pos',
    'get_act_patch_attn_head_pattern_all_pos',
    'get_act_patch_attn_head_pattern_by_pos',
    'get_act_patch_attn_head_pattern_dest_src_pos',
    'get_act_patch_attn_head_q_all_pos',
    'get_act_patch_attn_head_q_by_pos',
    'get_act_patch_attn_head_v_all_pos',
    'get_act_patch_attn_head_v_by_pos',
    'get_act_patch_attn_out',
    'get_act_patch_block_every',
    'get_act_patch_mlp_out',
    'get_act_patch_resid_mid',
    'get_act_patch_resid_pre',
    'layer_head_dest_src_pos_pattern_patch_setter',
    'layer_head_pattern_patch_setter',
    'layer_head_pos_pattern_patch_setter',
    'layer_head_vector_patch_setter',
    'layer_pos_head_vector_patch_setter',
    'layer_pos_patch_setter',
    'make_df_from_ranges',
]
# --- end of generated code ---


# --- direct path patching (TransformerLens 4.3's get_act_patch_direct_path*) ---------------------


def _direct_paths(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    corrupted_cache: Any,
    patching_metric: Callable[[torch.Tensor], torch.Tensor],
    sources: Sequence[tuple[int, int]],
    component: str,
    verbose: bool,
) -> torch.Tensor:
    """``[n_layers, n_heads, n_layers, n_receiver_heads]`` metrics of the direct paths from
    ``sources`` into every later head's ``component`` input, 0.0 elsewhere (as TransformerLens),
    batched by :mod:`patchspec.paths.engine`."""
    from patchspec.errors import did_you_mean
    from patchspec.model.session import Session
    from patchspec.paths import engine

    if component not in ("q", "k", "v"):
        raise SpecError(
            f"component must be one of 'q', 'k', 'v', got {component!r}"
            + did_you_mean(str(component), ("q", "k", "v"))
        )
    if not callable(patching_metric) or isinstance(patching_metric, Metric):
        raise PatchSpecError(
            "patching_metric must be a callable logits -> scalar tensor, as in TransformerLens; "
            "to use patchspec metrics, run a PathSpec (patchspec.paths) instead"
        )
    adapter = ModelAdapter.of(model)
    cfg = adapter.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    for layer, head in sources:
        if not 0 <= int(layer) < n_layers:
            raise SpecError(f"src_layer must be in 0..{n_layers - 1}, got {layer}")
        if not 0 <= int(head) < n_heads:
            raise SpecError(f"src_head must be in 0..{n_heads - 1}, got {head}")
    width = n_heads if component == "q" else n_kv
    senders = [engine.Sender("z", int(layer), int(head)) for layer, head in sources]
    targets = [engine.Target(component, layer, head) for layer in range(n_layers) for head in range(width)]
    engine.check_model(adapter, senders, targets, "direct")
    adapter.check_eval_mode()
    with adapter.exclusive():
        session = Session(model, None, corrupted_tokens, clean_cache=clean_cache)
        tokens = session.tokens("corrupted")

        def evaluate(logits: torch.Tensor, rows: int) -> torch.Tensor:
            parts = logits.unflatten(0, (rows, -1))
            return torch.stack(
                [torch.as_tensor(patching_metric(part), device=logits.device).float().reshape(()) for part in parts]
            )

        sizes = adapter.sizes(session.batch, session.seq)
        with torch.inference_mode():
            paths = engine.PathRun(
                adapter=adapter,
                tokens=tokens,
                replay=session.replay("corrupted"),
                source=lambda name: clean_cache[name],
                receiving=lambda name: corrupted_cache[name],
                evaluate=evaluate,
                positions=None,
                rows=engine.rows_per_pass(adapter, sizes, session.seq, None, None),
            )
            pairs, values = paths.values(senders, targets, "direct")
    results = torch.zeros(n_layers, n_heads, n_layers, width, device=cfg.device)
    if values is not None:
        index = torch.as_tensor(
            [(*sources[i], targets[j].layer, targets[j].head) for i, j in pairs], device=results.device
        )
        results[tuple(index.T)] = values.to(results)
    return results


def get_act_patch_direct_path(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    corrupted_cache: Any,
    patching_metric: Callable[[torch.Tensor], torch.Tensor],
    src_layer: int,
    src_head: int,
    component: str = "q",
    verbose: bool = True,
) -> torch.Tensor:
    """Drop-in for ``transformer_lens.patching.get_act_patch_direct_path``.

    Adds source head ``(src_layer, src_head)``'s clean-minus-corrupted write (``z @ W_O``) to
    one later head's own pre-LayerNorm ``component`` input at every position, everything else
    as in the corrupted run, and measures ``patching_metric`` on the logits: the exact edge
    patch of Wang et al. (2022), as TransformerLens 4.3 computes it, but with all later heads
    in a few batched passes replayed from their layer instead of one full forward each.

    Unlike TransformerLens, ``component="k"`` and ``"v"`` also work on grouped-query models:
    the receivers are then the key/value heads (``[n_layers, n_key_value_heads]``), each
    patched in the one key/value input its query heads share. The labelled equivalent is
    ``patchspec.catalog.PATH_HEAD_TO_HEAD_Q`` (``_K``, ``_V``), which gives NaN, not 0.0, where
    nothing is measured.

    Args:
        model: A ``TransformerBridge`` in eval mode.
        corrupted_tokens: Tokens of the corrupted run, ``[batch, pos]``.
        clean_cache: Cache of the clean run (holds ``blocks.{src_layer}.attn.hook_z``).
        corrupted_cache: Cache of the corrupted run (the same ``hook_z``).
        patching_metric: ``logits -> scalar``.
        src_layer: Layer of the source head.
        src_head: Index of the source head.
        component: The receivers' input: ``"q"``, ``"k"`` or ``"v"``.
        verbose: Accepted for TransformerLens's signature (the passes are few; no bar).

    Returns:
        ``[n_layers, n_heads]`` (``n_key_value_heads`` for k/v on grouped-query models), float32:
        entry ``[l, h]`` is the metric with the path into head ``(l, h)`` patched; rows
        ``l <= src_layer`` are 0.0 placeholders, not measurements, as in TransformerLens.

    Raises:
        PatchSpecError: a bad component, head or layer, a model in training mode, a block
            without attention, or a source whose write is not ``z @ W_O`` (a ``ValueError``,
            as TransformerLens raises).
    """
    return _direct_paths(
        model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric,
        [(src_layer, src_head)], component, verbose,
    )[src_layer, src_head]


def get_act_patch_direct_path_all_sources(
    model: Any,
    corrupted_tokens: torch.Tensor,
    clean_cache: Any,
    corrupted_cache: Any,
    patching_metric: Callable[[torch.Tensor], torch.Tensor],
    component: str = "q",
    verbose: bool = True,
) -> torch.Tensor:
    """Drop-in for ``transformer_lens.patching.get_act_patch_direct_path_all_sources``.

    :func:`get_act_patch_direct_path` from every source head, all (source, later head) pairs
    in batched passes, one chunk of rows per pass from the receivers' layer (TransformerLens
    runs one full forward per pair). ``k``/``v`` work on grouped-query models too (receivers
    are key/value heads).

    Returns:
        ``[n_layers, n_heads, n_layers, n_heads]`` float32 (last dim ``n_key_value_heads`` for
        k/v on grouped-query models): ``[sl, sh, dl, dh]`` is the metric with the path from head
        ``(sl, sh)`` into head ``(dl, dh)`` patched, and 0.0 where ``dl <= sl`` (placeholders,
        as in TransformerLens).
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    sources = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    return _direct_paths(
        model, corrupted_tokens, clean_cache, corrupted_cache, patching_metric, sources, component, verbose
    )


__all__ += ["get_act_patch_direct_path", "get_act_patch_direct_path_all_sources"]

__all__ += ["metric_positions"]
