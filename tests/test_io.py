"""Saving and loading results with their provenance (netCDF, zarr when installed)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import xarray as xr

import patchspec
from patchspec import PatchSpec
from patchspec.catalog import ATTN_OUT, HEAD_OUT_BY_POS, RESID_PRE
from patchspec.errors import InputError
from patchspec.model import ModelAdapter
from patchspec.results import tokens_hash, weights_hash
from tests.conftest import logit_diff_metric, per_example_metric
from tests.models import build, prompts


@pytest.fixture(scope="module")
def text_result(gpt2) -> xr.DataArray:
    """A per-example sweep of text prompts: baseline and prompt coords, token labels."""
    clean = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w9 w1 w2 w3"]
    corrupted = ["w10 w2 w3 w4", "w5 w11 w7 w8", "w9 w1 w12 w3"]
    return HEAD_OUT_BY_POS.run(gpt2, clean, corrupted, per_example_metric)


def assert_round_trip(result: xr.DataArray | xr.Dataset, path) -> xr.DataArray | xr.Dataset:
    before = copy.deepcopy(result)
    loaded = patchspec.load(patchspec.save(result, path))
    xr.testing.assert_identical(loaded, result)
    xr.testing.assert_identical(result, before)  # saving does not touch the result
    assert type(loaded) is type(result)
    return loaded


def test_dataarray_round_trips_exactly(text_result, tmp_path):
    """Values, coords (token labels, prompts, baselines) and attrs come back identical."""
    loaded = assert_round_trip(text_result, tmp_path / "r.nc")
    assert loaded.attrs == text_result.attrs  # the same types too: dicts, lists, floats
    assert loaded.attrs["spec"] == HEAD_OUT_BY_POS.to_dict()
    assert loaded["pos_token"].dtype == text_result["pos_token"].dtype
    assert loaded["clean_prompt"].values.tolist() == text_result["clean_prompt"].values.tolist()


def test_scalar_result_and_sweep_dataset_round_trip(gpt2, tmp_path):
    """A scalar-metric DataArray and a Sweep's Dataset round-trip too."""
    clean, corrupted = prompts(2)
    scalar = RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric)
    assert_round_trip(scalar, tmp_path / "scalar.nc")
    ds = patchspec.Sweep(RESID_PRE, ATTN_OUT, name="block").run(
        gpt2, clean, corrupted, per_example_metric
    )
    loaded = assert_round_trip(ds, tmp_path / "sweep.nc")
    assert loaded["attn_out"].attrs == ds["attn_out"].attrs


def test_awkward_attrs_and_unnamed_arrays_round_trip(tmp_path):
    """None, booleans, nested dicts, NaN and an unnamed array are kept exactly."""
    result = xr.DataArray(
        np.array([[1.0, np.nan], [3.0, -4.5]]),
        dims=("layer", "pos"),
        coords={"layer": [0, 1], "pos_token": ("pos", ["<bos>", " Mary"])},
        attrs={
            "none": None,
            "flag": True,
            "count": 3,
            "nested": {"a": [1, {"b": None}], "c": "x"},
            "nan": float("nan"),
            "empty": "",
            "vector": np.array([1.5, 2.5]),
        },
    )
    loaded = assert_round_trip(result, tmp_path / "awkward.nc")
    assert loaded.attrs["flag"] is True and loaded.attrs["none"] is None
    assert loaded.name is None


def test_derived_results_round_trip(text_result, tmp_path):
    """Statistics and normalised results (a ``bound`` dim, ``quantity`` attr) round-trip."""
    assert_round_trip(text_result.patch.normalized(), tmp_path / "norm.nc")
    assert_round_trip(text_result.patch.bootstrap_ci(n_resamples=20), tmp_path / "ci.nc")


def test_saved_spec_reruns_the_same_experiment(gpt2, tmp_path):
    """``PatchSpec.from_dict`` of the loaded spec re-runs to identical values."""
    spec = HEAD_OUT_BY_POS.sel(layer=[1], head=[0, 2]).named("some_heads")
    clean, corrupted = prompts(2)
    result = spec.run(gpt2, clean, corrupted, per_example_metric)
    loaded = patchspec.load(patchspec.save(result, tmp_path / "r.nc"))
    rebuilt = PatchSpec.from_dict(loaded.attrs["spec"])
    assert rebuilt == spec
    again = rebuilt.run(gpt2, clean, corrupted, per_example_metric)
    xr.testing.assert_identical(again, loaded)
    assert loaded.attrs["tokens_sha256"] == tokens_hash(clean, corrupted)


def test_provenance_hashes_weights_and_tokens(gpt2, tmp_path):
    """The attrs carry a weights fingerprint (a full hash on request) and a tokens hash."""
    clean, corrupted = prompts(2)
    result = RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric)
    assert "model_weights_sha256" not in result.attrs  # the full hash is opt-in
    assert len(result.attrs["model_fingerprint"]) == 64
    hashed = RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, hash_weights=True)
    assert hashed.attrs["model_weights_sha256"] == weights_hash(gpt2)
    assert hashed.attrs["model_fingerprint"] == result.attrs["model_fingerprint"]
    assert result.attrs["tokens_sha256"] == tokens_hash(clean, corrupted)
    assert result.attrs["tokens_sha256"] != tokens_hash(corrupted, clean)
    assert result.attrs["transformer_lens_version"].startswith("4.")
    twin = build("gpt2", tmp_path / "twin")  # same seed, same weights, another object
    assert weights_hash(twin) == weights_hash(gpt2)
    other = build("gpt2", tmp_path / "other", seed=1)
    assert weights_hash(other) != weights_hash(gpt2)
    fingerprint = ModelAdapter(twin).fingerprint(full=True)
    assert fingerprint["model_fingerprint"] == result.attrs["model_fingerprint"]
    adapter = ModelAdapter(other)
    assert adapter.fingerprint()["model_fingerprint"] != result.attrs["model_fingerprint"]
    before = weights_hash(twin)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert weights_hash(twin) != before
    assert ModelAdapter(twin).fingerprint()["model_fingerprint"] != fingerprint["model_fingerprint"]


def test_zarr_round_trip(text_result, tmp_path):
    """A ``.zarr`` path writes a zarr store that loads back identical."""
    pytest.importorskip("zarr")
    assert_round_trip(text_result, tmp_path / "r.zarr")


def test_errors_name_the_problem(tmp_path):
    """Missing files, unknown formats and unserialisable attrs are clear errors."""
    with pytest.raises(InputError, match="no saved result at"):
        patchspec.load(tmp_path / "missing.nc")
    result = xr.DataArray([1.0], dims="layer", name="m", attrs={"model": object()})
    with pytest.raises(
        InputError, match="attr 'model' of variable 'm' \\(object\\) cannot be saved"
    ):
        patchspec.save(result, tmp_path / "bad.nc")
    with pytest.raises(InputError, match="format must be one of"):
        patchspec.save(result, tmp_path / "r.nc", format="hdf")  # type: ignore[arg-type]
