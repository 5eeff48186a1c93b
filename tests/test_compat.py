"""patchspec.compat against transformer_lens.patching itself, on multi-head and GQA models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl

import patchspec.compat as compat
from patchspec import PatchSpecError, catalog
from patchspec import metrics as ps_metrics
from tests.conftest import logit_diff_metric, per_example_metric

pytestmark = pytest.mark.slow

ALL_FUNCTIONS = [entry.tl_function for entry in catalog.TABLE] + [s.tl_function for s in catalog.STACKS]
# TransformerLens 4.3's resid_mid is the second norm's input, not the residual stream (see compat).
MATCHING = [name for name in ALL_FUNCTIONS if name != "get_act_patch_resid_mid"]
ENGINES = ["reference", "batched"]


@pytest.fixture(scope="module")
def setup(model, tokens):
    clean, corrupted = tokens
    _, cache = model.run_with_cache(clean)
    return model, corrupted, cache


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", MATCHING)
def test_matches_transformer_lens(setup, name, engine):
    """Each drop-in returns TransformerLens's tensor, same shape, to 1e-5."""
    model, corrupted, cache = setup
    expected = getattr(tl, name)(model, corrupted, cache, logit_diff_metric)
    got = getattr(compat, name)(model, corrupted, cache, logit_diff_metric, engine=engine, progress=False)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_function_of_transformer_lens_is_here():
    """Every public patching function of TransformerLens has a twin of the same name."""
    wanted = [n for n in dir(tl) if n.startswith("get_act_patch")]
    wanted += ["generic_activation_patch", "make_df_from_ranges", "PatchingResult"]
    wanted += [n for n in dir(tl) if n.endswith("_patch_setter")]
    missing = [n for n in wanted if not hasattr(compat, n)]
    assert not missing


def test_resid_mid_semantics(setup, tokens):
    """TL 4.3's resid_mid equals its mlp_out; ours patches the residual and restores the clean run."""
    model, corrupted, cache = setup
    tl_mid = tl.get_act_patch_resid_mid(model, corrupted, cache, logit_diff_metric)
    tl_mlp = tl.get_act_patch_mlp_out(model, corrupted, cache, logit_diff_metric)
    torch.testing.assert_close(tl_mid, tl_mlp)
    ours = compat.get_act_patch_resid_mid(model, corrupted, cache, logit_diff_metric, progress=False)
    assert not torch.allclose(ours, tl_mid)
    clean_value = logit_diff_metric(model(tokens[0]))
    whole = catalog.RESID_MID.over("layer").run(model, tokens[0], corrupted, logit_diff_metric)
    torch.testing.assert_close(torch.tensor(whole.values), clean_value.expand(2).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_per_example_and_baseline(setup, reduce):
    """reduce=/baseline= give TransformerLens's PatchingResult with the same values."""
    model, corrupted, cache = setup
    expected = tl.get_act_patch_attn_head_out_all_pos(
        model, corrupted, cache, per_example_metric, reduce=reduce, baseline=True
    )
    got = compat.get_act_patch_attn_head_out_all_pos(
        model, corrupted, cache, per_example_metric, reduce=reduce, baseline=True, progress=False
    )
    assert isinstance(got, tl.PatchingResult)
    torch.testing.assert_close(got.values, expected.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.baseline, expected.baseline, rtol=1e-5, atol=1e-5)
    assert got.axis_names == expected.axis_names


def test_every_stack_with_result(setup):
    """*_every helpers stack PatchingResults on patch_type exactly like TransformerLens."""
    model, corrupted, cache = setup
    expected = tl.get_act_patch_attn_head_by_pos_every(model, corrupted, cache, per_example_metric, reduce="none")
    got = compat.get_act_patch_attn_head_by_pos_every(
        model, corrupted, cache, per_example_metric, reduce="none", progress=False
    )
    torch.testing.assert_close(got.values, expected.values, rtol=1e-5, atol=1e-5)
    assert got.patch_type_names == expected.patch_type_names


def test_metric_mapping(setup):
    """A mapping of metrics gives a leading metric axis, as in TransformerLens."""
    model, corrupted, cache = setup
    metrics = {"a": logit_diff_metric, "b": lambda logits: logits[:, -1].logsumexp(-1).mean()}
    expected = tl.get_act_patch_resid_pre(model, corrupted, cache, metrics)
    got = compat.get_act_patch_resid_pre(model, corrupted, cache, metrics, progress=False)
    torch.testing.assert_close(got.values, expected.values, rtol=1e-5, atol=1e-5)
    assert got.metric_names == ["a", "b"]


def test_index_df_and_return_index_df(setup):
    """Explicit index rows give TransformerLens's flat output; the index frame comes back."""
    model, corrupted, cache = setup
    frame = pd.DataFrame({"layer": [1, 0, 1], "pos": [5, 2, 0], "head": [3, 1, 0]})
    expected = tl.generic_activation_patch(
        model, corrupted, cache, logit_diff_metric, tl.layer_pos_head_vector_patch_setter, "z", index_df=frame
    )
    got = compat.generic_activation_patch(
        model, corrupted, cache, logit_diff_metric, compat.layer_pos_head_vector_patch_setter, "z",
        index_df=frame, progress=False,
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tensor, df = compat.get_act_patch_resid_pre(model, corrupted, cache, logit_diff_metric, return_index_df=True, progress=False)
    assert list(df.columns) == ["layer", "pos"] and len(df) == tensor.numel()


def test_custom_patch_setter(setup):
    """A user's own setter callable works and matches TransformerLens."""
    model, corrupted, cache = setup

    def half_patch(act, index, clean):
        _layer, pos = index
        act[:, pos] = 0.5 * clean[:, pos] + 0.5 * act[:, pos]
        return act

    expected = tl.generic_activation_patch(
        model, corrupted, cache, logit_diff_metric, half_patch, "resid_pre", index_axis_names=("layer", "pos")
    )
    got = compat.generic_activation_patch(
        model, corrupted, cache, logit_diff_metric, half_patch, "resid_pre",
        index_axis_names=("layer", "pos"), progress=False,
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_docstrings_are_generated_and_name_dims():
    """Every drop-in's docstring is generated from the catalogue and names its result dims."""
    for entry in catalog.TABLE:
        doc = getattr(compat, entry.tl_function).__doc__
        assert f"result dims: {', '.join(entry.spec.axes)}" in doc
        assert entry.tl_function in doc
    for stack in catalog.STACKS:
        assert "patch_type" in getattr(compat, stack.tl_function).__doc__


def test_bad_reduce_and_metric_shape(setup):
    """Bad reduce and a metric of the wrong shape are clear errors."""
    model, corrupted, cache = setup
    with pytest.raises(PatchSpecError, match="reduce must be one of"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, logit_diff_metric, reduce="sum")
    with pytest.raises(PatchSpecError, match=r"must return a scalar under reduce='scalar', got shape \(2,\)"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, per_example_metric, progress=False)
    with pytest.raises(PatchSpecError, match=r"patching_metric 'metric' is a patchspec Metric; .* catalog"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, ps_metrics.logit_diff(5, 7))
    with pytest.raises(PatchSpecError, match=r"patching_metric 'ld' is int"):
        compat.get_act_patch_resid_pre(model, corrupted, cache, {"ld": 3})
