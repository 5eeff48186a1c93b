"""The lean replay (causal suffix replay, lean blocks, liveness) against the model and the
reference engine: every hook point it models, every prefix length, both architectures."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchspec import PatchSpec, catalog, metrics, runner
from patchspec.execute.batched import BatchedEstimator
from patchspec.layouts import Layout, register_layout
from patchspec.model import lean as lean_module
from patchspec.model.adapter import ModelAdapter
from patchspec.options import RunOptions
from patchspec.plan import Sizes, compile
from patchspec.sources import Corrupted
from tests.execute.test_batched import execute, task_of
from tests.models import prompts
from tests.properties.test_engine_properties import METRICS, specs

SEQ = 6
TOL = {"rtol": 1e-5, "atol": 1e-5}


def shared(n: int, prefix: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted prompts whose first ``prefix`` tokens are the same."""
    clean, corrupted = prompts(n=n, length=SEQ, seed=seed)
    corrupted[:, :prefix] = clean[:, :prefix]
    return clean, corrupted


def start(model: Any, clean: Any, corrupted: Any, metric: Any) -> Any:
    """A prepared run on these prompts (no forward pass yet)."""
    return runner.prepare(model, clean, corrupted, metric, options=RunOptions(progress=False))


def test_lean_models_every_hook_point(model):
    """Built for both fixtures, every modelled hook point matches the model's own activation
    (the build compares each with run_with_cache), and a suffix replay equals the full pass."""
    clean, _ = prompts(n=2, length=SEQ)
    adapter = ModelAdapter.of(model)
    logits, _, replay = adapter.run_recording(clean, ())
    lean = adapter.lean(replay, clean, logits)
    assert lean is not None
    every = {f"blocks.{i}.{leaf}" for i in range(model.cfg.n_layers) for leaf in lean_module.LOCATIONS}
    assert lean.supported == every == lean_module.hook_points(model.cfg.n_layers)
    for layer in range(model.cfg.n_layers):
        for first in range(SEQ + 1):
            got = lean.run(layer, 3, [SEQ - 1, 1], (), first)
            torch.testing.assert_close(got, logits[:, [SEQ - 1, 1]].repeat(3, 1, 1), **TOL)


def test_a_hook_point_that_differs_is_dropped(gpt2):
    """A hook point whose lean activation differs from the model's is no longer supported, and
    a patch there replays through the model's own blocks (still exact)."""
    clean, _ = prompts(n=2, length=SEQ)
    adapter = ModelAdapter.of(gpt2)
    logits, cache, replay = adapter.run_recording(clean, ["blocks.1.attn.hook_z"])
    cache = {"blocks.1.attn.hook_z": cache["blocks.1.attn.hook_z"] + 1.0}
    lean = lean_module.build(gpt2, replay, logits, cache)
    assert lean is not None and "blocks.1.attn.hook_z" not in lean.supported
    assert "blocks.0.attn.hook_z" not in lean.supported  # not in the cache: not checked, dropped
    assert not lean.supports(["blocks.1.attn.hook_z"])


@st.composite
def suffix_cases(draw: st.DrawFn) -> dict[str, Any]:
    batch = draw(st.integers(1, 3))
    sizes = Sizes(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=8, d_mlp=64, batch=batch, seq=SEQ)
    spec = draw(specs(sizes))
    if draw(st.booleans()):
        spec = spec & draw(specs(sizes, per_axis=2).filter(lambda s: s.source.receiver == spec.source.receiver))
    return {
        "batch": batch,
        "prefix": draw(st.integers(0, SEQ - 1)),
        "spec": spec,
        "metric": draw(st.sampled_from(sorted(METRICS))),
        "cells_per_batch": draw(st.sampled_from([None, 1, 3, 50])),
        "seed": draw(st.integers(0, 3)),
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=suffix_cases())
def test_suffix_replay_equals_reference(model, case):
    """Prompts sharing a prefix of every length, random specs (joint too), sources, directions,
    metrics and chunk sizes: the lean suffix replay equals the reference engine."""
    clean, corrupted = shared(case["batch"], case["prefix"], case["seed"])
    spec, metric = case["spec"], METRICS[case["metric"]]
    want = spec.run(model, clean, corrupted, metric, engine="reference", progress=False)
    got = spec.run(model, clean, corrupted, metric, progress=False, cells_per_batch=case["cells_per_batch"])
    np.testing.assert_allclose(got.values, want.values, **TOL)


def test_suffix_replay_recomputes_less(gpt2):
    """Replayed lean, a by-position sweep recomputes only positions from each cell's own on,
    cells before the first changed token run no forward pass, and the values equal the
    full-position replay's."""
    clean, corrupted = shared(2, 3)
    for spec in (catalog.RESID_PRE, catalog.HEAD_OUT_BY_POS, catalog.HEAD_PATTERN_DEST_SRC):
        run = start(gpt2, clean, corrupted, metrics.logit_diff(5, 7))
        task = task_of(run, compile(spec, run.sizes))
        full, full_stats = execute(task, BatchedEstimator(lean=False))
        got, stats = execute(task, BatchedEstimator())
        torch.testing.assert_close(got, full, **TOL)
        assert stats.lean > 0 and full_stats.lean == 0
        n_layers, seq, batch = run.sizes.n_layers, run.sizes.seq, run.sizes.batch
        assert 0 < stats.positions < stats.cells * batch * seq * n_layers


def test_cells_before_the_first_difference_are_the_baseline(gpt2):
    """Patching clean values into positions where clean and corrupted agree changes nothing:
    those cells are exactly the corrupted baseline and run no forward pass."""
    clean, corrupted = shared(2, 4)
    metric = metrics.logit_diff(5, 7)
    spec = catalog.RESID_PRE.sel(layer=0)
    result = spec.run(gpt2, clean, corrupted, metric, progress=False)
    reference = spec.run(gpt2, clean, corrupted, metric, engine="reference", progress=False)
    np.testing.assert_allclose(result.values, reference.values, **TOL)
    before = result.isel(pos=slice(0, 4)).values
    np.testing.assert_allclose(before, result.attrs["corrupted_baseline"], rtol=0, atol=1e-6)
    run = start(gpt2, clean, corrupted, metric)
    _, stats = execute(task_of(run, compile(spec, run.sizes)), BatchedEstimator())
    batch, layers = run.sizes.batch, run.sizes.n_layers
    # Only positions 4 and 5 are recomputed (at most both from position 4, one copy each).
    assert stats.positions <= 2 * batch * (SEQ - 4) * layers
    assert stats.forwards <= 2


def test_noising_and_ragged_prompts(model):
    """Noising (the clean run receives corrupted values) and ragged text prompts with named
    positions replay lean exactly."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    clean = {"input_ids": torch.tensor([[0, 5, 6, 7, 8, 9], [0, 5, 6, 9, 1, 1]]), "attention_mask": mask}
    corrupted = {"input_ids": torch.tensor([[0, 5, 11, 7, 8, 9], [0, 5, 6, 12, 1, 1]]), "attention_mask": mask}
    named = {"positions": {"END": [5, 3]}}
    for spec in (catalog.RESID_PRE.using(Corrupted()), catalog.HEAD_OUT_BY_POS.sel(pos="END")):
        metric = metrics.logit_diff(4, 7)
        want = spec.run(model, clean, corrupted, metric, engine="reference", progress=False, **named)
        got = spec.run(model, clean, corrupted, metric, progress=False, **named)
        np.testing.assert_allclose(got.values, want.values, **TOL)


def test_falls_back_where_it_cannot_model(gpt2, caplog):
    """A hook point it does not model (an alias of the block input) and hooks the user left on
    the model replay through the model's own blocks, exactly, saying why at info level."""
    clean, corrupted = shared(2, 2)
    metric = metrics.logit_diff(5, 7)
    row = register_layout(Layout("block_in", ("batch", "pos", "d_model"), "alias", hook="blocks.{layer}.hook_in"))
    try:
        spec = PatchSpec("block_in", axes=("layer", "pos"))
        want = catalog.RESID_PRE.run(gpt2, clean, corrupted, metric, progress=False)
        with caplog.at_level(logging.INFO, logger="patchspec"):
            got = spec.run(gpt2, clean, corrupted, metric, progress=False)
        np.testing.assert_allclose(got.values, want.values, **TOL)
        assert "does not model" in caplog.text
    finally:
        from patchspec.layouts import LAYOUTS

        del LAYOUTS[row.name]
    seen: list[int] = []
    handle = gpt2.blocks[1].hook_resid_post.register_forward_hook(lambda *a: seen.append(1))
    try:
        with caplog.at_level(logging.INFO, logger="patchspec"):
            got = catalog.RESID_PRE.run(gpt2, clean, corrupted, metric, progress=False)
        assert "hooks of its own" in caplog.text and seen
        np.testing.assert_allclose(got.values, want.values, **TOL)
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, tmp_path):
    """In float16 and bfloat16 the lean replay is checked and used, and agrees with the
    reference engine to the dtype's precision."""
    from patchspec.tiny import tiny_model
    from tests.models import VOCAB

    model = tiny_model(VOCAB, tmp_path, architecture="qwen2", dtype=dtype, device="cpu")
    clean, corrupted = shared(2, 2)
    run = start(model, clean, corrupted, metrics.logit_diff(5, 7))
    task = task_of(run, compile(catalog.HEAD_OUT_BY_POS, run.sizes))
    got, stats = execute(task, BatchedEstimator())
    want, _ = execute(task, BatchedEstimator(lean=False))
    assert stats.lean > 0
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_out_of_memory_splits_lean_chunks(gpt2, monkeypatch):
    """A lean chunk that runs out of memory is split (keeping its start layer and first
    position) and retried; no cell is lost or changed."""
    from patchspec.execute.local import LocalExecutor
    from patchspec.model.lean import LeanReplay

    clean, corrupted = shared(2, 1)
    run = start(gpt2, clean, corrupted, metrics.logit_diff(5, 7))
    task = task_of(run, compile(catalog.HEAD_OUT_BY_POS, run.sizes))
    want, _ = execute(task, BatchedEstimator(cells_per_batch=4))
    real_run = LeanReplay.run
    raised: list[int] = []

    def tight(self: Any, layer: int, copies: int, *args: Any) -> torch.Tensor:
        if copies > 2:
            raised.append(copies)
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_run(self, layer, copies, *args)

    monkeypatch.setattr(LeanReplay, "run", tight)
    executor = LocalExecutor()
    got, stats = execute(task, BatchedEstimator(cells_per_batch=48), executor)
    assert raised and executor.splits >= 1 and stats.largest <= 2 and stats.lean > 0
    torch.testing.assert_close(got, want, **TOL)
