"""Attribution patching (AtP, integrated gradients) and exact verification of estimates."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats

import patchspec as ps
from patchspec import catalog, metrics
from patchspec.attribution.verify import clopper_pearson_upper, verify
from patchspec.errors import InputError, MetricError, OptionError
from patchspec.sources import Source
from patchspec.tiny import tiny_model
from tests.models import VOCAB, build, prompts

LD = metrics.logit_diff(5, 7)
LD_EACH = metrics.logit_diff(5, 7, reduce="none")


def effect(array: xr.DataArray) -> np.ndarray:
    """Values minus the receiving run's baseline (per example when the metric is)."""
    base = np.asarray(array.attrs[f"{array.attrs['receiver']}_baseline"])
    return np.asarray(array.values) - base


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """GPT-2 and Qwen2 (grouped-query) models whose final norm is the identity, so a logit
    difference is linear in the last layer's MLP post-activations and output residual; and
    the same models with the last MLP's output weights zeroed too, so it is linear in the last
    layer's head outputs, values and attention pattern as well."""
    out = {}
    for kind in ("gpt2", "qwen2"):
        for variant in ("post", "attention"):
            model = build(kind, tmp_path_factory.mktemp(f"linear-{kind}-{variant}"))
            # (object.__setattr__: the bridge forwards attribute writes to the wrapped module)
            object.__setattr__(model.ln_final, "forward", lambda x, *args, **kwargs: x)
            if variant == "attention":
                with torch.no_grad():
                    for name, p in model.blocks[1].mlp.named_parameters():
                        if "c_proj" in name or "down_proj" in name:
                            p.zero_()
            out[kind, variant] = model
    return out


LAST_LAYER = [
    (catalog.HEAD_OUT_BY_POS.sel(layer=1), "attention"),
    (catalog.HEAD_V_BY_POS.sel(layer=1), "attention"),
    (catalog.HEAD_PATTERN_DEST_SRC.sel(layer=1), "attention"),
    (catalog.RESID_MID.sel(layer=1), "attention"),
    (
        ps.PatchSpec(
            "post", axes=("layer", "pos", "neuron"), restrictions={"layer": 1, "neuron": [0, 3, 7]}
        ),
        "post",
    ),
    (catalog.RESID_POST.sel(layer=1), "post"),
    (catalog.MLP_OUT.sel(layer=1), "post"),
]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
@pytest.mark.parametrize(("spec", "variant"), LAST_LAYER, ids=lambda v: getattr(v, "label", v))
def test_atp_equals_exact_where_the_metric_is_linear(linear, kind, spec, variant):
    """Where the metric is linear in the patched activation, AtP is exact (to 1e-5)."""
    model = linear[kind, variant]
    clean, corrupted = prompts()
    exact = spec.run(model, clean, corrupted, LD_EACH, progress=False)
    atp = spec.run(model, clean, corrupted, LD_EACH, estimator="atp", progress=False)
    assert atp.dims == exact.dims and atp.shape == exact.shape
    np.testing.assert_allclose(atp.values, exact.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "source",
    [ps.Corrupted(), ps.Zero(), ps.Mean(receiver="corrupted"), ps.Resample(receiver="corrupted")],
    ids=lambda s: s.kind,
)
def test_direction_and_ablations_follow_the_source(linear, source):
    """Noising and ablations use their own values: still exact where the metric is linear."""
    model = linear["gpt2", "attention"]
    clean, corrupted = prompts(n=3)
    spec = attrs.evolve(catalog.HEAD_OUT_BY_POS.sel(layer=1), source=source)
    exact = spec.run(model, clean, corrupted, LD, progress=False)
    atp = spec.run(model, clean, corrupted, LD, estimator="atp", progress=False)
    assert atp.attrs["receiver"] == exact.attrs["receiver"] == source.receiver
    np.testing.assert_allclose(atp.values, exact.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
@pytest.mark.parametrize(
    "source",
    [ps.Subspace("B", strength=0.7), ps.Add("d", coef=2.0), ps.Subspace("B", donor="corrupted")],
    ids=lambda s: f"{s.kind}-{s.receiver}",
)
def test_functional_sources_are_linearised_at_what_they_write(linear, kind, source):
    """Subspace and Add write a function of the receiving activation: AtP linearises that
    written value (not the raw donor), so it is still exact where the metric is linear."""
    model = linear[kind, "attention"]
    clean, corrupted = prompts(n=3)
    width = model.cfg.d_model
    generator = torch.Generator().manual_seed(0)
    tensors = {"B": torch.randn(width, 3, generator=generator), "d": torch.randn(width, generator=generator)}
    spec = attrs.evolve(catalog.RESID_MID.sel(layer=1), source=source)
    exact = spec.run(model, clean, corrupted, LD, tensors=tensors, progress=False)
    atp = spec.run(model, clean, corrupted, LD, tensors=tensors, estimator="atp", progress=False)
    assert atp.attrs["tensors"] == exact.attrs["tensors"]
    assert np.abs(effect(exact)).max() > 1e-4  # the patch does something
    np.testing.assert_allclose(atp.values, exact.values, rtol=1e-5, atol=1e-5)


def test_attrs_and_coords_match_the_exact_result(gpt2):
    """Same dims, coords and attrs as the exact result, but estimator and exact."""
    clean, corrupted = prompts()
    spec = catalog.HEAD_OUT_BY_POS
    exact = spec.run(gpt2, clean, corrupted, LD_EACH, progress=False)
    atp = spec.run(gpt2, clean, corrupted, LD_EACH, estimator="atp", progress=False)
    xr.testing.assert_identical(atp.coords.to_dataset(), exact.coords.to_dataset())
    assert atp.attrs["estimator"] == "atp" and atp.attrs["exact"] is False
    assert exact.attrs["exact"] is True
    differ = {k for k in exact.attrs if exact.attrs[k] != atp.attrs[k]}
    assert differ == {"estimator", "engine", "exact"}
    assert "example" in (exact - atp).dims


@attrs.frozen
class Blend(Source):
    """The corrupted activation moved a fraction ``eps`` of the way to the clean one."""

    kind = "blend_test"
    eps: float = 0.1

    def values(self, hook_name, runs):
        old = runs.activation("corrupted", hook_name)
        return old + self.eps * (runs.activation("clean", hook_name) - old)

    def needs(self):
        return ("clean", "corrupted")


def test_first_order_error_shrinks_quadratically(gpt2):
    """For a patch a fraction eps of the way to clean, |exact - AtP| falls as eps**2."""
    clean, corrupted = prompts()
    errors = []
    for eps in (0.4, 0.2, 0.1):
        spec = attrs.evolve(catalog.RESID_PRE.sel(layer=0), source=Blend(eps=eps))
        exact = spec.run(gpt2, clean, corrupted, LD, engine="reference", progress=False)
        atp = spec.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False)
        errors.append(float(np.abs(exact.values - atp.values).max()))
    ratios = [errors[i + 1] / errors[i] for i in range(2)]
    assert all(0.15 < r < 0.35 for r in ratios), (errors, ratios)


def test_node_atp_equals_transformer_lens(gpt2):
    """Head-output and MLP-output nodes equal TL 4.3's attribution_patch (denoising, averaged)."""
    from transformer_lens.tools.analysis import attribution_patch

    clean, corrupted = prompts(n=3)

    def tl_metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    scores = attribution_patch(gpt2, clean, corrupted, tl_metric).node_scores
    heads = effect(
        catalog.HEAD_OUT_BY_POS.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False)
    )
    mlps = effect(catalog.MLP_OUT.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False))
    compared = 0
    for node, score in scores.items():
        if node.kind == "attn_head_out":
            ours = heads[node.layer, node.position, node.head]
        elif node.kind == "mlp_out":
            ours = mlps[node.layer, node.position]
        else:
            continue
        np.testing.assert_allclose(ours, score, rtol=1e-5, atol=1e-5)
        compared += 1
    assert compared == 2 * 6 * 4 + 2 * 6


@pytest.mark.parametrize(
    "spec", [catalog.HEAD_OUT_BY_POS, catalog.HEAD_PATTERN_BY_DEST, catalog.MLP_NEURON_POST]
)
def test_batched_gradients_equal_one_example_at_a_time(gpt2, spec):
    """A batch of prompts gives each prompt the estimate it gets alone."""
    clean, corrupted = prompts(n=3)
    batched = spec.run(gpt2, clean, corrupted, LD_EACH, estimator="atp", progress=False)
    for b in range(3):
        alone = spec.run(
            gpt2, clean[b : b + 1], corrupted[b : b + 1], LD_EACH, estimator="atp", progress=False
        )
        np.testing.assert_allclose(
            batched.isel(example=b).values, alone.isel(example=0).values, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
@pytest.mark.parametrize(
    ("coarse", "fine", "summed"),
    [
        (catalog.HEAD_OUT, catalog.HEAD_OUT_BY_POS, ("pos",)),
        (catalog.HEAD_K, catalog.HEAD_K_BY_POS, ("pos",)),
        (catalog.HEAD_V, catalog.HEAD_V_BY_POS, ("pos",)),
        (catalog.HEAD_PATTERN_BY_DEST, catalog.HEAD_PATTERN_DEST_SRC, ("src_pos",)),
        (catalog.HEAD_PATTERN, catalog.HEAD_PATTERN_DEST_SRC, ("dest_pos", "src_pos")),
        (ps.PatchSpec("resid_pre", axes=("layer",)), catalog.RESID_PRE, ("pos",)),
    ],
    ids=lambda v: v.label if hasattr(v, "label") else "-".join(v),
)
def test_coarse_cells_are_sums_of_fine_cells(request, kind, coarse, fine, summed):
    """AtP is linear in the mask: a coarse cell's change is the sum of its fine cells'."""
    model = request.getfixturevalue(kind)
    clean, corrupted = prompts()
    big = effect(coarse.run(model, clean, corrupted, LD, estimator="atp", progress=False))
    small = fine.run(model, clean, corrupted, LD, estimator="atp", progress=False)
    total = (small - small.attrs["corrupted_baseline"]).sum(list(summed))
    np.testing.assert_allclose(big, total.values, rtol=1e-5, atol=1e-6)


def test_grouped_query_keys_and_values_are_per_kv_head(qwen2):
    """On a grouped-query model k and v estimates have one cell per key/value head."""
    clean, corrupted = prompts()
    for spec in (catalog.HEAD_K_BY_POS, catalog.HEAD_V_BY_POS):
        exact = spec.run(qwen2, clean, corrupted, LD, progress=False)
        atp = spec.run(qwen2, clean, corrupted, LD, estimator="atp", progress=False)
        assert atp.sizes["kv_head"] == 2 and atp.dims == exact.dims
        assert np.corrcoef(effect(atp).ravel(), effect(exact).ravel())[0, 1] > 0.9


def test_several_metrics_and_a_sweep(gpt2):
    """A list of metrics gives a metric dim, as in exact results; a Sweep gives a Dataset."""
    clean, corrupted = prompts()
    sweep = ps.Sweep(catalog.RESID_PRE, catalog.ATTN_OUT)
    both = [LD_EACH, metrics.logprob(5, reduce="none")]
    exact = sweep.run(gpt2, clean, corrupted, both, progress=False)
    atp = sweep.run(gpt2, clean, corrupted, both, estimator="atp", progress=False)
    for name in exact.data_vars:
        assert atp[name].dims == exact[name].dims == ("layer", "pos", "metric", "example")
        assert np.corrcoef(effect(atp[name]).ravel(), effect(exact[name]).ravel())[0, 1] > 0.8


def test_integrated_gradients_are_complete(gpt2):
    """IG of a whole hook point converges to its exact effect; one step is the midpoint
    gradient, and more steps are closer to exact than AtP."""
    clean, corrupted = prompts()
    spec = ps.PatchSpec("resid_pre", axes=("layer",))
    exact = effect(spec.run(gpt2, clean, corrupted, LD, progress=False))
    atp = effect(spec.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False))
    ig = effect(spec.run(gpt2, clean, corrupted, LD, estimator="ig", ig_steps=16, progress=False))
    assert np.abs(ig - exact).max() < 1e-3 * max(1.0, np.abs(exact).max())
    assert np.abs(ig - exact).max() < np.abs(atp - exact).max()
    result = spec.run(gpt2, clean, corrupted, LD, estimator="ig", ig_steps=2, progress=False)
    assert result.attrs["estimator"] == "ig" and result.attrs["exact"] is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(tmp_path, dtype):
    """AtP runs in float16 and bfloat16 and agrees with exact patching there."""
    model = tiny_model(VOCAB, tmp_path, dtype=dtype, device="cpu")
    clean, corrupted = prompts()
    spec = catalog.HEAD_OUT_BY_POS
    exact = spec.run(model, clean, corrupted, LD, progress=False)
    atp = spec.run(model, clean, corrupted, LD, estimator="atp", progress=False)
    assert np.isfinite(atp.values).all() and atp.dims == exact.dims
    assert np.corrcoef(effect(atp).ravel(), effect(exact).ravel())[0, 1] > 0.9


def test_verified_cells_are_the_exact_sweep_cells(gpt2):
    """verify patches the top and random cells exactly, bit-identical to a full exact sweep,
    and leaves every other cell NaN."""
    clean, corrupted = prompts()
    spec = catalog.HEAD_OUT_BY_POS
    atp = spec.run(gpt2, clean, corrupted, LD_EACH, estimator="atp", progress=False)
    full = spec.run(gpt2, clean, corrupted, LD_EACH, progress=False)
    checked = verify(atp, gpt2, clean, corrupted, LD_EACH, top=4, random=6, seed=3)
    measured = ~np.isnan(checked.exact.values)
    np.testing.assert_array_equal(checked.exact.values[measured], full.values[measured])
    roles = checked.checked.values
    assert (roles == "top").sum() == 4 and (roles == "random").sum() == 6
    assert measured.all(-1).sum() == 10 and measured.any(-1).sum() == 10
    scores = np.abs(effect(atp).mean(-1)).ravel()
    assert set(np.argsort(-scores)[:4]) == set(np.flatnonzero(roles.ravel() == "top"))
    baselines = ["corrupted_baseline", "clean_baseline"]
    xr.testing.assert_identical(checked.estimate.rename(atp.name), atp.drop_vars(baselines))


def test_verify_takes_the_run_time_tensors_of_the_estimate(gpt2):
    """An estimate of a spec whose source names run-time tensors is verified with the same
    tensors (its cells equal the full exact sweep); other tensors are refused before any pass."""
    clean, corrupted = prompts(n=3)
    direction = torch.randn(gpt2.cfg.d_model, generator=torch.Generator().manual_seed(1))
    spec = attrs.evolve(catalog.RESID_PRE, source=ps.Add("d", coef=3.0))
    tensors = {"d": direction}
    atp = spec.run(gpt2, clean, corrupted, LD, tensors=tensors, estimator="atp", progress=False)
    full = spec.run(gpt2, clean, corrupted, LD, tensors=tensors, progress=False)
    checked = verify(atp, gpt2, clean, corrupted, LD, top=3, random=2, tensors=tensors)
    measured = ~np.isnan(checked.exact.values)
    assert measured.sum() == 5
    np.testing.assert_array_equal(checked.exact.values[measured], full.values[measured])
    with pytest.raises(InputError, match=r"tensor 'd' is not the one the estimate was made with"):
        verify(atp, gpt2, clean, corrupted, LD, top=3, random=2, tensors={"d": 2 * direction})


def test_verify_bound_is_clopper_pearson(gpt2):
    """The bound is the one-sided exact binomial bound on the random draw."""
    clean, corrupted = prompts()
    atp = catalog.RESID_PRE.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False)
    checked = verify(
        atp, gpt2, clean, corrupted, LD, top=2, random=5, threshold=0.0, confidence=0.9
    )
    x, n = checked.attrs["random_exceeding"], checked.attrs["random_checked"]
    assert n == 5
    expected = 1.0 if x == n else stats.beta.ppf(0.9, x + 1, n - x)
    assert checked.attrs["exceed_share_upper"] == pytest.approx(expected)
    assert clopper_pearson_upper(0, 30, 0.95) == pytest.approx(1 - 0.05 ** (1 / 30))
    assert "Clopper-Pearson" in checked.attrs["statistic"]


def test_verify_refuses_an_estimate_of_another_grid(gpt2):
    """An estimate made on other inputs is refused before any patched pass."""
    clean, corrupted = prompts()
    atp = catalog.RESID_PRE.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False)
    short_clean, short_corrupted = prompts(length=4)
    with pytest.raises(ps.InputError, match="the estimate has dims"):
        verify(atp, gpt2, short_clean, short_corrupted, LD)
    with pytest.raises(OptionError, match="top must be a non-negative int, got -1"):
        verify(atp, gpt2, clean, corrupted, LD, top=-1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"estimator": "atpp"},
            r"unknown estimator 'atpp'; valid estimators are exact, atp, atp\*, graddrop, ig "
            r".*did you mean 'atp'",
        ),
        ({"estimator": "ig", "ig_steps": 0}, "ig_steps must be a positive int or None, got 0"),
        (
            {"estimator": "atp", "ig_steps": 4},
            "ig_steps=4 sets the steps of estimator='ig', but estimator is 'atp'",
        ),
        ({"ig_steps": 4}, "ig_steps=4 sets the steps of estimator='ig', but estimator is 'exact'"),
        (
            {"estimator": "atp", "engine": "reference"},
            "engine='reference' chooses the exact engine",
        ),
        (
            {"estimator": "atp", "cells_per_batch": 4},
            r"options \['cells_per_batch'\] configure the exact batched engine",
        ),
        ({"estimator": 3}, "estimator must be a name .* got int"),
    ],
)
def test_bad_options_are_refused_before_any_pass(gpt2, options, message):
    """Unknown estimators and bad ig_steps are OptionErrors naming what is valid."""
    clean, corrupted = prompts()
    calls = []
    handle = gpt2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(OptionError, match=message):
            catalog.RESID_PRE.run(gpt2, clean, corrupted, LD, progress=False, **options)
    finally:
        handle.remove()
    assert not calls


def test_a_non_differentiable_metric_is_refused_before_the_gradient_pass(gpt2):
    """A metric with no gradient is a MetricError naming it, before any gradient pass."""
    clean, corrupted = prompts()

    def top_token_is_5(logits):
        return (logits[:, -1].argmax(-1) == 5).float().mean()

    with pytest.raises(MetricError, match="metric 'top_token_is_5' is not differentiable"):
        catalog.RESID_PRE.run(
            gpt2, clean, corrupted, top_token_is_5, estimator="atp", progress=False
        )


def test_an_estimator_object_is_accepted(gpt2):
    """estimator= takes an object, e.g. AtP with a small memory budget (many chunks)."""
    from patchspec.attribution import AtP

    clean, corrupted = prompts()
    small = catalog.MLP_NEURON_POST.run(
        gpt2, clean, corrupted, LD, estimator=AtP(max_memory=4096), progress=False
    )
    big = catalog.MLP_NEURON_POST.run(gpt2, clean, corrupted, LD, estimator="atp", progress=False)
    np.testing.assert_allclose(small.values, big.values, rtol=1e-6, atol=1e-6)


def test_experiment_files_and_the_cli_take_the_estimator(tmp_path):
    """[run] estimator and --estimator give estimates; bad values fail before the model loads."""
    from patchspec import attribution, cli
    from patchspec.experiment import ExperimentError, load_experiment

    assert cli.ESTIMATORS == attribution.ESTIMATOR_NAMES
    text = """
[model]
path = "toy"

[prompts]
clean = ["milk cake sun milk cake"]
corrupted = ["dog cake bus milk cake"]

[metric]
kind = "logit_diff"
answer = "sun"
wrong = "bus"

[[specs]]
catalog = "HEAD_OUT_BY_POS"

[output]
folder = "out"
plots = false

[run]
estimator = "ig"
ig_steps = 2
"""
    path = tmp_path / "exp.toml"
    path.write_text(text)
    assert load_experiment(path).options == {"estimator": "ig", "ig_steps": 2}
    path.write_text(text.replace('"ig"', '"atpp"'))
    with pytest.raises(ExperimentError, match="unknown estimator 'atpp'"):
        load_experiment(path)
    path.write_text(text.replace("ig_steps = 2", "").replace('"ig"', '"exact"'))
    ds = cli.run_experiment(path, progress=False, estimator="atp")
    assert ds["head_out_by_pos"].attrs["estimator"] == "atp"


@pytest.fixture(scope="module")
def saturated(tmp_path_factory):
    """The linear GPT-2 (identity final norm, last MLP silenced) with layer 1's query weights
    scaled up 3000 times, so its attention softmax saturates."""
    model = build("gpt2", tmp_path_factory.mktemp("saturated"))
    object.__setattr__(model.ln_final, "forward", lambda x, *args, **kwargs: x)
    with torch.no_grad():
        for name, p in model.blocks[1].mlp.named_parameters():
            if "c_proj" in name:
                p.zero_()
        for name, p in model.blocks[1].attn.named_parameters():
            if name.startswith("q."):
                p.mul_(3000.0)
    return model


@pytest.mark.parametrize(
    "spec",
    [
        catalog.HEAD_Q_BY_POS.sel(layer=1),
        catalog.HEAD_K_BY_POS.sel(layer=1),
        catalog.HEAD_K.sel(layer=1),
        ps.PatchSpec("attn_scores", axes=("layer", "head", "dest_pos"), restrictions={"layer": 1}),
    ],
    ids=lambda s: s.label,
)
def test_the_qk_fix_is_exact_from_the_pattern_on(saturated, spec):
    """With the metric linear in the pattern, AtP* (pattern recomputed exactly) equals exact
    patching, where plain AtP through the saturated softmax is off, sign included."""
    clean, corrupted = prompts()
    exact = effect(spec.run(saturated, clean, corrupted, LD_EACH, progress=False))
    atp = effect(spec.run(saturated, clean, corrupted, LD_EACH, estimator="atp", progress=False))
    star = spec.run(saturated, clean, corrupted, LD_EACH, estimator="atp*", progress=False)
    assert star.attrs["estimator"] == "atp*" and star.attrs["exact"] is False
    fixed = effect(star)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(fixed, exact, rtol=0, atol=1e-3 * scale)
    assert np.abs(atp - exact).max() > 0.1 * scale
    seen = np.abs(exact) > 1e-3 * scale
    assert (np.sign(atp) != np.sign(exact))[seen].any()
    assert (np.sign(fixed) == np.sign(exact))[seen].all()


def test_the_qk_fix_runs_on_rotary_models(qwen2):
    """On a rotary model the QK fix rotates the patch as the model does (tests/test_graddrop.py
    checks it against a hand-written patch); cells without q, k or scores are plain AtP."""
    clean, corrupted = prompts()
    exact = catalog.HEAD_Q_BY_POS.run(qwen2, clean, corrupted, LD, progress=False)
    star = catalog.HEAD_Q_BY_POS.run(qwen2, clean, corrupted, LD, estimator="atp*", progress=False)
    assert np.corrcoef(effect(star).ravel(), effect(exact).ravel())[0, 1] > 0.99
    plain = catalog.HEAD_OUT_BY_POS.run(qwen2, clean, corrupted, LD, progress=False)
    star = catalog.HEAD_OUT_BY_POS.run(
        qwen2, clean, corrupted, LD, estimator="atp*", progress=False
    )
    assert star.dims == plain.dims
