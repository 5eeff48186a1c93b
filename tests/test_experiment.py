"""Experiment files: malformed files raise errors naming the key and what was expected."""

from __future__ import annotations

import pytest

from patchspec.experiment import ExperimentError, load_experiment

GOOD = """
[model]
path = "toy"

[prompts]
clean = ["a b c"]
corrupted = ["d e f"]

[metric]
kind = "logit_diff"
answer = "c"
wrong = "f"

[[specs]]
catalog = "BLOCK_EVERY"

[[specs]]
activation = "z"
axes = ["layer", "head"]
restrictions = { pos = -1 }
name = "heads_last"

[output]
folder = "out"
"""


def write(tmp_path, text):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_a_good_file_parses(tmp_path):
    """Catalogue sweeps expand to their specs; inline specs are built from their dicts."""
    experiment = load_experiment(write(tmp_path, GOOD))
    assert [s.label for s in experiment.specs] == ["resid_pre", "attn_out", "mlp_out", "heads_last"]
    assert experiment.specs[-1].restriction("pos") == -1
    assert experiment.folder == (tmp_path / "out").resolve() and experiment.metric.name == "logit_diff"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('kind = "logit_diff"', 'kind = "logitdiff"', r"\[metric\] kind = 'logitdiff' is not a metric; valid: .*did you mean 'logit_diff'\?"),
        ('catalog = "BLOCK_EVERY"', 'catalog = "BLOCK_EVRY"', r"\[\[specs\]\] entry 1 catalog = 'BLOCK_EVRY' is not a catalogue name.*did you mean 'BLOCK_EVERY'\?"),
        ('axes = ["layer", "head"]', 'axes = ["layer", "heads"]', r"\[\[specs\]\] entry 2 is not a valid spec: axis 'heads' is not a dim"),
        ('corrupted = ["d e f"]', 'corrupted = ["d e f", "g h i"]', r"\[prompts\] has 1 clean but 2 corrupted prompts"),
        ('corrupted = ["d e f"]', "", r"\[prompts\] needs 'corrupted'"),
        ('[model]\npath = "toy"', "[model]", r"\[model\] needs path"),
        ("[output]", "[outputs]", r"\[outputs\] is not a section; valid sections are .*did you mean 'output'\?"),
        ('answer = "c"', "answer = 3.5\nextra = 1", r"\[metric\] has bad arguments for 'logit_diff'"),
    ],
)
def test_malformed_files_name_the_key(tmp_path, old, new, message):
    """Each malformed file raises ExperimentError naming the file, the key and what was expected."""
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ExperimentError, match=message) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_not_toml_and_missing_file(tmp_path):
    """Syntax errors and missing files are ExperimentErrors too."""
    with pytest.raises(ExperimentError, match="not valid TOML"):
        load_experiment(write(tmp_path, "[model\n"))
    with pytest.raises(ExperimentError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.toml")
