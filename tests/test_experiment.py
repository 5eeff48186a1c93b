"""Experiment files: malformed files raise errors naming the key and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchspec import cli, experiment
from patchspec.experiment import ExperimentError, load_experiment
from patchspec.sources import Mean

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
    assert (
        experiment.folder == (tmp_path / "out").resolve() and experiment.metric.name == "logit_diff"
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'kind = "logit_diff"',
            'kind = "logitdiff"',
            r"\[metric\] kind = 'logitdiff' is not a metric; valid: .*did you mean 'logit_diff'\?",
        ),
        (
            'catalog = "BLOCK_EVERY"',
            'catalog = "BLOCK_EVRY"',
            r"\[\[specs\]\] entry 1 catalog = 'BLOCK_EVRY' is not a catalogue name.*did you mean 'BLOCK_EVERY'\?",
        ),
        (
            'axes = ["layer", "head"]',
            'axes = ["layer", "heads"]',
            r"\[\[specs\]\] entry 2 is not a valid spec: axis 'heads' is not a dim",
        ),
        (
            'corrupted = ["d e f"]',
            'corrupted = ["d e f", "g h i"]',
            r"\[prompts\] has 1 clean but 2 corrupted prompts",
        ),
        ('corrupted = ["d e f"]', "", r"\[prompts\] needs 'corrupted'"),
        ('axes = ["layer", "head"]', 'axes = "layer"', r"entry 2 axes must be a list of dim names"),
        (
            '[[specs]]\ncatalog = "BLOCK_EVERY"\n\n[[specs]]\nactivation',
            "[specs]\nactivation",
            r"\[specs\] must be written \[\[specs\]\]",
        ),
        (
            'path = "toy"',
            'path = "toy"\ndevice = "cdua"',
            r"\[model\] device = 'cdua' is not a device",
        ),
        ('path = "toy"', 'path = "toy"\nname = "gpt2"', r"\[model\] gives both path"),
        (
            'corrupted = ["d e f"]',
            'corrupted = ["d e f"]\nfile = "p.jsonl"',
            r"\[prompts\] gives both 'file' and 'clean'",
        ),
        (
            'corrupted = ["d e f"]',
            'corrupted = [""]',
            r"\[prompts\] corrupted\[0\] must be a non-empty string",
        ),
        ('[model]\npath = "toy"', "[model]", r"\[model\] needs one of path"),
        (
            "[output]",
            "[outputs]",
            r"\[outputs\] is not a section; valid sections are .*did you mean 'output'\?",
        ),
        (
            'answer = "c"',
            "answer = 3.5",
            r"\[metric\] answer must be a token \(a string or a token id\), got 3.5 \(a float\)",
        ),
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


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'path = "toy"',
            'pth = "toy"',
            r"\[model\] pth is not a key of \[model\]; valid keys are path, name, device; did you mean 'path'\?",
        ),
        (
            'clean = ["a b c"]',
            'clean = ["a b c"]\nclen = ["x"]',
            r"\[prompts\] clen is not a key .*did you mean 'clean'\?",
        ),
        ('wrong = "f"', 'wrng = "f"', r"\[metric\] wrng is not a key .*did you mean 'wrong'\?"),
        (
            'folder = "out"',
            'foldr = "out"',
            r"\[output\] foldr is not a key .*did you mean 'folder'\?",
        ),
        (
            "[output]",
            '[run]\nengin = "batched"\n[output]',
            r"\[run\] engin is not a key .*did you mean 'engine'\?",
        ),
        (
            'catalog = "BLOCK_EVERY"',
            'catalog = "HEAD_OUT"\nnmae = "x"',
            r"\[\[specs\]\] entry 1 nmae is not a key .*did you mean 'name'\?",
        ),
        (
            'name = "heads_last"',
            'nme = "heads_last"',
            r"\[\[specs\]\] entry 2 is not a valid spec: unknown spec key 'nme'.*did you mean 'name'\?",
        ),
    ],
)
def test_misspelt_keys_are_errors_with_did_you_mean(tmp_path, old, new, message):
    """An unknown key in any section is an error suggesting the nearest valid key."""
    assert old in GOOD
    with pytest.raises(ExperimentError, match=message):
        load_experiment(write(tmp_path, GOOD.replace(old, new, 1)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[output]\nplots = "false"',
            r"\[output\] plots must be true or false \(a TOML boolean, no quotes\), got 'false' \(a string\)",
        ),
        ("[output]\nplots = 0", r"\[output\] plots must be true or false .*got 0 \(an integer\)"),
        ("[output]\nfolder = 3", r"\[output\] folder must be a non-empty string, got 3"),
        ('[run]\nstart_at_layer = "no"', r"\[run\] start_at_layer must be true or false"),
        ('[run]\ncells_per_batch = "4"', r"\[run\] cells_per_batch must be an integer, got '4'"),
        (
            '[run]\nengine = "batchd"',
            r"\[run\] is invalid: unknown engine 'batchd'.*did you mean 'batched'\?",
        ),
        ("[positions]\nEND = [1, 2]", r"\[positions\] END has 2 indices but there are 1 prompts"),
        ('[positions]\nEND = "last"', r"\[positions\] END must be an integer, got 'last'"),
        (
            "[reference]\nreference = [1]",
            r"\[reference\] reference\[0\] must be a non-empty string, got 1",
        ),
    ],
)
def test_values_must_have_their_types(tmp_path, text, message):
    """``plots = "false"`` is an error, not True; every value's type is checked."""
    base = GOOD.replace('[output]\nfolder = "out"\n', "")
    with pytest.raises(ExperimentError, match=message):
        load_experiment(write(tmp_path, base + text + "\n"))


def test_metric_arguments_are_checked(tmp_path):
    """Arguments a metric does not take, and token lists of the wrong length, are errors."""
    with pytest.raises(
        ExperimentError, match=r"\[metric\] pos is not an argument of 'loss'; it takes reduce"
    ):
        load_experiment(
            write(
                tmp_path,
                GOOD.replace(
                    'kind = "logit_diff"\nanswer = "c"\nwrong = "f"', 'kind = "loss"\npos = -1'
                ),
            )
        )
    with pytest.raises(
        ExperimentError, match=r"\[metric\] answer has 2 tokens but there are 1 prompts"
    ):
        load_experiment(write(tmp_path, GOOD.replace('answer = "c"', 'answer = ["c", "d"]')))
    with pytest.raises(ExperimentError, match=r"\[metric\] 'logit_diff' needs 'wrong'"):
        load_experiment(write(tmp_path, GOOD.replace('wrong = "f"\n', "")))
    with pytest.raises(ExperimentError, match=r'\[metric\] reduce must be "mean" or "none"'):
        load_experiment(write(tmp_path, GOOD.replace('wrong = "f"', 'wrong = "f"\nreduce = "sum"')))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("heads/last", "contains a '/'"),
        ("..", "is only dots"),
        ("a\\\\b", "contains a '\\\\'"),
        ("a\\tb", "contains a control character"),
    ],
)
def test_spec_names_unsafe_as_file_names_are_refused(tmp_path, name, problem):
    """A name that cannot name ``<name>.nc`` is refused when the file is read."""
    path = write(tmp_path, GOOD.replace('name = "heads_last"', f'name = "{name}"'))
    with pytest.raises(
        ExperimentError, match=rf"\[\[specs\]\] entry 2 names its results .*, which {problem}"
    ):
        load_experiment(path)


def test_spec_names_must_differ_ignoring_case(tmp_path):
    """Two specs whose files would overwrite each other on a case-insensitive disk are refused."""
    text = GOOD.replace('name = "heads_last"', 'name = "Attn_Out"')
    with pytest.raises(
        ExperimentError,
        match=r"entry 2 names its results 'Attn_Out', as \[\[specs\]\] entry 1 does \('attn_out'\)",
    ):
        load_experiment(write(tmp_path, text))


def test_a_bad_spec_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`patchspec run` refuses an unsafe spec name without loading a model or running a pass."""
    calls = []
    monkeypatch.setattr(experiment, "load_model", lambda spec: calls.append(spec))
    path = write(tmp_path, GOOD.replace('name = "heads_last"', 'name = "heads/last"'))
    assert cli.main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert calls == [] and "contains a '/'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_named_positions_and_reference_sets_are_checked(tmp_path):
    """Names the specs use must be given in [positions]; Mean datasets in [reference]."""
    named = GOOD.replace("restrictions = { pos = -1 }", 'restrictions = { pos = "END" }')
    with pytest.raises(ExperimentError, match=r"named position 'END', which no \[positions\]"):
        load_experiment(write(tmp_path, named))
    mean = GOOD.replace(
        'name = "heads_last"', 'name = "heads_last"\nsource = { kind = "mean", over = "ref" }'
    )
    with pytest.raises(
        ExperimentError, match=r"the reference dataset 'ref', which the \[reference\] section"
    ):
        load_experiment(write(tmp_path, mean))
    both = named.replace(
        'name = "heads_last"', 'name = "heads_last"\nsource = { kind = "mean", over = "ref" }'
    )
    exp = load_experiment(
        write(
            tmp_path,
            both
            + '[positions]\nEND = -1\n[reference]\nref = ["x y z"]\n[run]\nmax_memory = "1GB"\n',
        )
    )
    assert exp.positions == {"END": [-1]} and exp.reference == {"ref": ["x y z"]}
    assert exp.specs[-1].source == Mean(over="ref") and exp.options == {"max_memory": "1GB"}


def test_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    """``[model] path`` resolves from the experiment's folder, not from the working directory."""
    folder, elsewhere = tmp_path / "exp", tmp_path / "elsewhere"
    (folder / "model").mkdir(parents=True)
    (elsewhere / "model").mkdir(parents=True)  # a decoy with the same name
    (elsewhere / "other").mkdir()
    for model in (folder / "model", elsewhere / "model"):
        (model / "config.json").write_text("{}")
    monkeypatch.chdir(elsewhere)
    path = folder / "exp.toml"
    path.write_text(GOOD.replace('path = "toy"', 'path = "model"'))
    exp = load_experiment(path)
    assert exp.model == {"path": str((folder / "model").resolve())}
    assert exp.folder == (folder / "out").resolve()
    booted = []
    from transformer_lens.model_bridge import TransformerBridge

    def boot(name, device=None):
        booted.append(name)
        raise OSError("no weights here")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))
    with pytest.raises(
        ExperimentError, match=r"\[model\] path '.*exp/model' cannot be loaded: OSError"
    ):
        experiment.load_model(exp.model)
    assert booted == [str((folder / "model").resolve())]
    path.write_text(GOOD.replace('path = "toy"', 'path = "other"'))
    with pytest.raises(
        ExperimentError,
        match=r"\[model\] path = 'other' is not a folder: '.*exp/other' \(relative paths are relative to the experiment file",
    ):
        load_experiment(path)


def _jsonl(tmp_path, lines):
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    text = GOOD.replace('clean = ["a b c"]\ncorrupted = ["d e f"]', 'file = "pairs.jsonl"')
    return write(tmp_path, text.replace('answer = "c"\nwrong = "f"\n', ""))


GOOD_ROW = json.dumps({"clean": "a b c", "corrupted": "d e f", "answer": "c", "wrong": "f"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            '{"clean": "a b c", "corrupted": ',
            r"line 3 is not valid JSON: Expecting value \(column 33\)",
        ),
        ('["a", "b"]', r"line 3 must be a JSON object"),
        ('{"clean": "a b c", "answer": "c", "wrong": "f"}', r"line 3 has no 'corrupted' key"),
        (
            '{"clean": 3, "corrupted": "d", "answer": "c", "wrong": "f"}',
            r"line 3 'clean' must be a non-empty string, got 3",
        ),
        (
            '{"clean": "a", "corupted": "d", "answer": "c", "wrong": "f"}',
            r"line 3 corupted is not a key .*did you mean 'corrupted'\?",
        ),
        (
            '{"clean": "a", "corrupted": "d", "answer": true, "wrong": "f"}',
            r"line 3 'answer' must be a token",
        ),
        (
            '{"clean": "a", "corrupted": "d", "wrong": "f"}',
            r"line 3 has no 'answer' but line 1 has one",
        ),
    ],
)
def test_malformed_jsonl_lines_are_named(tmp_path, bad, message):
    """Each malformed line of a prompts file is an error naming the file and the line."""
    path = _jsonl(tmp_path, [GOOD_ROW, "", bad])
    with pytest.raises(ExperimentError, match=r"\[prompts\] file '.*pairs\.jsonl' " + message):
        load_experiment(path)


def test_jsonl_columns_feed_the_metric_and_positions(tmp_path):
    """answer/wrong and per-line named positions come from the prompts file."""
    rows = [
        {
            "clean": "a b c",
            "corrupted": "d e f",
            "answer": "c",
            "wrong": "f",
            "positions": {"END": 2},
        },
        {
            "clean": "a b c d",
            "corrupted": "d e f g",
            "answer": "d",
            "wrong": "g",
            "positions": {"END": 3},
        },
    ]
    exp = load_experiment(_jsonl(tmp_path, [json.dumps(r) for r in rows]))
    assert exp.clean == ["a b c", "a b c d"] and exp.positions == {"END": [2, 3]}
    with pytest.raises(
        ExperimentError, match=r"\[metric\] answer is given here and in the prompts file"
    ):
        load_experiment(
            write(
                tmp_path,
                exp_text(tmp_path).replace(
                    'kind = "logit_diff"', 'kind = "logit_diff"\nanswer = "c"'
                ),
            )
        )


def exp_text(tmp_path):
    return (tmp_path / "exp.toml").read_text()


def test_every_key_is_documented():
    """docs/cli.md's table lists every section and key the loader accepts, on the section's rows."""
    rows = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text().splitlines()
    sections: dict[str, str] = {}
    current = ""
    for row in rows:
        if row.startswith("| `["):
            current = row.split("`")[1].strip("[]")
        if row.startswith("| ") and current:
            sections[current] = sections.get(current, "") + row
    assert set(sections) == set(experiment.KEYS)
    for section, keys in experiment.KEYS.items():
        for key in keys:
            assert f"`{key}`" in sections[section], (section, key)
