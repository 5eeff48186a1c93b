"""The main job: `patchspec demo` finds the toy model's circuit; `patchspec run` runs a file."""

from __future__ import annotations

import contextlib
import io as io_
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from patchspec import cli, io
from patchspec.cli import demo, main, run_experiment, write_outputs
from patchspec.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
#: What the demo printed (filled by the ``found`` fixture).
PRINTED: dict[str, str] = {}


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    printed = io_.StringIO()
    with contextlib.redirect_stdout(printed):
        result = demo(tmp_path_factory.mktemp("demo"), progress=False)
    PRINTED["demo"] = printed.getvalue()
    return result


def test_docs_show_what_the_demo_prints_and_every_option(found):
    """docs/cli.md's demo output is what the demo prints (but the folder and timing), and the
    page names every option of the parser."""
    page = (ROOT / "docs" / "cli.md").read_text()
    section = page[page.index("## `patchspec demo`") :]
    shown = section[section.index("```text\n") + 8 :]
    shown = shown[: shown.index("```")]
    printed = PRINTED["demo"]
    def tail(text):
        return re.sub(r"Wrote 19 files to .*", "Wrote 19 files", text.strip())
    assert tail(shown) == tail(printed)
    for action in cli.parser()._subparsers._group_actions[0].choices["run"]._actions:
        for flag in action.option_strings:
            assert flag in page or flag in ("-h", "--help"), flag


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
    pair = "atp_vs_exact_head_out_by_pos.png"
    assert {f"{n}.nc" for n in names} | {f"{n}.png" for n in names} | {pair} == written
    nc = next(p for p in found.files if p.name == "head_out_by_pos.nc")
    loaded = io.load(nc)
    assert loaded.dims == ("layer", "pos", "head") and "pos_token" in loaded.coords
    xr.testing.assert_allclose(loaded, found.results["head_out_by_pos"])


def test_demo_estimates_every_sweep_by_attribution_patching(found):
    """The demo's AtP estimates lie on the exact results' grids and agree with them where the
    toy circuit is (the previous-token and induction heads are AtP's top heads too)."""
    estimates = found.estimates
    assert estimates is not None and set(estimates.data_vars) == set(found.results.data_vars)
    for name in found.results.data_vars:
        exact, atp = found.results[name], estimates[name]
        assert atp.dims == exact.dims and atp.attrs["estimator"] == "atp" and not atp.attrs["exact"]
    heads = estimates["head_out"].patch.effect()
    assert int(heads.sel(layer=0).argmax("head")) == found.previous_token_head
    exact = found.results["head_out_by_pos"].patch.effect().values.ravel()
    atp = estimates["head_out_by_pos"].patch.effect().values.ravel()
    assert np.corrcoef(exact, atp)[0, 1] > 0.9


def test_run_sample_experiment(tmp_path, capsys):
    """`patchspec run` on the sample file prints baselines and top cells like the demo, and
    writes the expected dims and coordinates to --out (no plots with --no-plots)."""
    out = tmp_path / "chosen"
    sample = ROOT / "examples" / "experiments" / "induction.toml"
    assert main(["run", str(sample), "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr()
    assert re.search(r"^baselines: clean 15\.\d{3}, corrupted -15\.\d{3}$", printed.out, re.M)
    assert "Top cells by normalised effect (patched - corrupted) / (clean - corrupted)" in printed.out
    rows = re.findall(r"^  (\w+) +(layer=.*)$", printed.out, re.M)
    assert [name for name, _cells in rows] == [
        "resid_pre", "attn_out", "mlp_out", "head_out", "head_out_last_pos"
    ]  # fmt: skip
    assert all(len(cells.split(", ")) == 2 and ": +" in cells for _name, cells in rows)
    assert f"Wrote 5 files to {out}/" in printed.out
    assert "\r" not in printed.err + printed.out  # not a terminal: no progress bar
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
    """The heatmap is drawn from the normalised effect itself, so its title is the plot's own
    (which states attrs["formula"]); the CLI overrides neither title nor name."""
    import patchspec.plot
    from patchspec.accessor import PatchAccessor

    def noising(self):
        return self._obj.assign_attrs(formula="(clean - patched) / (clean - corrupted)")

    titles = []
    monkeypatch.setattr(PatchAccessor, "normalized", noising)
    monkeypatch.setattr(
        patchspec.plot, "plot", lambda data, **kw: titles.append((data.name, data.attrs["formula"], kw))
    )
    ds = xr.Dataset({"heads": ("layer", [1.0, 2.0])})
    write_outputs(ds, tmp_path, plots=True)
    assert titles == [("heads", "(clean - patched) / (clean - corrupted)", {"path": tmp_path / "heads.png"})]
    with pytest.raises(
        InputError, match=r"result 'a/b' contains a '/' and cannot name an output file"
    ):
        write_outputs(xr.Dataset({"a/b": ("layer", [1.0])}), tmp_path / "x", plots=False)
    assert not (tmp_path / "x").exists()


def one_line_error(capsys, argv, match):
    """``main(argv)`` exits 2 with one line on stderr matching ``match``, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.match(r"patchspec: error: " + match, err), err


def test_version_and_help_import_nothing_heavy():
    """`--version` and `--help` answer without importing torch, TransformerLens or xarray, and
    the help has no reST markup."""
    code = (
        "import sys, contextlib, io\n"
        "from patchspec.cli import main\n"
        "for argv in (['--version'], ['--help'], ['run', '--help'], ['demo', '--help']):\n"
        "    with contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "heavy = {'torch', 'transformer_lens', 'transformers', 'xarray'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    from patchspec import __version__

    assert done.stdout.startswith(f"patchspec {__version__}\n")
    for option in ("--out FOLDER", "--device DEVICE", "--engine {batched,reference}"):
        assert option in done.stdout
    assert "--progress, --no-progress" in done.stdout
    assert not re.search(r"``|:mod:|:func:|:class:", done.stdout)


def test_engine_choices_are_the_registered_engines(capsys):
    """--engine offers the estimator registry's built-in names; another name is refused."""
    from patchspec.execute.registry import ESTIMATORS

    assert set(cli.ENGINES) <= set(ESTIMATORS) and {"batched", "reference"} <= set(cli.ENGINES)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--engine", "fast"])
    assert exit_.value.code == 2
    assert "invalid choice: 'fast' (choose from" in capsys.readouterr().err


def test_bad_device_folder_or_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """A device this machine lacks, a folder that holds no model, an unreadable or missing file:
    one line, exit status 2, before any model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, ["demo", "--device", "cuda"], r"--device 'cuda' is not available: ")
    one_line_error(capsys, ["demo", "--device", "gpu"], r"--device 'gpu' is not a device")
    (tmp_path / "empty").mkdir()
    good = (ROOT / "examples" / "experiments" / "induction.toml").read_text()
    exp = tmp_path / "exp.toml"
    exp.write_text(good.replace('path = "toy"', 'path = "empty"'))
    (tmp_path / "induction_prompts.jsonl").write_text(
        (ROOT / "examples" / "experiments" / "induction_prompts.jsonl").read_text()
    )
    one_line_error(
        capsys, ["run", str(exp)], r".*exp\.toml: \[model\] path = 'empty' is not a model folder: .* has no config\.json"
    )
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "nonsense"}')
    one_line_error(capsys, ["run", str(exp)], r"\[model\] path '.*empty' cannot be loaded: ")
    exp.write_text(good.replace('path = "toy"', 'path = "toy"\ndevice = "cuda"'))
    one_line_error(capsys, ["run", str(exp)], r".*\[model\] device = 'cuda' is not available")
    exp.write_text(good)
    one_line_error(capsys, ["run", str(exp), "--device", "cuda:1"], r"--device 'cuda:1' is not")
    one_line_error(capsys, ["run", str(tmp_path)], r".* is a folder, not an experiment file")
    one_line_error(capsys, ["run", str(tmp_path / "no.toml")], r".*no\.toml: no such experiment file")

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    one_line_error(capsys, ["run", str(exp)], r".*exp\.toml: cannot be read: Permission denied")


def test_report_ranks_per_metric_and_per_prompt_baselines(capsys):
    """The summary gives a metric dim one ranking (and baselines) per metric, and averages
    per-prompt baselines."""
    values = xr.DataArray(
        [[1.0, 3.0], [2.0, 0.0]],
        dims=("metric", "layer"),
        coords={"metric": ["a", "b"], "layer": [0, 1]},
        attrs={"clean_baseline": [4.0, 2.0], "corrupted_baseline": [0.0, 0.0]},
    )
    cli.report(xr.Dataset({"resid": values}), k=1)
    out = capsys.readouterr().out
    assert "baselines [a]: clean 4.000, corrupted 0.000\nbaselines [b]: clean 2.000" in out
    assert re.search(r"resid \[a\] +layer=1: \+0\.75\n  resid \[b\] +layer=0: \+1\.00", out)
    per_prompt = xr.DataArray(
        [[1.0, 3.0], [2.0, 0.0]],
        dims=("layer", "example"),
        coords={"layer": [0, 1]},
        attrs={"clean_baseline": [4.0, 2.0], "corrupted_baseline": [0.0, 1.0]},
    )
    cli.report(xr.Dataset({"resid": per_prompt}), k=1)
    out = capsys.readouterr().out
    assert "baselines: clean mean 3.000 over 2 prompts, corrupted mean 0.500 over 2 prompts" in out
    assert re.search(r"resid +layer=0: \+", out)
