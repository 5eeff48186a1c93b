"""compat's direct path functions against TransformerLens 4.3's, multi-head and grouped-query."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl

import patchspec.compat as compat
from patchspec import PatchSpecError
from tests.conftest import logit_diff_metric


@pytest.fixture(scope="module")
def caches(model, tokens):
    clean, corrupted = tokens
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)
    return model, corrupted, clean_cache, corrupted_cache


def _components(model):
    return ["q", "k", "v"] if model.cfg.n_key_value_heads in (None, model.cfg.n_heads) else ["q"]


def test_all_sources_match_transformer_lens(caches):
    """All-sources direct paths equal TransformerLens's tensor (shape, dtype, 0.0 rows) to 1e-5."""
    model, corrupted, clean_cache, corrupted_cache = caches
    for component in _components(model):
        expected = tl.get_act_patch_direct_path_all_sources(
            model,
            corrupted,
            clean_cache,
            corrupted_cache,
            logit_diff_metric,
            component=component,
            verbose=False,
        )
        got = compat.get_act_patch_direct_path_all_sources(
            model, corrupted, clean_cache, corrupted_cache, logit_diff_metric, component=component
        )
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got[1, :, :2] == 0).all()  # rows dl <= sl are TransformerLens's placeholders


def test_one_source_matches_transformer_lens(caches):
    """One source head, as TransformerLens, and the caller's split-input flags are left as they were."""
    model, corrupted, clean_cache, corrupted_cache = caches
    before = (model.cfg.use_split_qkv_input, model.cfg.use_attn_in)
    expected = tl.get_act_patch_direct_path(
        model, corrupted, clean_cache, corrupted_cache, logit_diff_metric, 0, 2, verbose=False
    )
    got = compat.get_act_patch_direct_path(
        model, corrupted, clean_cache, corrupted_cache, logit_diff_metric, 0, 2
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (model.cfg.use_split_qkv_input, model.cfg.use_attn_in) == before


def test_grouped_query_keys_and_values(qwen2, tokens):
    """k/v on a grouped-query model, which TransformerLens refuses: one column per key/value
    head, equal to patching that key/value input by hand."""
    clean, corrupted = tokens
    _, clean_cache = qwen2.run_with_cache(clean)
    _, corrupted_cache = qwen2.run_with_cache(corrupted)
    with pytest.raises(ValueError, match="GQA"):
        tl.get_act_patch_direct_path(
            qwen2, corrupted, clean_cache, corrupted_cache, logit_diff_metric, 0, 0, "k"
        )
    got = compat.get_act_patch_direct_path(
        qwen2, corrupted, clean_cache, corrupted_cache, logit_diff_metric, 0, 3, "v"
    )
    assert got.shape == (2, 2)
    w_o = qwen2.blocks[0].attn.W_O[3]
    delta = (
        clean_cache["blocks.0.attn.hook_z"][:, :, 3]
        - corrupted_cache["blocks.0.attn.hook_z"][:, :, 3]
    ) @ w_o

    def hook(act, hook):
        act = act.clone()
        act[:, :, 1] += delta
        return act

    qwen2.set_use_split_qkv_input(True)
    try:
        logits = qwen2.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_v_input", hook)])
    finally:
        qwen2.set_use_split_qkv_input(False)
    torch.testing.assert_close(got[1, 1], logit_diff_metric(logits), rtol=1e-5, atol=1e-5)
    assert (got[0] == 0).all()


def test_bad_arguments(gpt2, tokens):
    """A misspelt component, a head out of range and a patchspec metric are clear errors."""
    clean, corrupted = tokens
    _, cache = gpt2.run_with_cache(clean)
    with pytest.raises(PatchSpecError, match="component must be one of 'q', 'k', 'v', got 'key'"):
        compat.get_act_patch_direct_path(
            gpt2, corrupted, cache, cache, logit_diff_metric, 0, 0, "key"
        )
    with pytest.raises(PatchSpecError, match=r"src_head must be in 0..3, got 7"):
        compat.get_act_patch_direct_path(gpt2, corrupted, cache, cache, logit_diff_metric, 0, 7)
    gpt2.train()
    try:
        with pytest.raises(PatchSpecError, match="evaluation mode"):
            compat.get_act_patch_direct_path(gpt2, corrupted, cache, cache, logit_diff_metric, 0, 0)
    finally:
        gpt2.eval()
    with pytest.raises(PatchSpecError, match="callable"):
        compat.get_act_patch_direct_path(gpt2, corrupted, cache, cache, "logit_diff", 0, 0)


def test_per_head_inputs_route_matches(caches, monkeypatch):
    """Forcing the gated per-head inputs (instead of the checked projection) gives the same
    numbers, restores the caller's flags, and by default those flags are never touched."""
    from patchspec.paths import engine

    model, corrupted, clean_cache, corrupted_cache = caches
    expected = tl.get_act_patch_direct_path_all_sources(
        model, corrupted, clean_cache, corrupted_cache, logit_diff_metric, verbose=False
    )
    calls = []
    original = model.set_use_split_qkv_input
    monkeypatch.setattr(
        model, "set_use_split_qkv_input", lambda flag: calls.append(flag) or original(flag)
    )
    compat.get_act_patch_direct_path_all_sources(
        model, corrupted, clean_cache, corrupted_cache, logit_diff_metric
    )
    assert calls == []
    monkeypatch.setattr(engine, "PROJECT", False)
    got = compat.get_act_patch_direct_path_all_sources(
        model, corrupted, clean_cache, corrupted_cache, logit_diff_metric
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == [True, False] and not model.cfg.use_split_qkv_input
