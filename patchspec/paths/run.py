"""Running a :class:`~patchspec.paths.PathSpec`: validate, session, engine, label.

The same steps as :mod:`patchspec.runner` (whose ``prepare``, session, metric evaluator and
provenance it reuses), with :mod:`patchspec.paths.engine` in place of an estimator: a path's
cells are (sender, receiver) pairs, not regions of one activation.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import numpy as np
import torch
import xarray as xr

from patchspec import runner
from patchspec.errors import InputError, OptionError, SpecError
from patchspec.metrics import Evaluator
from patchspec.model.adapter import ModelAdapter
from patchspec.options import RunOptions
from patchspec.paths import engine
from patchspec.paths.spec import RECEIVER_AXES, PathSpec
from patchspec.plan.grid import compile
from patchspec.plan.sizes import Sizes
from patchspec.sources import Receiver

#: The engines a path spec runs on.
ENGINES = ("batched", "reference")


def senders_of(
    spec: PathSpec, sizes: Sizes, positions: Any = None
) -> tuple[dict[str, list[Any]], list[engine.Sender]]:
    """The sender coordinates per sender axis, and the senders in C order over them.

    Raises:
        SpecError: a restriction outside the model's sizes, or a named sender position.
    """
    grid = compile(spec.sender, sizes, positions=positions)
    coords = {dim: list(grid.coords[dim]) for dim in grid.dims}
    if "pos" in coords and not all(isinstance(p, int | np.integer) for p in coords["pos"]):
        raise SpecError(
            "a path's sender positions must be token indices; named positions (which may differ "
            "between prompts) are not supported for senders yet"
        )
    senders = []
    for values in itertools.product(*(coords[d] for d in grid.dims)):
        at = dict(zip(grid.dims, (int(v) for v in values), strict=True))
        senders.append(
            engine.Sender(spec.sender.activation, at["layer"], at.get("head"), at.get("pos"))
        )
    return coords, senders


def receivers_of(spec: PathSpec, sizes: Sizes) -> tuple[dict[str, list[int]], list[engine.Target]]:
    """The receiver coordinates per receiver axis, and the receivers in C order over them."""
    axes = RECEIVER_AXES[spec.receiver]
    size = {"layer": sizes.n_layers, "head": sizes.n_heads, "kv_head": sizes.n_kv_heads}
    coords = {a: list(range(size[a])) for a in axes}
    targets = []
    for values in itertools.product(*(coords[a] for a in axes)):
        at = dict(zip(axes, values, strict=True))
        head = at.get("head", at.get("kv_head"))
        targets.append(engine.Target(spec.receiver, at.get("layer", 0), head))
    return coords, targets


def run_path(
    spec: PathSpec,
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    engine: str | None = None,
    progress: bool | None = None,
    positions: Any = None,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
    hash_weights: bool = False,
) -> xr.DataArray:
    """:meth:`PathSpec.run` (see there)."""
    from patchspec.paths import engine as paths_engine

    if engine is not None and engine not in ENGINES:
        raise OptionError(f"a path spec runs on engine 'batched' or 'reference', got {engine!r}")
    if clean is None:
        raise InputError("clean prompts are required (give prompts or tokens, not None)")
    options = RunOptions(
        engine=engine,
        progress=progress,
        cells_per_batch=cells_per_batch,
        max_memory=max_memory,
        hash_weights=hash_weights,
    )
    with ModelAdapter.of(model).exclusive(), contextlib.ExitStack() as stack:
        run = runner.prepare(model, clean, corrupted, metric, options=options, positions=positions)
        adapter, session, sizes = run.adapter, run.session, run.sizes
        sender_coords, senders = senders_of(spec, sizes, run.positions)
        receiver_coords, targets = receivers_of(spec, sizes)
        paths_engine.check_model(adapter, senders, targets, spec.through)
        if not torch.equal(session.mask("clean"), session.mask("corrupted")):
            raise InputError(
                "path patching adds the sender's clean-minus-corrupted write at every position, so "
                "the clean and corrupted prompts must have their padding at the same positions; "
                "give prompts of equal token lengths"
            )
        receiving: Receiver = "corrupted" if spec.receiving_run == "corrupted" else "clean"
        giving: Receiver = "clean" if receiving == "corrupted" else "corrupted"
        session.hook_names.update(
            paths_engine.needed_hooks(senders, targets, sizes.n_layers, spec.through)
        )
        context = run.context.for_run(receiving)
        evaluate = Evaluator(run.metrics, context, stacked=run.metric_dim, describe=str)
        with torch.inference_mode():
            clean_base = evaluate(session.logits("clean"), "the clean baseline")
            corrupted_base = evaluate(session.logits("corrupted"), "the corrupted baseline")
        reference = engine == "reference"
        read = evaluate.logit_positions(sizes.seq)
        rows = (
            1
            if reference
            else paths_engine.rows_per_pass(
                adapter,
                sizes,
                sizes.seq if read is None else len(read),
                max_memory,
                cells_per_batch,
            )
        )

        measured = sum(paths_engine.reads(s, t, sizes.n_layers) for s in senders for t in targets)
        bar = stack.enter_context(
            runner.run_progress(
                progress, [spec.label], measured, "batched" if not reference else "reference"
            )
        )

        def values_of(logits: torch.Tensor, n: int) -> torch.Tensor:
            out = evaluate.many(logits, [f"a path of {spec.label}"] * n, read)
            bar.update(n)
            return out

        paths = paths_engine.PathRun(
            adapter=adapter,
            tokens=session.tokens(receiving),
            replay=None if reference else session.replay(receiving),
            source=lambda name: session.activation(giving, name),
            receiving=lambda name: session.activation(receiving, name),
            evaluate=values_of,
            positions=read,
            rows=rows,
        )
        with torch.inference_mode():
            pairs, values = paths.values(senders, targets, spec.through)
        return _label(
            run,
            spec,
            sender_coords,
            receiver_coords,
            senders,
            targets,
            pairs,
            values,
            evaluate,
            clean_base,
            corrupted_base,
            paths,
            reference,
        )


def _label(
    run: runner.Run,
    spec: PathSpec,
    sender_coords: dict[str, list[Any]],
    receiver_coords: dict[str, list[int]],
    senders: list[engine.Sender],
    targets: list[engine.Target],
    pairs: list[tuple[int, int]],
    values: torch.Tensor | None,
    evaluate: Evaluator,
    clean_base: torch.Tensor,
    corrupted_base: torch.Tensor,
    paths: engine.PathRun,
    reference: bool,
) -> xr.DataArray:
    """The values as one DataArray over sender x receiver dims, NaN where not measured."""
    n_layers = run.sizes.n_layers
    tail = tuple(values.shape[1:]) if values is not None else tuple(corrupted_base.shape)
    data = np.full((len(senders), len(targets), *tail), np.nan)
    if values is not None:
        flat = values.detach().float().cpu().numpy().astype(np.float64)
        index = np.asarray(pairs, dtype=np.int64)
        data[index[:, 0], index[:, 1]] = flat
    s_shape = tuple(len(v) for v in sender_coords.values())
    r_shape = tuple(len(v) for v in receiver_coords.values())
    data = data.reshape(s_shape + r_shape + tail)
    extra: tuple[str, ...] = ("metric",) if run.metric_dim else ()
    if len(tail) > len(extra):
        extra = (*extra, "example")
    coords: dict[str, Any] = {f"sender_{k}": v for k, v in sender_coords.items()}
    coords.update({f"receiver_{k}": v for k, v in receiver_coords.items()})
    if run.metric_dim:
        coords["metric"] = list(evaluate.names)
    if "example" in extra:
        coords["example"] = list(range(tail[-1]))
        for key, texts in run.prompts.items():
            if len(texts) == tail[-1]:
                coords[key] = ("example", list(texts))
    if "pos" in sender_coords and run.labels is not None:
        coords["sender_pos_token"] = ("sender_pos", [run.labels[p] for p in sender_coords["pos"]])
    # The mask: whether each receiver reads each sender (it depends on the layers only).
    mask_dims = [d for d in ("sender_layer", "receiver_layer") if d in coords]
    layers_s = sender_coords["layer"]
    layers_r = receiver_coords.get("layer", [0])
    probe = targets[0].kind
    measured = np.asarray(
        [
            [
                engine.reads(
                    engine.Sender(spec.sender.activation, ls), engine.Target(probe, lr), n_layers
                )
                for lr in layers_r
            ]
            for ls in layers_s
        ]
    )
    if "receiver_layer" not in coords:
        measured = measured[:, 0]
    coords["measured"] = (tuple(mask_dims), measured)
    attributes: dict[str, Any] = {
        "spec": spec.to_dict(),
        "spec_name": spec.label,
        "sender": spec.sender.activation,
        "receiver_input": spec.receiver,
        "through": spec.through,
        "receiver": spec.receiving_run,
        "direction": runner.direction(spec.receiving_run, [spec.sender.source.kind]),  # type: ignore[arg-type]
        "metric": ", ".join(evaluate.names),
        "clean_baseline": runner._plain(clean_base),
        "corrupted_baseline": runner._plain(corrupted_base),
        "engine": "reference" if reference else "batched",
        "estimator": "paths",
        "exact": True,
        "forward_passes": int(paths.stats["forwards"]),
        **run.provenance,
    }
    if "example" in extra and not run.metric_dim:
        for key in ("clean_baseline", "corrupted_baseline"):
            listed = attributes[key]
            if isinstance(listed, list) and len(listed) == tail[-1]:
                coords[key] = ("example", [float(v) for v in listed])
    dims = (*spec.dims, *extra)
    return xr.DataArray(
        data, dims=dims, coords=coords, name="+".join(evaluate.names), attrs=attributes
    )
