"""Command line: ``patchspec demo`` and ``patchspec run EXPERIMENT.toml``.

``demo`` patches the bundled toy model (a two-layer transformer trained on induction) and shows
activation patching find its circuit: a previous-token head in layer 0 feeding an induction
head in layer 1 (Olsson et al. 2022, "In-context Learning and Induction Heads").

Only the standard library, ``attrs`` and :mod:`patchspec.errors` are imported here; torch,
TransformerLens, xarray and patchspec's own heavy modules are imported when a command runs, so
``patchspec --help`` and ``patchspec --version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from patchspec.errors import InputError, PatchSpecError

if TYPE_CHECKING:
    import xarray as xr

    from patchspec.spec import AnySpec

#: The built-in engines (``patchspec.execute.registry.ESTIMATORS``), named here so that
#: ``--help`` needs no torch; a test keeps the two in step.
ENGINES = ("batched", "reference")
#: The built-in estimators (``patchspec.attribution.ESTIMATOR_NAMES``), likewise.
ESTIMATORS = ("exact", "atp", "atp*", "graddrop", "ig")

#: The catalogue specs the demo sweeps, by name (see :func:`demo_specs`).
DEMO_SPEC_NAMES = (
    "RESID_PRE",
    "ATTN_OUT",
    "MLP_OUT",
    "HEAD_OUT",
    "HEAD_OUT_BY_POS",
    "HEAD_Q",
    "HEAD_K",
    "HEAD_V",
    "HEAD_PATTERN",
)


def demo_specs() -> tuple[AnySpec, ...]:
    """The demo's specs: the standard sweeps of :data:`DEMO_SPEC_NAMES`."""
    from patchspec import catalog

    return tuple(getattr(catalog, name) for name in DEMO_SPEC_NAMES)


def __getattr__(name: str) -> Any:
    if name == "DEMO_SPECS":  # the name it had; built on first use (it imports torch)
        return demo_specs()
    raise AttributeError(f"module 'patchspec.cli' has no attribute {name!r}")


def describe(cell: xr.DataArray) -> str:
    """``layer=1 head=2 pos=9 ('c'): +0.94``: one row of ``result.patch.top()``."""
    parts = []
    for name, coord in cell.coords.items():
        if name in ("rank", "metric") or str(name).endswith("_token") or coord.ndim:
            continue
        label = f"{name}={coord.item()}"
        if f"{name}_token" in cell.coords:
            label += f" ({cell.coords[f'{name}_token'].item()!r})"
        parts.append(label)
    return f"{' '.join(parts)}: {float(cell):+.2f}"


#: What ``result.patch.normalized()`` computes when its output does not say (``attrs["formula"]``).
DEFAULT_FORMULA = "(patched - corrupted) / (clean - corrupted)"


#: What a normalised effect of 1 means, by formula (when its ``attrs["meaning"]`` does not say).
MEANINGS = {
    DEFAULT_FORMULA: "1 = patching restores the clean answer",
    "(clean - patched) / (clean - corrupted)": "1 = patching destroys the clean answer",
}


def formula(effect: xr.DataArray | xr.Dataset) -> str:
    """The formula of a normalised effect, as its attrs state it."""
    return str(effect.attrs.get("formula", DEFAULT_FORMULA))


def _number(value: Any) -> str:
    """A baseline as text: ``1.234``, or ``mean 1.234 over 16 prompts`` for one per prompt."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        flat = [float(v) for v in value]
        return f"mean {sum(flat) / len(flat):.3f} over {len(flat)} prompts" if flat else "none"
    text = f"{float(value):.3f}"
    return "0.000" if text == "-0.000" else text


#: The attrs holding a run's unpatched metric values.
BASELINES = ("clean_baseline", "corrupted_baseline")


def _item(value: Any, i: int) -> Any:
    return value[i] if isinstance(value, list | tuple) else value


def report(ds: xr.Dataset, *, k: int = 2) -> None:
    """Print a sweep's baselines and the top ``k`` cells of each spec by normalised effect.

    The summary ``patchspec demo`` and ``patchspec run`` print. A result that cannot be
    normalised (no clean baseline) is ranked by its effect instead; one with a ``metric`` dim
    is ranked per metric.
    """
    first = next(iter(ds.data_vars.values()), None)
    if first is None:
        print("no results")
        return

    clean, corrupted = (ds.attrs.get(k, first.attrs.get(k)) for k in BASELINES)
    if "metric" in first.dims:  # a baseline per metric (each a number or one per prompt)
        for i, metric in enumerate(first["metric"].values.tolist()):
            print(
                f"baselines [{metric}]: clean {_number(_item(clean, i))}, "
                f"corrupted {_number(_item(corrupted, i))}"
            )
    else:
        print(f"baselines: clean {_number(clean)}, corrupted {_number(corrupted)}")
    rows: list[tuple[str, str, str]] = []  # (name, what was ranked, cells)
    for name, result in ds.data_vars.items():
        try:
            effects = result.patch.normalized()
            what = f"normalised effect {formula(effects)}"
            meaning = effects.attrs.get("meaning") or MEANINGS.get(formula(effects))
            if meaning:
                what += f": {meaning}"
        except InputError:  # no clean baseline to normalise by
            effects = result.patch.effect()
            what = "effect (patched minus the receiving run's baseline)"
        metrics = effects["metric"].values.tolist() if "metric" in effects.dims else [None]
        for metric in metrics:
            effect = effects if metric is None else effects.sel(metric=metric)
            label = str(name) if metric is None else f"{name} [{metric}]"
            best = effect.patch.top(k, absolute=False)
            cells = ", ".join(describe(best.sel(rank=r)) for r in best["rank"].values)
            rows.append((label, what, cells or "no cells measured"))
    shown = None
    width = max(16, *(len(label) for label, _w, _c in rows))
    for label, what, cells in rows:
        if what != shown:
            print(f"\nTop cells by {what}:")
            shown = what
        print(f"  {label:<{width}} {cells}")


def write_outputs(ds: xr.Dataset, folder: Path, *, plots: bool) -> list[Path]:
    """Save every variable as netCDF (and a heatmap PNG); return the files written.

    Raises:
        InputError: a variable's name cannot name a file (checked before anything is
            written), or a file cannot be written.
    """
    from patchspec import io
    from patchspec.experiment import unsafe_file_name

    for name in ds.data_vars:
        problem = unsafe_file_name(str(name))
        if problem:
            raise InputError(
                f"result {name!r} {problem} and cannot name an output file in {str(folder)!r}"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {str(folder)!r}: {err}") from None
    written = []
    for name, result in ds.data_vars.items():
        path = folder / f"{name}.nc"
        io.save(result, path)
        written.append(path)
        if plots:
            from patchspec.plot import plot

            png = folder / f"{name}.png"
            effect = result.patch.normalized()
            try:
                plot(effect, path=png)  # its title says spec, metric, direction and formula
            except OSError as err:
                raise InputError(f"cannot write {str(png)!r}: {err}") from None
            written.append(png)
    return written


@attrs.frozen
class DemoResult:
    """What the demo found: the results, and the circuit heads by patching and by detector."""

    results: xr.Dataset
    previous_token_head: int
    induction_head: int
    detector: dict[str, Any]
    files: list[Path]
    #: The same sweeps estimated by attribution patching (``estimator="atp"``).
    estimates: xr.Dataset | None = None


def _check_device(device: str | None, where: str = "--device") -> None:
    """Refuse a device this machine does not have, before anything loads.

    Raises:
        InputError: naming the device and why.
    """
    if device is None:
        return
    from patchspec.experiment import device_problem

    problem = device_problem(device)
    if problem:
        raise InputError(f"{where} {device!r} {problem}")


def demo(
    out: Path,
    *,
    progress: bool | None = None,
    plots: bool = True,
    engine: str | None = None,
    device: str | None = None,
) -> DemoResult:
    """Run the demo sweeps on the toy model, print a summary, write results; return them.

    Args:
        out: The output folder.
        progress: Show the progress bar (default: on a terminal, for runs of 64 cells or more).
        plots: Write a heatmap PNG per spec.
        engine: The estimator (default ``"batched"``).
        device: Where the model runs (default: CUDA when available, else the CPU).

    Raises:
        InputError: the device is not available here, or an output cannot be written.
    """
    _check_device(device)
    from patchspec import metrics
    from patchspec.spec import Sweep
    from patchspec.toy import detected_heads, induction_prompts, toy_model

    started = time.perf_counter()
    model = toy_model(device)
    last = model.cfg.n_layers - 1
    # Replacing the query word's first occurrence breaks the previous-token link, so patching
    # reveals both halves of the circuit (see patchspec.toy.induction_prompts).
    prompts = induction_prompts(n=1, seed=0, corruption="query")
    metric = metrics.logprob(prompts.answer)
    print(
        f"toy model: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}"
    )
    print(f"clean:     {prompts.clean[0]}")
    print(f"corrupted: {prompts.corrupted[0]}")
    print(f"metric:    log-probability of {prompts.answer[0]!r} at the last position")
    ds = Sweep(*demo_specs(), name="demo").run(
        model, prompts.clean, prompts.corrupted, metric, progress=progress, engine=engine
    )
    report(ds)
    heads = ds["head_out"].patch.normalized()
    prev = int(heads.sel(layer=0).argmax("head"))
    induction = int(heads.sel(layer=last).argmax("head"))
    print(
        f"\nCircuit found by patching: layer-0 head {prev} (previous-token head) feeds layer-{last} "
        f"head {induction} (induction head); patching each alone restores "
        f"{float(heads.sel(layer=0, head=prev)):.0%} and {float(heads.sel(layer=last, head=induction)):.0%} "
        "of the clean log-probability."
    )
    scores = detected_heads(model)
    prev_scores, ind_scores = scores["previous_token_head"], scores["induction_head"]
    print(
        "TransformerLens's head detector agrees: previous-token scores in layer 0 "
        f"{[round(float(v), 2) for v in prev_scores[0]]}, induction scores in layer {last} "
        f"{[round(float(v), 2) for v in ind_scores[last]]}."
    )
    written = write_outputs(ds, out, plots=plots)
    estimates, files = compare_attribution(
        ds, model, prompts.clean, prompts.corrupted, metric, out, plots=plots
    )
    written += files
    print(f"\nWrote {len(written)} files to {out}/ in {time.perf_counter() - started:.1f} s")
    detector = {name: value.tolist() for name, value in scores.items()}
    return DemoResult(ds, prev, induction, detector, written, estimates)


#: The demo spec drawn beside its attribution-patching estimate.
AGREEMENT_SPEC = "head_out_by_pos"


def compare_attribution(
    exact: xr.Dataset,
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    out: Path,
    *,
    plots: bool,
) -> tuple[xr.Dataset, list[Path]]:
    """Estimate the demo's sweep by attribution patching (``estimator="atp"``), print how well
    each spec's estimate agrees with the exact result (Pearson r of the effects, and whether
    the top cells match), and draw the estimate beside the exact result of
    :data:`AGREEMENT_SPEC` (:func:`patchspec.plot.plot_agreement`); return the estimates and
    the files written."""
    from patchspec.spec import Sweep
    from patchspec.stats import agreement

    specs = demo_specs()
    atp = Sweep(*specs, name="demo").run(
        model, clean, corrupted, metric, estimator="atp", progress=False
    )
    print(
        "\nAttribution patching (AtP, an estimate of every cell from 2 forward and 1 backward "
        "passes)\nagainst exact patching, per spec (effects; r: Pearson correlation):"
    )
    for name in exact.data_vars:
        if name not in atp:
            continue
        scores = agreement(exact[name], atp[name])
        same = "same top cell" if scores["same_top"] else "top cell differs"
        print(f"  {name:<16} {scores['cells']:4d} cells  r {scores['pearson']:+.3f}  {same}")
    print("AtP is an estimate: patchspec.verify patches the cells it ranks highest exactly.")
    if not plots or AGREEMENT_SPEC not in atp:
        return atp, []
    from patchspec.plot import plot_agreement

    png = out / f"atp_vs_exact_{AGREEMENT_SPEC}.png"
    try:
        plot_agreement(exact[AGREEMENT_SPEC], atp[AGREEMENT_SPEC], path=png)
    except OSError as err:
        raise InputError(f"cannot write {str(png)!r}: {err}") from None
    return atp, [png]


def run_experiment(
    path: Path,
    *,
    progress: bool | None = None,
    out: Path | None = None,
    device: str | None = None,
    engine: str | None = None,
    plots: bool | None = None,
    estimator: str | None = None,
) -> xr.Dataset:
    """Run an experiment file end to end, print its baselines and top cells; return the results.

    Args:
        path: The experiment file (TOML).
        progress: Show the progress bar (default: on a terminal, for runs of 64 cells or more).
        out: The output folder instead of ``[output] folder``.
        device: The device instead of ``[model] device``.
        engine: The engine instead of ``[run] engine``.
        plots: Instead of ``[output] plots``.
        estimator: The estimator instead of ``[run] estimator`` (``"atp"``: attribution
            patching, see :mod:`patchspec.attribution`).

    Raises:
        ExperimentError: the file is malformed or the model cannot be loaded.
        InputError: the device is not available here, or an output cannot be written.
    """
    _check_device(device)
    from patchspec.experiment import load_experiment, load_model, load_tensors

    experiment = load_experiment(path)  # checks the whole file before the model loads
    model_spec = dict(experiment.model)
    if device is not None:
        model_spec["device"] = device
    options = dict(experiment.options)
    if engine is not None:
        options["engine"] = engine
    if estimator is not None:
        options["estimator"] = estimator
    folder = experiment.folder if out is None else out
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} exists and is not a folder")
    model = load_model(model_spec)
    print(f"{path}: {len(experiment.specs)} specs, {len(experiment.clean)} prompt pairs")
    import xarray

    ds = xarray.Dataset()
    written: list[Path] = []
    if experiment.specs:
        ds = experiment.sweep.run(
            model,
            experiment.clean,
            experiment.corrupted,
            experiment.metric,
            progress=progress,
            positions=experiment.positions,
            reference=experiment.reference,
            tensors=load_tensors(experiment.tensors),
            **options,
        )
        report(ds)
        written = write_outputs(ds, folder, plots=experiment.plots if plots is None else plots)
    written += _run_paths(experiment, model, options, folder, progress)
    print(f"\nWrote {len(written)} files to {folder}/")
    return ds


def _run_paths(
    experiment: Any, model: Any, options: dict[str, Any], folder: Path, progress: bool | None
) -> list[Path]:
    """Run the experiment's ``[[paths]]`` and save each result as ``<name>.nc``."""
    from patchspec import io

    keep = ("engine", "cells_per_batch", "max_memory", "hash_weights")
    written = []
    for spec in experiment.paths:
        result = spec.run(
            model,
            experiment.clean,
            experiment.corrupted,
            experiment.metric,
            progress=progress,
            positions=experiment.positions,
            **{k: v for k, v in options.items() if k in keep},
        )
        print(f"{spec.label}: {dict(result.sizes)}, {result.attrs['forward_passes']} forward passes")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{spec.label}.nc"
        io.save(result, target)
        written.append(target)
    return written


def _version() -> str:
    from patchspec import __version__

    return __version__


def parser() -> argparse.ArgumentParser:
    """The ``patchspec`` argument parser (imports nothing heavy)."""
    top = argparse.ArgumentParser(
        prog="patchspec",
        description="Activation patching for TransformerLens models, with labelled results.",
        epilog="Run 'patchspec COMMAND --help' for a command's options.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, out_help: str) -> None:
        p.add_argument("--out", type=Path, metavar="FOLDER", help=out_help)
        p.add_argument(
            "--device",
            metavar="DEVICE",
            help="where the model runs: cpu, cuda, cuda:1, mps (default: cuda when available)",
        )
        p.add_argument(
            "--engine",
            choices=ENGINES,
            help="how cells are computed: batched (default, many cells per forward pass) or "
            "reference (one plain forward pass per cell)",
        )
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show a progress bar (default: on a terminal, for runs of 64 cells or more)",
        )
        p.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")

    d = sub.add_parser(
        "demo",
        help="patch the bundled toy model and find its induction circuit",
        description="Patch the bundled two-layer toy model, print the top cells of each sweep "
        "and the induction circuit they reveal, and write one netCDF file and one heatmap per "
        "sweep.",
    )
    common(d, "output folder (default: patchspec-demo)")
    r = sub.add_parser(
        "run",
        help="run an experiment file (TOML)",
        description="Run an experiment file: print the baselines and the top cells of each spec, "
        "and write one netCDF file (and heatmap) per spec. The whole file is checked before the "
        "model loads. See docs/cli.md for the format.",
    )
    r.add_argument("experiment", type=Path, metavar="EXPERIMENT.toml")
    r.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="exact (default: patch every cell) or an estimate of every cell from a few passes: "
        "atp (attribution patching), atp* (AtP with the QK fix), graddrop (AtP* with GradDrop: an "
        "unsigned ranking score) or ig (integrated gradients); see "
        "docs/attribution.md",
    )
    common(r, "output folder (default: [output] folder of the file)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``patchspec`` console script: 0 on success, 2 on a bad input."""
    args = parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo(
                args.out or Path("patchspec-demo"),
                progress=args.progress,
                plots=not args.no_plots,
                engine=args.engine,
                device=args.device,
            )
        else:
            run_experiment(
                args.experiment,
                progress=args.progress,
                out=args.out,
                device=args.device,
                engine=args.engine,
                plots=False if args.no_plots else None,
                estimator=args.estimator,
            )
    except (PatchSpecError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"patchspec: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchspec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
