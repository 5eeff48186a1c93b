"""Labelled analysis: per-example results, baselines, the ``.patch`` accessor and statistics.

Statistics are checked against TransformerLens 4.3's ``PatchingResult`` on the same per-example
values; the random draws use the same seeded generator, so the numbers agree to float rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from transformer_lens.patching import PatchingResult
from transformer_lens.utilities import statistics as tl_stats

import patchspec
from patchspec import stats
from patchspec.catalog import ATTN_OUT, RESID_PRE
from patchspec.errors import InputError
from tests.conftest import logit_diff_metric, per_example_metric
from tests.docblocks import run_python_blocks
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
    ours = values.patch.permutation_pvalue(n_permutations=400, seed=1, alternative=alternative)
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
        result.patch.permutation_pvalue().values, tl.permutation_pvalue().numpy(), rtol=1e-12
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
            ds.patch.permutation_pvalue()[name], ds[name].patch.permutation_pvalue()
        )
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


def test_analysis_guide_examples_run(monkeypatch, tmp_path):
    """Every python block of docs/analysis.md runs, in order, in one namespace."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        namespace = run_python_blocks("docs/analysis.md", at_least=8)
    xr.testing.assert_identical(namespace["loaded"], namespace["result"])


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
