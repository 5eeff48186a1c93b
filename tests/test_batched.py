"""The batched engine: replay from the patched layer, chunking, memory budget, metrics, guards."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import torch

import patchspec.batched as batched
from patchspec import (
    HookError,
    JointSpec,
    MetricError,
    PatchSpec,
    PatchSpecError,
    Sweep,
    catalog,
    metrics,
)
from patchspec.engine import ENGINES, run_reference
from patchspec.layouts import LAYOUTS, Layout
from patchspec.metrics import Evaluator, MetricContext
from patchspec.plan import Cell, Region, Sizes, explicit_plan, plan
from patchspec.runs import Runs
from patchspec.sources import Clean, Corrupted, Source
from tests.conftest import logit_diff_metric, per_example_metric
from tests.models import prompts


def setup(
    model: Any, spec: Any, metric: Any = logit_diff_metric, tokens: Any = None
) -> tuple[Any, ...]:
    """A plan, its runs and an evaluator, as a sweep would build them."""
    clean, corrupted = prompts() if tokens is None else tokens
    runs = Runs(model, clean, corrupted)
    p = plan(spec, Sizes.of(model, runs.batch, runs.seq))
    runs.hook_names.update(p.hook_names)
    context = MetricContext(
        model, runs.logits("clean"), runs.logits("corrupted"), runs.tokens(p.receiver)
    )
    ms, stacked = metrics.as_metrics(metric)
    return p, runs, Evaluator(ms, context, stacked=stacked)


def test_registered_as_default():
    """``import patchspec`` registers the batched engine, the default of every entry point."""
    from patchspec.sweep import _engine_name

    assert ENGINES["batched"] is batched.run_batched
    assert _engine_name(None) == "batched"


@pytest.mark.parametrize("copies", [1, 3])
def test_replay_equals_the_models_forward(model, copies):
    """Blocks L..end replayed from recorded inputs give the model's own logits, any L, any copies."""
    _clean, corrupted = prompts(n=2, length=7)
    with torch.inference_mode():
        replay, logits = batched.Replay.capture(model, corrupted)
        assert replay is not None
        torch.testing.assert_close(logits, model(corrupted))
        want = logits.repeat(copies, 1, 1)
        for layer in range(model.cfg.n_layers):
            torch.testing.assert_close(replay.run(layer, copies), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                replay.run(layer, copies, [2, 6]), want[:, [2, 6]], rtol=1e-5, atol=1e-5
            )
        assert replay.matches(logits, 0)


def test_replay_skips_earlier_blocks(gpt2):
    """Starting at block 1 never runs block 0: its hooks do not fire, block 1's do, once each."""
    _clean, corrupted = prompts()
    fired: dict[str, int] = {}

    def count(name: str) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> None:
            fired[name] = fired.get(name, 0) + 1

        return hook

    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.1.hook_resid_pre"]
    with torch.inference_mode():
        replay, _ = batched.Replay.capture(gpt2, corrupted)
        with gpt2.hooks(fwd_hooks=[(name, count(name)) for name in names]):
            replay.run(1, 4)
    assert fired == {"blocks.1.attn.hook_z": 1, "blocks.1.hook_resid_pre": 1}


@pytest.mark.parametrize(
    "spec",
    [catalog.HEAD_OUT_BY_POS, catalog.RESID_MID, catalog.HEAD_V, catalog.HEAD_PATTERN_BY_DEST],
    ids=lambda s: s.label,
)
def test_equals_reference(model, spec):
    """Batched == reference on both models, for plain and built-in metrics."""
    for metric in (logit_diff_metric, metrics.logit_diff(5, 7, reduce="none")):
        p, runs, evaluate = setup(model, spec, metric)
        want = run_reference(model, p, runs, evaluate)
        got = batched.run_batched(model, p, runs, evaluate, cells_per_batch=5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_k(gpt2):
    """cells_per_batch and max_memory change K, never the values."""
    p, runs, evaluate = setup(gpt2, catalog.HEAD_OUT_BY_POS, metrics.logit_diff(5, 7))
    want = batched.run_batched(gpt2, p, runs, evaluate, cells_per_batch=1)
    for options in (
        {"cells_per_batch": 2},
        {"cells_per_batch": 7},
        {"cells_per_batch": 1000},
        {"max_memory": "1MB"},
        {},
    ):
        got = batched.run_batched(gpt2, p, runs, evaluate, **options)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_memory_budget_changes_k(gpt2):
    """A bigger budget gives more cells per pass; cells_per_batch is capped by it."""
    sizes = Sizes.of(gpt2, 2, 6)
    cpu = torch.device("cpu")
    small = batched.choose_cells_per_batch(
        gpt2, sizes, n_positions=6, device=cpu, max_memory="256KB"
    )
    large = batched.choose_cells_per_batch(
        gpt2, sizes, n_positions=6, device=cpu, max_memory="64MB"
    )
    assert 1 <= small < large
    assert (
        batched.choose_cells_per_batch(gpt2, sizes, n_positions=6, device=cpu, cells_per_batch=3)
        == 3
    )
    capped = batched.choose_cells_per_batch(
        gpt2, sizes, n_positions=6, device=cpu, cells_per_batch=10**6, max_memory="256KB"
    )
    assert capped == small
    assert batched.choose_cells_per_batch(gpt2, sizes, n_positions=6, device=cpu, max_memory=1) == 1


def test_budget_is_used_by_the_engine(gpt2, caplog):
    """The engine's forwards follow the budget (debug summary), with identical values."""
    p, runs, evaluate = setup(gpt2, catalog.HEAD_OUT_BY_POS, metrics.logit_diff(5, 7))
    results = {}
    with caplog.at_level(logging.DEBUG, logger="patchspec.batched"):
        for budget in ("300KB", "100MB"):
            caplog.clear()
            results[budget] = batched.run_batched(gpt2, p, runs, evaluate, max_memory=budget)
            (record,) = [r for r in caplog.records if hasattr(r, "stats")]
            results[budget + "_forwards"] = record.stats.forwards
    assert results["300KB_forwards"] > results["100MB_forwards"] == 2
    torch.testing.assert_close(results["300KB"], results["100MB"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kib", 1536), (4096, 4096), ("3e3", 3000)],
)
def test_parse_memory(value, expected):
    """Memory sizes in bytes or with decimal/binary units."""
    assert batched.parse_memory(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1GB", "2 GX", 0, True, None])
def test_parse_memory_rejects(value):
    """A size that is not positive or has an unknown unit is a clear error."""
    with pytest.raises(
        PatchSpecError, match=r"max_memory=.* is not a memory size; give a positive number"
    ):
        batched.parse_memory(value)


def test_bad_cells_per_batch(gpt2):
    """cells_per_batch must be a positive int."""
    p, runs, evaluate = setup(gpt2, catalog.RESID_PRE)
    with pytest.raises(PatchSpecError, match=r"cells_per_batch must be a positive int, got 0"):
        batched.run_batched(gpt2, p, runs, evaluate, cells_per_batch=0)


def test_out_of_memory_splits_and_retries(gpt2, monkeypatch, caplog):
    """A chunk that runs out of memory is split and retried; no cell is lost or changed."""
    p, runs, evaluate = setup(gpt2, catalog.HEAD_OUT_BY_POS, metrics.logit_diff(5, 7))
    want = batched.run_batched(gpt2, p, runs, evaluate, cells_per_batch=4)
    real_run = batched.Replay.run

    def tight(self: Any, layer: int, copies: int, positions: Any = None) -> torch.Tensor:
        if copies > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, layer, copies, positions)

    monkeypatch.setattr(batched.Replay, "run", tight)
    with caplog.at_level(logging.DEBUG, logger="patchspec.batched"):
        got = batched.run_batched(gpt2, p, runs, evaluate, cells_per_batch=48)
    (record,) = [r for r in caplog.records if hasattr(r, "stats")]
    assert record.stats.splits > 0 and record.stats.largest <= 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_other_errors_are_not_retried(gpt2, monkeypatch):
    """Only out-of-memory errors split a chunk; anything else propagates."""
    p, runs, evaluate = setup(gpt2, catalog.RESID_PRE)

    def broken(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(batched.Replay, "run", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        batched.run_batched(gpt2, p, runs, evaluate)


def test_full_forward_fallback(gpt2, monkeypatch, caplog):
    """A model whose replay does not reproduce its forward runs full passes, logged, same values."""
    p, runs, evaluate = setup(gpt2, catalog.HEAD_OUT, metrics.logit_diff(5, 7))
    want = run_reference(gpt2, p, runs, evaluate)
    monkeypatch.setattr(batched, "_VERIFIED", batched.weakref.WeakKeyDictionary())
    monkeypatch.setattr(batched.Replay, "matches", lambda self, logits, layer: False)
    with caplog.at_level(logging.DEBUG, logger="patchspec.batched"):
        got = batched.run_batched(gpt2, p, runs, evaluate)
    assert "falling back to full forward passes" in caplog.text
    (record,) = [r for r in caplog.records if hasattr(r, "stats")]
    assert record.stats.full == record.stats.forwards > 0 and record.stats.replayed == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_start = batched.run_batched(gpt2, p, runs, evaluate, start_at_layer=False)
    torch.testing.assert_close(no_start, want, rtol=1e-5, atol=1e-5)


def test_model_without_block_stack_falls_back(gpt2, monkeypatch):
    """A model without ln_final/unembed to replay through is run with full forward passes."""
    p, runs, evaluate = setup(gpt2, catalog.RESID_PRE)
    want = run_reference(gpt2, p, runs, evaluate)

    class Bare:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            if name in ("ln_final", "unembed"):
                raise AttributeError(name)
            return getattr(self.inner, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner(*args, **kwargs)

    replay, _ = batched.Replay.capture(Bare(gpt2), runs.corrupted_tokens)
    assert replay is None
    got = batched.run_batched(Bare(gpt2), p, runs, evaluate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@attrs.frozen
class _Zeros(Source):
    """Zeros of a fixed shape, read from no cache (for a hook no cache has)."""

    kind: ClassVar[str] = "test-zeros"
    shape: tuple[int, ...] = (2, 6, 32)

    def values(self, hook_name: str, runs: Any) -> torch.Tensor:
        return torch.zeros(self.shape)


class _DeadLayout(Layout):
    """A layout whose hook point exists but never fires (GPT-2's joint qkv input)."""

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.attn.qkv.hook_in"


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_hook_that_never_fires_raises(gpt2, monkeypatch, engine):
    """A patch whose hook never fires is a HookError naming the hook, not a silent no-op."""
    monkeypatch.setitem(
        LAYOUTS, "dead", _DeadLayout("dead", ("batch", "pos", "d_model"), "never fires")
    )
    region = Region("dead", 1, (("pos", (0,)), ("d_model", None)), _Zeros())
    p = explicit_plan(("cell",), {"cell": (0,)}, [Cell(coords=(0,), regions=(region,))])
    _, runs, evaluate = setup(gpt2, catalog.RESID_PRE)
    with pytest.raises(
        HookError, match=r"hook 'blocks\.1\.attn\.qkv\.hook_in' fired 0 times in one forward pass"
    ):
        ENGINES[engine](gpt2, p, runs, evaluate, progress=False)


def test_caches_are_never_mutated(model):
    """Neither engine writes into the clean or corrupted caches (TL setters included)."""
    clean, corrupted = prompts()
    runs = Runs(model, clean, corrupted)
    sizes = Sizes.of(model, runs.batch, runs.seq)
    p = plan(catalog.RESID_PRE & catalog.HEAD_OUT.sel(layer=1), sizes)
    noising = plan(catalog.MLP_OUT.using(Corrupted()), sizes)
    runs.hook_names.update(p.hook_names, noising.hook_names)
    context = MetricContext(model, runs.logits("clean"), runs.logits("corrupted"), clean)
    evaluate = Evaluator([metrics.as_metric(logit_diff_metric)], context)
    before = {(w, k): v.clone() for w, cache in runs._caches.items() for k, v in cache.items()}

    def in_place_setter(act: torch.Tensor, index: list[int], clean: torch.Tensor) -> torch.Tensor:
        act[:, index[1]] = clean[:, index[1]]
        clean.mul_(1.0)  # a no-op write: values must still be the same tensor contents
        return act

    setter_region = Region("resid_pre", 1, (), Clean(), setter=in_place_setter, setter_index=(1, 2))
    setter_plan = explicit_plan(
        ("cell",), {"cell": (0, 1)}, [Cell((0,), (setter_region,)), Cell((1,), (setter_region,))]
    )
    for engine in ("batched", "reference"):
        for each in (p, noising, setter_plan):
            ENGINES[engine](model, each, runs, evaluate, progress=False)
    after = {(w, k): v for w, cache in runs._caches.items() for k, v in cache.items()}
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_setter_regions_match_reference(gpt2):
    """User-written TransformerLens setters run per copy and give the reference values."""

    def half_patch(act: torch.Tensor, index: list[int], clean: torch.Tensor) -> torch.Tensor:
        act[:, index[1]] = 0.5 * (act[:, index[1]] + clean[:, index[1]])
        return act

    cells = [
        Cell(
            (i,),
            (
                Region(
                    "resid_pre", layer, (), Clean(), setter=half_patch, setter_index=(layer, pos)
                ),
            ),
        )
        for i, (layer, pos) in enumerate([(0, 1), (1, 2), (0, 5), (1, 0)])
    ]
    p = explicit_plan(("cell",), {"cell": tuple(range(4))}, cells)
    _, runs, evaluate = setup(gpt2, catalog.RESID_PRE)
    want = run_reference(gpt2, p, runs, evaluate)
    got = batched.run_batched(gpt2, p, runs, evaluate, cells_per_batch=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_metric_dim_from_a_list_or_mapping(gpt2):
    """Several metrics on the same passes give a ``metric`` dim equal to separate runs."""
    clean, corrupted = prompts()
    ld, lp = metrics.logit_diff(5, 7), metrics.logprob(5, pos=-2)
    both = catalog.RESID_PRE.run(gpt2, clean, corrupted, [ld, lp], progress=False)
    assert both.dims == ("layer", "pos", "metric")
    assert list(both.metric.values) == ["logit_diff", "logprob"]
    for name, metric in (("logit_diff", ld), ("logprob", lp)):
        alone = catalog.RESID_PRE.run(gpt2, clean, corrupted, metric, progress=False)
        np.testing.assert_allclose(both.sel(metric=name).values, alone.values, rtol=1e-5, atol=1e-6)
        assert float(both.clean_baseline.sel(metric=name)) == pytest.approx(
            alone.attrs["clean_baseline"], rel=1e-5
        )
    per_prompt = {
        "diff": metrics.logit_diff(5, 7, reduce="none"),
        "mine": per_example_metric,
        "p": metrics.prob(5, reduce="none"),
    }
    named = catalog.HEAD_OUT.run(gpt2, clean, corrupted, per_prompt, progress=False)
    assert named.dims == ("layer", "head", "metric", "example")
    assert list(named.metric.values) == ["diff", "mine", "p"]
    reference = catalog.HEAD_OUT.run(
        gpt2, clean, corrupted, per_prompt, engine="reference", progress=False
    )
    np.testing.assert_allclose(named.values, reference.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        named.sel(metric="diff").values, named.sel(metric="mine").values, rtol=1e-5, atol=1e-5
    )


def test_metric_collection_errors(gpt2):
    """Repeated names, empty collections and mixed shapes are clear errors."""
    clean, corrupted = prompts()
    with pytest.raises(
        MetricError,
        match=r"metrics evaluated together need distinct names; \['logit_diff'\] repeat",
    ):
        catalog.RESID_PRE.run(
            gpt2, clean, corrupted, [metrics.logit_diff(5, 7), metrics.logit_diff(5, 8)]
        )
    with pytest.raises(MetricError, match="needs at least one metric"):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, [])
    with pytest.raises(MetricError, match=r"must all return a scalar or all one value per prompt"):
        catalog.RESID_PRE.run(
            gpt2, clean, corrupted, [metrics.logit_diff(5, 7), metrics.prob(5, reduce="none")]
        )


def test_unembeds_only_where_the_metric_reads(gpt2, monkeypatch):
    """Built-in metrics get logits at their positions only; a plain callable gets full logits."""
    seen: list[tuple[int, ...]] = []
    real = batched.evaluate_cells

    def spy(evaluate: Any, logits: torch.Tensor, cells: Any, positions: Any = None) -> torch.Tensor:
        seen.append((logits.shape[1], positions))
        return real(evaluate, logits, cells, positions)

    monkeypatch.setattr(batched, "evaluate_cells", spy)
    for metric, want in (
        (metrics.logit_diff(5, 7, pos=[2, 4]), (2, (2, 4))),
        ([metrics.logit_diff(5, 7), metrics.prob(3, pos=1)], (2, (1, 5))),
        (logit_diff_metric, (6, None)),
        ([metrics.logit_diff(5, 7), metrics.loss()], (6, None)),
    ):
        seen.clear()
        p, runs, evaluate = setup(gpt2, catalog.HEAD_OUT, metric)
        got = batched.run_batched(gpt2, p, runs, evaluate)
        assert set(seen) == {want}
        torch.testing.assert_close(
            got, run_reference(gpt2, p, runs, evaluate), rtol=1e-5, atol=1e-5
        )


def test_non_finite_metric_names_the_cell(gpt2):
    """A non-finite value in a block is reported at the cell that produced it."""
    bad = metrics.Metric(
        "bad",
        lambda logits, ctx: torch.where(torch.arange(logits.shape[0]) >= 4, torch.nan, 1.0),
        positions=(-1,),
        rowwise=True,
    )
    clean, corrupted = prompts()
    with pytest.raises(
        MetricError, match=r"metric 'bad' returned a non-finite value .* at layer=0, head=2"
    ):
        catalog.HEAD_OUT.run(gpt2, clean, corrupted, bad, cells_per_batch=8)


def test_rowwise_metric_shape_is_checked(gpt2):
    """A rowwise metric must return one value per row of the block."""
    wrong = metrics.Metric(
        "wrong", lambda logits, ctx: logits[:2, -1, 0], positions=(-1,), rowwise=True
    )
    clean, corrupted = prompts()
    with pytest.raises(
        MetricError,
        match=r"rowwise metric 'wrong' returned shape \(2,\) for 4 stacked copies of 2 prompts",
    ):
        catalog.HEAD_OUT.run(gpt2, clean, corrupted, wrong, cells_per_batch=8)


def test_at_maps_positions(gpt2):
    """metrics.at reads the same logits from full and from compact blocks of stacked copies."""
    clean, _ = prompts()
    logits = gpt2(clean).detach()
    full = MetricContext(gpt2, None, None, clean)
    compact = attrs.evolve(full, logit_positions=(1, 5))
    stacked = logits.repeat(3, 1, 1)
    for pos in (-1, 1, [5, 1]):
        want = metrics.at(logits, pos, full)
        torch.testing.assert_close(metrics.at(stacked[:, [1, 5]], pos, compact), want.repeat(3, 1))
    with pytest.raises(
        MetricError, match=r"position 2 was not computed \(the logits hold positions \[1, 5\]\)"
    ):
        metrics.at(stacked[:, [1, 5]], 2, compact)


def test_progress_bar_in_cells(gpt2, capsys):
    """progress=True shows a bar counting cells."""
    clean, corrupted = prompts()
    catalog.HEAD_OUT.run(
        gpt2, clean, corrupted, logit_diff_metric, progress=True, cells_per_batch=3
    )
    err = capsys.readouterr().err
    assert "patching (batched)" in err and "8/8" in err


def test_sweep_with_joint_and_sources(qwen2):
    """A Sweep of joint and noising specs on the grouped-query model equals the reference."""
    clean, corrupted = prompts()
    heads = PatchSpec("z", axes=("layer", "head")).sel(layer=1)
    noising = catalog.HEAD_K.using(Corrupted())
    joint = JointSpec((heads, catalog.RESID_PRE.sel(pos=[0, -1])), name="joint")
    sweep = Sweep(joint, noising.named("k"))
    got = sweep.run(qwen2, clean, corrupted, metrics.logit_diff(5, 7), cells_per_batch=3)
    want = sweep.run(qwen2, clean, corrupted, metrics.logit_diff(5, 7), engine="reference")
    for name in sweep.names:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-5, atol=1e-5)


def test_region_masks_match_an_oracle():
    """Stacked masks equal masks built by plain indexing, per-prompt selections included."""
    from patchspec.engine import region_mask, region_masks
    from patchspec.plan import PerExample

    sizes = Sizes(n_layers=2, n_heads=3, n_kv_heads=3, d_model=4, d_head=2, d_mlp=5, batch=2, seq=4)
    regions = [
        Region("z", 0, (("pos", (1, 3)), ("head", (2,)), ("d_head", None)), Clean()),
        None,
        Region(
            "z", 0, (("pos", PerExample(((0,), (2, 3)))), ("head", None), ("d_head", (1,))), Clean()
        ),
        Region("z", 0, (("pos", None), ("head", None), ("d_head", None)), Clean()),
    ]
    masks = region_masks(regions, sizes, "cpu")
    assert masks.shape[:2] == (4, 2)
    for k, region in enumerate(regions):
        want = np.zeros((2, 4, 3, 2), dtype=bool)
        if region is not None:
            for b in range(2):
                picks = []
                for dim, selection in region.index:
                    if selection is None:
                        picks.append(range(sizes.size(dim)))
                    elif isinstance(selection, PerExample):
                        picks.append(selection.values[b])
                    else:
                        picks.append(selection)
                want[b][np.ix_(*[list(p) for p in picks])] = True
            single = region_mask(region, sizes, "cpu")
            np.testing.assert_array_equal(single.expand(2, 4, 3, 2).numpy(), want)
        np.testing.assert_array_equal(masks[k].expand(2, 4, 3, 2).numpy(), want)
