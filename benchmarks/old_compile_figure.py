"""Cost of planning and building masks for the attention-pattern dest x src grid, PRE-REFACTOR.

This measures the code as it was at git commit c7e32cfdefa10ac96e374a74651f9bb86d06028c
(before the internals refactor); its printed output is ``old_compile_figure.txt``. It was run
from a pristine ``git archive`` of that commit::

    cd /tmp/pristine && PYTHONPATH=/tmp/pristine python benchmarks/old_compile_figure.py

No model is needed: a GPT-2-small-shaped :class:`patchspec.plan.Sizes` (12 layers, 12 heads,
d_model 768, d_head 64, d_mlp 3072) with batch 1 and 64 tokens. ``HEAD_PATTERN_DEST_SRC`` then
has 12 * 12 * 64 * 64 = 589,824 cells. Planning one layer (49,152 cells) is timed and
extrapolated x12; masks (:func:`patchspec.engine.region_masks`) are timed for chunks of K cells
over a few thousand cells and extrapolated to all cells. CPU seconds (``time.process_time``)
and wall seconds, torch on one thread.
"""

from __future__ import annotations

import time

import torch

import patchspec
from patchspec.catalog import HEAD_PATTERN_DEST_SRC
from patchspec.engine import region_masks
from patchspec.plan import Sizes, plan

LAYERS, HEADS, SEQ = 12, 12, 64
TOTAL = LAYERS * HEADS * SEQ * SEQ
K = 64
MASK_CELLS = 4096


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    torch.set_num_threads(1)
    print(f"patchspec from {patchspec.__file__}; torch {torch.__version__}, 1 thread")
    sizes = Sizes(
        n_layers=LAYERS, n_heads=HEADS, n_kv_heads=HEADS, d_model=768, d_head=64,
        d_mlp=3072, batch=1, seq=SEQ,
    )  # fmt: skip
    spec = HEAD_PATTERN_DEST_SRC.sel(layer=0)
    plan(HEAD_PATTERN_DEST_SRC.sel(layer=0, head=0), sizes)  # warm up
    p, cpu, wall = timed(lambda: plan(spec, sizes))
    n = len(p.cells)
    print(f"plan: one layer, {n} cells: {cpu:.3f} s CPU, {wall:.3f} s wall")
    print(f"  per cell: {cpu / n * 1e6:.2f} us CPU, {wall / n * 1e6:.2f} us wall")
    print(
        f"  extrapolated to {TOTAL} cells (x12): {cpu * TOTAL / n:.2f} s CPU, "
        f"{wall * TOTAL / n:.2f} s wall"
    )
    assert all(len(cell.regions) == 1 for cell in p.cells)
    regions = [cell.regions[0] for cell in p.cells[:MASK_CELLS]]
    region_masks(regions[:K], sizes, "cpu")  # warm up
    chunks = [regions[i : i + K] for i in range(0, len(regions), K)]
    masks, cpu, wall = timed(lambda: [region_masks(chunk, sizes, "cpu") for chunk in chunks])
    m = len(regions)
    print(
        f"region_masks: {m} cells in {len(chunks)} chunks of K={K}: {cpu:.3f} s CPU, {wall:.3f} s wall"
    )
    print(f"  mask shape per chunk: {tuple(masks[0].shape)}")
    print(f"  per cell: {cpu / m * 1e6:.2f} us CPU, {wall / m * 1e6:.2f} us wall")
    print(
        f"  extrapolated to {TOTAL} cells: {cpu * TOTAL / m:.2f} s CPU, "
        f"{wall * TOTAL / m:.2f} s wall"
    )


if __name__ == "__main__":
    main()
