"""The main job: `patchspec demo` finds the toy model's circuit; `patchspec run` runs a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import xarray as xr

from patchspec import io
from patchspec.cli import demo, main, run_experiment, write_outputs
from patchspec.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    return demo(tmp_path_factory.mktemp("demo"), progress=False)


def test_demo_finds_the_heads_the_head_detector_finds(found):
    """Patching's top heads are TransformerLens's head-detector heads (an independent check)."""
    prev = torch.tensor(found.detector["previous_token_head"])
    induction = torch.tensor(found.detector["induction_head"])
    assert found.previous_token_head == int(prev[0].argmax())
    last = induction.shape[0] - 1
    # The toy model's layer-1 heads are all induction heads with near-equal detector scores
    # (0.62-0.64 of a possible 0.645): the patched top head must be one of the best.
    assert induction[last, found.induction_head] >= induction[last].max() - 0.02
    heads = found.results["head_out"].patch.normalized()
    assert float(heads.sel(layer=0, head=found.previous_token_head)) > 0.8
    assert float(heads.sel(layer=last, head=found.induction_head)) > 0.5
    # Heads that are neither barely matter.
    others = heads.sel(layer=0).drop_sel(head=found.previous_token_head)
    assert float(abs(others).max()) < 0.2


def test_demo_writes_results_and_heatmaps(found):
    """Every sweep is written as netCDF (loadable, labelled) and as a PNG heatmap."""
    names = set(found.results.data_vars)
    written = {p.name for p in found.files}
    assert {f"{n}.nc" for n in names} | {f"{n}.png" for n in names} == written
    nc = next(p for p in found.files if p.name == "head_out_by_pos.nc")
    loaded = io.load(nc)
    assert loaded.dims == ("layer", "pos", "head") and "pos_token" in loaded.coords
    xr.testing.assert_allclose(loaded, found.results["head_out_by_pos"])


def test_run_sample_experiment(tmp_path, capsys):
    """`patchspec run` on the sample file writes the expected dims and coordinates."""
    folder = tmp_path / "experiments"
    shutil.copytree(ROOT / "examples" / "experiments", folder)
    text = (folder / "induction.toml").read_text().replace("../../patchspec-out/induction", "out")
    (folder / "induction.toml").write_text(text.replace("plots = true", "plots = false"))
    assert main(["run", str(folder / "induction.toml"), "--no-progress"]) == 0
    out = folder / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["resid_pre.nc", "attn_out.nc", "mlp_out.nc", "head_out.nc", "head_out_last_pos.nc"]
    )
    heads = io.load(out / "head_out_last_pos.nc")
    assert heads.dims == ("layer", "head") and heads["head"].values.tolist() == [0, 1, 2, 3]
    assert heads.attrs["spec"]["restrictions"] == {"pos": -1}
    resid = io.load(out / "resid_pre.nc")
    assert resid.dims == ("layer", "pos") and resid.sizes["pos"] == 12
    assert resid["pos_token"].values[0] == "<bos>"


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    """A malformed experiment file exits 2 with the error on stderr."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npath = "toy"\n[prompts]\nclean = ["a"]\n')
    assert main(["run", str(bad)]) == 2
    assert "[prompts] needs 'corrupted'" in capsys.readouterr().err


def test_run_with_named_positions_reference_and_options(tmp_path):
    """[positions], [reference] and [run] options reach the sweep; results are saved and load."""
    shutil.copy(ROOT / "examples" / "experiments" / "induction_prompts.jsonl", tmp_path)
    first = (tmp_path / "induction_prompts.jsonl").read_text().splitlines()[:2]
    reference = [json.loads(line)["clean"] for line in first]
    (tmp_path / "exp.toml").write_text(
        f"""
[model]
path = "toy"
[prompts]
file = "induction_prompts.jsonl"
[metric]
kind = "logit_diff"
[[specs]]
activation = "resid_pre"
axes = ["layer", "pos"]
name = "resid_named"
[[specs]]
catalog = "ATTN_OUT"
name = "attn_mean"
[positions]
END = -1
FIRST = 1
[reference]
ref = {json.dumps(reference)}
[output]
folder = "out"
plots = false
[run]
engine = "reference"
hash_weights = true
"""
    )
    text = (tmp_path / "exp.toml").read_text()
    text = text.replace(
        'name = "attn_mean"', 'name = "attn_mean"\nsource = { kind = "mean", over = "ref" }'
    )
    (tmp_path / "exp.toml").write_text(
        text.replace(
            'catalog = "ATTN_OUT"\n',
            'activation = "attn_out"\naxes = ["layer"]\nrestrictions = { pos = "END" }\n',
        )
    )
    ds = run_experiment(tmp_path / "exp.toml", progress=False)
    assert ds["resid_named"]["pos"].values.tolist() == ["END", "FIRST"]
    assert ds["attn_mean"].attrs["estimator"] == "reference"
    assert "model_weights_sha256" in ds["attn_mean"].attrs
    assert ds["attn_mean"].attrs["sources"] == [
        {"kind": "mean", "over": "ref", "receiver": "clean"}
    ]
    loaded = io.load(tmp_path / "out" / "resid_named.nc")
    xr.testing.assert_identical(loaded, ds["resid_named"])


def test_plot_titles_name_the_formula_the_effect_states(tmp_path, monkeypatch):
    """The heatmap title is the normalised effect's own formula (attrs["formula"])."""
    import patchspec.plot
    from patchspec.accessor import PatchAccessor

    def noising(self):
        return self._obj.assign_attrs(formula="(clean - patched) / (clean - corrupted)")

    titles = []
    monkeypatch.setattr(PatchAccessor, "normalized", noising)
    monkeypatch.setattr(patchspec.plot, "plot", lambda data, **kw: titles.append(kw["title"]))
    ds = xr.Dataset({"heads": ("layer", [1.0, 2.0])})
    write_outputs(ds, tmp_path, plots=True)
    assert titles == ["heads: (clean - patched) / (clean - corrupted)"]
    with pytest.raises(
        InputError, match=r"result 'a/b' contains a '/' and cannot name an output file"
    ):
        write_outputs(xr.Dataset({"a/b": ("layer", [1.0])}), tmp_path / "x", plots=False)
    assert not (tmp_path / "x").exists()
