"""Running specs: ``spec.run(...)`` gives a DataArray, ``Sweep(*specs).run(...)`` a Dataset.

A sweep checks its inputs before any forward pass, runs the clean and corrupted models once
(caching only the activations it reads), evaluates the baselines, hands every cell to an
executor and labels what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
import xarray as xr

from patchspec.engine import check_hooks, describe_cell, get_engine
from patchspec.errors import SpecError
from patchspec.metrics import Evaluator, Metric, MetricArg, MetricContext, as_metrics
from patchspec.plan import Plan, Positions, PositionTable, Sizes, plan, resolve_positions
from patchspec.results import (
    BASELINE_KEYS,
    named_token_labels,
    provenance,
    to_dataarray,
    token_labels,
)
from patchspec.runs import Prompts, Runs, check_eval_mode, prompt_texts
from patchspec.sources import Receiver
from patchspec.spec import AnySpec, as_specs

#: Sweeps with at least this many cells show a progress bar unless ``progress=False``.
PROGRESS_FROM = 64
DEFAULT_ENGINE = "batched"


@attrs.frozen(eq=False)
class Prepared:
    """Everything shared by the specs of one sweep."""

    model: Any
    runs: Runs
    plans: tuple[Plan, ...]
    #: Every metric evaluated; ``metric_dim``: results get a ``metric`` dim.
    metrics: tuple[Metric, ...]
    metric_dim: bool
    context: MetricContext
    labels: list[str] | None
    prompts: dict[str, list[str]] = attrs.field(factory=dict)


def _engine_name(engine: str | None) -> str:
    from patchspec.engine import ENGINES

    if engine is not None:
        return engine
    return DEFAULT_ENGINE if DEFAULT_ENGINE in ENGINES else "reference"


def prepare(
    specs: tuple[AnySpec, ...],
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricArg,
    *,
    positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
    reference: Prompts | dict[str, Prompts] | None = None,
) -> Prepared:
    """Validate inputs, plan every spec and run the two unpatched passes."""
    check_eval_mode(model)
    metric_list, metric_dim = as_metrics(metric)
    runs = Runs(model, clean, corrupted, reference=reference)
    sizes = Sizes.of(model, runs.batch, runs.seq)
    named: Positions | None = None
    if positions is not None:
        lengths: dict[Receiver, Sequence[int]] = {
            "clean": runs.lengths("clean"),
            "corrupted": runs.lengths("corrupted"),
        }
        resolved = resolve_positions(positions, lengths=lengths)
        if resolved is not None:
            named_labels = named_token_labels(model, runs.tokens("clean"), resolved.clean)
            named = attrs.evolve(resolved, labels=named_labels)
    plans = tuple(plan(spec, sizes, positions=named) for spec in specs)
    for p in plans:
        check_hooks(model, p)
        runs.hook_names.update(p.hook_names)
    with torch.inference_mode():
        context = MetricContext(
            model=model,
            clean_logits=runs.logits("clean"),
            corrupted_logits=runs.logits("corrupted"),
            tokens=runs.tokens(plans[0].receiver if plans else "corrupted"),
        )
    labels = token_labels(model, runs.tokens("clean"))
    texts = {"clean_prompt": prompt_texts(clean), "corrupted_prompt": prompt_texts(corrupted)}
    prompts = {k: v for k, v in texts.items() if v is not None}
    return Prepared(model, runs, plans, metric_list, metric_dim, context, labels, prompts)


def _run_plan(
    prep: Prepared,
    spec: AnySpec,
    p: Plan,
    *,
    engine: str | None,
    progress: bool | None,
    options: dict[str, Any],
) -> xr.DataArray:
    runs = prep.runs
    context = attrs.evolve(prep.context, tokens=runs.tokens(p.receiver))
    evaluate = Evaluator(
        prep.metrics,
        context,
        stacked=prep.metric_dim,
        describe=lambda cell: describe_cell(p, cell),
    )
    with torch.inference_mode():
        clean_base = evaluate(runs.logits("clean"), "the clean baseline")
        corrupted_base = evaluate(runs.logits("corrupted"), "the corrupted baseline")
    name = _engine_name(engine)
    show = len(p.cells) >= PROGRESS_FROM if progress is None else progress
    values = get_engine(name)(
        prep.model,
        p,
        runs,
        evaluate,
        progress=show,
        **options,
    )
    per_example = values.ndim == 2 + prep.metric_dim
    if per_example and any(not m.per_example and m.reduce is not None for m in evaluate.metrics):
        raise SpecError("internal: a reduced metric produced per-example values")
    try:
        spec_attr: Any = spec.to_dict()
    except SpecError:
        spec_attr = repr(spec)
    attributes = {
        "spec": spec_attr,
        "spec_name": spec.label,
        "activation": "&".join(part.activation for part in spec.parts),
        "source": ", ".join(dict.fromkeys(s.kind for s in spec.sources)),
        "sources": [s.to_dict() for s in spec.sources],
        "metric": ", ".join(evaluate.names),
        "clean_baseline": _plain(clean_base),
        "corrupted_baseline": _plain(corrupted_base),
        "engine": name,
        **provenance(prep.model, runs.clean_tokens, runs.corrupted_tokens),
    }
    if p.positions is not None:
        attributes["positions"] = {
            "clean": {k: list(v) for k, v in p.positions.clean.items()},
            "corrupted": {k: list(v) for k, v in p.positions.corrupted.items()},
        }
    return to_dataarray(
        p,
        values,
        name="+".join(evaluate.names),
        labels=prep.labels,
        attrs=attributes,
        prompts=prep.prompts,
        metrics=evaluate.names if prep.metric_dim else None,
    )


def _plain(value: torch.Tensor) -> Any:
    return float(value) if value.ndim == 0 else value.tolist()


def run(
    spec: AnySpec,
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricArg,
    *,
    engine: str | None = None,
    progress: bool | None = None,
    positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
    reference: Prompts | dict[str, Prompts] | None = None,
    **options: Any,
) -> xr.DataArray:
    """Sweep one spec and return a labelled DataArray (see :meth:`Sweep.run`)."""
    (spec,) = as_specs([spec])
    prep = prepare(
        (spec,), model, clean, corrupted, metric, positions=positions, reference=reference
    )
    return _run_plan(prep, spec, prep.plans[0], engine=engine, progress=progress, options=options)


class Sweep:
    """Several specs run on the same prompts; the result is one labelled Dataset.

    Args:
        *specs: :class:`~patchspec.PatchSpec` or :class:`~patchspec.JointSpec` values.
        name: Optional name, kept in the result's attrs.

    Example:
        >>> from patchspec.catalog import RESID_PRE, ATTN_OUT, MLP_OUT
        >>> Sweep(RESID_PRE, ATTN_OUT, MLP_OUT).names
        ('resid_pre', 'attn_out', 'mlp_out')
    """

    def __init__(self, *specs: AnySpec, name: str | None = None) -> None:
        if not specs:
            raise SpecError("a Sweep needs at least one spec")
        self.specs = as_specs(list(specs))
        names = [s.label for s in self.specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"specs in a Sweep need distinct names; {dupes} repeat (use .named())")
        self.name = name

    @property
    def names(self) -> tuple[str, ...]:
        """The data variable name of each spec's result."""
        return tuple(s.label for s in self.specs)

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.specs)
        return f"Sweep({inner}{'' if self.name is None else f', name={self.name!r}'})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sweep) and (self.specs, self.name) == (other.specs, other.name)

    def __hash__(self) -> int:
        return hash((self.specs, self.name))

    def run(
        self,
        model: Any,
        clean: Prompts,
        corrupted: Prompts,
        metric: MetricArg,
        *,
        engine: str | None = None,
        progress: bool | None = None,
        positions: PositionTable | tuple[PositionTable, PositionTable] | None = None,
        reference: Prompts | dict[str, Prompts] | None = None,
        **options: Any,
    ) -> xr.Dataset:
        """Run every spec and return one Dataset with a data variable per spec.

        Args:
            model: A TransformerLens model (``TransformerBridge``) in eval mode.
            clean: Clean prompts (strings) or tokens ``[batch, pos]``.
            corrupted: Corrupted prompts or tokens of the same shape.
            metric: A :class:`~patchspec.metrics.Metric` or a callable ``logits -> scalar |
                [batch]``; a per-prompt metric adds an ``example`` dim. A list or a mapping
                ``{name: metric}`` evaluates several metrics on the same forward passes and adds
                a ``metric`` dim (coordinates: the names).
            engine: ``"batched"`` (default) or ``"reference"`` (one forward per cell).
            progress: Show a progress bar (default: for sweeps of 64 cells or more).
            positions: Named token positions, one index per prompt: ``{"S2": [3, 4], "END":
                -1}`` or a DataFrame with a column per name (a pair ``(clean, corrupted)`` when
                they differ between the runs). Position restrictions may then use the names,
                and a swept position axis without a restriction sweeps them. See
                :func:`patchspec.plan.resolve_positions`.
            reference: Prompts or tokens of a reference dataset for ``Mean(over="reference")``,
                or ``{name: prompts}`` for ``Mean(over=name)``.
            **options: Executor options: for ``"batched"``, ``cells_per_batch``,
                ``max_memory`` (e.g. ``"2GB"``) and ``start_at_layer`` (see
                :func:`patchspec.batched.run_batched`).

        Returns:
            A Dataset whose variables are named after the specs; each has the spec's axes as
            dims, and its baselines and provenance in its attrs.

        Raises:
            PatchSpecError: bad spec, inputs, metric or model state (before any patched pass).
        """
        prep = prepare(
            self.specs, model, clean, corrupted, metric, positions=positions, reference=reference
        )
        arrays = {
            spec.label: _run_plan(prep, spec, p, engine=engine, progress=progress, options=options)
            for spec, p in zip(self.specs, prep.plans, strict=True)
        }
        first = next(iter(arrays.values()))
        shared = {k: first.attrs[k] for k in ("metric", "clean_baseline", "corrupted_baseline", "model", "model_weights_sha256", "tokens_sha256", "patchspec_version", "transformer_lens_version")}
        if self.name is not None:
            shared["sweep"] = self.name
        return xr.Dataset(_shared_baselines(arrays), attrs=shared)


def _shared_baselines(arrays: dict[str, xr.DataArray]) -> dict[str, xr.DataArray]:
    """Drop per-example baseline coords that differ between specs (each keeps them in attrs)."""
    for key in BASELINE_KEYS:
        values = [a[key].values.tolist() for a in arrays.values() if key in a.coords]
        if values and any(v != values[0] for v in values):
            arrays = {n: a.drop_vars(key, errors="ignore") for n, a in arrays.items()}
    return arrays
