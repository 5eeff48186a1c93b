#!/usr/bin/env python
"""Compiling a large grid and building its masks chunk by chunk: CPU time, no model needed.

The attention-pattern dest x src grid of a GPT-2-small-shaped model (12 layers, 12 heads) at 64
tokens has 12 x 12 x 64 x 64 = 589,824 cells. This script times, in CPU seconds
(``time.process_time``, torch on 1 thread):

1. ``compile(HEAD_PATTERN_DEST_SRC, sizes)`` (uncached: a fresh ``Sizes`` each repeat);
2. the start layer of every cell and its chunks, as the batched engine schedules them
   (``K`` = 32 cells per pass: the CPU default of 2,048 tokens per forward at 64 tokens);
3. the vectorised masks of every chunk (``masks.part_writes``: one scatter per dim), and
   separately the dense form of one chunk's mask (``Mask.dense()``, which the engine builds
   inside the forward pass, where it is as large as the activation itself).

It prints these beside the figure measured on the code before the refactor
(``benchmarks/old_compile_figure.txt``: 45.9 us per cell to plan and 152.7 us per cell for
masks, i.e. about 27 s + 90 s for this grid).

Run from the repository root: ``.venv/bin/python benchmarks/bench_compile.py``.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from patchspec import catalog
from patchspec.execute.masks import part_writes
from patchspec.execute.schedule import chunks_by_start
from patchspec.plan import Sizes, compile

OLD_PLAN_US, OLD_MASK_US = 45.87, 152.74  # per cell, benchmarks/old_compile_figure.txt
CELLS_PER_PASS = 32


def main() -> None:
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    best: dict[str, float] = {}
    for repeat in range(3):
        sizes = Sizes(n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64 + 0 * repeat,
                      d_mlp=3072 + repeat, batch=1, seq=64)  # d_mlp differs: no compile cache hit
        t0 = time.process_time()
        grid = compile(catalog.HEAD_PATTERN_DEST_SRC, sizes)
        t1 = time.process_time()
        cells = np.arange(grid.n_cells, dtype=np.int64)
        starts = grid.first_layers(cells)[:, 0]
        chunks = chunks_by_start(cells, starts, CELLS_PER_PASS)
        t2 = time.process_time()
        memo: dict = {}
        part = grid.parts[0]
        active = 0
        for chunk in chunks:
            for _activation, _layer, _source, mask in part_writes(
                grid, part, chunk.cells, sizes, torch.device("cpu"), memo
            ):
                active += int(mask.active.shape[0])
        t3 = time.process_time()
        dense = part_writes(grid, part, chunks[0].cells, sizes,
                            torch.device("cpu"), memo)[0][3].dense()
        t4 = time.process_time()
        assert active == grid.n_cells and int(dense.sum()) == len(chunks[0])
        for key, value in (("compile", t1 - t0), ("schedule", t2 - t1), ("masks", t3 - t2),
                           ("dense", t4 - t3)):
            best[key] = min(best.get(key, float("inf")), value)
    n = grid.n_cells
    total = best["compile"] + best["schedule"] + best["masks"]
    old = n * (OLD_PLAN_US + OLD_MASK_US) / 1e6
    print(f"grid: {grid.dims}, {n:,} cells, {len(chunks):,} chunks of <= {CELLS_PER_PASS}")
    print(f"compile           {best['compile']:8.4f} s CPU")
    print(f"schedule          {best['schedule']:8.4f} s CPU")
    print(f"masks (factored)  {best['masks']:8.4f} s CPU  ({best['masks'] / n * 1e6:.2f} us/cell)")
    print(f"total             {total:8.4f} s CPU  (target < 1 s)")
    print(f"before refactor   {old:8.1f} s CPU  (plan {OLD_PLAN_US} + masks {OLD_MASK_US} us/cell)")
    print(f"speed-up          {old / total:8.0f}x")
    print(f"one dense mask    {best['dense'] * 1e3:8.3f} ms CPU  (shape {tuple(dense.shape)}, "
          "built inside the forward pass)")


if __name__ == "__main__":
    main()
