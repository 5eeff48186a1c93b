"""compat's fast path: position-restricted unembedding of TransformerLens metrics (against
transformer_lens.patching, on the fast path and the full-logit fallback), one unpatched run
per sweep, and no host syncs in the chunk loop."""

from __future__ import annotations

import logging

import pytest
import torch
import transformer_lens.patching as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import patchspec.compat as compat
from patchspec import MetricError, PatchSpecError, catalog
from patchspec import metrics as ps_metrics
from patchspec.execute.batched import BatchedEstimator
from tests.conftest import logit_diff_metric
from tests.syncguard import counting


def last_two(logits: torch.Tensor) -> torch.Tensor:
    """Reads positions 2 and -1."""
    return (logits[:, 2, 5] - logits[:, -1, 7]).mean()


def every_position(logits: torch.Tensor) -> torch.Tensor:
    """Reads every position (a next-token loss of token 5)."""
    return -logits.log_softmax(-1)[:, :, 5].mean()


def thresholded(logits: torch.Tensor) -> torch.Tensor:
    """Reads position 0 only where a logit there is huge: no arithmetic path from position 0
    unless it is, so only the +M probe sees the read."""
    return torch.where(logits[:, 0, 5].abs() > 1e30, logits[:, 0, 5], logits[:, -1, 5]).mean()


@pytest.fixture(scope="module")
def setup(model, tokens):
    clean, corrupted = tokens
    _, cache = model.run_with_cache(clean)
    return model, corrupted, cache


CASES = [
    ("get_act_patch_resid_pre", logit_diff_metric, (5,)),
    ("get_act_patch_attn_head_out_by_pos", last_two, (2, 5)),
    ("get_act_patch_attn_head_v_by_pos", logit_diff_metric, (5,)),
    ("get_act_patch_mlp_out", every_position, None),
    ("get_act_patch_attn_out", thresholded, None),
]


@pytest.mark.parametrize(("name", "metric", "held"), CASES, ids=[f"{c[0][14:]}-{c[1].__name__}" for c in CASES])
def test_fast_path_and_fallback_match_transformer_lens(setup, name, metric, held):
    """Each drop-in equals TransformerLens to 1e-5, unembedding only what the metric reads."""
    model, corrupted, cache = setup
    assert compat.metric_positions(metric, model(corrupted)) == held
    seen: list[torch.Tensor] = []

    def spy(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits)
        return metric(logits)

    expected = getattr(tl, name)(model, corrupted, cache, metric)
    got = getattr(compat, name)(model, corrupted, cache, spy, progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    patched = seen[-1]  # the last cell's logits, shaped as TransformerLens gives them
    assert patched.shape == (corrupted.shape[0], corrupted.shape[1], model.cfg.d_vocab)
    others = [p for p in range(corrupted.shape[1]) if held is not None and p not in held]
    assert bool(patched[:, others].isnan().all()) and not bool(patched[:, list(held or [])].isnan().any())


def test_explicit_positions_and_all(setup):
    """metric_positions= a list is trusted; 'all' unembeds everything; both equal TL."""
    model, corrupted, cache = setup
    expected = tl.get_act_patch_resid_pre(model, corrupted, cache, last_two)
    for positions in ([2, -1], "all"):
        got = compat.get_act_patch_resid_pre(
            model, corrupted, cache, last_two, progress=False, metric_positions=positions
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wrong_explicit_positions_fall_back(setup, caplog):
    """A metric that reads a position it was not given fails on NaN: the sweep reruns in full."""
    model, corrupted, cache = setup
    expected = tl.get_act_patch_resid_pre(model, corrupted, cache, last_two)
    with caplog.at_level(logging.INFO, logger="patchspec.compat"):
        got = compat.get_act_patch_resid_pre(
            model, corrupted, cache, last_two, progress=False, metric_positions=[-1]
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "running resid_pre again with every position unembedded" in caplog.text


def test_bad_metric_positions(setup):
    """A bad metric_positions is refused before any pass, naming it."""
    model, corrupted, cache = setup
    with pytest.raises(PatchSpecError, match=r"got 'alll'; did you mean 'all'"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, last_two, metric_positions="alll")
    with pytest.raises(PatchSpecError, match=r"non-empty list of int positions .* got \[1.5\]"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, last_two, metric_positions=[1.5])
    with pytest.raises(PatchSpecError, match=r"position 9, outside the 6 positions"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, last_two, metric_positions=[9])


def test_probe_refuses_what_it_cannot_tell():
    """Non-deterministic, mutating, non-finite and all-position metrics read every position."""
    logits = torch.randn(2, 4, 6)
    assert compat.metric_positions(lambda x: x[:, -1, 0].mean() + torch.rand(()), logits) is None
    assert compat.metric_positions(lambda x: x.mul_(1)[:, -1, 0].mean(), logits) is None
    assert compat.metric_positions(lambda x: x[:, -1, 0].mean() / 0, logits) is None
    assert compat.metric_positions(lambda x: x.argmax(1).float().mean(), logits) is None
    assert compat.metric_positions(lambda x: (x[:, 1] > 0).float().mean() + x[:, -1, 0].mean(), logits) == (1, 3)


def test_mapping_and_per_example(setup):
    """A metric mapping and reduce='none' take the fast path too and equal TL."""
    model, corrupted, cache = setup
    metrics = {"ld": logit_diff_metric, "two": last_two}
    expected = tl.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metrics, baseline=True)
    got = compat.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metrics, baseline=True, progress=False)
    torch.testing.assert_close(got.values, expected.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.baseline, expected.baseline, rtol=1e-5, atol=1e-5)


def test_unpatched_run_once_per_sweep(gpt2, tokens):
    """A *_every stack runs the unpatched corrupted pass once for all its entries (TL's model
    forward runs the embedding; replayed passes start after it)."""
    clean, corrupted = tokens
    _, cache = gpt2.run_with_cache(clean)
    calls = []
    handle = gpt2.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        compat.get_act_patch_block_every(gpt2, corrupted, cache, logit_diff_metric, progress=False)
        stacked = len(calls)
        calls.clear()
        compat.get_act_patch_resid_pre(gpt2, corrupted, cache, logit_diff_metric, progress=False)
        single = len(calls)
    finally:
        handle.remove()
    assert stacked == single == 1


def _guarded(monkeypatch):
    """Count host reads inside the batched estimator's chunks only."""
    guard = counting(monkeypatch)
    syncs = guard.__enter__()
    original = BatchedEstimator.estimate

    def estimate(self, task, chunk):
        syncs.active = True
        try:
            return original(self, task, chunk)
        finally:
            syncs.active = False

    monkeypatch.setattr(BatchedEstimator, "estimate", estimate)
    return syncs


METRICS = {
    "rowwise": ps_metrics.logit_diff(5, 7),
    "plain": logit_diff_metric,
    "loss": ps_metrics.loss(),
    "kl": ps_metrics.kl_to_clean(),
    "many": [ps_metrics.prob(5, reduce="none"), ps_metrics.logit_diff(5, 7, reduce="none")],
}


@pytest.mark.parametrize("kind", list(METRICS))
def test_no_host_sync_in_the_chunk_loop(monkeypatch, gpt2, tokens, kind):
    """Nothing in a chunk reads the device: no item/bool/tolist/cpu/nonzero (the values are
    read once per chunk by the executor)."""
    syncs = _guarded(monkeypatch)
    catalog.HEAD_OUT_BY_POS.run(gpt2, *tokens, METRICS[kind])
    assert syncs.seen == []


def test_no_host_sync_in_compat_chunks(monkeypatch, qwen2, tokens):
    """The drop-ins' chunks (per-cell TL metric calls included) do not read the device."""
    clean, corrupted = tokens
    _, cache = qwen2.run_with_cache(clean)
    syncs = _guarded(monkeypatch)
    compat.get_act_patch_attn_head_out_by_pos(qwen2, corrupted, cache, logit_diff_metric, progress=False)
    assert syncs.seen == []


def test_the_guard_sees_syncs(monkeypatch):
    """The guard is not vacuous: the reads it patches are counted."""
    with counting(monkeypatch) as syncs:
        syncs.active = True
        x = torch.ones(3)
        bool(x.any()), x.sum().item(), x.tolist(), x.nonzero(), float(x[0])
        syncs.active = False
    assert [s.split(" ")[0] for s in syncs.seen] == ["__bool__", "item", "tolist", "nonzero", "__float__"]


def test_deferred_non_finite_names_the_cell(gpt2, tokens):
    """With the check on the chunk's host copy, a non-finite value still names its cell."""
    calls = {"n": 0}

    def explodes(logits):
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] > 2 else 1.0)

    # Chunks as the model's own blocks cut them (the fakes depend on the order and rows of chunks).
    from patchspec.execute import BatchedEstimator

    with pytest.raises(MetricError, match=r"non-finite value nan at layer=0, pos=0"):
        catalog.RESID_PRE.run(gpt2, *tokens, explodes, engine=BatchedEstimator(lean=False))

    def rowwise(logits, ctx):
        rows = ps_metrics.at(logits, -1, ctx)[:, 5].float()
        return torch.where(torch.arange(rows.shape[0]) >= 2 * 3, float("inf"), rows)

    metric = ps_metrics.Metric("row", rowwise, (-1,), rowwise=True)
    with pytest.raises(MetricError, match=r"'row' returned a non-finite value inf at layer=0, pos=3"):
        catalog.RESID_PRE.run(gpt2, *tokens, metric, engine=BatchedEstimator(lean=False))


@settings(max_examples=6, deadline=None)
@given(
    positions=st.lists(st.integers(-6, 5), min_size=1, max_size=3),
    token=st.integers(3, 40),
    per_prompt=st.booleans(),
)
def test_fast_equals_reference_property(qwen2, tokens, positions, token, per_prompt):
    """For metrics reading any set of positions (per prompt or shared), the probed fast path
    finds exactly those positions and equals the reference engine on full logits."""
    clean, corrupted = tokens
    _, cache = qwen2.run_with_cache(clean)
    read = sorted({p % 6 for p in positions})

    def metric(logits):
        if per_prompt:  # prompt b reads position read[b % len(read)]
            at = torch.tensor([read[b % len(read)] for b in range(logits.shape[0])])
            return logits[torch.arange(logits.shape[0]), at, token].mean()
        return logits[:, positions, token].sum(1).mean()

    wanted = sorted({read[b % len(read)] for b in range(2)}) if per_prompt else read
    assert compat.metric_positions(metric, qwen2(corrupted)) == (None if len(wanted) == 6 else tuple(wanted))
    fast = compat.get_act_patch_resid_pre(qwen2, corrupted, cache, metric, progress=False)
    oracle = compat.get_act_patch_resid_pre(
        qwen2, corrupted, cache, metric, progress=False, engine="reference", metric_positions="all"
    )
    torch.testing.assert_close(fast, oracle, rtol=1e-5, atol=1e-5)
