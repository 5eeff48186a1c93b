"""Command line: ``patchspec demo`` and ``patchspec run EXPERIMENT.toml``.

``demo`` patches the bundled toy model (a two-layer transformer trained on induction) and shows
activation patching find its circuit: a previous-token head in layer 0 feeding an induction
head in layer 1 (Olsson et al. 2022, "In-context Learning and Induction Heads").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import xarray as xr

from patchspec import catalog, metrics
from patchspec.errors import InputError, PatchSpecError
from patchspec.spec import Sweep

DEMO_SPECS = (
    catalog.RESID_PRE,
    catalog.ATTN_OUT,
    catalog.MLP_OUT,
    catalog.HEAD_OUT,
    catalog.HEAD_OUT_BY_POS,
    catalog.HEAD_Q,
    catalog.HEAD_K,
    catalog.HEAD_V,
    catalog.HEAD_PATTERN,
)


def describe(cell: xr.DataArray) -> str:
    """``layer=1 head=2 pos=9 ('c'): +0.94``: one row of ``result.patch.top()``."""
    parts = []
    for name, coord in cell.coords.items():
        if name == "rank" or str(name).endswith("_token"):
            continue
        label = f"{name}={coord.item()}"
        if f"{name}_token" in cell.coords:
            label += f" ({cell.coords[f'{name}_token'].item()!r})"
        parts.append(label)
    return f"{' '.join(parts)}: {float(cell):+.2f}"


#: What ``result.patch.normalized()`` computes when its output does not say (``attrs["formula"]``).
DEFAULT_FORMULA = "(patched - corrupted) / (clean - corrupted)"


#: What a normalised effect of 1 means, by formula.
MEANINGS = {
    DEFAULT_FORMULA: "1 = patching restores the clean answer",
    "(clean - patched) / (clean - corrupted)": "1 = patching destroys the clean answer",
}


def formula(effect: xr.DataArray | xr.Dataset) -> str:
    """The formula of a normalised effect, as its attrs state it."""
    return str(effect.attrs.get("formula", DEFAULT_FORMULA))


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
                plot(
                    effect.rename("normalised effect"),
                    path=png,
                    title=f"{name}: {formula(effect)}",
                    col_wrap=2,
                )
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


def demo(
    out: Path, *, progress: bool = True, plots: bool = True, engine: str | None = None
) -> DemoResult:
    """Run the demo sweeps on the toy model, print a summary, write results; return them."""
    from patchspec.toy import detected_heads, induction_prompts, toy_model

    started = time.perf_counter()
    model = toy_model()
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
    ds = Sweep(*DEMO_SPECS, name="demo").run(
        model, prompts.clean, prompts.corrupted, metric, progress=progress, engine=engine
    )
    print(
        f"baselines: clean {ds.attrs['clean_baseline']:.3f}, corrupted {ds.attrs['corrupted_baseline']:.3f}"
    )
    effects = {name: result.patch.normalized() for name, result in ds.data_vars.items()}
    shown = formula(next(iter(effects.values())))
    meaning = MEANINGS.get(shown)
    print(f"\nTop cells by normalised effect {shown}{f' ({meaning})' if meaning else ''}:")
    for name, effect in effects.items():
        best = effect.patch.top(2, absolute=False)
        cells = ", ".join(describe(best.sel(rank=r)) for r in best["rank"].values)
        print(f"  {name:<16} {cells}")
    heads = effects["head_out"]
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
    print(f"\nWrote {len(written)} files to {out}/ in {time.perf_counter() - started:.1f} s")
    detector = {name: value.tolist() for name, value in scores.items()}
    return DemoResult(ds, prev, induction, detector, written)


def run_experiment(path: Path, *, progress: bool = True) -> xr.Dataset:
    """Run an experiment file end to end; return the results."""
    from patchspec.experiment import load_experiment, load_model

    experiment = load_experiment(path)  # checks the whole file before the model loads
    model = load_model(experiment.model)
    ds = experiment.sweep.run(
        model,
        experiment.clean,
        experiment.corrupted,
        experiment.metric,
        progress=progress,
        positions=experiment.positions,
        reference=experiment.reference,
        **experiment.options,
    )
    written = write_outputs(ds, experiment.folder, plots=experiment.plots)
    for name, result in ds.data_vars.items():
        print(f"{name}: dims {dict(result.sizes)}")
    print(f"Wrote {len(written)} files to {experiment.folder}/")
    return ds


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``patchspec`` console script."""
    parser = argparse.ArgumentParser(prog="patchspec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="patch the bundled toy model and find its induction circuit")
    d.add_argument(
        "--out",
        type=Path,
        default=Path("patchspec-demo"),
        help="output folder (default: patchspec-demo)",
    )
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")
    d.add_argument(
        "--engine", choices=None, default=None, help="executor: batched (default) or reference"
    )
    r = sub.add_parser("run", help="run an experiment file (TOML)")
    r.add_argument("experiment", type=Path)
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(
                args.out, progress=not args.no_progress, plots=not args.no_plots, engine=args.engine
            )
        else:
            run_experiment(args.experiment, progress=not args.no_progress)
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
