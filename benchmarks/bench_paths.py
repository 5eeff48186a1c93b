#!/usr/bin/env python
"""All-sources direct path patching: TransformerLens 4.3 vs patchspec, same process.

Times ``transformer_lens.patching.get_act_patch_direct_path_all_sources`` (one full forward per
(source head, later head) pair; caches computed beforehand, not timed), patchspec's drop-in
``patchspec.compat.get_act_patch_direct_path_all_sources`` (same arguments, same callable
metric reading full logits, caches given) and the labelled ``catalog.PATH_HEAD_TO_HEAD_<C>.run``
with ``metrics.logit_diff`` (timed whole: it runs the clean and corrupted inputs itself, and
unembeds only the last position), checks that all three agree to 1e-4, and prints the times and
the ratios ``tl_s / compat_s`` and ``tl_s / spec_s``, in wall-clock and in CPU (process) time:
on a machine whose cores other processes share, wall-clock ratios swing by several times between
runs, the CPU ones much less (the run uses ``--threads`` threads, 1 by default). Each is the best
of ``--repeats`` runs (TransformerLens: one run when it takes over 20 CPU seconds).

The model is a GPT-2 with random, seeded weights built locally (``patchspec.tiny``), by default
the medium shape of ``bench_vs_tl.py``: 6 layers, 8 heads, d_model 256, a 2000-word vocabulary.

Run from the repository root::

    python benchmarks/bench_paths.py                      # medium shape, batch 8, 16 tokens, q
    python benchmarks/bench_paths.py --layers 2 --heads 4 --d-model 64 --batch 2   # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# This checkout's patchspec, also when another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

ANSWER, WRONG = 5, 7


def best_of(
    fn: Callable[[], Any], repeats: int, *, slow_after: float = 20.0
) -> tuple[float, float, Any]:
    """The best wall and CPU (process) times of ``repeats`` calls (one call when the first takes
    over ``slow_after`` CPU seconds)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        if cpus[-1] > slow_after:
            break
    return min(walls), min(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--component", choices=("q", "k", "v"), default="q")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformer_lens.patching as tl

    import patchspec.compat as compat
    from patchspec import catalog, metrics
    from patchspec.tiny import tiny_model

    words = [f"w{i}" for i in range(args.vocab)]
    model = tiny_model(
        words,
        tempfile.mkdtemp(prefix="bench-paths-"),
        n_layers=args.layers,
        n_heads=args.heads,
        d_model=args.d_model,
        n_ctx=max(64, args.seq),
        seed=0,
        device="cpu",
    )
    gen = torch.Generator().manual_seed(1)
    vocab = int(model.cfg.d_vocab)
    clean = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
    corrupted = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
    clean[:, 0] = corrupted[:, 0] = 0

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()

    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
    c = args.component
    with torch.inference_mode():
        tl_s, tl_cpu, expected = best_of(
            lambda: tl.get_act_patch_direct_path_all_sources(
                model, corrupted, clean_cache, corrupted_cache, metric, component=c, verbose=False
            ),
            args.repeats,
        )
    compat_s, compat_cpu, got = best_of(
        lambda: compat.get_act_patch_direct_path_all_sources(
            model, corrupted, clean_cache, corrupted_cache, metric, component=c
        ),
        args.repeats,
    )
    spec = catalog.PATHS[f"PATH_HEAD_TO_HEAD_{c.upper()}"]
    labelled = metrics.logit_diff(ANSWER, WRONG)
    spec_s, spec_cpu, result = best_of(
        lambda: spec.run(model, clean, corrupted, labelled), args.repeats
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    measured = torch.as_tensor(result.fillna(0.0).values, dtype=torch.float32)
    torch.testing.assert_close(measured, expected.cpu(), rtol=1e-4, atol=1e-4)
    pairs = sum((args.layers - 1 - sl) * args.heads * args.heads for sl in range(args.layers))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )
    print(
        f"model: GPT-2 {args.layers}L {args.heads}H d_model {args.d_model} vocab {vocab}; "
        f"batch {args.batch} x {args.seq} tokens; component {c}; {pairs} (source, later head) pairs"
    )
    print("| time | tl_s | compat_s | spec_s | tl/compat | tl/spec | spec forwards |")
    print("|---|---|---|---|---|---|---|")
    for what, (t, c, p) in {
        "wall": (tl_s, compat_s, spec_s),
        "cpu": (tl_cpu, compat_cpu, spec_cpu),
    }.items():
        print(
            f"| {what} | {t:.2f} | {c:.2f} | {p:.2f} | {t / c:.1f} | {t / p:.1f} | "
            f"{result.attrs['forward_passes']} |"
        )


if __name__ == "__main__":
    main()
