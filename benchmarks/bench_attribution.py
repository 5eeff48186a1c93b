#!/usr/bin/env python
"""Attribution patching (AtP) against exact batched patching: time and agreement.

For each grid (``mlp_neuron_post`` by position, ``head_out_by_pos``, ``head_pattern_dest_src``)
this runs ``estimator="atp"`` and the exact batched engine on the same prompts and reports

* the time of each, measured in the same run (their ratio is the figure to read: absolute times
  on a shared machine are noisy);
* agreement of the effects (value minus the corrupted baseline): Pearson and Spearman over
  cells, recall of the exact top-10 cells (by ``|effect|``) within AtP's top-10, and within
  AtP's top-50 (what ``ps.verify(..., top=50)`` would patch exactly).

Models: ``toy`` (the bundled induction model, with induction prompts and the answer-minus-wrong
logit difference), and random-weight GPT-2 shapes ``medium`` (6 layers, d_model 256) and
``small`` (GPT-2-small: 12 layers, d_model 768), with random prompts and a fixed logit
difference. On a random-weight model agreement says little; the timings are the point there.
``--exact-cells N`` patches only ``N`` cells (drawn at random) exactly and extrapolates the
exact time from them (agreement is then over those cells; recall needs the full grid).
``--estimator`` times another estimator in AtP's place (``atp*``, ``graddrop``; a GradDrop score
is compared with ``|exact effect|``).

Run from the repository root, e.g.::

    .venv/bin/python benchmarks/bench_attribution.py --model toy --batch 8
    .venv/bin/python benchmarks/bench_attribution.py --model medium --batch 8 --exact-cells 2000
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch
from scipy import stats

from patchspec import catalog, metrics, runner
from patchspec.options import RunOptions
from patchspec.plan import compile

GRIDS = {
    "mlp_neuron_post_by_pos": catalog.MLP_NEURON_POST.over("layer", "pos", "neuron"),
    "head_out_by_pos": catalog.HEAD_OUT_BY_POS,
    "head_pattern_dest_src": catalog.HEAD_PATTERN_DEST_SRC,
}


def _model(name: str, batch: int, length: int, device: str):
    if name == "toy":
        from patchspec.toy import induction_prompts, toy_model

        model = toy_model(device)
        p = induction_prompts(batch, length=length, seed=0)
        return model, p.clean, p.corrupted, metrics.logit_diff(p.answer, p.wrong)
    from patchspec.tiny import tiny_model

    shape = {"medium": (6, 8, 256), "small": (12, 12, 768)}[name]
    words = [f"w{i}" for i in range(1000)]
    model = tiny_model(
        words, tempfile.mkdtemp(), n_layers=shape[0], n_heads=shape[1], d_model=shape[2],
        n_ctx=max(64, length), device=device,
    )
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    clean = torch.randint(3, vocab, (batch, length), generator=gen)
    corrupted = torch.randint(3, vocab, (batch, length), generator=gen)
    clean[:, 0] = corrupted[:, 0] = 0
    return model, clean, corrupted, metrics.logit_diff(5, 7)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _recall(exact: np.ndarray, estimate: np.ndarray, k: int, within: int) -> float:
    want = set(np.argsort(-np.abs(exact))[:k])
    got = set(np.argsort(-np.abs(estimate))[:within])
    return len(want & got) / len(want)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", choices=["toy", "medium", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=8, help="toy: half-length; else tokens")
    parser.add_argument("--exact-cells", type=int, default=None)
    parser.add_argument("--grids", nargs="*", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--estimator", default="atp", choices=["atp", "atp*", "graddrop"])
    args = parser.parse_args()
    model, clean, corrupted, metric = _model(args.model, args.batch, args.length, args.device)
    cfg = model.cfg
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.device}, {torch.get_num_threads()} threads; model {args.model} "
        f"({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads), batch {args.batch}"
    )
    print(f"{'grid':24} {'cells':>9} {'exact s':>9} {args.estimator + ' s':>7} {'speedup':>8} "
          f"{'pearson':>8} {'spearman':>8} {'top10@10':>8} {'top10@50':>8}")
    for name in args.grids:
        spec = GRIDS[name]
        run = runner.prepare(model, clean, corrupted, metric, options=RunOptions(progress=False))
        grid = run.add(compile(spec, run.sizes))
        n = grid.n_cells
        cells = None
        if args.exact_cells is not None and args.exact_cells < n:
            cells = np.sort(np.random.default_rng(0).choice(n, args.exact_cells, replace=False))
        runner.run_grid(run, grid, spec.label, cells=np.arange(min(n, 8)))  # warm up
        _sync(args.device)
        t0 = time.perf_counter()
        exact, _ev, _cb, corrupted_base = runner.run_grid(run, grid, spec.label, cells=cells)
        _sync(args.device)
        exact_s = time.perf_counter() - t0
        if cells is not None:
            exact_s *= n / len(cells)
        estimator = args.estimator
        spec.run(model, clean, corrupted, metric, estimator=estimator, progress=False)  # warm up
        _sync(args.device)
        t0 = time.perf_counter()
        atp = spec.run(model, clean, corrupted, metric, estimator=estimator, progress=False)
        _sync(args.device)
        atp_s = time.perf_counter() - t0
        e = exact.cpu().numpy().astype(np.float64) - float(corrupted_base)
        if atp.attrs.get("quantity") == "score":  # unsigned: against |exact effect|
            e, a = np.abs(e), atp.values.reshape(-1)
        else:
            a = atp.values.reshape(-1) - atp.attrs["corrupted_baseline"]
        chosen = np.arange(n) if cells is None else cells
        e, a_sub = e[chosen], a[chosen]
        pearson = stats.pearsonr(e, a_sub).statistic
        spearman = stats.spearmanr(e, a_sub).statistic
        r10 = f"{_recall(e, a, 10, 10):.2f}" if cells is None else "-"
        r50 = f"{_recall(e, a, 10, 50):.2f}" if cells is None else "-"
        extrapolated = "*" if cells is not None else " "
        print(f"{name:24} {n:>9} {exact_s:>8.2f}{extrapolated} {atp_s:>7.2f} "
              f"{exact_s / atp_s:>7.0f}x {pearson:>8.3f} {spearman:>8.3f} {r10:>8} {r50:>8}")
    if args.exact_cells is not None:
        print(f"* exact time extrapolated from {args.exact_cells} random cells; "
              "agreement over those cells")


if __name__ == "__main__":
    main()
