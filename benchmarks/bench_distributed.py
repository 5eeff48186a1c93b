"""The Dask executor against the local one: scaling over 1 and 2 workers, overhead per chunk,
and the sweep size from which 2 workers beat one process.

A medium GPT-2 (random weights, seed 0: 6 layers, 8 heads, d_model 256, vocab 2,000) and a
head-by-position sweep (``catalog.HEAD_OUT_BY_POS``: layers x positions x heads cells) over
prompts of growing length, timed three ways in one process:

* ``local``: the local executor, torch on 2 threads (and on 1 thread, as a worker has);
* ``dask1`` / ``dask2``: a ``LocalCluster`` of 1 or 2 worker processes of 1 thread each (Dask's
  nanny gives each worker 1 torch thread). Each cluster's first sweep (worker start, model load)
  is not timed; every timed sweep still pays for the workers rebuilding the run (session,
  unpatched passes) once each.

Every distributed result is checked against the local one (1e-5). The overhead per chunk is
``(dask1 - local1) / chunks`` on a sweep of one cell per chunk (``local1``: the local executor on
1 thread, as a worker has). The break-even size solves ``local(cells) == dask2(cells)`` for lines
fitted to the timed sizes.

    python benchmarks/bench_distributed.py                 # medium model, 4 sizes (long on 2 cores)
    python benchmarks/bench_distributed.py --lengths 8 16  # medium model, 2 sizes
    python benchmarks/bench_distributed.py --quick         # smoke run: a smaller model, two sizes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (tokens) to time")
    args = parser.parse_args()

    import xarray as xr
    from dask.distributed import Client, LocalCluster

    from patchspec import catalog, metrics
    from patchspec.tiny import tiny_model

    words = [f"w{i}" for i in range(2000)]
    sizes = dict(n_layers=2, n_heads=4, d_model=64) if args.quick else dict(n_layers=6, n_heads=8, d_model=256)
    lengths = tuple(args.lengths or ((8, 16) if args.quick else (8, 16, 32, 48)))
    batch = 4
    folder = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    model = tiny_model(words, folder, architecture="gpt2", n_ctx=64, device="cpu", **sizes)
    metric = metrics.logit_diff(5, 7)
    gen = torch.Generator().manual_seed(0)

    def prompts(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean = torch.randint(3, len(words), (batch, length), generator=gen)
        corrupted = torch.randint(3, len(words), (batch, length), generator=gen)
        clean[:, 0] = corrupted[:, 0] = 0
        return clean, corrupted

    spec = catalog.HEAD_OUT_BY_POS
    inputs = {n: prompts(n) for n in lengths}
    rows: dict[str, dict[int, float]] = {"local": {}, "local1": {}, "dask1": {}, "dask2": {}}
    cells: dict[int, int] = {}
    expected = {}
    torch.set_num_threads(2)
    for n, (clean, corrupted) in inputs.items():
        seconds, result = best(lambda c=clean, k=corrupted: spec.run(model, c, k, metric), args.repeat)
        rows["local"][n], expected[n], cells[n] = seconds, result, result.size
    # overhead per chunk: one cell per chunk, local on 1 thread against one 1-thread worker
    small_clean, small_corrupted = inputs[lengths[0]]
    torch.set_num_threads(1)
    for n, (clean, corrupted) in inputs.items():
        rows["local1"][n], _ = best(lambda c=clean, k=corrupted: spec.run(model, c, k, metric), args.repeat)
    local1, one_per_chunk = best(
        lambda: spec.run(model, small_clean, small_corrupted, metric, cells_per_batch=1), args.repeat
    )
    torch.set_num_threads(2)

    overhead = None
    started: dict[str, float] = {}
    for name, workers in (("dask1", 1), ("dask2", 2)):
        start = time.perf_counter()
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None,
        )
        client = Client(cluster)
        client.wait_for_workers(workers)
        spec.run(model, small_clean, small_corrupted, metric, executor=client)  # load the model
        started[name] = time.perf_counter() - start
        try:
            for n, (clean, corrupted) in inputs.items():
                seconds, result = best(
                    lambda c=clean, k=corrupted, cl=client: spec.run(model, c, k, metric, executor=cl),
                    args.repeat,
                )
                xr.testing.assert_allclose(result, expected[n], rtol=1e-5, atol=1e-5)
                rows[name][n] = seconds
            if workers == 1:
                seconds, result = best(
                    lambda cl=client: spec.run(model, small_clean, small_corrupted, metric,
                                               cells_per_batch=1, executor=cl),
                    args.repeat,
                )
                xr.testing.assert_allclose(result, one_per_chunk, rtol=1e-5, atol=1e-5)
                overhead = (seconds - local1) / one_per_chunk.size
        finally:
            client.close()
            cluster.close()

    print(f"model {sizes}, batch {batch}, HEAD_OUT_BY_POS; best of {args.repeat}")
    print(f"cluster start + first sweep (model load): dask1 {started['dask1']:.1f} s, "
          f"dask2 {started['dask2']:.1f} s (not in the times below)")
    print("| tokens | cells | local_s (2 thr) | local_s (1 thr) | dask1_s | dask2_s | local/dask2 |")
    print("|--------|-------|-----------------|-----------------|---------|---------|-------------|")
    for n in lengths:
        print(f"| {n:6d} | {cells[n]:5d} | {rows['local'][n]:15.3f} | {rows['local1'][n]:15.3f} | "
              f"{rows['dask1'][n]:7.3f} | {rows['dask2'][n]:7.3f} | "
              f"{rows['local'][n] / rows['dask2'][n]:11.2f} |")
    if overhead is not None:
        print(f"overhead per chunk: {1000 * overhead:.1f} ms ({one_per_chunk.size} chunks of 1 cell: "
              f"local 1 thread {local1:.3f} s)")
    x = np.array([cells[n] for n in lengths], dtype=float)
    fit_local = np.polyfit(x, [rows["local"][n] for n in lengths], 1)
    fit_dask2 = np.polyfit(x, [rows["dask2"][n] for n in lengths], 1)
    slope = fit_local[0] - fit_dask2[0]
    if slope > 0:
        even = (fit_dask2[1] - fit_local[1]) / slope
        print(f"break-even (local == dask2, linear fits): about {max(even, 0):.0f} cells")
    else:
        print("break-even: none in this range (2 workers never gain per cell here)")


if __name__ == "__main__":
    main()
