"""Subspace, Add and SAELatent patch types against hand-written hooks, on both engines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformer_lens.tools.analysis.interchange import SubspaceInterchange

from patchspec import JointSpec, PatchSpec, Sweep
from patchspec.errors import InputError, SpecError
from patchspec.interventions import Add, SAELatent, Subspace, orthonormal_basis, sae_weights
from patchspec.sources import Zero, source_from_dict
from patchspec.spec import spec_from_dict
from tests.conftest import per_example_metric

TOL = 1e-5


def _close(got, want, atol: float = TOL, rtol: float = TOL) -> None:
    """``got`` (a result's values or a tensor) equals ``want`` to the tolerances, in float64."""
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
        atol=atol, rtol=rtol,
    )


def _basis(d: int, rank: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, rank, generator=torch.Generator().manual_seed(seed))


def _cache(model, tokens, names):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def _hooked(model, tokens, name, fn):
    """The per-prompt metric with ``fn(act)`` replacing the activation at ``name``."""
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: fn(act.clone()))])
    return per_example_metric(logits)


def _both(spec, model, clean, corrupted, **kw):
    fast = spec.run(model, clean, corrupted, per_example_metric, **kw)
    slow = spec.run(model, clean, corrupted, per_example_metric, engine="reference", **kw)
    _close(torch.as_tensor(fast.values), torch.as_tensor(slow.values), atol=TOL, rtol=TOL)
    return fast


def test_subspace_equals_transformer_lens_interchange(model, tokens):
    """Each (strength, layer, pos) cell equals TL's SubspaceInterchange in a hand-written hook."""
    clean, corrupted = tokens
    d = model.cfg.d_model
    raw = _basis(d, 3)
    spec = PatchSpec(
        "resid_pre",
        axes=("strength", "layer", "pos"),
        restrictions={"strength": [0.5, 1.0], "pos": [1, 5]},
        source=Subspace("B"),
    )
    result = _both(spec, model, clean, corrupted, tensors={"B": raw})
    q = torch.linalg.qr(raw)[0]
    for s in (0.5, 1.0):
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.hook_resid_pre"
            src = _cache(model, clean, [name])[name]
            for pos in (1, 5):

                def fn(act, pos=pos, src=src, s=s):
                    act[:, pos] = SubspaceInterchange(q, s)(act[:, pos], src[:, pos])
                    return act

                want = _hooked(model, corrupted, name, fn)
                got = torch.as_tensor(result.sel(strength=s, layer=layer, pos=pos).values)
                _close(got, want, atol=TOL, rtol=TOL)


def test_subspace_of_the_whole_space_is_the_plain_patch_and_strength_zero_no_patch(model, tokens):
    """A basis of the full space is the activation patch; s=0 leaves the corrupted run."""
    clean, corrupted = tokens
    d = model.cfg.d_model
    plain = PatchSpec("resid_pre", axes=("layer", "pos")).run(model, clean, corrupted, per_example_metric)
    full = _both(
        PatchSpec("resid_pre", axes=("layer", "pos"), source=Subspace("I")),
        model, clean, corrupted, tensors={"I": _basis(d, d, seed=3)},
    )
    _close(torch.as_tensor(full.values), torch.as_tensor(plain.values), atol=TOL, rtol=TOL)
    none = _both(
        PatchSpec("attn_out", axes=("layer", "pos"), source=Subspace("B", strength=0.0)),
        model, clean, corrupted, tensors={"B": _basis(d, 2)},
    )
    base = torch.as_tensor(none.attrs["corrupted_baseline"])
    _close(torch.as_tensor(none.values), base.expand(none.shape), atol=1e-6, rtol=0)


def test_subspace_from_another_site_and_on_head_vectors(gpt2, tokens):
    """Source layer and position differ from the target; a d_head basis on z, per head."""
    clean, corrupted = tokens
    d = gpt2.cfg.d_model
    raw = _basis(d, 2, seed=5)
    spec = PatchSpec(
        "resid_pre", axes=("pos",), restrictions={"layer": 1},
        source=Subspace("B", source_layer=0, source_pos=2),
    )
    result = _both(spec, gpt2, clean, corrupted, tensors={"B": raw})
    src = _cache(gpt2, clean, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"][:, 2]
    q = torch.linalg.qr(raw)[0]
    for pos in range(clean.shape[1]):

        def fn(act, pos=pos):
            act[:, pos] = SubspaceInterchange(q, 1.0)(act[:, pos], src)
            return act

        want = _hooked(gpt2, corrupted, "blocks.1.hook_resid_pre", fn)
        _close(torch.as_tensor(result.sel(pos=pos).values), want, atol=TOL, rtol=TOL)
    head_basis = _basis(gpt2.cfg.d_head, 1, seed=6)
    z = PatchSpec("z", axes=("head",), restrictions={"layer": 0, "pos": -1}, source=Subspace("h"))
    result = _both(z, gpt2, clean, corrupted, tensors={"h": head_basis})
    src = _cache(gpt2, clean, ["blocks.0.attn.hook_z"])["blocks.0.attn.hook_z"]
    qh = torch.linalg.qr(head_basis)[0]
    for head in range(gpt2.cfg.n_heads):

        def fn(act, head=head):
            act[:, -1, head] = SubspaceInterchange(qh, 1.0)(act[:, -1, head], src[:, -1, head])
            return act

        want = _hooked(gpt2, corrupted, "blocks.0.attn.hook_z", fn)
        _close(torch.as_tensor(result.sel(head=head).values), want, atol=TOL, rtol=TOL)


def test_add_coef_zero_is_the_unpatched_run_and_equals_a_hook(model, tokens):
    """Steering with coef 0 gives the clean baseline; other coefs equal a hand-written hook."""
    clean, corrupted = tokens
    direction = _basis(model.cfg.d_model, 1, seed=2)[:, 0]
    spec = PatchSpec(
        "resid_post", axes=("coef", "layer"), restrictions={"coef": [0.0, 3.0], "pos": [2, 3]},
        source=Add("v"),
    )
    result = _both(spec, model, clean, corrupted, tensors={"v": direction})
    base = torch.as_tensor(result.attrs["clean_baseline"])
    _close(
        torch.as_tensor(result.sel(coef=0.0).values), base.expand(model.cfg.n_layers, -1), atol=1e-6, rtol=0
    )
    for layer in range(model.cfg.n_layers):

        def fn(act):
            act[:, [2, 3]] += 3.0 * direction
            return act

        want = _hooked(model, clean, f"blocks.{layer}.hook_resid_post", fn)
        _close(
            torch.as_tensor(result.sel(coef=3.0, layer=layer).values), want, atol=TOL, rtol=TOL
        )


def test_add_at_named_positions_and_in_a_custom_rule(gpt2, tokens):
    """Named positions and a custom rule (the explicit path) agree across engines and a hook."""
    clean, corrupted = tokens
    v = _basis(gpt2.cfg.d_model, 1, seed=4)[:, 0]
    named = PatchSpec("resid_pre", axes=("coef",), restrictions={"coef": [1.0, -2.0], "layer": 1, "pos": "S"},
                      source=Add("v", normalise=True))
    result = _both(named, gpt2, clean, corrupted, tensors={"v": v}, positions={"S": [1, 3]})
    for coef in (1.0, -2.0):
        def fn(act, coef=coef):
            act[0, 1] += coef * v / v.norm()
            act[1, 3] += coef * v / v.norm()
            return act

        want = _hooked(gpt2, clean, "blocks.1.hook_resid_pre", fn)
        _close(torch.as_tensor(result.sel(coef=coef).values), want, atol=TOL, rtol=TOL)
    ruled = PatchSpec(
        "resid_pre", axes=("coef", "step"), restrictions={"coef": [2.0], "step": (0, 1)},
        rule=lambda cell: {"layer": cell["step"], "pos": [0, 4]}, source=Add("v"),
    )
    result = _both(ruled, gpt2, clean, corrupted, tensors={"v": v})
    for step in (0, 1):
        def fn(act):
            act[:, [0, 4]] += 2.0 * v
            return act

        want = _hooked(gpt2, clean, f"blocks.{step}.hook_resid_pre", fn)
        _close(torch.as_tensor(result.sel(coef=2.0, step=step).values), want, atol=TOL, rtol=TOL)


def _perfect_sae(d: int) -> dict[str, torch.Tensor]:
    """ReLU SAE with latents relu(x) and relu(-x): it reconstructs every input exactly."""
    eye = torch.eye(d)
    return {
        "W_enc": torch.cat([eye, -eye], 1),
        "W_dec": torch.cat([eye, -eye], 0),
        "b_enc": torch.zeros(2 * d),
        "b_dec": torch.zeros(d),
    }


def _random_sae(d: int, n: int, *, jump: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {
        "W_enc": torch.randn(d, n, generator=g) / d**0.5,
        "W_dec": torch.randn(n, d, generator=g) / n**0.5,
        "b_enc": torch.randn(n, generator=g) * 0.1,
        "b_dec": torch.randn(d, generator=g) * 0.1,
    }
    if jump:
        out["threshold"] = torch.rand(n, generator=g) * 0.2
    return out


def test_sae_no_latent_leaves_the_model_and_all_latents_reproduce_the_clean_run(model, tokens):
    """latent=None changes nothing (1e-6); every latent of a lossless SAE is the plain patch."""
    clean, corrupted = tokens
    d = model.cfg.d_model
    none = _both(
        PatchSpec("resid_mid", axes=("layer", "pos"), source=SAELatent("sae")),
        model, clean, corrupted, tensors={"sae": _random_sae(d, 12)},
    )
    base = torch.as_tensor(none.attrs["corrupted_baseline"])
    _close(torch.as_tensor(none.values), base.expand(none.shape), atol=1e-6, rtol=0)
    every = _both(
        PatchSpec("resid_mid", axes=("layer", "pos"), source=SAELatent("sae", latent=list(range(2 * d)))),
        model, clean, corrupted, tensors={"sae": _perfect_sae(d)},
    )
    plain = PatchSpec("resid_mid", axes=("layer", "pos")).run(model, clean, corrupted, per_example_metric)
    _close(torch.as_tensor(every.values), torch.as_tensor(plain.values), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("jump", [False, True])
def test_sae_latent_sweep_keeps_the_error_term(gpt2, tokens, jump):
    """Each (latent, pos) cell equals x + (z'_l - z_l) W_dec[l] in a hand-written hook."""
    clean, corrupted = tokens
    weights = _random_sae(gpt2.cfg.d_model, 10, jump=jump)
    sae = sae_weights(weights)
    spec = PatchSpec(
        "resid_pre", axes=("latent", "pos"), restrictions={"latent": [0, 4, 9], "layer": 1},
        source=SAELatent("sae"),
    )
    result = _both(spec, gpt2, clean, corrupted, tensors={"sae": weights})
    name = "blocks.1.hook_resid_pre"
    src = _cache(gpt2, clean, [name])[name]

    def z(x):
        pre = x @ weights["W_enc"] + weights["b_enc"]
        return pre * (pre > weights["threshold"]) if jump else pre.relu()

    assert torch.allclose(z(src), sae.encode(src), atol=1e-6)
    for latent in (0, 4, 9):
        for pos in range(clean.shape[1]):

            def fn(act, latent=latent, pos=pos):
                delta = z(src[:, pos])[:, latent] - z(act[:, pos])[:, latent]
                act[:, pos] += delta[:, None] * weights["W_dec"][latent]
                return act

            want = _hooked(gpt2, corrupted, name, fn)
            got = torch.as_tensor(result.sel(latent=latent, pos=pos).values)
            _close(got, want, atol=TOL, rtol=TOL)


def test_sae_object_is_read_by_its_attributes(gpt2, tokens):
    """An SAE object (duck-typed like sae_lens.SAE, with cfg.apply_b_dec_to_input) works."""
    clean, corrupted = tokens
    weights = _random_sae(gpt2.cfg.d_model, 6)

    class Cfg:
        apply_b_dec_to_input = True
        architecture = "standard"

    class FakeSAE:
        cfg = Cfg()
        W_enc, W_dec, b_enc, b_dec = (weights[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec"))

    spec = PatchSpec("resid_pre", axes=("latent",), restrictions={"latent": [1, 2], "layer": 0, "pos": 3},
                     source=SAELatent("sae"))
    from_object = _both(spec, gpt2, clean, corrupted, tensors={"sae": FakeSAE()})
    name = "blocks.0.hook_resid_pre"
    src = _cache(gpt2, clean, [name])[name]
    for latent in (1, 2):
        def fn(act, latent=latent):
            def z(x):
                return ((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]).relu()[:, latent]

            act[:, 3] += (z(src[:, 3]) - z(act[:, 3]))[:, None] * weights["W_dec"][latent]
            return act

        want = _hooked(gpt2, corrupted, name, fn)
        _close(torch.as_tensor(from_object.sel(latent=latent).values), want, atol=TOL, rtol=TOL)
    FakeSAE.cfg.architecture = "topk"
    with pytest.raises(InputError, match="architecture 'topk'"):
        spec.run(gpt2, clean, corrupted, per_example_metric, tensors={"sae": FakeSAE()})


def test_a_joint_spec_mixes_a_functional_write_with_an_ablation(gpt2, tokens):
    """Zero-ablating one layer while steering another agrees across engines."""
    clean, corrupted = tokens
    v = _basis(gpt2.cfg.d_model, 1)[:, 0]
    joint = PatchSpec("mlp_out", axes=("pos",), restrictions={"layer": 0}, source=Zero()) & PatchSpec(
        "resid_pre", axes=("coef",), restrictions={"coef": [0.0, 1.0], "layer": 1}, source=Add("v")
    )
    assert isinstance(joint, JointSpec)
    _both(joint, gpt2, clean, corrupted, tensors={"v": v})


def test_tensors_are_recorded_by_hash_and_shape_never_by_value(gpt2, tokens):
    """attrs['tensors'] has shape, dtype and SHA-256; another tensor gives another hash."""
    clean, corrupted = tokens
    spec = PatchSpec("resid_pre", axes=("layer",), restrictions={"pos": -1}, source=Subspace("B"))
    b = _basis(gpt2.cfg.d_model, 2)
    one = spec.run(gpt2, clean, corrupted, per_example_metric, tensors={"B": b, "unused": b})
    two = spec.run(gpt2, clean, corrupted, per_example_metric, tensors={"B": b * 2})
    assert set(one.attrs["tensors"]) == {"B"}
    assert one.attrs["tensors"]["B"]["shape"] == [gpt2.cfg.d_model, 2]
    assert one.attrs["tensors"]["B"]["sha256"] != two.attrs["tensors"]["B"]["sha256"]
    assert "tensors" not in str(one.attrs["spec"]) and "0." not in str(one.attrs["spec"]).replace("1.0", "")


def test_bad_tensors_fail_before_any_forward_pass(gpt2, tokens, monkeypatch):
    """Missing keys, wrong shapes, degenerate bases, bad latents and layers: errors, no pass."""
    from patchspec.model.adapter import ModelAdapter

    def no_pass(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(ModelAdapter, "run_recording", no_pass)
    monkeypatch.setattr(ModelAdapter, "run_with_hooks", no_pass)
    clean, corrupted = tokens
    d = gpt2.cfg.d_model
    sub = PatchSpec("resid_pre", axes=("layer",), source=Subspace("B"))

    def run(spec, **tensors):
        spec.run(gpt2, clean, corrupted, per_example_metric, tensors=tensors)

    with pytest.raises(InputError, match=r"no tensor 'basis' was given.*given: 'bases'.*did you mean 'bases'"):
        run(sub.using(Subspace("basis")), bases=torch.eye(d))
    with pytest.raises(InputError, match=r"shape \(3, 32\).*transposed"):
        run(sub, B=torch.randn(3, d))
    degenerate = torch.randn(d, 1).repeat(1, 2)
    with pytest.raises(InputError, match="degenerate: its 2 columns span only 1"):
        run(sub, B=degenerate)
    with pytest.raises(InputError, match="source_layer=5 is outside"):
        run(sub.using(Subspace("B", source_layer=5)), B=torch.eye(d))
    with pytest.raises(InputError, match=r"direction 'v' has shape \(7,\)"):
        run(PatchSpec("mlp_out", axes=("layer",), source=Add("v")), v=torch.ones(7))
    sae = PatchSpec("resid_pre", axes=("latent",), restrictions={"latent": [1, 40]}, source=SAELatent("s"))
    with pytest.raises(InputError, match="latent=40 is outside SAE 's'"):
        run(sae, s=_random_sae(d, 12))
    with pytest.raises(InputError, match="SAE 's' reads 5 features"):
        run(sae, s=_random_sae(5, 50))
    with pytest.raises(InputError, match="SAE 's' has no W_dec"):
        run(sae, s={"W_enc": torch.eye(d)})


def test_bad_specs_are_refused_when_built():
    """Non-string keys, unlisted or slice sweep values, bad field values, two source axes."""
    with pytest.raises(SpecError, match="non-empty string key"):
        Subspace(torch.eye(2))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="needs its values listed"):
        PatchSpec("resid_pre", axes=("strength",), source=Subspace("B"))
    with pytest.raises(SpecError, match=r"Subspace\.strength must be a finite number, got 'x'"):
        PatchSpec("resid_pre", axes=("strength",), restrictions={"strength": [1, "x"]}, source=Subspace("B"))
    with pytest.raises(SpecError, match=r"SAELatent\.latent must be"):
        SAELatent("s", latent=-1)
    with pytest.raises(SpecError, match="sweeps 'source' and 'coef'"):
        PatchSpec("resid_pre", axes=("source", "coef"), restrictions={"coef": [1.0], "source": (Add("v"),)},
                  source=Add("v"))
    with pytest.raises(SpecError, match="axis 'strength' is not a dim"):
        PatchSpec("resid_pre", axes=("strength",), restrictions={"strength": [1.0]}, source=Add("v"))


def test_orthonormal_basis_spans_the_given_columns():
    """QR keeps the span: the projector of the result equals the least-squares projector."""
    b = _basis(6, 3)
    q = orthonormal_basis(b, 6)
    _close(q.T @ q, torch.eye(3), atol=1e-12)
    proj = b.double() @ torch.linalg.pinv(b.double())
    _close(q @ q.T, proj, atol=1e-12)


@given(
    source=st.one_of(
        st.builds(Subspace, st.sampled_from(["B", "basis"]), strength=st.floats(-2, 2),
                  donor=st.sampled_from(["clean", "corrupted"]), source_layer=st.none() | st.integers(0, 3),
                  source_pos=st.none() | st.integers(0, 9)),
        st.builds(Add, st.just("v"), coef=st.floats(-5, 5), normalise=st.booleans()),
        st.builds(SAELatent, st.just("s"), latent=st.none() | st.integers(0, 9) | st.lists(st.integers(0, 50), unique=True, min_size=1, max_size=3)),
    )
)
def test_new_sources_round_trip_through_dicts(source):
    """Each new type, and a spec sweeping its field, survive to_dict/from_dict."""
    assert source_from_dict(source.to_dict()) == source
    field = source.sweepable[0]
    value = getattr(source, field)
    values = [value] if isinstance(value, int | float) else [0, 2]
    spec = PatchSpec("resid_pre", axes=(field, "layer"), restrictions={field: values}, source=source)
    assert spec_from_dict(spec.to_dict()) == spec
    assert Sweep.from_dict(Sweep(spec).to_dict()) == Sweep(spec)


def test_experiment_files_name_tensors_in_a_tensors_section(tmp_path, capsys):
    """[tensors] files reach the sweep; a spec naming a missing key fails when the file loads;
    results with tensor records save and load."""
    from patchspec import io
    from patchspec.cli import run_experiment
    from patchspec.experiment import ExperimentError, load_experiment

    torch.save(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), tmp_path / "basis.pt")
    text = """
[model]
path = "toy"
[prompts]
clean = ["<bos> milk cake sun car salt milk cake sun car"]
corrupted = ["<bos> dog green gray car red milk cake sun car"]
[metric]
kind = "logit_diff"
answer = "salt"
wrong = "red"
[[specs]]
activation = "resid_pre"
axes = ["strength", "pos"]
restrictions = { strength = [0.0, 1.0], layer = 1, pos = [4, 5] }
source = { kind = "subspace", basis = "B" }
name = "subspace"
[tensors]
B = "basis.pt"
[output]
folder = "out"
plots = false
"""
    (tmp_path / "exp.toml").write_text(text)
    ds = run_experiment(tmp_path / "exp.toml", progress=False)
    capsys.readouterr()
    assert ds["subspace"].attrs["tensors"]["B"]["shape"] == [64, 2]
    loaded = io.load(tmp_path / "out" / "subspace.nc")
    assert loaded.attrs["tensors"] == ds["subspace"].attrs["tensors"]
    (tmp_path / "bad.toml").write_text(text.replace('B = "basis.pt"', 'b = "basis.pt"'))
    with pytest.raises(ExperimentError, match=r"names the tensor 'B', which no \[tensors\] entry gives"):
        load_experiment(tmp_path / "bad.toml")
    (tmp_path / "missing.toml").write_text(text.replace('"basis.pt"', '"nope.pt"'))
    with pytest.raises(ExperimentError, match=r"\[tensors\] B = 'nope.pt': no such file"):
        load_experiment(tmp_path / "missing.toml")


def test_steered_text_is_greedy_decoding_under_the_steering_hook():
    """Each coef's continuation equals a hand-written greedy loop; coef 0 is the unsteered text."""
    from patchspec.interventions import steered_text
    from patchspec.toy import induction_prompts, toy_model

    model = toy_model()
    p = induction_prompts(2, length=5, seed=0)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3
    spec = PatchSpec("resid_pre", axes=("coef",), restrictions={"coef": [0.0, 2.0], "layer": 1, "pos": [4, 5]},
                     source=Add("v"))
    texts = steered_text(spec, model, p.clean, tensors={"v": v}, max_new_tokens=3)
    assert texts.dims == ("coef", "example") and texts["example"].values.tolist() == p.clean
    assert texts.sel(coef=0.0).values.tolist() == texts.attrs["unsteered"]

    def by_hand(prompt, coef):
        tokens = model.to_tokens(prompt)
        start = tokens.shape[1]

        def hook(act, hook):
            act = act.clone()
            act[:, [4, 5]] += coef * v
            return act

        with torch.inference_mode():
            for _ in range(3):
                logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", hook)])
                tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return model.to_string(tokens[0, start:])

    for coef in (0.0, 2.0):
        assert texts.sel(coef=coef).values.tolist() == [by_hand(t, coef) for t in p.clean]
    with pytest.raises(SpecError, match="whose source is Add"):
        steered_text(PatchSpec("resid_pre", axes=("layer",)), model, p.clean)


def test_named_positions_that_move_read_the_donor_at_its_own_index(gpt2, tokens):
    """With position tables that differ between runs, a full-space Subspace and an all-latent
    lossless SAE patch equal the plain patch, which aligns the donor per name."""
    clean, corrupted = tokens
    d = gpt2.cfg.d_model
    tables = ({"X": [1, 2], "Y": [4, 3]}, {"X": [2, 1], "Y": [3, 4]})
    spec = PatchSpec("resid_pre", axes=("layer", "pos"))
    plain = spec.run(gpt2, clean, corrupted, per_example_metric, positions=tables)
    full = _both(spec.using(Subspace("I")), gpt2, clean, corrupted, positions=tables,
                 tensors={"I": torch.eye(d)})
    _close(full.values, plain.values)
    sae = _both(spec.using(SAELatent("s", latent=list(range(2 * d)))), gpt2, clean, corrupted,
                positions=tables, tensors={"s": _perfect_sae(d)})
    _close(sae.values, plain.values)
    unaligned = PatchSpec("resid_pre", axes=("layer", "pos"), restrictions={"pos": [1, 2]}).run(
        gpt2, clean, corrupted, per_example_metric
    )
    assert not torch.allclose(torch.as_tensor(unaligned.values), torch.as_tensor(plain.values))


@pytest.mark.filterwarnings("ignore::patchspec.errors.PatchSpecWarning")
def test_a_donor_prompt_s_padding_is_never_written_into_real_tokens(gpt2, tokens):
    """Subspace and SAELatent read a donor run: its padding at a real receiving token is refused."""
    clean, corrupted = tokens
    mask = torch.ones_like(clean)
    mask[0, 4:] = 0
    padded = {"input_ids": clean, "attention_mask": mask}
    d = gpt2.cfg.d_model
    for source, tensors in ((Subspace("I"), {"I": torch.eye(d)}), (SAELatent("s", latent=0), {"s": _perfect_sae(d)})):
        spec = PatchSpec("resid_pre", axes=("layer", "pos"), source=source)
        with pytest.raises(InputError, match=r"writes .* values into corrupted prompt 0 .* padding there"):
            spec.run(gpt2, padded, corrupted, per_example_metric, tensors=tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(tmp_path, dtype):
    """In float16 and bfloat16 the three types run on both engines, agree, and keep identities."""
    from patchspec import metrics
    from patchspec.tiny import tiny_model
    from tests.models import VOCAB, prompts

    model = tiny_model(VOCAB, tmp_path, architecture="gpt2", dtype=dtype, device="cpu")
    clean, corrupted = prompts()
    metric = metrics.logit_diff(5, 7)
    d = model.cfg.d_model
    cases = [
        (PatchSpec("resid_pre", axes=("strength", "pos"), restrictions={"strength": [0.0, 1.0], "layer": 1},
                   source=Subspace("B")), {"B": _basis(d, 4)}, "corrupted_baseline", "strength"),
        (PatchSpec("resid_post", axes=("coef", "pos"), restrictions={"coef": [0.0, 1.0], "layer": 0},
                   source=Add("v")), {"v": _basis(d, 1)[:, 0]}, "clean_baseline", "coef"),
        (PatchSpec("resid_mid", axes=("latent", "pos"), restrictions={"latent": [0, 3], "layer": 1},
                   source=SAELatent("s")), {"s": _random_sae(d, 8)}, None, None),
    ]
    for spec, tensors, baseline, axis in cases:
        fast = spec.run(model, clean, corrupted, metric, tensors=tensors, progress=False)
        slow = spec.run(model, clean, corrupted, metric, tensors=tensors, engine="reference", progress=False)
        assert torch.isfinite(torch.as_tensor(fast.values)).all()
        _close(fast.values, slow.values, atol=2e-2, rtol=2e-2)
        if axis is not None:
            unpatched = fast.sel({axis: 0.0}).values
            _close(unpatched, torch.full(unpatched.shape, fast.attrs[baseline]), atol=2e-2, rtol=2e-2)


def test_tensors_saved_beside_a_result_are_checked_against_its_records(gpt2, tokens, tmp_path):
    """save_tensors/read_tensors keep the run's tensors; a changed tensor is refused."""
    from patchspec.interventions import read_tensors, save_tensors

    clean, corrupted = tokens
    d = gpt2.cfg.d_model
    tensors = {"B": _basis(d, 2), "s": _random_sae(d, 4)}
    spec = PatchSpec("resid_pre", axes=("layer",), restrictions={"pos": -1}, source=Subspace("B"))
    joint = spec & PatchSpec("mlp_out", axes=(), restrictions={"layer": 0, "pos": 2}, source=SAELatent("s", latent=1))
    result = joint.run(gpt2, clean, corrupted, per_example_metric, tensors=tensors)
    assert set(result.attrs["tensors"]) == {"B", "s"}
    records = save_tensors(tmp_path / "r.tensors.pt", tensors)
    assert records == result.attrs["tensors"]
    again = read_tensors(tmp_path / "r.tensors.pt", expect=result.attrs["tensors"])
    rerun = joint.run(gpt2, clean, corrupted, per_example_metric, tensors=again)
    _close(rerun.values, result.values, atol=0, rtol=0)
    save_tensors(tmp_path / "other.pt", {"B": tensors["B"] + 1, "s": tensors["s"]})
    with pytest.raises(InputError, match=r"tensor 'B' in .* differs from the result's record"):
        read_tensors(tmp_path / "other.pt", expect=result.attrs["tensors"])


_WIDTH = {"resid_pre": "d_model", "resid_mid": "d_model", "attn_out": "d_model", "z": "d_head", "v": "d_head", "post": "d_mlp"}


@settings(max_examples=6, deadline=None)
@given(
    activation=st.sampled_from(sorted(_WIDTH)),
    kind=st.sampled_from(["subspace", "add", "sae"]),
    rank=st.integers(1, 3),
    values=st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=2, unique=True),
    layer=st.integers(0, 1),
)
def test_batched_equals_reference_for_random_functional_patches(model, tokens, activation, kind, rank, values, layer):
    """Any activation, any of the three types, a swept field: the engines agree (property)."""
    clean, corrupted = tokens
    width = getattr(model.cfg, _WIDTH[activation])
    if kind == "subspace":
        source, axis, tensors = Subspace("T"), "strength", {"T": _basis(width, rank)}
    elif kind == "add":
        source, axis, tensors = Add("T"), "coef", {"T": _basis(width, 1)[:, 0]}
    else:
        source, axis, tensors = SAELatent("T"), "latent", {"T": _random_sae(width, 4)}
        values = list(range(rank))
    spec = PatchSpec(activation, axes=(axis, "pos"), restrictions={axis: values, "layer": layer}, source=source)
    _both(spec, model, clean, corrupted, tensors=tensors)
