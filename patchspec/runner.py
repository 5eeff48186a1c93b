"""The one path from specs to labelled results.

validate -> session -> compile -> estimate -> label:

1. **validate** everything that needs no forward pass: options (already a validated
   :class:`~patchspec.options.RunOptions`), the estimator and executor, the metric, the model's
   mode, the inputs' shapes, named positions, every restriction and hook;
2. open a **session** (:class:`~patchspec.model.session.Session`): tokens, padding, the two
   unpatched runs and the activations the grids read, each computed once;
3. **compile** each spec to a :class:`~patchspec.plan.grid.Grid` (cached);
4. **estimate**: the estimator cuts the grid into chunks and the executor runs them;
5. **label**: an ``xarray.DataArray`` per spec, with coordinates, baselines and provenance.

``spec.run``, ``Sweep.run`` and every function of :mod:`patchspec.compat` go through here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
import xarray as xr

import patchspec.accessor  # noqa: F401  (registers the .patch accessor of the results made here)
from patchspec.attribution import attribution_estimator
from patchspec.errors import InputError, MetricError, SpecError
from patchspec.execute.protocols import Estimator, Executor, Origin, Progress, Task
from patchspec.execute.registry import executor_for, make_estimator
from patchspec.metrics import Evaluator, Metric, MetricContext, as_metrics, validate_metrics
from patchspec.model.adapter import ModelAdapter
from patchspec.model.session import Session, metric_inputs
from patchspec.options import RunOptions
from patchspec.plan.conflicts import check_conflicts
from patchspec.plan.grid import Grid, compile
from patchspec.plan.positions import Positions, PositionTable, resolve_positions
from patchspec.plan.sizes import Sizes
from patchspec.results import (
    BASELINE_KEYS,
    named_token_labels,
    provenance,
    to_dataarray,
    token_labels,
)
from patchspec.sources import Receiver
from patchspec.spec import AnySpec, Sweep

log = logging.getLogger(__name__)

#: Runs of at least this many cells (all specs together) show a progress bar by default, on a
#: terminal or in a notebook; ``progress=True`` always shows one, ``progress=False`` never.
PROGRESS_FROM = 64
#: Attrs every variable of a Sweep's Dataset shares, lifted to the Dataset.
SHARED_ATTRS = (
    "metric",
    "clean_baseline",
    "corrupted_baseline",
    "model",
    "model_fingerprint",
    "model_weights_sha256",
    "tokens_sha256",
    "patchspec_version",
    "transformer_lens_version",
)


@attrs.frozen(eq=False)
class Run:
    """What the specs of one sweep share: validated pieces and the session.

    Attributes:
        adapter: The model adapter.
        session: The unpatched runs.
        estimator: What computes the values.
        executor: Where the chunks run.
        options: The run's options.
        metrics: The metrics, evaluated on the same passes.
        metric_dim: Whether results get a ``metric`` dim.
        positions: Named positions, resolved.
        prompts: Prompt texts for results' ``example`` coordinates.
    """

    adapter: ModelAdapter
    session: Session
    estimator: Estimator
    executor: Executor
    options: RunOptions
    metrics: tuple[Metric, ...]
    metric_dim: bool
    positions: Positions | None
    prompts: dict[str, list[str]]
    _context: dict[str, Any] = attrs.field(factory=dict)

    @property
    def sizes(self) -> Sizes:
        """Sizes of the model and inputs."""
        return self.adapter.sizes(self.session.batch, self.session.seq)

    def add(self, grid: Grid) -> Grid:
        """Check a grid's hooks and make the session cache what it reads; before any pass.

        Raises:
            HookError: a hook the grid patches is missing or gated.
            SpecError: parts of a joint grid that would write one element in either order.
            InputError: a source cannot serve these inputs, the grid writes one run's padding
                into the other's real tokens, or the unpatched runs were already made without
                its activations.
        """
        self.adapter.check_hooks(grid.sites)
        check_conflicts(grid)
        extra: list[tuple[str, int]] = []
        for part in grid.parts:
            sites = tuple((part.spec.activation, layer) for layer in part.layers)
            for source in part.spec.sources:
                source.check_sites(self.session, sites, self.sizes)
                extra += source.extra_sites(sites)
        if extra:
            self.adapter.check_hooks(dict.fromkeys(extra))
        for source in dict.fromkeys(s for part in grid.parts for s in part.spec.sources):
            source.check(self.session)
        self.session.check_alignment(grid)
        reads = set(grid.hook_names) | {self.adapter.hook_name(a, layer) for a, layer in extra}
        missing = reads - self.session.hook_names
        if missing and "context" in self._context:
            raise InputError(f"grid added after the unpatched runs; hooks {sorted(missing)} missing")
        self.session.hook_names.update(reads)
        return grid

    @property
    def context(self) -> MetricContext:
        """What metrics read besides the patched logits (runs the unpatched passes once)."""
        if "context" not in self._context:
            session = self.session
            with torch.inference_mode():
                self._context["context"] = MetricContext(
                    model=self.adapter.model,
                    clean_logits=session.logits("clean") if session.has("clean") else None,
                    corrupted_logits=session.logits("corrupted"),
                    tokens=session.tokens("corrupted"),
                    inputs=metric_inputs(session, self.positions),
                )
        return self._context["context"]  # type: ignore[no-any-return]

    @property
    def provenance(self) -> dict[str, str]:
        """Weights fingerprint, tokens hash and versions, computed once for every spec of the run."""
        if "provenance" not in self._context:
            session = self.session
            self._context["provenance"] = provenance(
                self.adapter,
                session.clean_tokens,
                session.corrupted_tokens,
                full_hash=self.options.hash_weights,
            )
        return self._context["provenance"]  # type: ignore[no-any-return]

    @property
    def labels(self) -> list[str] | None:
        """One token label per position (the clean tokens, else the corrupted ones)."""
        if "labels" not in self._context:
            which: Receiver = "clean" if self.session.has("clean") else "corrupted"
            self._context["labels"] = token_labels(self.adapter.model, self.session.tokens(which))
        return self._context["labels"]  # type: ignore[no-any-return]


def prepare(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    options: RunOptions,
    positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
    reference: Any = None,
    clean_cache: Mapping[str, torch.Tensor] | None = None,
    tensors: Mapping[str, Any] | None = None,
) -> Run:
    """Validate everything that needs no forward pass and open the session (no pass yet).

    Raises:
        PatchSpecError: a bad option, metric, model state, input or named position.
    """
    adapter = ModelAdapter.of(model)
    adapter.check_eval_mode()
    metric_list, metric_dim = as_metrics(metric)
    estimator = attribution_estimator(
        options.estimator, ig_steps=options.ig_steps, max_memory=options.max_memory
    ) or make_estimator(options.engine, options.batching)
    executor = executor_for(options.executor)
    session = Session(
        adapter, clean, corrupted, reference=reference, clean_cache=clean_cache, tensors=tensors
    )
    texts = {f"{run}_prompt": session.texts(run) for run in ("clean", "corrupted")}
    named = _named_positions(session, positions)
    if not isinstance(positions, tuple | list):  # a pair of tables lines the two runs up
        session.warn_length_mismatches()
    # Metrics are checked against both runs (the baselines measure each) before any pass.
    inputs = metric_inputs(session, named)
    blank = MetricContext(adapter.model, None, None, session.tokens("corrupted"), inputs=inputs)
    validate_metrics(metric_list, [blank.for_run(run) for run in inputs])
    return Run(
        adapter=adapter,
        session=session,
        estimator=estimator,
        executor=executor,
        options=options,
        metrics=metric_list,
        metric_dim=metric_dim,
        positions=named,
        prompts={k: v for k, v in texts.items() if v is not None},
    )


def _named_positions(
    session: Session, positions: PositionTable | tuple[PositionTable, PositionTable] | None
) -> Positions | None:
    if positions is None:
        return None
    lengths: dict[Receiver, Sequence[int]] = {
        "clean": session.lengths("clean"),
        "corrupted": session.lengths("corrupted"),
    }
    resolved = resolve_positions(positions, lengths=lengths)
    if resolved is None:
        return None
    labels = named_token_labels(session.model, session.tokens("clean"), resolved.clean)
    return attrs.evolve(resolved, labels=labels)


def interactive() -> bool:
    """Whether a person is likely watching: stderr is a terminal, or this is a Jupyter kernel."""
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is not None and isatty():
        return True
    return "ipykernel" in sys.modules


def show_progress(progress: bool | None, cells: int) -> bool:
    """Whether a run of ``cells`` cells shows a bar: ``progress`` when given, else for runs of
    :data:`PROGRESS_FROM` cells or more when :func:`interactive` (quiet in pipes, logs and CI).

    Example:
        >>> show_progress(True, 1), show_progress(False, 10_000)
        (True, False)
    """
    if progress is not None:
        return bool(progress)
    return cells >= PROGRESS_FROM and interactive()


@contextlib.contextmanager
def run_progress(
    progress: bool | None, labels: Sequence[str], cells: int, engine: str
) -> Iterator[Progress]:
    """The one bar of a run over every spec's cells: ``patching 7 specs (batched)``, or
    ``patching head_out (batched)`` for one spec; the spec being run is its postfix."""
    what = labels[0] if len(labels) == 1 else f"{len(labels)} specs"
    desc = f"patching {what} ({engine})".replace("  ", " ")
    with Progress.open(show_progress(progress, cells), total=cells, desc=desc) as bar:
        yield bar


def estimate(
    estimator: Estimator,
    executor: Executor,
    task: Task,
    *,
    progress: bool | None,
    store: Any = None,
) -> torch.Tensor:
    """Every cell of ``task.cells``: the estimator's chunks, run by the executor.

    With a ``store`` (a :class:`patchspec.execute.store.SpecStore`), chunks already in it are
    read back instead of run, and each chunk is written to it as it finishes.

    Raises:
        MetricError: the estimator returned values for a different number of cells.
    """
    chunks = estimator.chunks(task)
    covered = sum(len(c) for c in chunks)
    if covered != len(task.cells):
        raise MetricError(
            f"estimator {estimator.name!r} planned {covered} cells for {len(task.cells)}; "
            "its chunks must cover every cell exactly once"
        )
    if task.progress is not None:  # the run's bar decides
        show = task.progress.enabled
    else:
        show = show_progress(progress, len(task.cells))
    if store is not None:
        values = store.run(executor, estimator, task, chunks, progress=show)
    else:
        values = executor.run(estimator, task, chunks, progress=show)
    stats = task.memo.get("stats")
    log.debug(
        "%s: %d cells in %d chunks by %s on %s%s",
        task.label,
        len(task.cells),
        len(chunks),
        estimator.name,
        executor.name,
        f" ({stats})" if stats is not None else "",
        extra={"stats": stats},
    )
    if values.shape[0] != len(task.cells):
        raise MetricError(
            f"executor {executor.name!r} returned {values.shape[0]} values for "
            f"{len(task.cells)} cells"
        )
    return values


def run_grid(
    run: Run,
    grid: Grid,
    label: str,
    cells: np.ndarray | None = None,
    progress: Progress | None = None,
    origin: Origin | None = None,
    store: Any = None,
) -> tuple[torch.Tensor, Evaluator, torch.Tensor | None, torch.Tensor]:
    """The values of one grid's cells, and the evaluator and baselines.

    Args:
        run: The prepared run (the grid added with :meth:`Run.add`).
        grid: The grid.
        label: The spec's label, for progress and errors.
        cells: Flat indices of the cells to compute (default: all); the others are NaN.
        progress: The run's bar (:func:`run_progress`); default: a bar of this grid's own,
            shown as ``run.options.progress`` and :func:`show_progress` decide.
        origin: What the task is built from (for executors that rebuild it elsewhere).
        store: The spec's part of a resumable store (see :func:`estimate`).

    Returns:
        ``(values, evaluator, clean_baseline, corrupted_baseline)``.
    """
    session = run.session
    evaluate = evaluator_for(run, grid)
    with torch.inference_mode():
        clean_base = (
            evaluate(session.logits("clean"), "the clean baseline")
            if session.has("clean")
            else None
        )
        corrupted_base = evaluate(session.logits("corrupted"), "the corrupted baseline")
    chosen = np.arange(grid.n_cells, dtype=np.int64) if cells is None else np.unique(cells)
    with contextlib.ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(
                run_progress(run.options.progress, [label], len(chosen), run.estimator.name)
            )
        progress.spec(label)
        task = Task(
            grid, chosen, session, run.adapter, evaluate, label, progress=progress, origin=origin
        )
        values = estimate(
            run.estimator, run.executor, task, progress=run.options.progress, store=store
        )
    if cells is not None:  # not measured means NaN
        full = values.new_full((grid.n_cells, *values.shape[1:]), float("nan"))
        full[torch.as_tensor(chosen, device=values.device)] = values
        values = full
    return values, evaluate, clean_base, corrupted_base


def evaluator_for(run: Run, grid: Grid) -> Evaluator:
    """The metric evaluator of ``grid``'s cells (runs the unpatched passes once per run)."""
    context = run.context.for_run(grid.receiver)
    return Evaluator(run.metrics, context, stacked=run.metric_dim, describe=grid.describe)


#: What a patch does, by the run that receives it and where the values come from.
DIRECTIONS = ("denoising", "noising", "ablation")


def direction(receiver: Receiver, kinds: Sequence[str]) -> str:
    """``"denoising"`` (clean values into the corrupted run), ``"noising"`` (corrupted values
    into the clean run) or ``"ablation"`` (any other source, into either run).

    Example:
        >>> direction("corrupted", ["clean"]), direction("clean", ["corrupted"]), direction("clean", ["mean"])
        ('denoising', 'noising', 'ablation')
    """
    if receiver == "corrupted" and set(kinds) == {"clean"}:
        return "denoising"
    if receiver == "clean" and set(kinds) == {"corrupted"}:
        return "noising"
    return "ablation"


def _plain(value: torch.Tensor | None) -> Any:
    if value is None:
        return None
    return float(value) if value.ndim == 0 else value.tolist()


def label(
    run: Run,
    spec: AnySpec,
    grid: Grid,
    values: torch.Tensor,
    evaluate: Evaluator,
    clean_base: torch.Tensor | None,
    corrupted_base: torch.Tensor,
) -> xr.DataArray:
    """One spec's values as a labelled DataArray with baselines and provenance in attrs."""
    try:
        spec_attr: Any = spec.to_dict()
    except SpecError:  # a custom rule is code: keep its repr
        spec_attr = repr(spec)
    estimator = run.estimator
    attributes: dict[str, Any] = {
        "spec": spec_attr,
        "spec_name": spec.label,
        "activation": "&".join(part.activation for part in spec.parts),
        "source": ", ".join(dict.fromkeys(s.kind for s in spec.sources)),
        "receiver": grid.receiver,
        "direction": direction(grid.receiver, [s.kind for s in spec.sources]),
        "sources": [s.to_dict() for s in spec.sources],
        "metric": ", ".join(evaluate.names),
        "clean_baseline": _plain(clean_base),
        "corrupted_baseline": _plain(corrupted_base),
        "engine": estimator.name,
        "estimator": estimator.name,
        "exact": bool(estimator.exact),
        "executor": run.executor.name,
        **run.provenance,
        # an estimator whose values are not patched metric values says what they are
        **dict(getattr(estimator, "result_attrs", None) or {}),
    }
    keys = tuple(dict.fromkeys(k for s in spec.sources for k in s.tensor_keys()))
    if keys:
        from patchspec.interventions import tensor_record

        records = run._context.setdefault("tensor_records", {})  # each tensor hashed once
        for k in keys:
            if k not in records:
                records[k] = tensor_record(run.session.tensor(k))
        attributes["tensors"] = {k: records[k] for k in keys}
    if grid.positions is not None:
        attributes["positions"] = {
            "clean": {k: list(v) for k, v in grid.positions.clean.items()},
            "corrupted": {k: list(v) for k, v in grid.positions.corrupted.items()},
        }
    return to_dataarray(
        grid,
        values,
        name="+".join(evaluate.names),
        labels=run.labels,
        attrs=attributes,
        prompts=run.prompts,
        metrics=evaluate.names if run.metric_dim else None,
    )


def run_specs(
    specs: Sequence[AnySpec],
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    options: RunOptions,
    positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
    reference: Any = None,
    tensors: Mapping[str, Any] | None = None,
) -> list[xr.DataArray]:
    """Sweep every spec on the same session; one labelled DataArray per spec.

    Raises:
        PatchSpecError: bad spec, option, inputs, metric or model state (before any patched
            forward pass), or a hook that did not fire as planned.
    """
    if clean is None:
        raise InputError("clean prompts are required (give prompts or tokens, not None)")
    with ModelAdapter.of(model).exclusive():  # one sweep of a model at a time
        run = prepare(
            model,
            clean,
            corrupted,
            metric,
            options=options,
            positions=positions,
            reference=reference,
            tensors=tensors,
        )
        grids = [run.add(compile(spec, run.sizes, positions=run.positions)) for spec in specs]
        check_shared_dims(specs, grids)
        origin = Origin(
            tuple(specs), 0, clean, corrupted, metric, options, positions, reference,
            token=uuid.uuid4().hex,
        )
        store = None
        if options.store is not None:  # checked against the run before any pass
            from patchspec.execute.store import SweepStore

            store = SweepStore.open(options.store, run, specs, grids)
        arrays = []
        labels = [spec.label for spec in specs]
        cells = sum(grid.n_cells for grid in grids)
        with run_progress(run.options.progress, labels, cells, run.estimator.name) as bar:
            for i, (spec, grid) in enumerate(zip(specs, grids, strict=True)):
                values, evaluate, clean_base, corrupted_base = run_grid(
                    run,
                    grid,
                    spec.label,
                    progress=bar,
                    origin=attrs.evolve(origin, index=i),
                    store=None if store is None else store.spec(i),
                )
                arrays.append(label(run, spec, grid, values, evaluate, clean_base, corrupted_base))
        return arrays


def _coordinate_kind(values: Sequence[Any]) -> str:
    kinds = {"name" if isinstance(v, str) else "index" if isinstance(v, int) else "label" for v in values}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def check_shared_dims(specs: Sequence[AnySpec], grids: Sequence[Grid]) -> None:
    """Refuse specs of one sweep whose shared dims hold coordinates of different kinds.

    A Sweep's Dataset joins its variables along the dims they share; position names on one and
    token indices on the other would turn every label into a string.

    Raises:
        InputError: the dim, and which spec has which kind of coordinates.
    """
    seen: dict[str, tuple[str, str]] = {}
    for spec, grid in zip(specs, grids, strict=True):
        for dim in grid.dims:
            kind = _coordinate_kind(grid.coords[dim])
            first = seen.setdefault(dim, (kind, spec.label))
            if first[0] != kind:
                raise InputError(
                    f"specs {first[1]!r} and {spec.label!r} of one sweep both have dim {dim!r}, "
                    f"with {first[0]} coordinates in one and {kind} coordinates in the other; a "
                    "Dataset cannot join them; run them as separate sweeps"
                )


def to_dataset(sweep: Sweep, arrays: Sequence[xr.DataArray]) -> xr.Dataset:
    """A Sweep's arrays as one Dataset, with the attrs they share lifted to it."""
    named = {spec.label: array for spec, array in zip(sweep.specs, arrays, strict=True)}
    first = arrays[0]
    shared = {k: first.attrs[k] for k in SHARED_ATTRS if k in first.attrs}
    if sweep.name is not None:
        shared["sweep"] = sweep.name
    return xr.Dataset(_on_shared_coords(_shared_baselines(named)), attrs=shared)


def _on_shared_coords(arrays: Mapping[str, xr.DataArray]) -> dict[str, xr.DataArray]:
    """The arrays reindexed to the union of their coordinates along every dim they share.

    Specs may measure different coordinates of one dim (every position and only the last): each
    variable gets the union, NaN where its spec was not measured, with the labels along the dim
    (``pos_token`` ...) taken from whichever spec has them. Indices come in increasing order and
    position names in the order they first appear (the positions table's order), never
    alphabetically.
    """
    out = dict(arrays)
    dims = dict.fromkeys(d for a in out.values() for d in a.dims if d in a.indexes)
    for dim in dims:
        having = [a for a in out.values() if dim in a.dims]
        values = [list(a[dim].values) for a in having]
        if all(v == values[0] for v in values):
            continue
        union = list(dict.fromkeys(v for vs in values for v in vs))
        if all(isinstance(v, int | np.integer) for v in union):
            union = sorted(union)
        labels: dict[str, dict[Any, Any]] = {}
        for array in having:
            for name, coord in array.coords.items():
                if coord.dims == (dim,) and name != dim:
                    labels.setdefault(str(name), {}).update(
                        zip(array[dim].values.tolist(), coord.values.tolist(), strict=True)
                    )
        for key, array in out.items():
            if dim not in array.dims:
                continue
            moved = array.drop_vars([n for n in labels if n in array.coords]).reindex({dim: union})
            out[key] = moved.assign_coords(
                {n: (dim, [table.get(v, "") for v in union]) for n, table in labels.items()}
            )
    return out


def _shared_baselines(arrays: Mapping[str, xr.DataArray]) -> dict[str, xr.DataArray]:
    """Drop per-example baseline coords that differ between specs (each keeps them in attrs)."""
    out = dict(arrays)
    for key in BASELINE_KEYS:
        values = [a[key].values.tolist() for a in out.values() if key in a.coords]
        if values and any(v != values[0] for v in values):
            out = {n: a.drop_vars(key, errors="ignore") for n, a in out.items()}
    return out
