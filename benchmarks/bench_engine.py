#!/usr/bin/env python
"""patchspec's engine against TransformerLens 4.3 and against the causal-suffix bound.

For each model, sequence length, batch size and case this times, in one process, on the same
model and inputs, interleaved within each repeat (median [min-max] over ``--repeats``):

* ``tl_s``: ``transformer_lens.patching``'s own function (one full forward pass per cell; the
  clean cache is computed beforehand and not timed). When a case has more than
  ``--tl-max-cells`` cells, TransformerLens runs a seeded random subset of that many cells
  (through the same function with ``index_df=``) and its time is extrapolated per cell to the
  whole grid: such rows say ``extrapolated from N cells`` (every TransformerLens cell is one
  full forward pass, so its cost per cell does not depend on the cell);
* ``ps_s``: patchspec's labelled call ``spec.run(model, clean, corrupted, metrics.logit_diff(5,
  7))``, timed whole (it runs the clean and corrupted inputs itself);
* ``compat_s``: the drop-in ``patchspec.compat.<same function>`` with TransformerLens's own
  arguments and metric callable (clean cache given);
* ``tl/ps`` and ``c/ps``: the ratios of those times;
* ``err``: the largest absolute difference of patchspec's and the drop-in's values from
  TransformerLens's over the cells TransformerLens measured (checked against ``--atol``,
  1e-5 in float32);
* ``ps_MiB`` / ``c_MiB``: peak memory of the call. CUDA: ``torch.cuda.max_memory_allocated``
  during the call minus the memory allocated at its start. CPU: the process's peak resident set
  size (RSS) during the call minus the RSS at its start, sampled every 2 ms by a thread
  (``psutil``); memory the allocator reuses from earlier calls does not show;
* ``eff`` = bound / ``ps_s`` and ``tl/bnd`` = ``tl_s`` / bound (the speed-up an engine running
  exactly at the bound would get), where

  bound = (token-layer positions recomputed) x (per-token-layer cost).

  Token-layer positions recomputed = sum over cells of batch x sum over layers ``l >= L`` of
  ``(seq - p)``, with ``L`` the cell's layer and ``p`` its first patched position: the patched
  position for by-position cells, the destination position for pattern cells, and the first
  position where clean and corrupted tokens differ for all-position cells (a patch at ``p``
  changes no position ``< p``, in any layer); a by-position cell before that first difference
  writes the corrupted run's own values and counts 0. It is computed here from each case's own
  definition, not from patchspec's engine. The per-token-layer cost (column ``us/tl``) is the
  time of one plain unpatched forward pass ``model(tokens)`` at the best of the batch sizes
  ``--forward-batches`` (chosen once per sequence length), divided by (n_layers x tokens); it is
  timed again inside every repeat of the row, interleaved with the contenders, and the median is
  used, so that a change of load on a shared machine moves the bound with the times. It includes
  the unembedding of every position, which patchspec skips for all but the metric's, so ``eff``
  can exceed 1.

Models are GPT-2s with random, seeded weights built locally (:func:`patchspec.tiny.tiny_model`,
vocabulary 2,000): ``medium`` (6 layers, 8 heads, d_model 256), ``gpt2-small`` (the GPT-2-small
shape: 12 layers, 12 heads, d_model 768) and ``tiny`` (2 layers, 4 heads, d_model 64; the smoke
run). Cases: ``resid_pre`` (resid_pre by pos), ``head_by_pos`` (head out (z) by pos),
``head_all_pos`` (head out at all positions), ``pattern`` (pattern dest x src) and ``neurons``
(MLP post by pos, the first ``--neurons`` neurons of each layer; TransformerLens has no
function of its own for it, so it runs ``generic_activation_patch`` with
``layer_pos_head_vector_patch_setter`` on ``post``, and patchspec
``PatchSpec("post", axes=("layer", "pos", "neuron"))``).

At the end the issue's benchmark goals are checked on the medium rows and printed as
``met`` / ``NOT met`` / ``not measured``.

Run from the repository root::

    python benchmarks/bench_engine.py                 # medium, seq 16-128, batch 1 and 8
    python benchmarks/bench_engine.py --seqs 16 32 --cases resid_pre head_by_pos
    python benchmarks/bench_engine.py --models medium gpt2-small --device cuda
    python benchmarks/bench_engine.py --quick         # smoke run, under a minute on one core
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# This checkout's patchspec, also when another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 2000
ANSWER, WRONG = 5, 7
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layers": 2, "n_heads": 4, "d_model": 64},
    "medium": {"n_layers": 6, "n_heads": 8, "d_model": 256},
    "gpt2-small": {"n_layers": 12, "n_heads": 12, "d_model": 768},
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Cases: their cells, and the bound computed from their definition alone


@dataclass(frozen=True)
class Sizes:
    """The sizes a case's cells range over."""

    n_layers: int
    n_heads: int
    seq: int
    neurons: int
    pattern_heads: int | None = None  # heads of the pattern case (None: all)


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        key: Command-line name.
        title: Name in the table.
        tl_function: ``transformer_lens.patching`` function (and ``patchspec.compat``'s twin);
            ``generic_activation_patch`` for the neuron case.
        axes: The cell index axes, in TransformerLens's output order (layer first).
        first_pos: Which index is the cell's first patched position (``None``: all positions,
            so the first position where clean and corrupted differ).
    """

    key: str
    title: str
    tl_function: str
    axes: tuple[str, ...]
    first_pos: str | None

    def ranges(self, sizes: Sizes) -> tuple[int, ...]:
        """The size of every index axis."""
        size = {
            "layer": sizes.n_layers,
            "pos": sizes.seq,
            "dest_pos": sizes.seq,
            "src_pos": sizes.seq,
            "head": sizes.pattern_heads or sizes.n_heads
            if self.key == "pattern"
            else sizes.n_heads,
            "neuron": sizes.neurons,
        }
        return tuple(size[axis] for axis in self.axes)

    def cells(self, sizes: Sizes) -> np.ndarray:
        """Every cell's index tuple, ``[cells, len(axes)]``, in TransformerLens's order."""
        return np.array(
            list(itertools.product(*(range(n) for n in self.ranges(sizes)))), dtype=np.int64
        )

    def restricted(self, sizes: Sizes) -> bool:
        """Whether this case sweeps part of TransformerLens's function's grid."""
        return self.key == "neurons" or (
            self.key == "pattern" and (sizes.pattern_heads or sizes.n_heads) < sizes.n_heads
        )

    def label(self, sizes: Sizes) -> str:
        """The case's name in the table, with its restriction."""
        if self.key == "neurons":
            return f"neurons < {sizes.neurons} (post by pos)"
        if self.restricted(sizes):
            return f"{self.title} (heads < {sizes.pattern_heads})"
        return self.title

    def spec(self, sizes: Sizes) -> Any:
        """The patchspec spec of this case."""
        from patchspec import PatchSpec, catalog

        if self.key == "neurons":
            return PatchSpec("post", axes=("layer", "pos", "neuron")).sel(
                neuron=slice(0, sizes.neurons)
            )
        spec = {
            "resid_pre": catalog.RESID_PRE,
            "head_by_pos": catalog.HEAD_OUT_BY_POS,
            "head_all_pos": catalog.HEAD_OUT,
            "pattern": catalog.HEAD_PATTERN_DEST_SRC,
        }[self.key]
        if self.restricted(sizes):
            spec = spec.sel(head=slice(0, sizes.pattern_heads))
        return spec


CASES: dict[str, Case] = {
    case.key: case
    for case in (
        Case("resid_pre", "resid_pre by pos", "get_act_patch_resid_pre", ("layer", "pos"), "pos"),
        Case(
            "head_by_pos",
            "head out by pos",
            "get_act_patch_attn_head_out_by_pos",
            ("layer", "pos", "head"),
            "pos",
        ),
        Case(
            "head_all_pos",
            "head out all pos",
            "get_act_patch_attn_head_out_all_pos",
            ("layer", "head"),
            None,
        ),
        Case(
            "pattern",
            "pattern dest x src",
            "get_act_patch_attn_head_pattern_dest_src_pos",
            ("layer", "head", "dest_pos", "src_pos"),
            "dest_pos",
        ),
        Case(
            "neurons",
            "neurons (post by pos)",
            "generic_activation_patch",
            ("layer", "pos", "neuron"),
            "pos",
        ),
    )
}


def first_difference(clean: torch.Tensor, corrupted: torch.Tensor) -> int:
    """The first position where any prompt's clean and corrupted tokens differ (seq if none)."""
    differs = (clean != corrupted).any(0).nonzero()
    return int(differs[0]) if len(differs) else int(clean.shape[1])


def token_layers(case: Case, cells: np.ndarray, sizes: Sizes, batch: int, first_diff: int) -> int:
    """Token-layer positions a causal-suffix engine recomputes for ``cells`` (see the module).

    Example:
        >>> sizes = Sizes(n_layers=2, n_heads=1, seq=4, neurons=1)
        >>> case = CASES["resid_pre"]
        >>> token_layers(case, case.cells(sizes), sizes, batch=1, first_diff=1)  # 2*(3+2+1) + 1*(3+2+1)
        18
    """
    layers = cells[:, 0]
    if case.first_pos is None:
        first = np.full(len(cells), first_diff)
    else:
        first = cells[:, case.axes.index(case.first_pos)]
        # Clean values written before the first differing token are the corrupted run's own:
        # such a cell is the baseline and needs no position recomputed.
        first = np.where(first < first_diff, sizes.seq, first)
    return int(batch * ((sizes.n_layers - layers) * (sizes.seq - first)).sum())


# --------------------------------------------------------------------------------------------
# Measuring


def build_model(kind: str, folder: Path, seq: int, device: str, dtype: torch.dtype) -> Any:
    """A GPT-2 bridge with random, seeded weights and a 2,000-word vocabulary."""
    from patchspec.tiny import tiny_model

    words = [f"w{i}" for i in range(VOCAB - 3)]  # + <bos> <pad> <unk>
    with contextlib.redirect_stderr(io.StringIO()):
        model = tiny_model(
            words, folder, n_ctx=max(64, seq), seed=0, device=device, dtype=dtype, **MODELS[kind]
        )
    assert int(model.cfg.d_vocab) == VOCAB
    return model


def inputs(batch: int, seq: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded clean and corrupted tokens ``[batch, seq]`` that differ from ``seq // 3`` on."""
    gen = torch.Generator().manual_seed(1000 * batch + seq)
    clean = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    corrupted = clean.clone()
    lo, hi = seq // 3, max(seq // 2, seq // 3 + 1)
    corrupted[:, lo:hi] = (
        clean[:, lo:hi] + 1 + torch.randint(0, VOCAB - 4, (batch, hi - lo), generator=gen)
    ) % (VOCAB - 3) + 3
    clean[:, 0] = corrupted[:, 0] = 0
    return clean.to(device), corrupted.to(device)


def tl_metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean logit difference at the last position (TransformerLens-style metric callable)."""
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory growth of a block, in MiB (see the module docstring for what is measured)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mib = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            process = psutil.Process()
            self._base = self._peak = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            import psutil

            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._peak, psutil.Process().memory_info().rss)
            self.mib = max(0, peak - self._base) / 2**20


def plain_forward(model: Any, x: torch.Tensor, device: str, reps: int) -> float:
    """The best of 3 mean times of ``reps`` plain forward passes over ``x``, per token-layer."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                model(x)
            sync(device)
            times.append((time.perf_counter() - start) / reps)
    return min(times) / (int(model.cfg.n_layers) * x.numel())


def token_layer_cost(
    model: Any, seq: int, batches: Sequence[int], device: str, max_tokens: int
) -> tuple[float, int]:
    """The best time per token and layer of a plain forward pass over ``batches``, and its batch."""
    best = (float("inf"), 0)
    x0 = inputs(1, seq, device)[1]
    with torch.inference_mode():
        for n in batches:
            if n * seq > max_tokens and n != min(batches):
                continue
            x = x0.repeat(n, 1)
            model(x)
            sync(device)
            once = time.perf_counter()
            model(x)
            sync(device)
            once = time.perf_counter() - once
            reps = max(1, min(20, int(0.3 / max(once, 1e-6))))
            best = min(best, (plain_forward(model, x, device, reps), n))
    return best


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    mib: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        return f"{self.median():.3g} [{min(self.seconds):.3g}-{max(self.seconds):.3g}]"


def timed(fn: Callable[[], Any], device: str, into: Timings) -> Any:
    """Run ``fn`` once, appending its wall time and peak memory to ``into``."""
    sync(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        out = fn()
        sync(device)
        into.seconds.append(time.perf_counter() - start)
    into.mib.append(memory.mib)
    return out


def tl_setter(case: Case) -> dict[str, Any]:
    """TransformerLens's ``patch_setter`` and ``activation_name`` of ``case``'s function."""
    fn = getattr(__import__("transformer_lens.patching", fromlist=["x"]), case.tl_function)
    return {
        "patch_setter": fn.keywords["patch_setter"],
        "activation_name": fn.keywords["activation_name"],
    }


def warm_up(model: Any, args: argparse.Namespace) -> None:
    """One untimed small run of every contender and case (first-call caches, lazy imports)."""
    cfg = model.cfg
    sizes = Sizes(int(cfg.n_layers), int(cfg.n_heads), 4, min(args.neurons, 2), 1)
    quiet = argparse.Namespace(**{**vars(args), "warmup": True, "repeats": 1, "tl_max_cells": 4})
    for key in args.cases:
        run_row(model, CASES[key], sizes, 1, quiet, 1)


def run_row(
    model: Any,
    case: Case,
    sizes: Sizes,
    batch: int,
    args: argparse.Namespace,
    forward_batch: int,
) -> dict[str, Any]:
    """Time one (model, seq, batch, case) row; the plain forward runs at ``forward_batch``."""
    import pandas as pd
    import transformer_lens.patching as tl

    import patchspec.compat as compat
    from patchspec import metrics

    device = args.device
    clean, corrupted = inputs(batch, sizes.seq, device)
    cells = case.cells(sizes)
    n_cells = len(cells)
    subset = np.arange(n_cells)
    if n_cells > args.tl_max_cells:
        subset = np.sort(
            np.random.default_rng(args.seed).choice(n_cells, args.tl_max_cells, replace=False)
        )
    whole = len(subset) == n_cells
    restricted = case.restricted(sizes)
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean)
    spec = case.spec(sizes)
    metric = metrics.logit_diff(ANSWER, WRONG)
    generic: dict[str, Any] = {
        "patch_setter": tl.layer_pos_head_vector_patch_setter,
        "activation_name": "post",
    }
    tl_df = pd.DataFrame(cells[subset], columns=list(case.axes))

    def run_tl() -> torch.Tensor:
        with (
            contextlib.redirect_stderr(io.StringIO()),
            torch.inference_mode(),
        ):  # TL's progress bars
            if case.key == "neurons":
                out = tl.generic_activation_patch(
                    model, corrupted, cache, tl_metric, index_df=tl_df, **generic
                )
            elif whole and not restricted:
                out = getattr(tl, case.tl_function)(model, corrupted, cache, tl_metric).flatten()
            else:
                out = getattr(tl, case.tl_function)(
                    model, corrupted, cache, tl_metric, index_axis_names=None, index_df=tl_df
                )
        return torch.as_tensor(out).float().flatten().cpu()

    def run_ps() -> Any:
        return spec.run(model, clean, corrupted, metric, progress=False)

    def run_compat() -> torch.Tensor:
        if case.key == "neurons":
            out = compat.generic_activation_patch(
                model,
                corrupted,
                cache,
                tl_metric,
                index_df=pd.DataFrame(cells, columns=list(case.axes)),
                progress=False,
                **generic,
            )
        elif restricted:
            out = getattr(compat, case.tl_function)(
                model,
                corrupted,
                cache,
                tl_metric,
                index_axis_names=None,
                index_df=pd.DataFrame(cells, columns=list(case.axes)),
                progress=False,
            )
        else:
            out = getattr(compat, case.tl_function)(
                model, corrupted, cache, tl_metric, progress=False
            )
        return torch.as_tensor(out).float().flatten().cpu()

    if args.warmup:  # untimed: first-call caches
        with contextlib.redirect_stderr(io.StringIO()), torch.inference_mode():
            tl.generic_activation_patch(
                model,
                corrupted,
                cache,
                tl_metric,
                index_df=tl_df[:2],
                **(generic if case.key == "neurons" else tl_setter(case)),
            )
        run_ps()
        run_compat()
    tl_t, ps_t, c_t = Timings(), Timings(), Timings()
    plain_x = inputs(1, sizes.seq, device)[1].repeat(forward_batch, 1)
    with torch.inference_mode():
        sync(device)
        once = time.perf_counter()
        model(plain_x)
        sync(device)
        reps = max(1, min(20, int(0.1 / max(time.perf_counter() - once, 1e-6))))
    costs = []
    expected = got_ps = got_c = None
    for _ in range(args.repeats):  # interleaved
        costs.append(plain_forward(model, plain_x, device, reps))
        expected = timed(run_tl, device, tl_t)
        got_ps = timed(run_ps, device, ps_t)
        got_c = timed(run_compat, device, c_t)
    assert expected is not None and got_ps is not None and got_c is not None
    ps_values = (
        torch.as_tensor(np.asarray(got_ps.values, dtype=np.float64)).float().flatten()[subset]
    )
    err = max(
        float((ps_values - expected).abs().max()), float((got_c[subset] - expected).abs().max())
    )
    scale = n_cells / len(subset)
    tl_t.seconds = [s * scale for s in tl_t.seconds]
    cost = statistics.median(costs)
    bound = token_layers(case, cells, sizes, batch, first_difference(clean, corrupted)) * cost
    tl_s, ps_s, c_s = tl_t.median(), ps_t.median(), c_t.median()
    return {
        "case": case.label(sizes),
        "key": case.key,
        "cells": n_cells,
        "tl_from": "all" if whole else f"extrapolated from {len(subset)} cells",
        "tl_s": tl_s,
        "tl": tl_t.spread(),
        "ps_s": ps_s,
        "ps": ps_t.spread(),
        "c_s": c_s,
        "compat": c_t.spread(),
        "tl/ps": tl_s / ps_s,
        "c/ps": c_s / ps_s,
        "us/tl": cost * 1e6,
        "eff": bound / ps_s,
        "tl/bnd": tl_s / bound,
        "err": err,
        "ok": err <= args.atol,
        "ps_MiB": max(ps_t.mib),
        "c_MiB": max(c_t.mib),
    }


# --------------------------------------------------------------------------------------------
# Output


COLUMNS: list[tuple[str, str]] = [
    ("model", "s"),
    ("seq", "d"),
    ("batch", "d"),
    ("case", "s"),
    ("cells", "d"),
    ("tl", "s"),
    ("ps", "s"),
    ("compat", "s"),
    ("tl/ps", ".1f"),
    ("c/ps", ".2f"),
    ("us/tl", ".1f"),
    ("eff", ".2f"),
    ("tl/bnd", ".1f"),
    ("err", ".1e"),
    ("ps_MiB", ".1f"),
    ("c_MiB", ".1f"),
    ("tl_from", "s"),
]


def table_row(row: dict[str, Any]) -> str:
    return "| " + " | ".join(format(row[key], fmt) for key, fmt in COLUMNS) + " |"


def machine(device: str) -> str:
    """CPU model, cores and load average (other processes may share the cores), or the GPU's name."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = ", load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = f"{cpu}, {os.cpu_count()} cores{load}"
    if device.startswith("cuda"):
        text += f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    return text


GOAL_CASES = ("resid_pre", "head_by_pos", "pattern")


def goals(rows: list[dict[str, Any]], atol: float) -> list[str]:
    """The issue's benchmark goals, checked on the medium rows: one line each."""
    medium = [r for r in rows if r["model"] == "medium"]

    def find(seq: int, batch: int, key: str) -> dict[str, Any] | None:
        return next(
            (r for r in medium if (r["seq"], r["batch"], r["key"]) == (seq, batch, key)), None
        )

    def verdict(checks: Sequence[tuple[str, float | None, float, str]]) -> str:
        """``checks``: (label, value or None when not measured, threshold, ">=" or "<=")."""
        measured = [c for c in checks if c[1] is not None]
        if not measured:
            return "not measured"
        parts = []
        good = True
        for label, value, threshold, how in measured:
            assert value is not None
            ok = value >= threshold if how == ">=" else value <= threshold
            good &= ok
            shown = f"{value:.1e}" if how == "<=" and threshold < 1e-2 else f"{value:.2f}"
            parts.append(f"{label} {shown}{'' if ok else ' (!)'}")
        missing = [c[0] for c in checks if c[1] is None]
        text = ("met" if good else "NOT met") + ": " + ", ".join(parts)
        if missing:
            text += f"; not measured: {', '.join(missing)}"
        return text

    def ratio(seq: int, batch: int, key: str) -> float | None:
        row = find(seq, batch, key)
        return None if row is None else float(row["tl/ps"])

    lines = []
    lines.append(
        "medium seq 32 batch 8, >= 8x TL on resid_pre and head out by pos, >= 10x on pattern: "
        + verdict(
            [
                ("resid_pre", ratio(32, 8, "resid_pre"), 8, ">="),
                ("head_by_pos", ratio(32, 8, "head_by_pos"), 8, ">="),
                ("pattern", ratio(32, 8, "pattern"), 10, ">="),
            ]
        )
    )
    lines.append(
        "medium seq 32 batch 1, >= 15x TL (resid_pre, head out by pos, pattern): "
        + verdict([(key, ratio(32, 1, key), 15, ">=") for key in GOAL_CASES])
    )
    falls = []
    for key in CASES:
        for batch in (1, 8):
            lo, hi = ratio(16, batch, key), ratio(128, batch, key)
            if lo is not None and hi is not None:
                falls.append((f"{key}/b{batch} seq128/seq16", hi / lo, 1.0, ">="))
    lines.append(
        "ratio at seq 128 >= ratio at seq 16 (medium): "
        + (verdict(falls) if falls else "not measured")
    )
    lines.append(
        "efficiency >= 0.7 of the bound (medium rows): "
        + verdict(
            [(f"{r['key']}/s{r['seq']}/b{r['batch']}", float(r["eff"]), 0.7, ">=") for r in medium]
        )
    )
    lines.append(
        "compat within 1.2x of spec.run (all rows): "
        + verdict(
            [
                (f"{r['model']}/{r['key']}/s{r['seq']}/b{r['batch']}", float(r["c/ps"]), 1.2, "<=")
                for r in rows
            ]
        )
    )
    lines.append(
        f"results equal TransformerLens to {atol:g} (all rows, measured cells): "
        + verdict(
            [
                (f"{r['model']}/{r['key']}/s{r['seq']}/b{r['batch']}", float(r["err"]), atol, "<=")
                for r in rows
            ]
        )
    )
    return lines


# --------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, seq 8, batch 1, few cells"
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=None, help="default: medium"
    )
    parser.add_argument("--seqs", nargs="+", type=int, default=None, help="default: 16 32 64 128")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8")
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=None, help="default: all"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per row (default 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--tl-max-cells",
        type=int,
        default=None,
        help="TransformerLens runs a random subset of this many cells when a case has more "
        "and is extrapolated per cell (default 256)",
    )
    parser.add_argument(
        "--neurons",
        type=int,
        default=None,
        help="neurons per layer in the neuron case (default 16)",
    )
    parser.add_argument(
        "--pattern-heads",
        type=int,
        default=None,
        help="sweep only heads < this in the pattern case (default: all heads)",
    )
    parser.add_argument(
        "--forward-batches",
        nargs="+",
        type=int,
        default=[1, 8, 32, 128],
        help="batch sizes tried for the per-token-layer cost (default 1 8 32 128)",
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="tolerance against TL (1e-5 float32, 1e-2 else)"
    )
    parser.add_argument(
        "--max-cells",
        type=int,
        default=10**9,
        help="skip (and say so) rows of cases with more cells than this",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="start no new row after this many seconds (the rows left are listed as skipped)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of TransformerLens's cell subset")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed first call of each contender per row (one small untimed run "
        "of every case per model is always made first)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["tiny"] if quick else ["medium"])
    args.seqs = args.seqs or ([8] if quick else [16, 32, 64, 128])
    args.batches = args.batches or ([1] if quick else [1, 8])
    args.cases = args.cases or list(CASES)
    args.repeats = args.repeats or (1 if quick else 3)
    args.tl_max_cells = args.tl_max_cells or (24 if quick else 256)
    args.neurons = args.neurons or (4 if quick else 16)
    if quick:
        args.forward_batches = [1, 8]
    if args.atol is None:
        args.atol = 1e-5 if args.dtype == "float32" else 1e-2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA device is available here (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); run with --device cpu or on a CUDA machine"
        )
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: give cpu or cuda[:N]")
    if min(args.seqs) < 3:
        parser.error(
            "--seqs: every length must be at least 3 (clean and corrupted differ from seq // 3 on)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    from importlib.metadata import version

    print(
        f"# {machine(args.device)}; {torch.get_num_threads()} torch thread(s), python "
        f"{platform.python_version()}, torch {torch.__version__}, transformer_lens "
        f"{version('transformer-lens')}, device {args.device}, {args.dtype}, repeats {args.repeats}"
    )
    print(
        "# times: median [min-max] seconds; TL cells beyond --tl-max-cells extrapolated per cell; "
        "memory: "
        + (
            "CUDA max_memory_allocated growth"
            if args.device.startswith("cuda")
            else "peak RSS growth (psutil, 2 ms)"
        )
    )
    header = "| " + " | ".join(key for key, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    max_tokens = 16384 if args.device.startswith("cuda") else 4096
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            model = build_model(kind, Path(tmp) / kind, max(args.seqs), args.device, dtype)
            cfg = model.cfg
            print(
                f"\n## {kind}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}, vocab {cfg.d_vocab}"
            )
            warm_up(model, args)
            for seq in args.seqs:
                cost, best = token_layer_cost(
                    model, seq, args.forward_batches, args.device, max_tokens
                )
                print(
                    f"\nseq {seq}: plain forward {cost * 1e6:.3f} us per token-layer at batch {best} "
                    f"(best of batches {args.forward_batches}; timed again at that batch in every "
                    "repeat of every row: column us/tl)\n"
                )
                print(header)
                print(rule)
                sizes = Sizes(
                    int(cfg.n_layers), int(cfg.n_heads), seq, args.neurons, args.pattern_heads
                )
                for batch in args.batches:
                    for key in args.cases:
                        n_cells = len(CASES[key].cells(sizes))
                        if n_cells > args.max_cells:
                            print(
                                f"| {kind} | {seq} | {batch} | {CASES[key].label(sizes)} | {n_cells} | skipped: over --max-cells {args.max_cells} |"
                            )
                            continue
                        if time.perf_counter() - started > args.budget_s:
                            print(
                                f"| {kind} | {seq} | {batch} | {CASES[key].label(sizes)} | {n_cells} | skipped: --budget-s {args.budget_s:g} spent |"
                            )
                            continue
                        row = run_row(model, CASES[key], sizes, batch, args, best)
                        row.update(model=kind, seq=seq, batch=batch)
                        rows.append(row)
                        print(table_row(row), flush=True)
            del model
    print("\n## Goals (issue 13)\n")
    for line in goals(rows, args.atol):
        print(f"- {line}")
    print(f"\n# finished; {machine(args.device)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
