"""Running specs: labelled results, restrictions, joint patches, and every input error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import patchspec.compat as compat
from patchspec import (
    HookError,
    InputError,
    MetricError,
    PatchSpec,
    SpecError,
    Sweep,
    catalog,
    metrics,
)
from tests.conftest import logit_diff_metric, per_example_metric

REF = {"engine": "reference", "progress": False}


@pytest.fixture(scope="module")
def cache(model, tokens):
    return model.run_with_cache(tokens[0])[1]


def test_dims_coords_and_token_labels(gpt2, tokens):
    """dims == axes, integer coordinates, token strings beside the position dim, attrs filled."""
    clean, corrupted = tokens
    result = catalog.HEAD_OUT_BY_POS.run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    assert result.dims == ("layer", "pos", "head")
    assert list(result["layer"].values) == [0, 1] and list(result["head"].values) == [0, 1, 2, 3]
    assert list(result.pos.values) == list(range(clean.shape[1]))
    expected_labels = [
        "|".join(dict.fromkeys(gpt2.tokenizer.decode([int(t)]) for t in clean[:, p])) for p in range(clean.shape[1])
    ]
    assert list(result.pos_token.values) == expected_labels
    assert result.attrs["activation"] == "z" and result.attrs["metric"] == "logit_diff_metric"
    assert result.attrs["spec"] == catalog.HEAD_OUT_BY_POS.to_dict()
    assert result.attrs["clean_baseline"] == pytest.approx(float(logit_diff_metric(gpt2(clean).detach())), rel=1e-5)
    assert result.attrs["corrupted_baseline"] == pytest.approx(float(logit_diff_metric(gpt2(corrupted).detach())), rel=1e-5)


@pytest.mark.parametrize("entry", catalog.TABLE, ids=lambda e: e.tl_function)
def test_sel_picks_the_compat_value(model, tokens, cache, entry):
    """result.sel(...) at a cell equals the drop-in tensor at the same index."""
    if entry.spec.activation == "pattern" and len(entry.spec.axes) == 4:
        pytest.skip("dest x src is covered by the compat tests; too slow to repeat here")
    clean, corrupted = tokens
    labelled = entry.spec.run(model, clean, corrupted, logit_diff_metric, **REF)
    tensor = getattr(compat, entry.tl_function)(model, corrupted, cache, logit_diff_metric, engine="reference", progress=False)
    np.testing.assert_allclose(labelled.values, tensor.numpy(), rtol=1e-5, atol=1e-6)
    point = dict(zip(labelled.dims, [labelled[d].values[-1] for d in labelled.dims], strict=True))
    assert float(labelled.sel(point)) == pytest.approx(float(tensor[tuple(-1 for _ in labelled.dims)]), rel=1e-5, abs=1e-6)


def test_restriction_is_the_sub_array(gpt2, tokens):
    """A restricted sweep equals the same cells of the full sweep; negative positions count from the end."""
    clean, corrupted = tokens
    full = catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    part = catalog.RESID_PRE.sel(layer=[1], pos=[-1, 0]).run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    last = clean.shape[1] - 1
    assert list(part.pos.values) == [last, 0]
    xr.testing.assert_allclose(part, full.sel(layer=[1], pos=[last, 0]).assign_attrs(part.attrs))


def test_restriction_of_an_unswept_dim_narrows_the_region(gpt2, tokens):
    """Heads patched at only the last position equal by-position patching at that position."""
    clean, corrupted = tokens
    last_only = catalog.HEAD_OUT.sel(pos=-1).run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    by_pos = catalog.HEAD_OUT_BY_POS.run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    np.testing.assert_allclose(last_only.values, by_pos.isel(pos=-1).values, rtol=1e-5)


def test_per_example_metric_adds_an_example_dim(gpt2, tokens):
    """A metric returning one value per prompt gives an example dim whose mean is the scalar sweep."""
    clean, corrupted = tokens
    per = catalog.RESID_PRE.run(gpt2, clean, corrupted, per_example_metric, **REF)
    mean = catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    assert per.dims == ("layer", "pos", "example")
    np.testing.assert_allclose(per.mean("example").values, mean.values, rtol=1e-5, atol=1e-6)
    assert len(per.attrs["clean_baseline"]) == clean.shape[0]


def test_joint_spec_equals_manual_hooks(gpt2, tokens):
    """Patching two heads jointly equals hand-written hooks patching both in one forward."""
    clean, corrupted = tokens
    cache = gpt2.run_with_cache(clean)[1]
    heads = catalog.HEAD_OUT.sel(layer=[0, 1], head=[1, 2])
    result = (heads & heads).run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    assert result.dims == ("layer_1", "head_1", "layer_2", "head_2")

    def manual(l1: int, h1: int, l2: int, h2: int) -> float:
        def hook(head: int, layer: int):
            def fn(act, hook):
                act = act.clone()
                act[:, :, head] = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
                return act
            return fn

        hooks = [(f"blocks.{l1}.attn.hook_z", hook(h1, l1)), (f"blocks.{l2}.attn.hook_z", hook(h2, l2))]
        return float(logit_diff_metric(gpt2.run_with_hooks(corrupted, fwd_hooks=hooks).detach()))

    for l1 in (0, 1):
        for h1 in (1, 2):
            for l2 in (0, 1):
                for h2 in (1, 2):
                    got = float(result.sel(layer_1=l1, head_1=h1, layer_2=l2, head_2=h2))
                    assert got == pytest.approx(manual(l1, h1, l2, h2), rel=1e-5, abs=1e-6)


def test_custom_rule_patches_its_region(gpt2, tokens):
    """A custom rule (a head at pos and pos-1) equals the joint patch of both positions."""
    clean, corrupted = tokens

    def head_and_previous(cell):
        return {"layer": cell["layer"], "head": cell["head"], "pos": [cell["pos"] - 1, cell["pos"]]}

    spec = PatchSpec("z", axes=("layer", "head", "pos"), restrictions={"pos": [2, 3]}, rule=head_and_previous)
    ours = spec.run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    direct = PatchSpec("z", axes=("layer", "head")).sel(pos=[1, 2]).run(gpt2, clean, corrupted, logit_diff_metric, **REF)
    np.testing.assert_allclose(ours.sel(pos=2).values, direct.values, rtol=1e-5)


def test_sweep_returns_one_variable_per_spec(qwen2, tokens):
    """A Sweep gives a Dataset; key/value heads keep their own dim on a grouped-query model."""
    clean, corrupted = tokens
    ds = catalog.HEAD_ALL_POS_EVERY.run(qwen2, clean, corrupted, logit_diff_metric, **REF)
    assert list(ds.data_vars) == ["head_out", "head_q", "head_k", "head_v", "head_pattern"]
    assert ds["head_k"].dims == ("layer", "kv_head") and ds.sizes["kv_head"] == 2 and ds.sizes["head"] == 4
    assert not np.isnan(ds["head_out"].values).any()


def test_sweep_names_must_differ():
    """Two specs with one name cannot share a Dataset."""
    with pytest.raises(SpecError, match=r"distinct names; \['resid_pre'\] repeat"):
        Sweep(catalog.RESID_PRE, catalog.RESID_PRE)


def test_builtin_metrics_match_hand_computation(gpt2, tokens):
    """Built-in metrics equal the same quantity computed by hand on the baselines."""
    clean, corrupted = tokens
    logits = gpt2(corrupted).detach()
    cases = {
        "logit_diff": (metrics.logit_diff(5, 7), (logits[:, -1, 5] - logits[:, -1, 7]).mean()),
        "logprob": (metrics.logprob(5), logits[:, -1].log_softmax(-1)[:, 5].mean()),
        "prob": (metrics.prob(5), logits[:, -1].softmax(-1)[:, 5].mean()),
        "loss": (metrics.loss(), torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), corrupted[:, 1:].flatten())),
    }
    for name, (metric, expected) in cases.items():
        result = catalog.RESID_PRE.sel(layer=0, pos=0).run(gpt2, clean, corrupted, metric, **REF)
        assert result.name == name
        assert result.attrs["corrupted_baseline"] == pytest.approx(float(expected), rel=1e-5), name
    kl = catalog.RESID_PRE.sel(layer=0, pos=0).run(gpt2, clean, corrupted, metrics.kl_to_clean(), **REF)
    assert kl.attrs["clean_baseline"] == pytest.approx(0.0, abs=1e-6)


def test_string_prompts_and_answer_strings(gpt2):
    """Prompts and answers may be strings; tokens come from the model's tokenizer."""
    result = catalog.RESID_PRE.run(gpt2, "w1 w2 w3 w4", "w5 w6 w7 w4", metrics.logit_diff("w2", "w6"), **REF)
    assert list(result.pos_token.values)[-4:] == ["w1", "w2", "w3", "w4"]


# --- errors ------------------------------------------------------------------------------


def test_training_mode_is_refused(gpt2, tokens):
    """A model in training mode is a clear error before any forward pass."""
    gpt2.train()
    try:
        with pytest.raises(InputError, match=r"evaluation mode; found training mode at .*Call model.eval\(\)"):
            catalog.RESID_PRE.run(gpt2, *tokens, logit_diff_metric, **REF)
    finally:
        gpt2.eval()


def test_mismatched_inputs(gpt2, tokens):
    """Clean and corrupted of different shapes are named with both shapes."""
    clean, corrupted = tokens
    with pytest.raises(InputError, match=r"same shape, got clean \(2, 6\) and corrupted \(2, 5\)"):
        catalog.RESID_PRE.run(gpt2, clean, corrupted[:, :5], logit_diff_metric, **REF)
    with pytest.raises(InputError, match="tokens must be integers"):
        catalog.RESID_PRE.run(gpt2, clean.float(), corrupted, logit_diff_metric, **REF)


def test_restriction_out_of_range(gpt2, tokens):
    """A restriction outside the model's range names the dim, the range and where it comes from."""
    with pytest.raises(SpecError, match=r"restriction layer=5 .* outside the valid range -2\.\.1 \(layer has 2 entries: model.cfg.n_layers\)"):
        catalog.RESID_PRE.sel(layer=5).run(gpt2, *tokens, logit_diff_metric, **REF)
    with pytest.raises(SpecError, match=r"restriction head=4 .*head has 4 entries: model.cfg.n_heads"):
        catalog.HEAD_OUT.sel(head=4).run(gpt2, *tokens, logit_diff_metric, **REF)


def test_rule_output_that_does_not_fit(gpt2, tokens):
    """A custom rule returning an unknown dim or an index out of range is named with its cell."""
    bad_dim = PatchSpec("z", axes=("layer",), rule=lambda c: {"heads": 0})
    with pytest.raises(SpecError, match=r"rule of spec .* returned dim 'heads' for cell \{'layer': 0\}"):
        bad_dim.run(gpt2, *tokens, logit_diff_metric, **REF)
    bad_index = PatchSpec("z", axes=("layer",), rule=lambda c: {"head": 9})
    with pytest.raises(SpecError, match=r"rule output for cell \{'layer': 0\}: head=9 .*outside the valid range"):
        bad_index.run(gpt2, *tokens, logit_diff_metric, **REF)


def test_metric_errors(gpt2, tokens):
    """A metric of the wrong shape or with a non-finite value is named with the cell."""
    with pytest.raises(MetricError, match=r"returned shape \(2, 6\) at the clean baseline"):
        catalog.RESID_PRE.run(gpt2, *tokens, lambda logits: logits[..., 0], **REF)
    calls = {"n": 0}

    def explodes(logits):
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] > 2 else 1.0)

    with pytest.raises(MetricError, match=r"non-finite value nan at layer=0, pos=0"):
        catalog.RESID_PRE.run(gpt2, *tokens, explodes, **REF)


def test_gated_and_missing_hooks(tmp_path, tokens, monkeypatch):
    """A gated hook names the flag to set; a hook the model lacks is named too."""
    from tests.models import build

    model = build("gpt2", tmp_path)
    spec = PatchSpec("result", axes=("layer", "head"))
    with pytest.raises(HookError, match=r"hook 'blocks.0.attn.hook_result' is gated: call model.set_use_attn_result\(True\)"):
        spec.run(model, *tokens, logit_diff_metric, **REF)
    model.set_use_attn_result(True)
    by_result = spec.run(model, *tokens, logit_diff_metric, **REF)
    by_z = catalog.HEAD_OUT.run(model, *tokens, logit_diff_metric, **REF)
    np.testing.assert_allclose(by_result.values, by_z.values, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(type(model), "hook_dict", property(lambda self: {}))
    with pytest.raises(HookError, match=r"the model has no hook point 'blocks.0.attn.hook_result'"):
        spec.run(model, *tokens, logit_diff_metric, **REF)


def test_a_hook_that_never_fires_raises(gpt2, tokens, monkeypatch):
    """If a registered patch hook does not fire, the sweep fails naming the hook."""
    original = gpt2.run_with_hooks

    def drop_hooks(tokens, fwd_hooks=(), **kwargs):
        return original(tokens, fwd_hooks=[], **kwargs)

    monkeypatch.setattr(gpt2, "run_with_hooks", drop_hooks)
    with pytest.raises(HookError, match=r"hook 'blocks.0.hook_resid_pre' fired 0 times"):
        catalog.RESID_PRE.run(gpt2, *tokens, logit_diff_metric, **REF)


def test_unknown_engine(gpt2, tokens):
    """An unknown engine name lists the valid ones."""
    from patchspec import PatchSpecError

    with pytest.raises(PatchSpecError, match=r"unknown engine 'fast'; valid engines are batched, reference"):
        catalog.RESID_PRE.run(gpt2, *tokens, logit_diff_metric, engine="fast")
