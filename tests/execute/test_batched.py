"""The batched estimator and the local executor: replay, chunking, memory, OOM, metrics, guards."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

from patchspec import (
    HookError,
    JointSpec,
    MetricError,
    OptionError,
    PatchSpec,
    PatchSpecError,
    Sweep,
    catalog,
    compat,
    metrics,
    runner,
)
from patchspec.execute import (
    BatchedEstimator,
    Chunk,
    LocalExecutor,
    ReferenceEstimator,
    Task,
    registry,
)
from patchspec.execute.batched import Stats
from patchspec.execute.masks import part_writes, region_writes
from patchspec.execute.schedule import choose_cells_per_batch
from patchspec.layouts import LAYOUTS, Layout
from patchspec.metrics import Evaluator, MetricContext, as_metrics
from patchspec.model import ModelAdapter, Replay
from patchspec.options import RunOptions, parse_memory
from patchspec.plan import (
    Cell,
    Grid,
    PerExample,
    Region,
    Sizes,
    compile,
    explicit_grid,
    resolve_positions,
)
from patchspec.sources import Clean, Corrupted, Source, Zero
from tests.conftest import logit_diff_metric, per_example_metric
from tests.models import prompts

TOL = {"rtol": 1e-5, "atol": 1e-5}
#: Every PatchSpec of the catalogue.
CATALOGUE = [v for v in vars(catalog).values() if isinstance(v, PatchSpec)]


# --- helpers ------------------------------------------------------------------------------------
def start(model: Any, metric: Any = logit_diff_metric, **options: Any) -> Any:
    """A prepared run (validated, session open, no forward pass yet), as ``spec.run`` makes it."""
    clean, corrupted = prompts()
    return runner.prepare(
        model, clean, corrupted, metric, options=RunOptions(progress=False, **options)
    )


def task_of(run: Any, grid: Grid, metric: Any = None, cells: Any = None) -> Task:
    """The task ``runner.run_grid`` builds for ``grid`` (optionally another metric or cells)."""
    run.add(grid)
    context = attrs.evolve(run.context, tokens=run.session.tokens(grid.receiver))
    if metric is None:
        chosen, stacked = run.metrics, run.metric_dim
    else:
        chosen, stacked = as_metrics(metric)
    evaluate = Evaluator(chosen, context, stacked=stacked, describe=grid.describe)
    flat = np.arange(grid.n_cells, dtype=np.int64) if cells is None else np.asarray(cells)
    return Task(grid, flat, run.session, run.adapter, evaluate, "spec")


def execute(task: Task, estimator: Any, executor: Any = None) -> tuple[torch.Tensor, Stats]:
    """Values of every cell of ``task`` through ``runner.estimate``, and the batched stats."""
    fresh = attrs.evolve(task, memo={})
    values = runner.estimate(estimator, executor or LocalExecutor(), fresh, progress=False)
    return values, fresh.memo.get("stats", Stats())


def values_of(model: Any, spec: Any, metric: Any = logit_diff_metric, **options: Any) -> Any:
    """Raw per-cell values of ``spec`` with these options (``runner.run_grid``)."""
    run = start(model, metric, **options)
    grid = run.add(compile(spec, run.sizes))
    return runner.run_grid(run, grid, spec.label)[0]


@pytest.fixture
def forwards(gpt2: Any) -> Iterator[list[int]]:
    """Counts forward passes of ``gpt2`` (calls of its first block) while the test runs."""
    calls: list[int] = []
    handle = gpt2.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


# --- registry and defaults ----------------------------------------------------------------------
def test_registry_and_default(gpt2):
    """The registry maps names to estimator classes, and the default is the exact batched one."""
    assert registry.ESTIMATORS["batched"] is BatchedEstimator
    assert registry.ESTIMATORS["reference"] is ReferenceEstimator
    assert isinstance(registry.make_estimator(None, {}), BatchedEstimator)
    assert registry.make_estimator("batched", {"cells_per_batch": 3}).cells_per_batch == 3
    assert isinstance(registry.executor_for(None), LocalExecutor)
    clean, corrupted = prompts()
    result = catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, progress=False)
    assert result.attrs["estimator"] == "batched" and result.attrs["exact"] is True
    assert result.attrs["executor"] == "local"
    reference = catalog.HEAD_OUT.run(
        gpt2, clean, corrupted, logit_diff_metric, engine="reference", progress=False
    )
    assert reference.attrs["estimator"] == "reference" and reference.attrs["exact"] is True
    np.testing.assert_allclose(result.values, reference.values, **TOL)


# --- replay -------------------------------------------------------------------------------------
@pytest.mark.parametrize("copies", [1, 3])
def test_replay_equals_the_models_forward(model, copies):
    """Blocks L..end replayed from recorded inputs give the model's own logits, any L, any copies."""
    _clean, corrupted = prompts(n=2, length=7)
    with torch.inference_mode():
        replay, logits = Replay.capture(model, corrupted)
        assert replay is not None
        torch.testing.assert_close(logits, model(corrupted))
        want = logits.repeat(copies, 1, 1)
        for layer in range(model.cfg.n_layers):
            torch.testing.assert_close(replay.run(layer, copies), want, **TOL)
            torch.testing.assert_close(replay.run(layer, copies, [2, 6]), want[:, [2, 6]], **TOL)
            assert replay.matches(logits, layer)
        assert not replay.matches(logits + 1.0, 0)


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
        replay, _ = Replay.capture(gpt2, corrupted)
        assert replay is not None
        with gpt2.hooks(fwd_hooks=[(name, count(name)) for name in names]):
            replay.run(1, 4)
    assert fired == {"blocks.1.attn.hook_z": 1, "blocks.1.hook_resid_pre": 1}


# --- batched == reference -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.label)
def test_equals_reference(model, spec):
    """Batched == reference on every catalogue spec, for a plain and a built-in metric."""
    run = start(model)
    grid = compile(spec, run.sizes)
    # At most 24 cells, shuffled: the executor must give values back in task.cells order.
    cells = np.random.default_rng(len(spec.label)).permutation(grid.n_cells)[:24]
    both = {"plain": per_example_metric, "builtin": metrics.logit_diff(5, 7, reduce="none")}
    want, _ = execute(task_of(run, grid, both, cells), ReferenceEstimator())
    assert want.shape == (len(cells), 2, 2)
    assert float(want.std(0).max()) > 0  # the patches change the metric
    torch.testing.assert_close(want[:, 0], want[:, 1], **TOL)
    for metric, expected in (
        (logit_diff_metric, want[:, 0].mean(-1)),
        (metrics.logit_diff(5, 7, reduce="none"), want[:, 1]),
    ):
        got, stats = execute(task_of(run, grid, metric, cells), BatchedEstimator(cells_per_batch=5))
        torch.testing.assert_close(got, expected, **TOL)
        assert stats.cells == len(cells) and stats.largest <= 5 and stats.replayed > 0


# --- chunk sizes and the memory budget -----------------------------------------------------------
def test_results_do_not_depend_on_k(gpt2):
    """cells_per_batch, max_memory, start_at_layer and lean change the passes, never the values
    (the chunk sizes checked are those of the model's own blocks; lean ones are cut by their
    first position too)."""
    run = start(gpt2, metrics.logit_diff(5, 7))
    task = task_of(run, compile(catalog.HEAD_OUT_BY_POS, run.sizes))
    want, stats = execute(task, BatchedEstimator(lean=False, cells_per_batch=1))
    assert stats.largest == 1 and stats.forwards == 48
    # 24 cells start at each layer, cut as evenly as K allows; 48 share one full pass.
    for estimator, largest in (
        (BatchedEstimator(lean=False, cells_per_batch=2), 2),
        (BatchedEstimator(lean=False, cells_per_batch=7), 6),
        (BatchedEstimator(lean=False, cells_per_batch=1000), 24),
        (BatchedEstimator(lean=False, max_memory="1MB"), 12),
        (BatchedEstimator(lean=False, cells_per_batch=7, max_memory="300KB"), 5),
        (BatchedEstimator(lean=False), 24),
        (BatchedEstimator(lean=False, start_at_layer=False), 48),
    ):
        got, stats = execute(task, estimator)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert stats.cells == 48 and stats.largest == largest <= stats.cells_per_batch
        lean, lean_stats = execute(task, attrs.evolve(estimator, lean=True))
        torch.testing.assert_close(lean, want, rtol=1e-5, atol=1e-6)
        assert (lean_stats.lean > 0) == estimator.start_at_layer
        if estimator.cells_per_batch is not None:
            assert lean_stats.largest <= estimator.cells_per_batch
    spec_values = values_of(gpt2, catalog.HEAD_OUT_BY_POS, metrics.logit_diff(5, 7), max_memory=1)
    torch.testing.assert_close(spec_values, want, rtol=1e-5, atol=1e-6)


def test_memory_budget_changes_k(gpt2):
    """A bigger budget gives more cells per pass; cells_per_batch is capped by it."""
    adapter = ModelAdapter.of(gpt2)
    sizes = adapter.sizes(2, 6)
    cpu = torch.device("cpu")

    def k(**options: Any) -> int:
        return choose_cells_per_batch(
            sizes, d_vocab=adapter.d_vocab, n_positions=6, device=cpu, **options
        )

    small, large = k(max_memory="256KB"), k(max_memory="64MB")
    assert 1 <= small < large
    assert k(cells_per_batch=3) == 3
    assert k(cells_per_batch=10**6, max_memory="256KB") == small
    assert k(cells_per_batch=2, max_memory="64MB") == 2
    assert k(max_memory=1) == 1
    fewer_positions = choose_cells_per_batch(
        sizes, d_vocab=adapter.d_vocab, n_positions=1, device=cpu, max_memory="256KB"
    )
    assert fewer_positions >= small


def test_budget_is_used_by_the_engine(gpt2):
    """The engine's passes follow the budget (its stats), with identical values."""
    run = start(gpt2, metrics.logit_diff(5, 7))
    task = task_of(run, compile(catalog.HEAD_OUT_BY_POS, run.sizes))
    results = {}
    for budget in ("300KB", "100MB"):
        values, stats = execute(task, BatchedEstimator(lean=False, max_memory=budget))
        expected = choose_cells_per_batch(
            task.grid.sizes,
            d_vocab=task.adapter.d_vocab,
            n_positions=1,  # logit_diff reads the last position only
            device=task.adapter.device,
            max_memory=budget,
        )
        assert stats.cells_per_batch == expected and stats.largest <= expected
        results[budget] = (values, stats.forwards)
    assert results["300KB"][1] > results["100MB"][1] == 2  # one pass per start layer
    torch.testing.assert_close(results["300KB"][0], results["100MB"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kib", 1536), (4096, 4096), ("3e3", 3000)],
)
def test_parse_memory(value, expected):
    """Memory sizes in bytes or with decimal/binary units."""
    assert parse_memory(value) == expected
    assert RunOptions(max_memory=value).max_memory == value


@pytest.mark.parametrize("value", ["lots", "-1GB", "2 GX", 0, True, None, [1]])
def test_parse_memory_rejects(value):
    """A size that is not positive or has an unknown unit is an OptionError (a TypeError too)."""
    with pytest.raises(
        OptionError, match=r"max_memory=.* is not a memory size; give a positive number"
    ) as info:
        parse_memory(value)
    assert isinstance(info.value, PatchSpecError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cells_per_batch": 0}, r"cells_per_batch must be a positive int or None, got 0"),
        ({"cells_per_batch": -3}, r"cells_per_batch must be a positive int or None, got -3"),
        ({"cells_per_batch": 2.5}, r"cells_per_batch must be a positive int or None, got 2\.5"),
        ({"cells_per_batch": True}, r"cells_per_batch must be a positive int or None, got True"),
        ({"max_memory": "lots"}, r"max_memory='lots' is not a memory size"),
        ({"start_at_layer": "yes"}, r"start_at_layer must be True or False, got 'yes'"),
        ({"engine": "batchd"}, r"unknown engine 'batchd'.*did you mean 'batched'\?"),
        ({"cells_per_batc": 4}, r"unknown option 'cells_per_batc'.*did you mean 'cells_per_batch'"),
    ],
)
def test_bad_options_fail_before_any_forward(gpt2, forwards, options, message):
    """A bad cells_per_batch (or other option) is an OptionError raised before any forward."""
    clean, corrupted = prompts()
    with pytest.raises(OptionError, match=message):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, **options)
    assert forwards == []
    gpt2(corrupted)
    assert forwards == [1]  # the counter does see a forward pass


# --- out of memory ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't "
                             "allocate memory: you tried to allocate 123 bytes"),
        lambda: RuntimeError("CUDA error: out of memory"),
        MemoryError,
    ],
    ids=["torch-oom", "cpu-alloc", "runtime-oom", "memory-error"],
)
def test_out_of_memory_splits_and_retries(gpt2, monkeypatch, error):
    """A chunk that runs out of memory is split and retried, later chunks kept small; no cell
    is lost or changed."""
    run = start(gpt2, metrics.logit_diff(5, 7))
    task = task_of(run, compile(catalog.HEAD_OUT_BY_POS, run.sizes))
    want, _ = execute(task, BatchedEstimator(lean=False, cells_per_batch=4))
    assert task.session.replay(task.grid.receiver) is not None  # recorded before patching run
    real_run = Replay.run
    raised: list[int] = []

    def tight(self: Any, layer: int, copies: int, positions: Any = None) -> torch.Tensor:
        if copies > 5:
            raised.append(copies)
            raise error()
        return real_run(self, layer, copies, positions)

    monkeypatch.setattr(Replay, "run", tight)
    executor = LocalExecutor()
    got, stats = execute(task, BatchedEstimator(lean=False, cells_per_batch=48), executor)
    # 24 cells per start layer: 24 -> 12 -> 6 -> 3 runs out of memory three times, then every
    # later chunk (the second layer's too) is cut to 3 cells before it runs.
    assert raised == [24, 12, 6] and executor.splits == 3
    assert stats.largest == 3 and stats.forwards == 16 and stats.replayed == 16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_out_of_memory_on_one_cell_is_raised(gpt2, monkeypatch):
    """A single cell that runs out of memory cannot be split: the error propagates."""
    run = start(gpt2)
    task = task_of(run, compile(catalog.HEAD_OUT, run.sizes))
    assert task.session.replay(task.grid.receiver) is not None

    def never(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Replay, "run", never)
    executor = LocalExecutor()
    with pytest.raises(torch.OutOfMemoryError):
        execute(task, BatchedEstimator(lean=False, cells_per_batch=4), executor)
    assert executor.splits == 2  # 4 -> 2 -> 1, then the single cell fails


def test_other_errors_are_not_retried(gpt2, monkeypatch):
    """Only out-of-memory errors split a chunk; anything else propagates at once."""
    run = start(gpt2)
    task = task_of(run, compile(catalog.RESID_PRE, run.sizes))
    assert task.session.replay(task.grid.receiver) is not None
    calls: list[int] = []

    def broken(self: Any, layer: int, copies: int, positions: Any = None) -> torch.Tensor:
        calls.append(copies)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Replay, "run", broken)
    executor = LocalExecutor()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        execute(task, BatchedEstimator(lean=False, cells_per_batch=6), executor)
    assert calls == [6] and executor.splits == 0


# --- fallbacks ----------------------------------------------------------------------------------
def test_full_forward_fallback(gpt2, monkeypatch, caplog):
    """A model whose replay does not reproduce its forward runs full passes, logged, same values."""
    adapter = ModelAdapter(gpt2)  # fresh: no cached verification
    monkeypatch.setattr(Replay, "matches", lambda self, logits, layer: False)
    with caplog.at_level(logging.DEBUG, logger="patchspec.model.adapter"):
        run = start(adapter, metrics.logit_diff(5, 7))
        task = task_of(run, compile(catalog.HEAD_OUT, run.sizes))
        want, _ = execute(task, ReferenceEstimator())
        got, stats = execute(task, BatchedEstimator())
    assert "falling back to full forward passes" in caplog.text
    assert task.session.replay(task.grid.receiver) is None
    assert stats.full == stats.forwards == 2 and stats.replayed == 0
    torch.testing.assert_close(got, want, **TOL)
    no_start, stats = execute(task, BatchedEstimator(start_at_layer=False))
    assert stats.full == stats.forwards == 1 and stats.replayed == 0
    torch.testing.assert_close(no_start, want, **TOL)
    clean, corrupted = prompts()
    public = catalog.HEAD_OUT.run(adapter, clean, corrupted, metrics.logit_diff(5, 7))
    np.testing.assert_allclose(public.values, want.numpy().reshape(2, 4), **TOL)


@pytest.mark.parametrize("hidden", [("ln_final", "unembed"), ("blocks",)])
def test_model_without_block_stack_falls_back(gpt2, hidden):
    """A model without blocks/ln_final/unembed to replay through runs full forward passes."""

    class Bare:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            if name in hidden:
                raise AttributeError(name)
            return getattr(self.inner, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner(*args, **kwargs)

    _clean, corrupted = prompts()
    with torch.inference_mode():
        replay, logits = Replay.capture(Bare(gpt2), corrupted)
        assert replay is None
        torch.testing.assert_close(logits, gpt2(corrupted))
    want = values_of(gpt2, catalog.RESID_PRE, engine="reference")
    run = start(Bare(gpt2))
    task = task_of(run, compile(catalog.RESID_PRE, run.sizes))
    got, stats = execute(task, BatchedEstimator())
    assert stats.full == stats.forwards > 0 and stats.replayed == 0
    torch.testing.assert_close(got, want, **TOL)


# --- guards -------------------------------------------------------------------------------------
@attrs.frozen
class _Zeros(Source):
    """Zeros of a fixed shape, read from no cache (for a hook no cache has)."""

    kind: ClassVar[str] = "test-zeros"
    shape: tuple[int, ...] = (2, 6, 32)

    def values(self, hook_name: str, runs: Any) -> torch.Tensor:
        return torch.zeros(self.shape)


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_hook_that_never_fires_raises(gpt2, monkeypatch, engine):
    """A patch whose hook exists but never fires is a HookError naming the hook, not a no-op."""
    dead = Layout(
        "dead", ("batch", "pos", "d_model"), "never fires", hook="blocks.{layer}.attn.qkv.hook_in"
    )
    monkeypatch.setitem(LAYOUTS, "dead", dead)
    spec = PatchSpec("dead", axes=("layer", "pos")).sel(layer=1, pos=0).using(_Zeros())
    clean, corrupted = prompts()
    with pytest.raises(
        HookError, match=r"hook 'blocks\.1\.attn\.qkv\.hook_in' fired 0 times in one forward pass"
    ):
        spec.run(gpt2, clean, corrupted, logit_diff_metric, engine=engine, progress=False)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def test_caches_are_never_mutated(model):
    """No estimator writes into the cached activations, logits or recorded replay inputs."""
    run = start(model)
    sizes = run.sizes
    region = Region("resid_pre", 1, (("pos", (2,)), ("d_model", None)), Clean())
    other = Region("resid_pre", 0, (("pos", (1, 4)), ("d_model", (0, 3))), Clean())
    grids = [
        compile(catalog.RESID_PRE & catalog.HEAD_OUT.sel(layer=1), sizes),
        compile(catalog.MLP_OUT.using(Corrupted()), sizes),  # noising: the clean run receives
        compile(catalog.RESID_MID, sizes),
        explicit_grid(
            ("cell",), {"cell": (0, 1)}, [Cell((0,), (region,)), Cell((1,), (region, other))], sizes
        ),
    ]
    for grid in grids:
        run.add(grid)
    session = run.session
    run.context  # noqa: B018 - the unpatched runs
    replays = [session.replay("corrupted"), session.replay("clean")]
    assert all(r is not None for r in replays)

    def snapshot() -> list[torch.Tensor]:
        out = [v for _w, cache in sorted(session._caches.items()) for _k, v in sorted(cache.items())]
        out += [session._logits[w] for w in sorted(session._logits)]
        for replay in replays:
            for index in sorted(replay.inputs):
                recorded = replay.inputs[index]
                out += [recorded.hidden, *_tensors(recorded.args), *_tensors(recorded.kwargs)]
        return out

    before = [t.clone() for t in snapshot()]
    assert len(before) > 2 * sizes.n_layers
    for grid in grids:
        for estimator in (
            BatchedEstimator(cells_per_batch=1),  # one copy: replayed inputs are not repeated
            BatchedEstimator(),
            BatchedEstimator(start_at_layer=False),
            ReferenceEstimator(),
        ):
            execute(task_of(run, grid), estimator)
    after = snapshot()
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


def _copy_setter(act: torch.Tensor, index: list[int], clean: torch.Tensor) -> torch.Tensor:
    """A user-written setter copying one head's clean vector at one position (TL's own kind)."""
    act[:, index[1], index[2]] = clean[:, index[1], index[2]]
    return act


def _half_setter(act: torch.Tensor, index: list[int], clean: torch.Tensor) -> torch.Tensor:
    """A user-written setter writing the mean of the corrupted and clean residual at one position."""
    act[:, index[1]] = 0.5 * (act[:, index[1]] + clean[:, index[1]])
    return act


def _max_setter(act: torch.Tensor, index: list[int], clean: torch.Tensor) -> torch.Tensor:
    """A user-written setter writing the larger of the corrupted and clean residual at one position."""
    act[:, index[1]] = torch.maximum(act[:, index[1]], clean[:, index[1]])
    return act


def test_probed_user_setter_matches_tl(gpt2):
    """User-written setters, probed to regions, give TransformerLens's values through the compat
    drop-in (copying ones: TL's own setter; blending ones: TL's own loop), cache left alone."""
    sizes = ModelAdapter.of(gpt2).sizes(2, 6)
    region = compat.probe_setter("z", _copy_setter, [1, 3, 2], sizes)
    assert (region.activation, region.layer) == ("z", 1)
    assert region.index == (("pos", (3,)), ("head", (2,)), ("d_head", None))
    assert isinstance(region.source, Clean)
    clean, corrupted = prompts()
    _, cache = gpt2.run_with_cache(clean)
    before = {k: v.clone() for k, v in cache.items()}
    axes = ["layer", "pos", "head_index"]
    want = compat.generic_activation_patch(
        gpt2, corrupted, cache, logit_diff_metric, tl_patching.layer_pos_head_vector_patch_setter,
        "z", axes, progress=False,
    )
    got = compat.generic_activation_patch(
        gpt2, corrupted, cache, logit_diff_metric, _copy_setter, "z", axes, progress=False
    )
    assert got.shape == want.shape == (2, 6, 4)
    torch.testing.assert_close(got, want, **TOL)
    half = compat.generic_activation_patch(
        gpt2, corrupted, cache, logit_diff_metric, _half_setter, "resid_pre", ["layer", "pos"],
        progress=False,
    )
    tl_half = tl_patching.generic_activation_patch(
        gpt2, corrupted, cache, logit_diff_metric, _half_setter, "resid_pre", ["layer", "pos"]
    )
    assert float(tl_half.std()) > 0
    torch.testing.assert_close(half, tl_half, **TOL)
    assert all(torch.equal(cache[k], v) for k, v in before.items())


def test_probed_max_setter_matches_tl(gpt2):
    """A setter whose output equals the probe's activation still patches what TL patches."""
    clean, corrupted = prompts()
    _, cache = gpt2.run_with_cache(clean)
    axes = ["layer", "pos"]
    got = compat.generic_activation_patch(
        gpt2, corrupted, cache, logit_diff_metric, _max_setter, "resid_pre", axes, progress=False
    )
    want = tl_patching.generic_activation_patch(
        gpt2, corrupted, cache, logit_diff_metric, _max_setter, "resid_pre", axes
    )
    torch.testing.assert_close(got, want, **TOL)


# --- metrics ------------------------------------------------------------------------------------
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
    seen: list[tuple[int, Any]] = []
    real = Evaluator.many

    def spy(self: Any, logits: torch.Tensor, cells: Any, positions: Any = None) -> torch.Tensor:
        seen.append((logits.shape[1], positions))
        return real(self, logits, cells, positions)

    monkeypatch.setattr(Evaluator, "many", spy)
    run = start(gpt2)
    grid = compile(catalog.HEAD_OUT, run.sizes)
    for metric, want in (
        (metrics.logit_diff(5, 7, pos=[2, 4]), (2, (2, 4))),
        ([metrics.logit_diff(5, 7), metrics.prob(3, pos=1)], (2, (1, 5))),
        (logit_diff_metric, (6, None)),
        ([metrics.logit_diff(5, 7), metrics.loss()], (6, None)),
    ):
        seen.clear()
        task = task_of(run, grid, metric)
        got, _ = execute(task, BatchedEstimator())
        assert set(seen) == {want}
        seen.clear()
        reference, _ = execute(task, ReferenceEstimator())
        assert seen == []  # the reference evaluates full logits, cell by cell
        torch.testing.assert_close(got, reference, **TOL)


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


# --- progress and sweeps ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_progress_bar_in_cells(gpt2, capsys, engine):
    """progress=True shows a bar counting cells, named after the spec and the estimator."""
    clean, corrupted = prompts()
    catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, progress=True, engine=engine)
    err = capsys.readouterr().err
    assert f"patching head_out ({engine})" in err and "8/8" in err
    catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, progress=False, engine=engine)
    assert "patching" not in capsys.readouterr().err


def test_sweep_with_joint_and_sources(qwen2):
    """A Sweep of joint and noising specs on the grouped-query model equals the reference."""
    clean, corrupted = prompts()
    heads = PatchSpec("z", axes=("layer", "head")).sel(layer=1)
    noising = catalog.HEAD_K.using(Corrupted())
    joint = JointSpec((heads, catalog.RESID_PRE.sel(pos=[0, -1])), name="joint")
    sweep = Sweep(joint, noising.named("k"))
    got = sweep.run(qwen2, clean, corrupted, metrics.logit_diff(5, 7), cells_per_batch=3)
    want = sweep.run(qwen2, clean, corrupted, metrics.logit_diff(5, 7), engine="reference")
    assert got["joint"].attrs["estimator"] == "batched"
    assert want["joint"].attrs["estimator"] == "reference"
    for name in sweep.names:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-5, atol=1e-5)


# --- estimator and executor contracts -----------------------------------------------------------
@attrs.frozen
class _Partial:
    """An estimator whose chunks cover only the first half of the cells."""

    name: ClassVar[str] = "partial"
    exact: ClassVar[bool] = False

    def chunks(self, task: Task) -> list[Chunk]:
        return [Chunk(task.cells[: len(task.cells) // 2])]

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        return torch.zeros(len(chunk))


@attrs.define
class _Short:
    """An executor that drops the last cell's value."""

    name: ClassVar[str] = "short"

    def run(self, estimator: Any, task: Task, chunks: Sequence[Chunk], *, progress: bool) -> Any:
        return LocalExecutor().run(estimator, task, chunks, progress=progress)[:-1]


def test_partial_coverage_is_rejected(gpt2):
    """An estimator that skips cells, or an executor that loses one, is a MetricError."""
    run = start(gpt2)
    task = task_of(run, compile(catalog.HEAD_OUT, run.sizes))
    with pytest.raises(MetricError, match=r"estimator 'partial' planned 4 cells for 8"):
        runner.estimate(_Partial(), LocalExecutor(), task, progress=False)
    with pytest.raises(MetricError, match=r"executor 'short' returned 7 values for 8 cells"):
        runner.estimate(BatchedEstimator(), _Short(), task, progress=False)
    clean, corrupted = prompts()
    with pytest.raises(MetricError, match="its chunks must cover every cell exactly once"):
        catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, engine=_Partial())


@attrs.frozen
class _Shuffled:
    """An estimator whose value for a cell is its flat index, in chunks of any size and order."""

    name: ClassVar[str] = "shuffled"
    exact: ClassVar[bool] = False

    def chunks(self, task: Task) -> list[Chunk]:
        rng = np.random.default_rng(0)
        cells = rng.permutation(task.cells)
        cuts = np.sort(rng.choice(np.arange(1, len(cells)), size=4, replace=False))
        return [Chunk(part) for part in np.split(cells, cuts)]

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        return torch.as_tensor(chunk.cells, dtype=torch.float32).unsqueeze(-1).repeat(1, 2)


def test_executor_keeps_task_order(gpt2):
    """LocalExecutor returns values in task.cells order whatever order the chunks come in."""
    run = start(gpt2, metrics.logit_diff(5, 7))
    grid = compile(catalog.HEAD_OUT_BY_POS, run.sizes)
    cells = np.random.default_rng(1).permutation(grid.n_cells)[:30]
    task = task_of(run, grid, cells=cells)
    got = LocalExecutor().run(_Shuffled(), task, _Shuffled().chunks(task), progress=False)
    assert got.shape == (30, 2)
    np.testing.assert_array_equal(got[:, 0].numpy(), cells)
    batched = BatchedEstimator(cells_per_batch=4)
    chunks = batched.chunks(task)
    assert len(chunks) > 2
    in_order = LocalExecutor().run(batched, task, chunks, progress=False)
    backwards = LocalExecutor().run(batched, task, chunks[::-1], progress=False)
    torch.testing.assert_close(backwards, in_order, rtol=0, atol=0)
    full, _ = execute(task_of(run, grid), ReferenceEstimator())
    torch.testing.assert_close(in_order, full[torch.as_tensor(cells)], **TOL)


# --- masks --------------------------------------------------------------------------------------
CPU = torch.device("cpu")
ORACLE_SIZES = Sizes(
    n_layers=2, n_heads=3, n_kv_heads=3, d_model=4, d_head=2, d_mlp=5, batch=2, seq=4
)


def _oracle(regions: Sequence[Region], sizes: Sizes, activation: str, layer: int) -> np.ndarray:
    """The mask of one copy at one site, by plain indexing of every region that writes there."""
    shape = sizes.shape(activation)
    want = np.zeros(shape, dtype=bool)
    for region in regions:
        if (region.activation, region.layer) != (activation, layer):
            continue
        for b in range(sizes.batch):
            picks = [[b]]
            for dim, selection in region.index:
                if selection is None:
                    picks.append(list(range(sizes.size(dim))))
                elif isinstance(selection, PerExample):
                    picks.append(list(selection.values[b]))
                else:
                    picks.append(list(selection))
            want[np.ix_(*picks)] = True
    return want


def _dense(writes: Sequence[Any], copies: int, sizes: Sizes) -> dict[tuple[str, int], np.ndarray]:
    """Dense ``[copies, *shape]`` masks per site, OR-ed over the writes at each site."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for activation, layer, _source, mask in writes:
        dense = mask.dense()
        assert dense.shape[0] == copies and dense.ndim == len(sizes.shape(activation)) + 1
        full = dense.expand(copies, *sizes.shape(activation)).numpy()
        site = (activation, layer)
        out[site] = out[site] | full if site in out else full.copy()
    return out


POSITIONS = resolve_positions(
    {"A": [1, 3], "B": [2, 2], "END": -1}, lengths={"clean": (4, 4), "corrupted": (4, 4)}
)
MASK_SPECS = [
    catalog.HEAD_OUT_BY_POS,
    catalog.HEAD_PATTERN_DEST_SRC,
    catalog.MLP_NEURON_POST.sel(neuron=[0, 4], layer=-1),
    PatchSpec("z", axes=("layer", "head")).sel(pos=[1, 3], d_head=1),
    PatchSpec("resid_pre", axes=("pos",)),  # no layer axis: every layer at once
    PatchSpec("v", axes=("layer", "kv_head")).over_sources(Zero(), Corrupted()),
    PatchSpec("resid_post", axes=("layer",)).sel(pos="A"),  # one index per prompt
    PatchSpec("q", axes=("layer", "pos")).sel(head=[0, 2]),  # swept names: per prompt
    catalog.HEAD_OUT.sel(layer=0) & catalog.RESID_MID.sel(pos=[0, -1]),
]


@pytest.mark.parametrize("spec", MASK_SPECS, ids=lambda s: s.label)
def test_part_masks_match_an_oracle(spec):
    """Vectorised masks of random cells equal masks built by hand from each cell's regions."""
    sizes = ORACLE_SIZES
    grid = compile(spec, sizes, positions=POSITIONS)
    assert grid.vectorised
    rng = np.random.default_rng(len(spec.label))
    cells = rng.choice(grid.n_cells, size=min(grid.n_cells, 9), replace=grid.n_cells < 9)
    memo: dict[Any, Any] = {}
    writes = [w for part in grid.parts for w in part_writes(grid, part, cells, sizes, CPU, memo)]
    got = _dense(writes, len(cells), sizes)
    regions = [grid.cell(int(c)).regions for c in cells]
    sites = {(r.activation, r.layer) for rs in regions for r in rs}
    assert sites <= set(got)
    for (activation, layer), mask in got.items():
        for k, cell_regions in enumerate(regions):
            want = _oracle(cell_regions, sizes, activation, layer)
            np.testing.assert_array_equal(mask[k], want, err_msg=f"{activation}@{layer} copy {k}")
    # The source each copy reads at a site is the one its regions name.
    for activation, layer, source, mask in writes:
        for k in np.flatnonzero(mask.active.numpy()):
            named = {r.source for r in regions[k] if (r.activation, r.layer) == (activation, layer)}
            assert named == {source}


def test_region_masks_match_an_oracle():
    """Masks of explicit regions equal masks built by plain indexing, per-prompt ones included."""
    sizes = ORACLE_SIZES
    z = ("z", 0)
    cells: list[tuple[Region, ...]] = [
        (Region(*z, (("pos", (1, 3)), ("head", (2,)), ("d_head", None)), Clean()),),
        (),
        (Region(*z, (("pos", PerExample(((0,), (2, 3)))), ("head", None), ("d_head", (1,))), Clean()),),
        (Region(*z, (("pos", None), ("head", None), ("d_head", None)), Clean()),),
        (
            Region(*z, (("pos", (0,)), ("head", (0,)), ("d_head", None)), Clean()),
            Region(*z, (("pos", (3,)), ("head", (1,)), ("d_head", (0,))), Clean()),
            Region("resid_pre", 1, (("pos", PerExample(((1,), (3,)))), ("d_model", None)), Clean()),
        ),
    ]
    writes = region_writes(cells, sizes, CPU)
    got = _dense(writes, len(cells), sizes)
    assert set(got) == {("z", 0), ("resid_pre", 1)}
    for (activation, layer), mask in got.items():
        for k, regions in enumerate(cells):
            np.testing.assert_array_equal(mask[k], _oracle(regions, sizes, activation, layer))


def test_a_subset_of_cells_leaves_the_rest_nan(gpt2):
    """Computing only some cells of a grid gives their exact values and NaN elsewhere."""
    from patchspec.options import RunOptions
    from patchspec.plan import compile

    clean, corrupted = prompts()
    spec = catalog.HEAD_OUT_BY_POS
    full = spec.run(gpt2, clean, corrupted, logit_diff_metric, progress=False)
    for engine in ("batched", "reference"):
        run = runner.prepare(
            gpt2, clean, corrupted, logit_diff_metric, options=RunOptions(engine=engine)
        )
        grid = run.add(compile(spec, run.sizes))
        chosen = np.asarray([5, 0, 17, 5], dtype=np.int64)
        values, *_ = runner.run_grid(run, grid, spec.label, cells=chosen)
        flat = full.values.reshape(-1)
        got = values.numpy()
        np.testing.assert_allclose(got[[0, 5, 17]], flat[[0, 5, 17]], rtol=1e-5, atol=1e-5)
        rest = np.setdiff1d(np.arange(grid.n_cells), chosen)
        assert np.isnan(got[rest]).all()
