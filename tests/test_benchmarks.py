"""benchmarks/bench_engine.py cannot rot: its bound against a brute-force count, and a smoke run."""

from __future__ import annotations

import doctest
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = module
    spec.loader.exec_module(module)
    return module


def brute_force(case_key: str, sizes: Any, batch: int, first_diff: int) -> int:
    """Count (prompt, layer, position) triples a causal-suffix replay recomputes, cell by cell.

    A patch of layer ``L`` at positions ``P`` changes exactly the (layer, position) pairs with
    layer >= L and position >= min(P), where only positions from the first differing token on
    count (before it the clean values written are the corrupted run's own).
    """
    n_layers, n_heads, seq, neurons = sizes.n_layers, sizes.n_heads, sizes.seq, sizes.neurons
    shapes = {
        "resid_pre": (n_layers, seq),
        "head_by_pos": (n_layers, seq, n_heads),
        "head_all_pos": (n_layers, n_heads),
        "pattern": (n_layers, n_heads, seq, seq),
        "neurons": (n_layers, seq, neurons),
    }
    total = 0
    for index in itertools.product(*(range(n) for n in shapes[case_key])):
        layer = index[0]
        patched = {
            "resid_pre": lambda i: {i[1]},
            "head_by_pos": lambda i: {i[1]},
            "head_all_pos": lambda i: set(range(first_diff, seq)),
            "pattern": lambda i: {i[2]},  # the destination row of the pattern
            "neurons": lambda i: {i[1]},
        }[case_key](index)
        patched = {p for p in patched if p >= first_diff}  # before it, clean values are corrupted's
        if not patched:
            continue
        start = min(patched)
        for _prompt, lay, pos in itertools.product(range(batch), range(n_layers), range(seq)):
            total += lay >= layer and pos >= start
    return total


@pytest.mark.parametrize(
    "case_key", ["resid_pre", "head_by_pos", "head_all_pos", "pattern", "neurons"]
)
def test_bound_counts_the_causal_suffix(bench: ModuleType, case_key: str) -> None:
    sizes = bench.Sizes(n_layers=3, n_heads=2, seq=5, neurons=2)
    case = bench.CASES[case_key]
    cells = case.cells(sizes)
    assert len(cells) == np.prod(case.ranges(sizes))
    for batch, first_diff in ((1, 2), (3, 0)):
        got = bench.token_layers(case, cells, sizes, batch, first_diff)
        assert got == brute_force(case_key, sizes, batch, first_diff)


def test_first_difference_and_docstring(bench: ModuleType) -> None:
    clean, corrupted = bench.inputs(2, 9, "cpu")
    assert bench.first_difference(clean, corrupted) == 3
    assert torch.equal(clean[:, :3], corrupted[:, :3])
    assert bool((clean[:, 3:4] != corrupted[:, 3:4]).all())
    assert bench.first_difference(clean, clean) == 9
    failed, tried = doctest.testmod(bench)
    assert tried > 0 and failed == 0


def test_cuda_refused_clearly_without_a_gpu(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    with pytest.raises(SystemExit):
        bench.parse(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_smoke_run(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        rc = bench.main(
            [
                "--quick",
                "--seqs",
                "5",
                "--cases",
                "resid_pre",
                "head_all_pos",
                "--tl-max-cells",
                "8",
                "--no-warmup",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 2, out
    assert "extrapolated from 8 cells" in rows[0] and rows[1].endswith("| all |")
    assert (
        "## Goals" in out
        and "results equal TransformerLens to 1e-05 (all rows, measured cells): met" in out
    )
