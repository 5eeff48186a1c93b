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

import xarray as xr

from patchspec import catalog, metrics
from patchspec.errors import PatchSpecError
from patchspec.sweep import Sweep

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


def normalized(result: xr.DataArray) -> xr.DataArray:
    """``(patched - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = clean restored."""
    clean, corrupted = result.attrs["clean_baseline"], result.attrs["corrupted_baseline"]
    return (result - corrupted) / (clean - corrupted)


def describe(result: xr.DataArray, point: dict[str, Any]) -> str:
    """``layer=1 head=2 pos=9 ('c')``: a cell with its token label."""
    parts = []
    for dim, value in point.items():
        label = f"{dim}={value}"
        token = f"{dim}_token"
        if token in result.coords:
            label += f" ({str(result.coords[token].sel({dim: value}).item())!r})"
        parts.append(label)
    return " ".join(parts)


def top_cells(result: xr.DataArray, k: int = 3) -> list[tuple[dict[str, Any], float]]:
    """The ``k`` cells with the largest normalised effect, as (coordinates, value)."""
    norm = normalized(result)
    flat = norm.stack(cell=norm.dims)
    order = flat.values.argsort()[::-1][:k]
    out = []
    for i in order:
        cell = flat.isel(cell=int(i))
        out.append(({str(d): int(cell[d].item()) for d in norm.dims}, float(cell.item())))
    return out


def write_outputs(ds: xr.Dataset, folder: Path, *, plots: bool) -> list[Path]:
    """Save every variable as netCDF (and a heatmap PNG); return the files written."""
    from patchspec import io

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in ds.data_vars.items():
        path = folder / f"{name}.nc"
        io.save(result, path)
        written.append(path)
        if plots:
            from patchspec.plot import plot

            png = folder / f"{name}.png"
            plot(normalized(result).assign_attrs(result.attrs), path=png, title=f"{name}: normalised effect")
            written.append(png)
    return written


def demo(out: Path, *, progress: bool = True, plots: bool = True, engine: str | None = None) -> xr.Dataset:
    """Run the demo sweeps on the toy model, print a summary, write results; return them."""
    from patchspec.toy import induction_prompts, toy_model

    started = time.perf_counter()
    model = toy_model()
    prompts = induction_prompts(n=1, seed=0)
    metric = metrics.logit_diff(prompts.answer, prompts.wrong)
    print(f"toy model: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, d_model {model.cfg.d_model}")
    print(f"clean:     {prompts.clean[0]}")
    print(f"corrupted: {prompts.corrupted[0]}")
    print(f"metric:    logit({prompts.answer[0]!r}) - logit({prompts.wrong[0]!r}) at the last position")
    ds = Sweep(*DEMO_SPECS, name="demo").run(
        model, prompts.clean, prompts.corrupted, metric, progress=progress, engine=engine
    )
    print(f"baselines: clean {ds.attrs['clean_baseline']:.3f}, corrupted {ds.attrs['corrupted_baseline']:.3f}")
    print("\nTop cells by normalised effect (1 = patching restores the clean answer):")
    for name, result in ds.data_vars.items():
        cells = ", ".join(f"{describe(result, p)}: {v:+.2f}" for p, v in top_cells(result, 2))
        print(f"  {name:<16} {cells}")
    heads = normalized(ds["head_out"])
    prev = int(heads.sel(layer=0).argmax("head"))
    induction = int(heads.sel(layer=model.cfg.n_layers - 1).argmax("head"))
    print(
        f"\nCircuit: layer-0 head {prev} (previous-token head) feeds layer-{model.cfg.n_layers - 1} "
        f"head {induction} (induction head): patching them restores "
        f"{float(heads.sel(layer=0, head=prev)):.0%} and "
        f"{float(heads.sel(layer=model.cfg.n_layers - 1, head=induction)):.0%} of the clean logit difference."
    )
    written = write_outputs(ds, out, plots=plots)
    print(f"\nWrote {len(written)} files to {out}/ in {time.perf_counter() - started:.1f} s")
    return ds


def run_experiment(path: Path, *, progress: bool = True) -> xr.Dataset:
    """Run an experiment file end to end; return the results."""
    from patchspec.experiment import load_experiment, load_model

    experiment = load_experiment(path)
    model = load_model(experiment.model)
    ds = Sweep(*experiment.specs).run(
        model, experiment.clean, experiment.corrupted, experiment.metric, progress=progress, engine=experiment.engine
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
    d.add_argument("--out", type=Path, default=Path("patchspec-demo"), help="output folder (default: patchspec-demo)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")
    d.add_argument("--engine", choices=None, default=None, help="executor: batched (default) or reference")
    r = sub.add_parser("run", help="run an experiment file (TOML)")
    r.add_argument("experiment", type=Path)
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.out, progress=not args.no_progress, plots=not args.no_plots, engine=args.engine)
        else:
            run_experiment(args.experiment, progress=not args.no_progress)
    except PatchSpecError as err:
        print(f"patchspec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
