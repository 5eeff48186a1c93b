#!/usr/bin/env python
"""TransformerLens's own patching functions vs patchspec's batched engine, same process.

For each model, batch size and case, this times TransformerLens's function (one full forward
pass per cell; the clean cache is computed beforehand and not timed) and patchspec's labelled
call ``spec.run(...)`` / ``Sweep(...).run(...)`` with the built-in ``metrics.logit_diff``
(timed whole: it runs and caches the clean and corrupted inputs itself), checks that both give
the same numbers, and prints one row per case:

* ``cells``: patched cells; ``fwd``: patchspec's forward passes (TransformerLens runs one per cell);
* ``tl_s`` / ``ps_s``: seconds for each, and ``ratio`` = ``tl_s / ps_s``;
* ``eff`` = bound / ``ps_s``, where the bound is the sum over cells of (layers recomputed /
  n_layers) x batch x the per-sequence time of a plain forward pass at the best batch size,
  measured in this run (a plain forward unembeds every position; patchspec only the last, so
  ``eff`` may exceed 1);
* ``tl/bound``: the ratio an engine at the bound would reach (``ratio`` / ``eff``);
* ``compat_s``, ``ratio_c``, ``eff_c``: the same for patchspec's drop-in
  (``patchspec.compat.<same name>``: same arguments and metric callable as TransformerLens, the
  clean cache given, so no unpatched runs of its own; a plain callable metric gets full logits).

Times are the best of 2-3 runs (of one when TransformerLens takes over 5 s), since other
processes may share the cores.

Models are GPT-2s with random, seeded weights built locally: ``small`` (2 layers, 4 heads,
d_model 64, vocab 2k) and ``medium`` (6 layers, 8 heads, d_model 256, vocab 2k).

Run from the repository root::

    python benchmarks/bench_vs_tl.py            # the full table (several minutes on 1 core)
    python benchmarks/bench_vs_tl.py --quick    # a smoke run: small model, a few cases
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 2000
SEQ = 18
ANSWER, WRONG = 5, 7
MODELS = {
    "small": {"n_layer": 2, "n_head": 4, "n_embd": 64},
    "medium": {"n_layer": 6, "n_head": 8, "n_embd": 256},
}


def build_model(kind: str, folder: Path) -> Any:
    """A GPT-2 bridge with random, seeded weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **MODELS[kind],
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    words = ["<bos>", "<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    with contextlib.redirect_stderr(io.StringIO()):
        model = TransformerBridge.boot_transformers(str(folder), device="cpu", tokenizer=tokenizer)
    model.eval()
    return model


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded clean and corrupted tokens ``[batch, SEQ]`` that differ in the middle."""
    gen = torch.Generator().manual_seed(batch)
    clean = torch.randint(3, VOCAB, (batch, SEQ), generator=gen)
    corrupted = clean.clone()
    corrupted[:, SEQ // 3 : SEQ // 2] = torch.randint(
        3, VOCAB, (batch, SEQ // 2 - SEQ // 3), generator=gen
    )
    clean[:, 0] = corrupted[:, 0] = 0
    return clean, corrupted


def tl_metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean logit difference at the last position (TransformerLens-style metric callable)."""
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


def per_sequence_time(model: Any, tokens: torch.Tensor, rows: tuple[int, ...]) -> tuple[float, int]:
    """The best per-sequence time of a plain forward pass over batch sizes ``rows``."""
    best = (float("inf"), 0)
    with torch.inference_mode():
        for n in rows:
            x = tokens[:1].repeat(n, 1)
            model(x)
            reps = max(3, 64 // n)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(reps):
                    model(x)
                times.append((time.perf_counter() - start) / reps / n)
            best = min(best, (min(times), n))
    return best


class ForwardCounter(logging.Handler):
    """Collects the ``stats`` of the batched engine from the runner's debug summaries."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.forwards = 0

    def emit(self, record: logging.LogRecord) -> None:
        stats = getattr(record, "stats", None)
        if stats is not None:
            self.forwards += stats.forwards


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """The best wall time of ``repeats`` calls (other processes may share the cores) and the output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def cases(quick: bool, kind: str) -> list[tuple[str, str, Any]]:
    """(case name, TransformerLens function, patchspec spec or sweep)."""
    from patchspec import catalog

    table = [
        ("resid_pre by pos", "get_act_patch_resid_pre", catalog.RESID_PRE),
        ("head out by pos", "get_act_patch_attn_head_out_by_pos", catalog.HEAD_OUT_BY_POS),
        ("head out all pos", "get_act_patch_attn_head_out_all_pos", catalog.HEAD_OUT),
        (
            "pattern dest x src",
            "get_act_patch_attn_head_pattern_dest_src_pos",
            catalog.HEAD_PATTERN_DEST_SRC,
        ),
        ("block_every", "get_act_patch_block_every", catalog.BLOCK_EVERY),
        ("head_all_pos_every", "get_act_patch_attn_head_all_pos_every", catalog.HEAD_ALL_POS_EVERY),
        ("head_by_pos_every", "get_act_patch_attn_head_by_pos_every", catalog.HEAD_BY_POS_EVERY),
    ]
    if kind != "small":  # the dest x src sweep runs on the smaller model only
        table = [row for row in table if row[0] != "pattern dest x src"]
    if quick:
        table = [
            row
            for row in table
            if row[0] in ("resid_pre by pos", "head out by pos", "head out all pos")
        ]
    return table


def layers_of(spec_or_sweep: Any, model: Any, batch: int) -> list[int]:
    """The first patched layer of every cell."""
    import numpy as np

    from patchspec.plan import Sizes, compile

    sizes = Sizes.of(model, batch, SEQ)
    specs = getattr(spec_or_sweep, "specs", (spec_or_sweep,))
    layers: list[int] = []
    for spec in specs:
        grid = compile(spec, sizes)
        layers += grid.first_layers(np.arange(grid.n_cells)).min(1).tolist()
    return layers


def run_case(
    model: Any, batch: int, name: str, tl_name: str, target: Any, seq_time: float
) -> dict[str, Any]:
    import transformer_lens.patching as tl

    import patchspec.compat as compat
    from patchspec import Sweep, metrics

    clean, corrupted = inputs(batch)
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean)
    tl_fn, compat_fn = getattr(tl, tl_name), getattr(compat, tl_name)
    with contextlib.redirect_stderr(io.StringIO()):  # TransformerLens's own progress bars
        tl_s, expected = timed(lambda: tl_fn(model, corrupted, cache, tl_metric))
        quick = tl_s < 5  # repeat short measurements only
        if quick:
            tl_s = min(tl_s, timed(lambda: tl_fn(model, corrupted, cache, tl_metric))[0])
    metric = metrics.logit_diff(ANSWER, WRONG)

    def labelled() -> Any:
        return target.run(model, clean, corrupted, metric, progress=False)

    if quick:
        labelled()  # warm-up: first-call caches
    counter = ForwardCounter()
    engine_log = logging.getLogger("patchspec.runner")
    engine_log.addHandler(counter)
    engine_log.setLevel(logging.DEBUG)
    try:
        ps_s, result = timed(labelled)
    finally:
        engine_log.removeHandler(counter)
    if quick:
        ps_s = min(ps_s, timed(labelled, repeats=2)[0])
    compat_s, got = timed(
        lambda: compat_fn(model, corrupted, cache, tl_metric, progress=False),
        repeats=2 if quick else 1,
    )
    err = float((got - expected).abs().max())
    if err > 1e-4:
        raise SystemExit(f"{name}: patchspec.compat differs from TransformerLens by {err}")
    if not isinstance(target, Sweep):  # same axis order as TransformerLens's tensor
        err = float(
            (torch.as_tensor(result.values).float().flatten() - expected.flatten()).abs().max()
        )
        if err > 1e-4:
            raise SystemExit(f"{name}: patchspec differs from TransformerLens by {err}")
    n_layers = model.cfg.n_layers
    starts = layers_of(target, model, batch)
    bound = sum((n_layers - layer) / n_layers for layer in starts) * batch * seq_time
    cells = len(starts)
    return {
        "case": name,
        "cells": cells,
        "fwd": counter.forwards,
        "tl_s": tl_s,
        "ps_s": ps_s,
        "ratio": tl_s / ps_s,
        "eff": bound / ps_s,
        "tl/bound": tl_s / bound,
        "compat_s": compat_s,
        "ratio_c": tl_s / compat_s,
        "eff_c": bound / compat_s,
    }


def machine() -> str:
    """CPU model, cores, load average: other processes may share the cores."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = ", load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return f"{cpu}, {os.cpu_count()} cores{load}"


COLUMNS = [
    ("model", 6, "s"),
    ("batch", 5, "d"),
    ("case", 18, "s"),
    ("cells", 6, "d"),
    ("fwd", 5, "d"),
    ("tl_s", 7, ".2f"),
    ("ps_s", 7, ".3f"),
    ("ratio", 6, ".1f"),
    ("eff", 5, ".2f"),
    ("tl/bound", 8, ".1f"),
    ("compat_s", 8, ".3f"),
    ("ratio_c", 7, ".1f"),
    ("eff_c", 5, ".2f"),
]


def table_row(row: dict[str, Any]) -> str:
    cells = []
    for key, width, fmt in COLUMNS:
        text = format(row[key], fmt)
        cells.append(text.ljust(width) if fmt == "s" else text.rjust(width))
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, batch 1, three cases")
    parser.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    parser.add_argument("--batches", nargs="*", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = args.models or (["small"] if args.quick else ["small", "medium"])
    batches = args.batches or ([1] if args.quick else [1, 8])
    from importlib.metadata import version

    print(
        f"# {machine()}; {torch.get_num_threads()} torch thread(s), python "
        f"{platform.python_version()}, torch {torch.__version__}, transformer_lens "
        f"{version('transformer-lens')}, seq {SEQ}"
    )
    header = "| " + " | ".join(k.ljust(w) if f == "s" else k.rjust(w) for k, w, f in COLUMNS) + " |"
    rule = "|" + "|".join("-" * (w + 2) for _k, w, _f in COLUMNS) + "|"
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            model = build_model(kind, Path(tmp) / kind)
            seq_time, best_rows = per_sequence_time(
                model, inputs(1)[1], (1, 8, 16, 32, 64, 128, 256)
            )
            print(
                f"\n{kind}: plain forward {seq_time * 1e3:.3f} ms/sequence at batch {best_rows} (best)\n"
            )
            print(header)
            print(rule)
            for batch in batches:
                for name, tl_name, target in cases(args.quick, kind):
                    row = run_case(model, batch, name, tl_name, target, seq_time)
                    print(table_row({"model": kind, "batch": batch, **row}), flush=True)
    print(f"\n# finished; {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
