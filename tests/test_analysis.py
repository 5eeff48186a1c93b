"""Labelled analysis: per-example results, baselines, the ``.patch`` accessor and statistics.

Statistics are checked against TransformerLens 4.3's ``PatchingResult`` on the same per-example
values; the random draws use the same seeded generator, so the numbers agree to float rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import xarray as xr
from transformer_lens.patching import PatchingResult
from transformer_lens.utilities import statistics as tl_stats

import patchspec
from patchspec import stats
from patchspec.catalog import ATTN_OUT, RESID_PRE
from patchspec.errors import InputError
from tests.conftest import logit_diff_metric, per_example_metric
from tests.models import prompts


@pytest.fixture(scope="module")
def result(gpt2) -> xr.DataArray:
    """A per-example resid_pre sweep on 4 prompts."""
    clean, corrupted = prompts(4)
    return RESID_PRE.run(gpt2, clean, corrupted, per_example_metric)


def tl_result(values: xr.DataArray, corrupted: np.ndarray) -> PatchingResult:
    """The same per-example values as a TransformerLens ``PatchingResult``."""
    dims = [d for d in values.dims if d != "example"]
    index = pd.MultiIndex.from_product([range(values.sizes[d]) for d in dims], names=dims)
    return PatchingResult(
        values=torch.tensor(values.transpose(*dims, "example").values),
        axis_names=dims,
        index_df=index.to_frame(index=False),
        metric_names=["metric"],
        reduced=False,
        baseline=torch.tensor(corrupted),
    )


def synthetic(n: int, seed: int = 0) -> xr.DataArray:
    """Random per-example values over (layer, pos, example) with per-example baselines."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.3, 1.0, size=(2, 3, n))
    return xr.DataArray(
        values,
        dims=("layer", "pos", "example"),
        coords={"layer": [0, 1], "pos": [0, 1, 2], "example": np.arange(n)},
        name="m",
        attrs={
            "clean_baseline": list(rng.normal(2.0, 0.5, n)),
            "corrupted_baseline": list(rng.normal(0.0, 0.5, n)),
        },
    )


def test_per_example_mean_equals_scalar_sweep(model):
    """The mean over ``example`` of a per-prompt sweep is the scalar-metric sweep."""
    clean, corrupted = prompts(3)
    per_example = ATTN_OUT.run(model, clean, corrupted, per_example_metric)
    scalar = ATTN_OUT.run(model, clean, corrupted, logit_diff_metric)
    assert per_example.dims == ("layer", "pos", "example")
    xr.testing.assert_allclose(per_example.mean("example"), scalar, rtol=1e-5, atol=1e-6)
    assert np.mean(per_example.attrs["clean_baseline"]) == pytest.approx(
        scalar.attrs["clean_baseline"], rel=1e-5, abs=1e-6
    )


def test_per_example_baselines_are_coords_that_follow_sel(result):
    """Per-example baselines ride along ``example`` as coords and in attrs, and follow ``sel``."""
    assert result["corrupted_baseline"].dims == ("example",)
    assert result["clean_baseline"].values.tolist() == result.attrs["clean_baseline"]
    picked = result.sel(example=[3, 1])
    _, corrupted = picked.patch.baselines()
    assert corrupted.values.tolist() == [result.attrs["corrupted_baseline"][i] for i in (3, 1)]
    # The same from the attrs alone (coords dropped): the example labels index the list.
    bare = picked.drop_vars(["clean_baseline", "corrupted_baseline"])
    xr.testing.assert_allclose(bare.patch.effect(), picked.patch.effect())


def test_text_prompts_become_example_coords(gpt2):
    """Prompts given as strings are coordinates along ``example``."""
    clean = ["w1 w2 w3", "w4 w5 w6"]
    corrupted = ["w7 w8 w9", "w4 w5 w3"]
    r = RESID_PRE.run(gpt2, clean, corrupted, per_example_metric)
    assert r["clean_prompt"].values.tolist() == clean
    assert r["corrupted_prompt"].values.tolist() == corrupted
    assert r.sel(example=1)["clean_prompt"].item() == "w4 w5 w6"


def test_effect_normalized_and_stderr_equal_transformer_lens(result):
    """``effect``, ``normalized`` and ``stderr`` equal ``PatchingResult``'s on the same values."""
    corrupted = np.array(result.attrs["corrupted_baseline"])
    clean = torch.tensor(result.attrs["clean_baseline"])
    tl = tl_result(result, corrupted)
    np.testing.assert_allclose(result.patch.effect().values, tl.effect().numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        result.patch.normalized().values, tl.normalized(clean).numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(result.patch.stderr().values, tl.stderr().numpy(), rtol=1e-12)


@pytest.mark.parametrize(("n", "statistic"), [(4, "mean"), (20, "mean"), (7, "median")])
def test_bootstrap_ci_equals_transformer_lens(n, statistic):
    """Percentile bootstrap bounds equal ``PatchingResult.bootstrap_ci`` for the same seed."""
    values = synthetic(n)
    tl = tl_result(values, np.array(values.attrs["corrupted_baseline"]))
    for seed in (0, 3):
        ci = values.patch.bootstrap_ci(n_resamples=300, seed=seed, statistic=statistic)
        low, high = tl.bootstrap_ci(n_resamples=300, seed=seed, statistic=statistic)
        assert ci.dims == ("layer", "pos", "bound")
        np.testing.assert_allclose(ci.sel(bound="low").values, low.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ci.sel(bound="high").values, high.numpy(), rtol=1e-12)
    effect_ci = values.patch.effect().patch.bootstrap_ci(confidence=0.9, n_resamples=500)
    low, high = tl.bootstrap_ci(confidence=0.9, n_resamples=500, of_effect=True)
    np.testing.assert_allclose(effect_ci.sel(bound="low").values, low.numpy(), rtol=1e-12)
    np.testing.assert_allclose(effect_ci.sel(bound="high").values, high.numpy(), rtol=1e-12)


@pytest.mark.parametrize("n", [4, 12, 13, 30])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_pvalue_equals_transformer_lens(n, alternative):
    """Sign-flip p-values equal ``PatchingResult.permutation_pvalue`` (exact and Monte Carlo)."""
    values = synthetic(n, seed=n)
    tl = tl_result(values, np.array(values.attrs["corrupted_baseline"]))
    ours = values.patch.permutation_pvalue(
        n_permutations=400, seed=1, alternative=alternative, correction=None
    )
    theirs = tl.permutation_pvalue(n_permutations=400, seed=1, alternative=alternative)
    np.testing.assert_allclose(ours.values, theirs.numpy(), rtol=1e-12)
    assert ours.dims == ("layer", "pos")


def test_statistics_on_a_real_sweep_equal_transformer_lens(result):
    """On a model's per-example values: bootstrap and the exact (4-example) permutation test."""
    tl = tl_result(result, np.array(result.attrs["corrupted_baseline"]))
    ci = result.patch.bootstrap_ci(seed=5)
    low, high = tl.bootstrap_ci(seed=5)
    np.testing.assert_allclose(ci.sel(bound="low").values, low.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ci.sel(bound="high").values, high.numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        result.patch.permutation_pvalue(correction=None).values,
        tl.permutation_pvalue().numpy(),
        rtol=1e-12,
    )


def test_derive_generator_is_transformer_lens_s():
    """The seeded generator draws what TransformerLens's ``derive_generator`` draws."""
    ours = torch.randint(0, 100, (50,), generator=stats.derive_generator(7, "bootstrap", "mean"))
    theirs = torch.randint(
        0, 100, (50,), generator=tl_stats.derive_generator(7, "bootstrap", "mean")
    )
    assert torch.equal(ours, theirs)


def test_statistics_are_seeded():
    """Same seed, same numbers; another seed, other numbers (Monte Carlo paths)."""
    values = synthetic(20)
    a = values.patch.bootstrap_ci(seed=1, n_resamples=200)
    xr.testing.assert_identical(a, values.patch.bootstrap_ci(seed=1, n_resamples=200))
    assert not a.equals(values.patch.bootstrap_ci(seed=2, n_resamples=200))
    p = values.patch.permutation_pvalue(seed=1, n_permutations=200)
    xr.testing.assert_identical(p, values.patch.permutation_pvalue(seed=1, n_permutations=200))


def test_statistics_keep_labels_and_work_over_any_dim(result):
    """Results keep the other coords (token labels) and any dim can be reduced."""
    err = result.patch.stderr()
    assert err.dims == ("layer", "pos")
    assert err["pos_token"].values.tolist() == result["pos_token"].values.tolist()
    over_pos = result.patch.bootstrap_ci("pos", n_resamples=50)
    assert over_pos.dims == ("layer", "example", "bound")
    xr.testing.assert_allclose(
        result.patch.stderr("layer"), result.std("layer", ddof=1) / np.sqrt(2)
    )


def test_nan_cells_give_nan_statistics():
    """A cell with a NaN (not measured) example gives NaN statistics, never a number."""
    values = synthetic(5).copy()
    values[0, 0, 2] = np.nan
    for out in (
        values.patch.stderr(),
        values.patch.bootstrap_ci(n_resamples=20).sel(bound="low"),
        values.patch.permutation_pvalue(),
    ):
        assert np.isnan(out.values[0, 0]) and np.isfinite(out.values[1:]).all()


def test_normalized_is_nan_with_a_warning_where_baselines_are_equal():
    """clean == corrupted for an example: NaN (never inf) and a warning naming the example."""
    values = synthetic(4)
    values.attrs["clean_baseline"][2] = values.attrs["corrupted_baseline"][2]
    with pytest.warns(RuntimeWarning, match=r"equal for example \[2\]"):
        out = values.patch.normalized()
    assert np.isnan(out.sel(example=2)).all()
    assert np.isfinite(out.drop_sel(example=2)).all()
    scalar = xr.DataArray(
        [1.0, 2.0], dims="layer", attrs={"clean_baseline": 1.0, "corrupted_baseline": 1.0}
    )
    with pytest.warns(RuntimeWarning, match="no recovery scale"):
        assert np.isnan(scalar.patch.normalized()).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synthetic(4).patch.normalized()


def test_effect_and_normalized_are_marked_and_not_applied_twice(result):
    """Derived results drop the baselines, say what they are, and refuse a second application."""
    effect = result.patch.effect()
    assert effect.attrs["quantity"] == "effect"
    assert "corrupted_baseline" not in effect.coords and "corrupted_baseline" not in effect.attrs
    with pytest.raises(InputError, match="already a effect"):
        effect.patch.effect()
    with pytest.raises(InputError, match="already a normalized"):
        result.patch.normalized().patch.normalized()
    # The sign-flip test of an effect is the test of the raw values.
    xr.testing.assert_identical(
        effect.patch.permutation_pvalue(), result.patch.permutation_pvalue()
    )


def test_scalar_metric_effect_and_normalized(gpt2):
    """Scalar baselines (attrs) broadcast over every cell."""
    clean, corrupted = prompts(2)
    r = RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric)
    expected = (r - r.attrs["corrupted_baseline"]) / (
        r.attrs["clean_baseline"] - r.attrs["corrupted_baseline"]
    )
    np.testing.assert_allclose(r.patch.normalized().values, expected.values)
    # Patching the whole residual stream before layer 0 at every position... position 0 is BOS.
    assert r.patch.effect().sel(layer=0, pos=0).item() == pytest.approx(0.0, abs=1e-5)


def test_top_lists_the_largest_cells_with_labels(result):
    """``top(k)`` ranks the mean over examples by magnitude and keeps each cell's labels."""
    effect = result.patch.effect()
    table = effect.patch.top(3)
    mean = effect.mean("example")
    flat = np.abs(mean.values).ravel()
    assert table.dims == ("rank",) and table["rank"].values.tolist() == [1, 2, 3]
    np.testing.assert_allclose(np.abs(table.values), np.sort(flat)[::-1][:3])
    for i in range(3):
        cell = table.isel(rank=i)
        assert mean.sel(layer=cell.layer, pos=cell.pos).item() == cell.item()
        assert cell["pos_token"].item() == result["pos_token"].sel(pos=cell.pos).item()
    frame = table.to_dataframe()
    assert {"layer", "pos", "pos_token"} <= set(frame.columns)
    signed = xr.DataArray([[-5.0, 1.0], [np.nan, 2.0]], dims=("layer", "pos"), name="m")
    assert signed.patch.top(10).values.tolist() == [-5.0, 2.0, 1.0]
    assert signed.patch.top(1, absolute=False).values.tolist() == [2.0]


def test_dataset_accessor_applies_to_every_spec(gpt2):
    """On a Sweep's Dataset the verbs apply to each spec's variable."""
    clean, corrupted = prompts(3)
    ds = patchspec.Sweep(RESID_PRE, ATTN_OUT).run(gpt2, clean, corrupted, per_example_metric)
    for name in ("resid_pre", "attn_out"):
        xr.testing.assert_identical(ds.patch.normalized()[name], ds[name].patch.normalized())
        xr.testing.assert_identical(
            ds.patch.permutation_pvalue(correction=None)[name],
            ds[name].patch.permutation_pvalue(correction=None),
        )
    # The default correction treats every cell of every spec as one family.
    raw = ds.patch.permutation_pvalue(correction=None)
    flat = np.concatenate([raw[name].values.ravel() for name in ("resid_pre", "attn_out")])
    joint = ds.patch.permutation_pvalue()
    np.testing.assert_allclose(
        np.concatenate([joint[name].values.ravel() for name in ("resid_pre", "attn_out")]),
        scipy.stats.false_discovery_control(flat),
    )
    assert joint.attrs["correction"] == joint["attn_out"].attrs["correction"] == "bh"
    assert ds.patch.bootstrap_ci(n_resamples=20)["attn_out"].dims == ("layer", "pos", "bound")
    assert ds.patch.stderr()["resid_pre"].dims == ("layer", "pos")


def test_errors_name_the_problem(result):
    """Missing dims, reduced per-example baselines and bad options are clear errors."""
    reduced = result.mean("example")
    with pytest.raises(InputError, match=r"dim 'example'.*dims are \('layer', 'pos'\)"):
        reduced.patch.stderr()
    with pytest.raises(InputError, match=r"4 per-example corrupted_baselines but no 'example'"):
        reduced.patch.effect()
    with pytest.raises(InputError, match=r"did you mean 'example'"):
        result.patch.bootstrap_ci("examples")
    with pytest.raises(InputError, match=r"alternative must be one of .*got 'two_sided'"):
        result.patch.permutation_pvalue(alternative="two_sided")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"statistic must be one of .*got 'max'"):
        result.patch.bootstrap_ci(statistic="max")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"confidence must be in \(0, 1\), got 95"):
        result.patch.bootstrap_ci(confidence=95)
    with pytest.raises(InputError, match="at least 2 values along 'example', got 1"):
        result.isel(example=[0]).patch.stderr()
    with pytest.raises(InputError, match="no 'corrupted_baseline'"):
        xr.DataArray([1.0], dims="example", name="m").patch.permutation_pvalue()
    with pytest.raises(InputError, match="k must be a positive integer, got 0"):
        result.patch.top(0)


def test_several_metrics_normalize_each_with_its_own_baselines(gpt2):
    """With a ``metric`` dim, each metric (and example) is normalised by its own baselines."""
    clean, corrupted = prompts(3)
    both = {"diff": per_example_metric, "neg": lambda logits: -2 * per_example_metric(logits)}
    r = RESID_PRE.run(gpt2, clean, corrupted, both)
    assert r.dims == ("layer", "pos", "metric", "example")
    assert r["clean_baseline"].dims == ("metric", "example")
    norm = r.patch.normalized()
    # Normalising removes the metric's scale and sign: both metrics recover the same fraction.
    np.testing.assert_allclose(
        norm.sel(metric="diff").values, norm.sel(metric="neg").values, rtol=1e-4
    )
    one = RESID_PRE.run(gpt2, clean, corrupted, per_example_metric)
    np.testing.assert_allclose(
        norm.sel(metric="diff").values, one.patch.normalized().values, rtol=1e-5
    )
    # The attrs alone (coords dropped) give the same numbers.
    bare = r.drop_vars(["clean_baseline", "corrupted_baseline"])
    xr.testing.assert_allclose(bare.patch.normalized(), norm)
    # Effects in two metrics' units do not rank against each other; fractions do.
    with pytest.raises(InputError, match=r"effects of 2 metrics \['diff', 'neg'\]"):
        r.patch.top(3)
    assert norm.patch.top(3).dims == ("rank",)
    assert r.sel(metric="neg").patch.top(1).attrs["quantity"] == "effect"


def test_sweep_of_specs_with_different_baselines_keeps_each_its_own(gpt2):
    """Denoising and noising specs see different baselines for a token-reading metric."""
    clean, corrupted = prompts(3)
    noising = RESID_PRE.using(patchspec.Corrupted()).named("noising")
    metric = patchspec.metrics.loss(reduce="none")
    ds = patchspec.Sweep(RESID_PRE, noising).run(gpt2, clean, corrupted, metric)
    alone = noising.run(gpt2, clean, corrupted, metric)
    assert ds["noising"].attrs["clean_baseline"] != ds["resid_pre"].attrs["clean_baseline"]
    assert "clean_baseline" not in ds.coords  # they differ, so each variable keeps its attrs
    xr.testing.assert_allclose(ds.patch.normalized()["noising"], alone.patch.normalized())


# --- Which run received the patch: denoising, noising, ablation --------------------------------
# The toy model's circuit (docs/toy_model.md): head 0.0 is the previous-token head, heads 1.0-1.3
# are induction heads. With the default corruption (a new first half), the induction heads carry
# the answer; heads 0.1-0.3 attend diffusely and do (almost) nothing in every direction.
INERT = [(0, 1), (0, 2), (0, 3)]
INDUCTION = [(1, h) for h in range(4)]


@pytest.fixture(scope="module")
def toy_sweep() -> xr.Dataset:
    """One sweep of every head on 12 toy prompts: denoising, noising and mean ablation."""
    from patchspec.catalog import HEAD_OUT
    from patchspec.toy import induction_prompts, toy_model

    model = toy_model("cpu")
    p = induction_prompts(12, length=12, seed=3)
    metric = patchspec.metrics.logit_diff(answer=p.answer, wrong=p.wrong, reduce="none")
    sweep = patchspec.Sweep(
        HEAD_OUT,
        HEAD_OUT.using(patchspec.Corrupted()).named("noising"),
        HEAD_OUT.using(patchspec.Mean()).named("mean"),
    )
    return sweep.run(model, p.clean, p.corrupted, metric, progress=False)


def cells(data: xr.DataArray, where: list[tuple[int, int]]) -> np.ndarray:
    return np.array([float(data.sel(layer=layer, head=head)) for layer, head in where])


def test_results_say_which_run_received_the_patch(toy_sweep):
    """Each variable records its receiving run and direction; the accessor reads them back."""
    expected = {
        "head_out": ("corrupted", "denoising"),
        "noising": ("clean", "noising"),
        "mean": ("clean", "ablation"),
    }
    for name, (receiver, direction) in expected.items():
        assert toy_sweep[name].patch.direction() == (receiver, direction)
        assert (toy_sweep[name].attrs["receiver"], toy_sweep[name].attrs["direction"]) == (
            receiver,
            direction,
        )


def test_noising_and_ablation_measure_from_the_clean_baseline(toy_sweep):
    """``clean - patched``: inert heads come out near 0, not at the clean-corrupted gap."""
    for name in ("noising", "mean"):
        r = toy_sweep[name]
        clean, corrupted = r.patch.baselines()
        effect = r.patch.effect()
        xr.testing.assert_allclose(
            effect,
            (clean - r).transpose(*r.dims).drop_vars(["clean_baseline", "corrupted_baseline"]),
        )
        assert effect.attrs["formula"] == "clean - patched"
        norm = r.patch.normalized()
        assert norm.attrs["formula"] == "(clean - patched) / (clean - corrupted)"
        assert "destroy" in norm.attrs["meaning"]
        assert (norm.attrs["receiver"], norm.attrs["quantity"]) == ("clean", "normalized")
        inert = cells(norm.mean("example"), INERT)
        assert np.abs(inert).max() < 0.01
        # What was measured before: patched - corrupted, the whole gap (about +25) for idle heads.
        old = cells((r - corrupted).mean("example"), INERT)
        assert old.min() > 20
    noising = toy_sweep["noising"].patch.normalized().mean("example")
    assert cells(noising, INDUCTION).min() > 0.1  # each induction head carries part of the answer
    mean = toy_sweep["mean"].patch.normalized().mean("example")
    assert float(mean.sel(layer=0, head=0)) > 0.1  # the previous-token head is needed


def test_inert_heads_are_not_significant_and_circuit_heads_are(toy_sweep):
    """Corrected p-values: large for inert heads, small for the circuit, in every direction."""
    circuit = {"head_out": INDUCTION, "noising": INDUCTION, "mean": [(0, 0)]}
    inert = {"head_out": [*INERT, (0, 0)], "noising": [*INERT, (0, 0)], "mean": INERT}
    for name, heads in circuit.items():
        p = toy_sweep[name].patch.permutation_pvalue()
        assert p.attrs["correction"] == "bh" and p.attrs["quantity"] == "pvalue"
        assert cells(p, heads).max() < 0.01, name
        assert cells(p, inert[name]).min() > 0.1, name


def test_stats_function_tests_the_effect_of_a_raw_result(toy_sweep):
    """``stats.permutation_pvalue(raw)`` tests the direction-aware effect, as the accessor does."""
    r = toy_sweep["noising"]
    xr.testing.assert_identical(stats.permutation_pvalue(r), r.patch.permutation_pvalue())
    xr.testing.assert_identical(
        stats.permutation_pvalue(r, correction=None),
        stats.permutation_pvalue(r.patch.effect(), correction=None),
    )


def test_denoising_is_unchanged(toy_sweep):
    """Denoising keeps ``patched - corrupted`` and its fraction of ``clean - corrupted``."""
    r = toy_sweep["head_out"]
    clean, corrupted = r.patch.baselines()
    bare = ["clean_baseline", "corrupted_baseline"]
    xr.testing.assert_allclose(r.patch.effect(), (r - corrupted).drop_vars(bare))
    norm = r.patch.normalized()
    xr.testing.assert_allclose(norm, ((r - corrupted) / (clean - corrupted)).drop_vars(bare))
    assert norm.attrs["formula"] == "(patched - corrupted) / (clean - corrupted)"
    assert r.patch.effect().attrs["formula"] == "patched - corrupted"
    assert "restored" in norm.attrs["meaning"]


@pytest.mark.parametrize(
    ("receiver", "direction"),
    [
        ("corrupted", "denoising"),
        ("clean", "noising"),
        ("clean", "ablation"),
        ("corrupted", "ablation"),
    ],
)
def test_a_cell_that_does_nothing_is_zero_and_not_significant(receiver, direction):
    """Patched == the receiving run's baseline: effect 0, normalized 0, p-value 1, everywhere."""
    rng = np.random.default_rng(0)
    clean, corrupted = rng.normal(3.0, 1.0, 8), rng.normal(-3.0, 1.0, 8)
    base = clean if receiver == "clean" else corrupted
    other = corrupted if receiver == "clean" else clean
    values = np.stack([base, other, base + 0.5 * (other - base)])  # inert, whole gap, half
    r = xr.DataArray(
        values,
        dims=("head", "example"),
        coords={"head": [0, 1, 2], "example": np.arange(8)},
        name="m",
        attrs={
            "clean_baseline": clean.tolist(),
            "corrupted_baseline": corrupted.tolist(),
            "receiver": receiver,
            "direction": direction,
        },
    )
    norm = r.patch.normalized()
    np.testing.assert_allclose(norm.mean("example").values, [0.0, 1.0, 0.5], atol=1e-12)
    assert r.patch.effect().sel(head=0).values.tolist() == [0.0] * 8
    p = r.patch.permutation_pvalue()
    assert float(p.sel(head=0)) == 1.0 and float(p.sel(head=1)) < 0.05
    assert r.patch.top(1)["head"].values.tolist() == [1]


def test_top_ranks_the_effect_of_raw_results(toy_sweep):
    """On a raw noising result ``top`` ranks ``clean - patched``: the circuit first."""
    r = toy_sweep["noising"]
    best = r.patch.top(4)
    assert best.attrs["quantity"] == "effect"
    assert {(int(a), int(b)) for a, b in zip(best.layer, best["head"], strict=True)} == set(
        INDUCTION
    )
    xr.testing.assert_identical(best, r.patch.effect().patch.top(4))
    signed = r.patch.top(1, absolute=False).isel(rank=0)
    assert (int(signed.layer), float(signed)) == (1, float(best.isel(rank=0)))
    mean = toy_sweep["mean"].patch.top(1).isel(rank=0)
    assert (int(mean.layer), int(mean["head"])) == (0, 0)


def test_dataset_top_ranks_every_spec_together(toy_sweep):
    """``ds.patch.top(k)``: one ranking, a ``spec`` coord, the same cells as each spec's own."""
    best = toy_sweep.patch.top(5)
    assert best.dims == ("rank",) and best["rank"].values.tolist() == [1, 2, 3, 4, 5]
    assert set(best.spec.values.tolist()) <= {"head_out", "noising", "mean"}
    for i in range(5):
        cell = best.isel(rank=i)
        own = toy_sweep[str(cell.spec.values)].patch.effect().mean("example")
        assert own.sel(layer=int(cell.layer), head=int(cell["head"])).item() == pytest.approx(
            float(cell)
        )
    scores = np.abs(best.values)
    assert (np.diff(scores) <= 0).all()
    every = [np.abs(toy_sweep[n].patch.effect().mean("example").values).max() for n in toy_sweep]
    assert scores[0] == pytest.approx(max(every))
    normalized = toy_sweep.patch.normalized().patch.top(3)
    assert normalized.attrs["quantity"] == "normalized"
    mixed = xr.Dataset(
        {"a": toy_sweep["noising"].patch.normalized(), "b": toy_sweep["mean"].patch.effect()}
    )
    with pytest.raises(InputError, match=r"different ones \(a: normalized, b: effect\)"):
        mixed.patch.top(3)


def test_dataset_effect_lifts_shared_formula_only(toy_sweep):
    """A Dataset's attrs say the formula only when every spec shares it."""
    both = toy_sweep[["noising", "mean"]].patch.normalized()
    assert both.attrs["formula"] == "(clean - patched) / (clean - corrupted)"
    assert "formula" not in toy_sweep.patch.normalized().attrs
    assert toy_sweep.patch.normalized()["noising"].attrs["direction"] == "noising"


def test_results_without_a_recorded_receiver():
    """Legacy results: read from their sources; no provenance is denoising; ambiguity refused."""
    base = {"clean_baseline": 3.0, "corrupted_baseline": 1.0}

    def r(**attrs):
        return xr.DataArray([1.0, 2.0], dims="layer", name="m", attrs={**base, **attrs})

    assert r().patch.direction() == ("corrupted", "denoising")
    assert r().patch.effect().values.tolist() == [0.0, 1.0]
    assert r(source="corrupted").patch.direction() == ("clean", "noising")
    noised = r(sources=[{"kind": "corrupted"}])
    assert noised.patch.effect().values.tolist() == [2.0, 1.0]
    mean = r(sources=[{"kind": "mean", "over": "receiver", "receiver": "clean"}])
    assert mean.patch.direction() == ("clean", "ablation")
    assert r(direction="noising").patch.direction() == ("clean", "noising")
    with pytest.raises(InputError, match=r"ablation \(source 'zero'\) may patch either run"):
        r(source="zero").patch.effect()
    with pytest.raises(InputError, match=r"is an ablation .* not record which run was ablated"):
        r(direction="ablation").patch.normalized()
    with pytest.raises(InputError, match=r"says it is noising .* but that the corrupted run"):
        r(receiver="corrupted", direction="noising").patch.effect()
    with pytest.raises(InputError, match=r"is 'cleen'.*did you mean 'clean'"):
        r(receiver="cleen").patch.effect()
    with pytest.raises(InputError, match=r"is 'nosing'.*did you mean 'noising'"):
        r(direction="nosing").patch.top(1)
    with pytest.raises(InputError, match="records neither its direction nor its source"):
        r(receiver="clean").patch.effect()


def test_quantities_without_meaning_are_refused():
    """No clean run, p-values ranked or tested again: clear errors, never a silent NaN."""
    r = xr.DataArray(
        [1.0, 2.0],
        dims="layer",
        name="m",
        attrs={"clean_baseline": None, "corrupted_baseline": 1.0, "receiver": "corrupted"},
    )
    assert r.patch.effect().values.tolist() == [0.0, 1.0]  # needs only the corrupted baseline
    with pytest.raises(
        InputError, match=r"attrs\['clean_baseline'\] is None: the sweep had no clean"
    ):
        r.patch.normalized()
    with pytest.raises(InputError, match=r"so the effect \(clean - patched\) cannot"):
        r.assign_attrs(receiver="clean", direction="noising").patch.effect()
    p = synthetic(6).patch.permutation_pvalue()
    with pytest.raises(InputError, match=r"holds p-values .* small means significant"):
        p.patch.top(3)
    with pytest.raises(InputError, match="already holds p-values"):
        stats.permutation_pvalue(p.expand_dims(example=2))
    with pytest.raises(InputError, match="already a pvalue"):
        p.patch.effect()


def test_equal_baselines_in_a_noising_run_warn():
    """No clean-corrupted gap: NaN with a warning, worded for the direction."""
    r = xr.DataArray(
        [1.0],
        dims="layer",
        name="m",
        attrs={
            "clean_baseline": 1.0,
            "corrupted_baseline": 1.0,
            "receiver": "clean",
            "direction": "noising",
        },
    )
    with pytest.warns(RuntimeWarning, match="no damage scale"):
        assert np.isnan(r.patch.normalized()).all()


# --- Multiple comparisons -------------------------------------------------------------------------
TABLE = xr.DataArray(
    [[0.01, 0.04, 0.03], [0.005, np.nan, 0.2]],
    dims=("layer", "head"),
    coords={"layer": [0, 1], "head": [0, 1, 2]},
    name="p",
)


def test_corrections_against_scipy_and_by_hand():
    """BH and BY equal scipy's; Holm and Bonferroni equal hand-computed values; NaN stays out."""
    finite = np.array([0.01, 0.04, 0.03, 0.005, 0.2])
    for method in ("bh", "by"):
        out = stats.adjust_pvalues(TABLE, method)
        got = out.values.ravel()[~np.isnan(TABLE.values.ravel())]
        np.testing.assert_allclose(got, scipy.stats.false_discovery_control(finite, method=method))
        assert out.attrs["correction"] == method and np.isnan(out.sel(layer=1, head=1))
    # Holm: sorted 0.005, 0.01, 0.03, 0.04, 0.2 times 5, 4, 3, 2, 1 -> .025 .04 .09 .08 .2,
    # kept monotone -> .025 .04 .09 .09 .2.
    holm = stats.adjust_pvalues(TABLE, "holm")
    np.testing.assert_allclose(holm.values, [[0.04, 0.09, 0.09], [0.025, np.nan, 0.2]])
    bonferroni = stats.adjust_pvalues(TABLE, "bonferroni")
    np.testing.assert_allclose(bonferroni.values, [[0.05, 0.2, 0.15], [0.025, np.nan, 1.0]])
    # BH by hand: ranks 1..5 -> .025, .025, .05, .05, .2 (step-up minimum from the top).
    np.testing.assert_allclose(
        stats.adjust_pvalues(TABLE).values, [[0.025, 0.05, 0.05], [0.025, np.nan, 0.2]]
    )
    xr.testing.assert_identical(stats.adjust_pvalues(TABLE).layer, TABLE.layer)


def test_corrections_within_families():
    """``dims=`` spans one family; each value of the other dims is its own."""
    per_layer = stats.adjust_pvalues(TABLE, "bonferroni", dims="head")
    np.testing.assert_allclose(per_layer.values, [[0.03, 0.12, 0.09], [0.01, np.nan, 0.4]])
    assert per_layer.dims == TABLE.dims
    whole = stats.adjust_pvalues(TABLE, "holm", dims=("layer", "head"))
    xr.testing.assert_identical(whole, stats.adjust_pvalues(TABLE, "holm"))
    bare = TABLE.drop_vars(["layer", "head"]).assign_coords(token=("head", ["a", "b", "c"]))
    out = stats.adjust_pvalues(bare, dims="layer")  # the coords stay exactly the input's
    xr.testing.assert_identical(out.coords.to_dataset(), bare.coords.to_dataset())


def test_permutation_pvalue_corrects_every_cell_by_default():
    """Default: BH over every cell; ``correction=None`` gives the raw (TransformerLens) values."""
    values = synthetic(8)
    raw = values.patch.permutation_pvalue(correction=None)
    assert raw.attrs["correction"] == "none" and raw.attrs["tested"] == "effect"
    corrected = values.patch.permutation_pvalue()
    xr.testing.assert_allclose(corrected, stats.adjust_pvalues(raw, "bh"))
    assert corrected.attrs["correction"] == "bh"
    holm = values.patch.permutation_pvalue(correction="holm")
    assert (holm.values >= corrected.values - 1e-12).all()
    assert (corrected.values >= raw.values - 1e-12).all()


def test_correction_errors_name_the_problem():
    """Unknown methods and dims, values that are not p-values, correcting twice."""
    with pytest.raises(InputError, match=r"correction must be one of .*got 'fdr'"):
        synthetic(4).patch.permutation_pvalue(correction="fdr")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="got 'hol'; did you mean 'holm'"):
        stats.adjust_pvalues(TABLE, "hol")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"dims='heads' is not a dim .*did you mean 'head'"):
        stats.adjust_pvalues(TABLE, dims="heads")
    with pytest.raises(InputError, match=r"p-values in \[0, 1\].*from -3 to 2"):
        stats.adjust_pvalues(xr.DataArray([-3.0, 2.0], dims="head", name="e"))
    with pytest.raises(InputError, match="already corrected"):
        stats.adjust_pvalues(stats.adjust_pvalues(TABLE))


def test_correction_name_is_checked_before_anything_else() -> None:
    """A misspelt correction is named even on a result that has no baselines."""
    bare = xr.DataArray([[1.0, 2.0]], dims=("layer", "example"))
    with pytest.raises(InputError, match=r"correction must be one of .* got 'bhh'; did you mean 'bh'\?"):
        bare.patch.permutation_pvalue(correction="bhh")
