"""Path specs (patchspec.paths): the value, the labelled result, and the batched engine against a
hand-written two-stage hook implementation, on multi-head and grouped-query models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchspec import Corrupted, PatchSpec, PatchSpecError, PatchSpecWarning, catalog
from patchspec.paths import PathSpec
from patchspec.paths.engine import split_qkv_input
from tests.conftest import logit_diff_metric, per_example_metric

# --- the oracle: freeze, patch senders, record receivers, patch receivers -------------------------


def _read_hook(receiver: str, layer: int) -> str:
    if receiver in ("q", "k", "v"):
        return f"blocks.{layer}.hook_resid_pre"
    if receiver == "mlp_in":
        return f"blocks.{layer}.ln2.hook_in"
    return "ln_final.hook_in"


_CACHES: dict = {}


@torch.no_grad()
def two_stage(model, clean, corrupted, sender, receiver, through, metric):
    """One path by hand, with full forward passes of the corrupted run.

    Stage 1 freezes every head's ``z`` (and, for direct paths, every MLP's output) at the
    corrupted run, patches the sender from the clean run and records the receiver's residual
    input. Stage 2 runs the corrupted input again with only the receiver's own pre-LayerNorm
    input replaced by the recorded one.
    """
    activation, s_layer, s_index = sender
    r_kind, r_layer, r_head = receiver
    key = (id(model), clean.data_ptr(), corrupted.data_ptr())
    if key not in _CACHES:
        _CACHES[key] = (model.run_with_cache(clean)[1], model.run_with_cache(corrupted)[1])
    clean_cache, corrupted_cache = _CACHES[key]
    n_layers = model.cfg.n_layers

    def freeze(name):
        def hook(act, hook):
            return corrupted_cache[name].clone()

        return hook

    def patch(name, index):
        def hook(act, hook):
            out = act.clone()
            out[index] = clean_cache[name][index]
            return out

        return hook

    hooks = []
    for layer in range(n_layers):
        z = f"blocks.{layer}.attn.hook_z"
        if activation == "z" and layer == s_layer:
            hooks.append((z, freeze(z)))
            hooks.append((z, patch(z, (slice(None), slice(None), s_index))))
        else:
            hooks.append((z, freeze(z)))
        mlp = f"blocks.{layer}.hook_mlp_out"
        if through == "direct":
            hooks.append((mlp, freeze(mlp)))
        if activation == "mlp_out" and layer == s_layer:
            hooks.append((mlp, patch(mlp, (slice(None), s_index))))
    if activation == "resid_pre":
        name = f"blocks.{s_layer}.hook_resid_pre"
        hooks.insert(0, (name, patch(name, (slice(None), s_index))))
    recorded = {}
    read = _read_hook(r_kind, r_layer)

    def record(act, hook):
        recorded["x"] = act.detach().clone()

    model.run_with_hooks(corrupted, fwd_hooks=[*hooks, (read, record)])

    if r_kind in ("q", "k", "v"):
        name = f"blocks.{r_layer}.attn.hook_{r_kind}_input"

        def replace(act, hook):
            out = act.clone()
            out[:, :, r_head] = recorded["x"]
            return out
    else:
        name = read

        def replace(act, hook):
            return recorded["x"]

    model.set_use_split_qkv_input(True)
    try:
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, replace)])
    finally:
        model.set_use_split_qkv_input(False)
    return metric(logits)


def _cells(result, spec):
    """(sender, receiver, value) for every measured cell of ``result``."""
    sender_axes, receiver_axes = spec.sender.axes, result.dims[len(spec.sender.axes) :]
    for index in np.ndindex(*result.shape):
        at = dict(zip(result.dims, index, strict=True))
        coords = {d: int(result[d].values[i]) for d, i in at.items()}
        value = float(result.values[index])
        s = {a: coords[f"sender_{a}"] for a in sender_axes}
        r = {d.removeprefix("receiver_"): coords[d] for d in receiver_axes}
        sender_index = s.get("head", s.get("pos"))
        receiver = (spec.receiver, r.get("layer", 0), r.get("head", r.get("kv_head")))
        yield (spec.sender.activation, s["layer"], sender_index), receiver, value


CASES = [
    # (sender spec, receivers)
    (catalog.HEAD_OUT.sel(layer=0, head=[0, 3]), ("q", "k", "v")),
    (catalog.HEAD_OUT.sel(head=[1]), ("mlp_in", "logits")),
    (
        PatchSpec("mlp_out", axes=("layer", "pos"), restrictions={"layer": 0, "pos": [2, 5]}),
        ("k", "logits"),
    ),
    (
        PatchSpec("resid_pre", axes=("layer", "pos"), restrictions={"layer": 1, "pos": [4]}),
        ("q", "mlp_in"),
    ),
]


@pytest.mark.parametrize(
    ("through", "project"),
    [("direct", True), ("mlp", True), ("direct", False)],
    ids=["direct", "mlp", "direct-per_head_inputs"],
)
def test_equals_two_stage_hooks(model, tokens, through, project, monkeypatch):
    """Every measured path equals the hand-written two-stage patch to 1e-5 (keys and values per
    key/value head on the grouped-query model), by either route into a query/key/value
    receiver; unmeasured cells are NaN and marked so."""
    from patchspec.paths import engine

    monkeypatch.setattr(engine, "PROJECT", project)
    clean, corrupted = tokens
    for sender, receivers in CASES:
        for receiver in receivers:
            spec = PathSpec(sender=sender, receiver=receiver, through=through)
            result = spec.run(model, clean, corrupted, logit_diff_metric)
            assert result.dims == spec.dims
            measured = result["measured"].broadcast_like(result).values
            assert np.isnan(result.values[~measured]).all()
            assert not np.isnan(result.values[measured]).any()
            checked = 0
            for s, r, value in _cells(result, spec):
                if math.isnan(value):
                    continue
                expected = two_stage(model, clean, corrupted, s, r, through, logit_diff_metric)
                assert value == pytest.approx(float(expected), rel=1e-5, abs=1e-5), (s, r)
                checked += 1
            assert checked > 0


def test_result_labels(qwen2, tokens):
    """Dims, coordinates and attrs: kv heads on keys, the mask, the direction and baselines."""
    clean, corrupted = tokens
    result = catalog.PATH_HEAD_TO_HEAD_K.run(qwen2, clean, corrupted, per_example_metric)
    assert result.dims == (
        "sender_layer",
        "sender_head",
        "receiver_layer",
        "receiver_kv_head",
        "example",
    )
    assert result.sizes["receiver_kv_head"] == 2
    assert result["measured"].dims == ("sender_layer", "receiver_layer")
    assert result["measured"].values.tolist() == [[False, True], [False, False]]
    assert np.isnan(result.sel(sender_layer=1).values).all()
    assert result.attrs["direction"] == "denoising" and result.attrs["receiver"] == "corrupted"
    assert result.attrs["receiver_input"] == "k" and result.attrs["through"] == "direct"
    assert len(result.attrs["clean_baseline"]) == 2
    assert PathSpec.from_dict(result.attrs["spec"]) == catalog.PATH_HEAD_TO_HEAD_K


def test_noising(gpt2, tokens):
    """A Corrupted() sender patches the clean run (noising), equal to swapping the runs."""
    clean, corrupted = tokens
    spec = PathSpec(sender=catalog.HEAD_OUT.using(Corrupted()), receiver="q")
    noised = spec.run(gpt2, clean, corrupted, logit_diff_metric)
    swapped = PathSpec(sender=catalog.HEAD_OUT, receiver="q").run(
        gpt2, corrupted, clean, logit_diff_metric
    )
    assert noised.attrs["direction"] == "noising"
    np.testing.assert_allclose(noised.values, swapped.values, rtol=1e-5, atol=1e-6)


def test_batched_uses_few_passes(gpt2, tokens):
    """All head -> head query paths of a 2-layer model take one replayed pass, not one per pair."""
    clean, corrupted = tokens
    result = catalog.PATH_HEAD_TO_HEAD_Q.run(gpt2, clean, corrupted, logit_diff_metric)
    assert result.attrs["forward_passes"] == 1
    reference = catalog.PATH_HEAD_TO_HEAD_Q.run(
        gpt2, clean, corrupted, logit_diff_metric, engine="reference"
    )
    assert reference.attrs["forward_passes"] == 16
    np.testing.assert_allclose(result.values, reference.values, rtol=1e-5, atol=1e-6)


def test_progress_counts_every_measured_path(gpt2, tokens, capsys):
    """progress=True draws one bar over the measured (sender, receiver) paths; False none."""
    clean, corrupted = tokens
    catalog.PATH_HEAD_TO_HEAD_Q.run(gpt2, clean, corrupted, logit_diff_metric, progress=True)
    bar = capsys.readouterr().err
    assert "patching" in bar and "16/16" in bar  # 4 layer-0 heads x 4 layer-1 heads
    catalog.PATH_HEAD_TO_HEAD_Q.run(gpt2, clean, corrupted, logit_diff_metric, progress=False)
    assert "16/16" not in capsys.readouterr().err


@settings(max_examples=5, deadline=None)
@given(
    heads=st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
    layers=st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
    receiver=st.sampled_from(["q", "k", "v", "mlp_in", "logits"]),
    through=st.sampled_from(["direct", "mlp"]),
    rows=st.integers(1, 5),
)
def test_batched_equals_one_pair_at_a_time(qwen2, tokens, heads, layers, receiver, through, rows):
    """Any senders and receivers, any rows per pass: the batched engine equals one full forward
    per (sender, receiver) pair."""
    clean, corrupted = tokens
    spec = PathSpec(
        sender=catalog.HEAD_OUT.sel(layer=layers, head=heads), receiver=receiver, through=through
    )
    batched = spec.run(qwen2, clean, corrupted, per_example_metric, cells_per_batch=rows)
    single = spec.run(qwen2, clean, corrupted, per_example_metric, engine="reference")
    np.testing.assert_allclose(batched.values, single.values, rtol=1e-5, atol=1e-6)


def test_split_input_flags_restored(gpt2, tokens, monkeypatch):
    """Where the per-head inputs are used (forced here), they are turned on for the passes and
    the caller's flags restored, also when the caller had use_attn_in on, and after an error."""
    from patchspec.paths import engine

    monkeypatch.setattr(engine, "PROJECT", False)
    clean, corrupted = tokens
    expected = catalog.PATH_HEAD_TO_HEAD_V.run(gpt2, clean, corrupted, logit_diff_metric)
    gpt2.set_use_attn_in(True)
    try:
        result = catalog.PATH_HEAD_TO_HEAD_V.run(gpt2, clean, corrupted, logit_diff_metric)
        assert gpt2.cfg.use_attn_in and not gpt2.cfg.use_split_qkv_input
        assert not np.isnan(result.sel(sender_layer=0, receiver_layer=1).values).any()
        np.testing.assert_allclose(result.values, expected.values, rtol=1e-5, atol=1e-6)
    finally:
        gpt2.set_use_attn_in(False)
    with pytest.raises(RuntimeError, match="boom"), split_qkv_input(gpt2):
        assert gpt2.cfg.use_split_qkv_input
        raise RuntimeError("boom")
    assert not gpt2.cfg.use_split_qkv_input and not gpt2.cfg.use_attn_in


def test_value_and_errors():
    """A path spec is a frozen, hashable value; bad fields are clear errors at construction."""
    spec = PathSpec(sender="z", receiver="q", through="mlp")
    assert spec == PathSpec.from_dict(spec.to_dict()) and hash(spec) == hash(
        PathSpec.from_dict(spec.to_dict())
    )
    assert spec.label == "path_z_to_q_via_mlp"
    assert spec.sel(layer=0).sender == PatchSpec(
        "z", axes=("layer", "head"), restrictions={"layer": 0}
    )
    with pytest.raises(AttributeError):
        spec.receiver = "k"  # type: ignore[misc]
    with pytest.raises(
        PatchSpecError, match=r"receiver 'key' is not a receiver input.*did you mean 'k'"
    ):
        PathSpec(sender="z", receiver="key")
    with pytest.raises(PatchSpecError, match=r"sender 'mlp_outt'.*did you mean 'mlp_out'"):
        PathSpec(sender="mlp_outt")
    with pytest.raises(PatchSpecError, match=r"through must be one of .*did you mean 'mlp'"):
        PathSpec(sender="z", through="mlps")
    with pytest.raises(PatchSpecError, match="must patch one of z, attn_out, mlp_out, resid_pre"):
        PathSpec(sender=catalog.HEAD_Q)
    with pytest.raises(PatchSpecError, match="restricts 'pos' without sweeping it"):
        PathSpec(sender=catalog.HEAD_OUT.sel(pos=-1))
    with pytest.raises(PatchSpecError, match=r"unknown key 'reciever'.*did you mean 'receiver'"):
        PathSpec.from_dict({"sender": "z", "reciever": "q"})


def test_bad_engine_and_padding(gpt2, tokens):
    """An unknown engine and differently padded runs are refused before any pass."""
    clean, corrupted = tokens
    with pytest.raises(PatchSpecError, match="engine 'batched' or 'reference', got 'fast'"):
        catalog.PATH_HEAD_TO_LOGITS.run(gpt2, clean, corrupted, logit_diff_metric, engine="fast")
    short = {"input_ids": corrupted, "attention_mask": torch.ones_like(corrupted)}
    short["attention_mask"][0, -1] = 0
    with (
        pytest.raises(PatchSpecError, match="padding at the same positions"),
        pytest.warns(PatchSpecWarning),
    ):
        catalog.PATH_HEAD_TO_LOGITS.run(gpt2, clean, short, logit_diff_metric)


# --- known mechanisms ---------------------------------------------------------------------------


def test_toy_previous_token_head_feeds_induction_keys():
    """On the toy induction model, the largest layer-0 -> layer-1 path (over queries, keys and
    values) runs from the previous-token head 0.0 into an induction head's key."""
    from patchspec.toy import induction_prompts, toy_model

    model = toy_model(device="cpu")
    prompts = induction_prompts(8, length=8, seed=0, corruption="query")
    answer = [model.to_single_token(w) for w in prompts.answer]
    wrong = [model.to_single_token(w) for w in prompts.wrong]
    from patchspec.metrics import logit_diff

    metric = logit_diff(answer, wrong)
    best = {}
    for receiver in ("q", "k", "v"):
        result = PathSpec(sender=catalog.HEAD_OUT.sel(layer=0), receiver=receiver).run(
            model, prompts.clean, prompts.corrupted, metric
        )
        effect = result.sel(sender_layer=0, receiver_layer=1) - result.attrs["corrupted_baseline"]
        best[receiver] = effect
    top = max(best, key=lambda r: float(best[r].max()))
    assert top == "k"
    k = best["k"]
    assert int(k.max("receiver_kv_head").argmax("sender_head")) == 0
    assert float(k.sel(sender_head=0).min()) > float(k.sel(sender_head=[1, 2, 3]).max())


def test_logits_paths_without_mlps(tmp_path, tokens):
    """On a model whose MLPs write nothing, head -> logits paths through MLPs equal the direct
    ones, and a last-layer head's direct path equals patching that head's output."""
    from tests.models import build

    model = build("gpt2", tmp_path / "no_mlp", seed=3)
    with torch.no_grad():
        for block in model.blocks:
            for p in block.mlp.out.parameters():
                p.zero_()
    clean, corrupted = tokens
    direct = catalog.PATH_HEAD_TO_LOGITS.run(model, clean, corrupted, per_example_metric)
    via = PathSpec(sender=catalog.HEAD_OUT, receiver="logits", through="mlp").run(
        model, clean, corrupted, per_example_metric
    )
    np.testing.assert_allclose(direct.values, via.values, rtol=1e-5, atol=1e-6)
    heads = catalog.HEAD_OUT.sel(layer=1).run(model, clean, corrupted, per_example_metric)
    np.testing.assert_allclose(
        direct.sel(sender_layer=1).values, heads.sel(layer=1).values, rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(direct.sel(sender_layer=0).values, direct.attrs["corrupted_baseline"])


def test_half_precision(tmp_path, tokens):
    """A bfloat16 grouped-query model runs both semantics, close to its float32 twin."""
    from patchspec.tiny import tiny_model
    from tests.models import VOCAB

    clean, corrupted = tokens
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(
            VOCAB, tmp_path / str(dtype), architecture="qwen2", device="cpu", dtype=dtype
        )
        for through in ("direct", "mlp"):
            spec = PathSpec(sender="z", receiver="k", through=through)
            results[dtype, through] = spec.run(model, clean, corrupted, logit_diff_metric)
    for through in ("direct", "mlp"):
        half, full = results[torch.bfloat16, through], results[torch.float32, through]
        measured = full["measured"].broadcast_like(full).values
        assert np.isfinite(half.values[measured]).all()
        np.testing.assert_allclose(half.values[measured], full.values[measured], atol=0.02)


EXPERIMENT = """
[model]
path = "toy"

[prompts]
clean = ["milk cake sun car milk cake sun", "tea road rice salt tea road rice"]
corrupted = ["milk cake sun car milk cake green", "tea road rice salt tea road green"]

[metric]
kind = "logit_diff"
answer = "car"
wrong = "green"

[[paths]]
catalog = "PATH_HEAD_TO_HEAD_K"

[[paths]]
sender = { activation = "mlp_out", axes = ["layer"] }
receiver = "logits"
through = "mlp"
name = "mlp_to_logits"

[output]
folder = "out"
"""


def test_experiment_file_paths(tmp_path, capsys):
    """An experiment file's [[paths]] (catalogue names or inline specs, no [[specs]] needed) run
    from the command line and are saved as netCDF; a misspelt name is a clear error."""
    from patchspec import io
    from patchspec.cli import main
    from patchspec.experiment import ExperimentError, load_experiment

    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT)
    loaded = load_experiment(path)
    assert loaded.specs == () and [p.label for p in loaded.paths] == [
        "path_head_to_head_k",
        "mlp_to_logits",
    ]
    assert main(["run", str(path), "--no-plots"]) == 0
    assert "Wrote 2 files" in capsys.readouterr().out
    keys = io.load(tmp_path / "out" / "path_head_to_head_k.nc")
    assert keys.dims == ("sender_layer", "sender_head", "receiver_layer", "receiver_kv_head")
    assert keys["measured"].values.tolist() == [[False, True], [False, False]]
    mlps = io.load(tmp_path / "out" / "mlp_to_logits.nc")
    assert mlps.dims == ("sender_layer",) and mlps.attrs["through"] == "mlp"
    path.write_text(EXPERIMENT.replace("PATH_HEAD_TO_HEAD_K", "PATH_HEAD_TO_HED_K"))
    with pytest.raises(
        ExperimentError, match=r"not a catalogue path.*did you mean 'PATH_HEAD_TO_HEAD_K'"
    ):
        load_experiment(path)
    path.write_text(EXPERIMENT.replace('receiver = "logits"', 'receiver = "logit"'))
    with pytest.raises(
        ExperimentError, match=r"\[\[paths\]\] entry 2 is not a valid path spec: receiver 'logit'"
    ):
        load_experiment(path)
