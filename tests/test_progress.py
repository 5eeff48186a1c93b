"""Progress: one bar per run over every spec's cells, quiet off a terminal, ``progress=`` honoured."""

from __future__ import annotations

import re

import pytest

from patchspec import catalog, compat, runner
from patchspec.spec import Sweep
from tests.conftest import logit_diff_metric

SPECS = (catalog.RESID_PRE, catalog.HEAD_OUT, catalog.ATTN_OUT)


def bars(err: str) -> set[str]:
    """The descriptions of every tqdm bar written to ``err``."""
    return set(re.findall(r"(patching [^:\r\n]*):", err))


def test_a_sweep_shows_one_bar_over_all_its_specs(gpt2, tokens, capsys):
    """A Sweep of 3 specs is one bar of all their cells, the spec being run in its postfix."""
    clean, corrupted = tokens
    ds = Sweep(*SPECS).run(gpt2, clean, corrupted, logit_diff_metric, progress=True)
    err = capsys.readouterr().err
    assert bars(err) == {"patching 3 specs (batched)"}
    cells = sum(ds[name].size for name in ds.data_vars)
    assert f"0/{cells}" in err and f"{cells}/{cells}" in err
    assert "attn_out" in err.rsplit("\r", 1)[-1]  # the last spec, in the finished bar


def test_one_spec_names_itself_and_compat_honours_progress(gpt2, tokens, capsys):
    """``spec.run`` names the spec; compat shows a bar by default (as TransformerLens) and
    ``progress=False`` silences it."""
    clean, corrupted = tokens
    catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, progress=True)
    assert bars(capsys.readouterr().err) == {"patching head_out (batched)"}
    cache = gpt2.run_with_cache(clean)[1]
    compat.get_act_patch_resid_pre(gpt2, corrupted, cache, logit_diff_metric)
    assert len(bars(capsys.readouterr().err)) == 1
    compat.get_act_patch_resid_pre(gpt2, corrupted, cache, logit_diff_metric, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_progress_false_prints_nothing(gpt2, tokens, capsys, engine):
    clean, corrupted = tokens
    Sweep(*SPECS).run(gpt2, clean, corrupted, logit_diff_metric, progress=False, engine=engine)
    assert capsys.readouterr().err == ""


def test_default_is_quiet_off_a_terminal_and_shown_on_one(gpt2, tokens, capsys, monkeypatch):
    """``progress=None``: no bar in a pipe, log or CI, even for a large run; a bar on a terminal
    for runs of PROGRESS_FROM cells or more, none below."""
    clean, corrupted = tokens
    monkeypatch.setattr(runner, "PROGRESS_FROM", 1)
    Sweep(*SPECS).run(gpt2, clean, corrupted, logit_diff_metric)
    assert capsys.readouterr().err == ""  # captured stderr is no terminal
    monkeypatch.setattr(runner, "interactive", lambda: True)
    Sweep(*SPECS).run(gpt2, clean, corrupted, logit_diff_metric)
    assert bars(capsys.readouterr().err) == {"patching 3 specs (batched)"}
    monkeypatch.setattr(runner, "PROGRESS_FROM", 10_000)
    Sweep(*SPECS).run(gpt2, clean, corrupted, logit_diff_metric)
    assert capsys.readouterr().err == ""


def test_tiny_models_load_without_hugging_face_bars(capfd):
    """No "Writing model shards" / "Loading weights" bars while a tiny model is made."""
    from patchspec.tiny import tiny_model

    model = tiny_model(["a", "b"], device="cpu")
    assert model.cfg.n_layers == 2
    out, err = capfd.readouterr()
    assert "Writing" not in err + out and "Loading" not in err + out
