"""Saving and loading results with their provenance (netCDF, zarr when installed)."""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
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
        InputError, match=r"attr 'model' of the result cannot be saved: type object \(<object"
    ):
        patchspec.save(result, tmp_path / "bad.nc")
    nested = result.assign_attrs(model="ok", spec={"a": [1, {"b": Path("x")}]})
    with pytest.raises(InputError, match=r"attr 'spec' of the result at \['a'\]\[1\]\['b'\]"):
        patchspec.save(nested, tmp_path / "bad.nc")
    with pytest.raises(InputError, match="format must be one of"):
        patchspec.save(result, tmp_path / "r.nc", format="hdf")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"folder .*nowhere' does not exist"):
        patchspec.save(result.assign_attrs(model="m"), tmp_path / "nowhere" / "r.nc")
    assert list(tmp_path.iterdir()) == []


def _types(value):
    """``value`` with every container and scalar replaced by its type (to compare types deeply)."""
    if isinstance(value, dict):
        return ("dict", [(_types(k), _types(v)) for k, v in value.items()])
    if isinstance(value, list | tuple | set | frozenset):
        return (type(value).__name__, [_types(v) for v in value])
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape)
    return type(value).__name__


def test_attr_types_round_trip(tmp_path):
    """Int dict keys, tuples, sets, bytes, numpy scalars and arrays keep their types."""
    attrs = {
        "by_layer": {0: (1, 2), 1: [3.5, None]},
        "tuple": ("a", ("b", 1)),
        "set": {1, 2},
        "frozen": frozenset({"x"}),
        "bytes": b"\x00\x01",
        "complex": 1 + 2j,
        "f32": np.float32(1.5),
        "i64": np.int64(7),
        "bool_": np.bool_(True),
        "matrix": np.arange(6, dtype=np.int8).reshape(2, 3),
        "one": np.array([1.0]),
        "tagged": {"__patchspec_type__": "tuple"},  # a key that looks like the tag
        "big": 2**70,
        "nul": "a\x00b",
        "units": "days since 2000-01-01",  # CF names are not interpreted
        "coordinates": "layer",
        "patchspec_attrs": "a user attr with a patchspec name",
        3: "an int key at the top level",
    }
    result = xr.DataArray([1.0, 2.0], dims="layer", name="m", attrs=attrs)
    loaded = assert_round_trip(result, tmp_path / "r.nc")
    assert _types(loaded.attrs) == _types(attrs)
    assert loaded.attrs["by_layer"] == {0: (1, 2), 1: [3.5, None]}
    assert loaded.dtype == result.dtype


def test_names_and_strings_netcdf_cannot_store_round_trip(tmp_path):
    """A NUL byte in a token label, "/" or non-string names and empty names are kept exactly."""
    ds = xr.Dataset(
        {
            "a/b": ("x/y", [1.0, 2.0], {"k": (1,)}),
            "a_b": ("x/y", [3.0, 4.0]),
            "": ("z", [1]),
            0: ("z", [2]),
        },
        coords={
            "x/y": ["p", "q"],
            "x/y_token": ("x/y", ["<bos>", " M\x00ary"]),
            "lone": ("x/y", ["\ud800", "ok"]),
            "objects": ("z", np.array(["s"], dtype=object)),
        },
        attrs={"sweep": ("a", "b")},
    )
    loaded = assert_round_trip(ds, tmp_path / "r.nc")
    assert loaded["x/y_token"].values.tolist() == ["<bos>", " M\x00ary"]
    assert loaded["objects"].dtype == object and loaded["x/y_token"].dtype == ds["x/y_token"].dtype
    for name in (None, 0, ("a", 1), "x/y", "layer"):  # "layer" is also a coordinate
        array = xr.DataArray([1.0, 2.0], dims="layer", coords={"layer": [0, 1]}, name=name)
        assert assert_round_trip(array, tmp_path / "a.nc").name == name


def _interrupted_write(self, path, **kwargs):
    """A netCDF write that fails half-way, leaving a partial file behind."""
    Path(path).write_bytes(b"\x89HDF\r\n\x1a\n partial")
    raise OSError("No space left on device")


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    """A write failing half-way, or a value refused up front, leaves the old file as it was."""
    path = tmp_path / "r.nc"
    old = xr.DataArray([1.0, 2.0], dims="layer", name="m", attrs={"run": 1})
    patchspec.save(old, path)
    before = path.read_bytes()
    new = old.assign_attrs(run=2)
    with monkeypatch.context() as patched:
        patched.setattr(xr.Dataset, "to_netcdf", _interrupted_write)
        with pytest.raises(
            InputError, match=r"could not save to .*r\.nc' \(OSError: No space left on device\)"
        ):
            patchspec.save(new, path)
    refused = [
        new.assign_attrs(model=object()),  # an attr of an unsupported type
        new.assign_coords(label=("layer", np.array(["a", 1], dtype=object))),  # mixed objects
    ]
    for bad in refused:
        with pytest.raises(InputError, match=r"cannot be saved|mixed objects"):
            patchspec.save(bad, path)
    assert path.read_bytes() == before
    xr.testing.assert_identical(patchspec.load(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["r.nc"]  # no temporary files left
    patchspec.save(new, path)
    assert patchspec.load(path).attrs["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["r.nc"]
    link = tmp_path / "link.nc"
    link.symlink_to(path)
    patchspec.save(old, link)  # writes the file the link points to
    assert link.is_symlink() and patchspec.load(path).attrs["run"] == 1


def _truncated(path):
    good = patchspec.save(xr.DataArray([1.0] * 100, dims="layer", name="m"), path.with_suffix(".x"))
    path.write_bytes(good.read_bytes()[:2000])


def _foreign(path):
    xr.Dataset({"a": ("x", [1.0])}, attrs={"title": "not patchspec"}).to_netcdf(path)


def _newer(path):
    patchspec.save(xr.DataArray([1.0], dims="layer", name="m"), path)
    with h5py.File(path, "a") as f:
        f.attrs["patchspec_format"] = 99


def _edited(path):
    patchspec.save(xr.Dataset({"a": ("x", [1.0]), "b": ("x", [2.0])}), path)
    with h5py.File(path, "a") as f:
        del f["b"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: None, "no saved result at"),
        (_truncated, "is not a readable netCDF file .*truncated file"),
        (lambda path: path.write_text("hello"), "is not a readable netCDF file"),
        (_foreign, "is a netCDF file but not a patchspec result .*xarray.open_dataset"),
        (_newer, "was written in patchspec file format 99, newer than this patchspec reads"),
        (_edited, r"lacks variables \['b'\]"),
        (lambda path: path.mkdir(), "is a folder, not a netCDF file"),
    ],
    ids=["missing", "truncated", "not-netcdf", "foreign", "newer", "edited", "folder"],
)
def test_load_errors_name_the_path(tmp_path, make, message):
    """Each unreadable file is an InputError naming the path and what is wrong."""
    path = tmp_path / "r.nc"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        patchspec.load(path)
    assert repr(str(path)) in str(info.value)


def test_legacy_files_load(tmp_path):
    """Files saved before the format had a version still load (attrs as plain JSON)."""
    ds = xr.Dataset(
        {"m": ("layer", [1.0, 2.0], {"spec": '{"a": [1]}', "patchspec_json": '["spec"]'})},
        coords={"layer": [0, 1]},
        attrs={"patchspec_dataarray": '"m"', "patchspec_json": '["patchspec_dataarray"]'},
    )
    ds.to_netcdf(tmp_path / "old.nc")
    loaded = patchspec.load(tmp_path / "old.nc")
    assert isinstance(loaded, xr.DataArray) and loaded.name == "m"
    assert loaded.attrs == {"spec": {"a": [1]}}


def test_named_positions_and_metric_dims_round_trip(gpt2, tmp_path):
    """A Sweep with named positions, several per-example metrics: Dataset and DataArray."""
    clean = ["w1 w2 w3 w4", "w5 w6 w7 w8 w9"]
    corrupted = ["w10 w2 w3 w4", "w5 w11 w7 w8 w9"]
    metrics = {"diff": per_example_metric, "again": per_example_metric}
    ds = patchspec.Sweep(RESID_PRE, ATTN_OUT).run(
        gpt2, clean, corrupted, metrics, positions={"END": -1, "A": [1, 2]}
    )
    assert {"metric", "example"} <= set(ds.dims)
    loaded = assert_round_trip(ds, tmp_path / "sweep.nc")
    assert loaded.attrs == ds.attrs and loaded["attn_out"].attrs == ds["attn_out"].attrs
    assert_round_trip(ds["resid_pre"], tmp_path / "resid.nc")
