"""GradDrop (AtP*'s answer to cancellation) and the QK fix on rotary, grouped-query models."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr

import patchspec as ps
from patchspec import catalog, metrics, stats
from patchspec.attribution.verify import verify
from patchspec.tiny import tiny_model
from tests.models import VOCAB, build, prompts

LD = metrics.logit_diff(5, 7)
LD_EACH = metrics.logit_diff(5, 7, reduce="none")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """3-layer GPT-2 and Qwen2 (grouped-query, rotary) models: GradDrop has layers to drop."""
    return {
        kind: tiny_model(
            VOCAB,
            tmp_path_factory.mktemp(f"deep-{kind}"),
            architecture=kind,
            n_layers=3,
            device="cpu",
        )
        for kind in ("gpt2", "qwen2")
    }


def hand_graddrop(model, clean, corrupted, kind):
    """GradDrop by hand: per dropped layer a separate forward pass whose residual writes of that
    layer zero their gradient with a tensor hook, and per cell (dest values - corrupted) . grad;
    ``kind`` is ``"z"`` (``[layer, example, pos, head]``) or ``"resid_mid"`` (``[layer,
    example, pos]``, linearised at the gradient arriving at the block's attn_out write)."""
    layers = model.cfg.n_layers
    _, clean_cache = model.run_with_cache(clean)
    total = 0.0
    for dropped in range(layers):
        kept, arriving = {}, {}

        def keep(name, kept=kept):
            def hook(act, hook):
                kept[name] = out = act.clone()
                return out

            return hook

        def write(name, layer, dropped=dropped, arriving=arriving):
            def hook(act, hook):
                out = act.clone()

                def on_grad(grad):
                    if name.endswith("attn_out"):
                        arriving[layer] = grad
                    return torch.zeros_like(grad) if layer == dropped else None

                out.register_hook(on_grad)
                return out

            return hook

        names = [
            f"blocks.{j}.{n}" for j in range(layers) for n in ("attn.hook_z", "hook_resid_mid")
        ]
        hooks = [(name, keep(name)) for name in names]
        hooks += [
            (f"blocks.{j}.{w}", write(f"blocks.{j}.{w}", j))
            for j in range(layers)
            for w in ("hook_attn_out", "hook_mlp_out")
        ]
        with torch.enable_grad():
            logits = model.run_with_hooks(corrupted, fwd_hooks=hooks)
            (logits[:, -1, 5] - logits[:, -1, 7]).sum().backward(
                inputs=[kept[f"blocks.{j}.attn.hook_z"] for j in range(layers)]
            )
        per_layer = []
        for j in range(layers):
            if kind == "z":
                name = f"blocks.{j}.attn.hook_z"
                diff = clean_cache[name] - kept[name].detach()
                per_layer.append((diff * kept[name].grad).sum(-1))
            else:
                name = f"blocks.{j}.hook_resid_mid"
                diff = clean_cache[name] - kept[name].detach()
                per_layer.append((diff * arriving[j]).sum(-1))
        total = total + torch.stack(per_layer).abs()
    return (total / (layers - 1)).numpy()


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_graddrop_equals_a_hand_written_loop(deep, kind):
    """Every cell's score is 1/(L-1) sum_l |AtP with layer l's writes' gradient zeroed|, each
    layer's gradient from its own forward and backward with tensor hooks."""
    model = deep[kind]
    clean, corrupted = prompts(n=3)
    heads = catalog.HEAD_OUT_BY_POS.run(
        model, clean, corrupted, LD_EACH, estimator="graddrop", progress=False
    )
    expected = hand_graddrop(model, clean, corrupted, "z")  # [layer, example, pos, head]
    np.testing.assert_allclose(
        heads.transpose("layer", "example", "pos", "head").values, expected, rtol=1e-4, atol=1e-6
    )
    mid = catalog.RESID_MID.run(
        model, clean, corrupted, LD_EACH, estimator="graddrop", progress=False
    )
    expected = hand_graddrop(model, clean, corrupted, "resid_mid")
    np.testing.assert_allclose(
        mid.transpose("layer", "example", "pos").values, expected, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_the_last_layer_scores_plain_atp(deep, kind):
    """A last-layer node loses nothing to earlier drops (they are upstream) and its own drop
    zeroes it: its score is (L - 1) |AtP| / (L - 1) = |AtP|, per example."""
    model = deep[kind]
    clean, corrupted = prompts(n=3)
    for spec in (catalog.HEAD_OUT_BY_POS.sel(layer=2), catalog.MLP_NEURON_POST.sel(layer=2)):
        atp = spec.run(model, clean, corrupted, LD_EACH, estimator="atp", progress=False)
        score = spec.run(model, clean, corrupted, LD_EACH, estimator="graddrop", progress=False)
        np.testing.assert_allclose(score.values, abs(atp.patch.effect()).values, rtol=1e-5, atol=1e-7)


def test_a_mean_metric_scores_the_mean_of_per_example_scores(deep):
    """A mean-reduced metric's score is the mean over examples of the per-example scores (the
    paper's expectation of |AtP_l|), not the |.| of the mean."""
    model = deep["gpt2"]
    clean, corrupted = prompts(n=3)
    spec = catalog.MLP_OUT
    each = spec.run(model, clean, corrupted, LD_EACH, estimator="graddrop", progress=False)
    mean = spec.run(model, clean, corrupted, LD, estimator="graddrop", progress=False)
    np.testing.assert_allclose(mean.values, each.mean("example").values, rtol=1e-5, atol=1e-7)
    assert (each.values >= 0).all()


@pytest.fixture(scope="module")
def cancelling(tmp_path_factory):
    """A 2-layer GPT-2 that is linear from layer 0's head outputs on (layer 0's MLP and layer 1's
    attention silenced, identity norms after them), whose layer-1 MLP writes exactly minus the
    projection of the residual stream onto head 0's output subspace: head 0 of layer 0 has a
    direct effect, cancelled exactly by its indirect effect through that MLP. ``"open"`` is the
    same model with that MLP silenced too (the direct path alone)."""
    out = {}
    for variant in ("cancel", "open"):
        model = build("gpt2", tmp_path_factory.mktemp(f"cancel-{variant}"))
        for norm in (model.ln_final, model.blocks[1].ln2):
            object.__setattr__(norm, "forward", lambda x, *args, **kwargs: x)
        d_model, d_head = model.cfg.d_model, model.cfg.d_head

        def param(module, part, kind):
            return next(p for n, p in module.named_parameters() if part in n and n.endswith(kind))

        with torch.no_grad():
            for p in (*model.blocks[1].attn.o.parameters(), *model.blocks[0].mlp.parameters()):
                p.zero_()
            w_o = param(model.blocks[0].attn, "o.", "weight")  # Conv1D: [n_heads * d_head, d_model]
            basis, _ = torch.linalg.qr(w_o[:d_head].T)  # [d_model, d_head]: head 0's writes
            projection = basis @ basis.T
            mlp = model.blocks[1].mlp
            w_in, b_in = param(mlp, "c_fc", "weight"), param(mlp, "c_fc", "bias")
            w_out, b_out = param(mlp, "c_proj", "weight"), param(mlp, "c_proj", "bias")
            for p in (w_in, b_in, w_out, b_out):
                p.zero_()
            if variant == "cancel":  # gelu_new(x + 30) = x + 30: the MLP is -projection, exactly
                w_in[:, :d_model] = projection
                b_in[:d_model] = 30.0
                w_out[:d_model] = -torch.eye(d_model)
                b_out[:] = 30.0
        out[variant] = model
    return out


def test_graddrop_finds_a_node_whose_paths_cancel(cancelling):
    """Head 0 of layer 0: its exact effect and AtP are 0 (the paths cancel); dropping layer 1's
    gradient leaves the direct path, so its score is |direct effect| (AtP on the model without
    the cancelling MLP), and it ranks higher than under plain AtP."""
    clean, corrupted = prompts(n=3)
    spec = catalog.HEAD_OUT_BY_POS
    model = cancelling["cancel"]
    exact = spec.run(model, clean, corrupted, LD_EACH, progress=False)
    atp = spec.run(model, clean, corrupted, LD_EACH, estimator="atp", progress=False)
    score = spec.run(model, clean, corrupted, LD_EACH, estimator="graddrop", progress=False)
    direct = spec.run(
        cancelling["open"], clean, corrupted, LD_EACH, estimator="atp", progress=False
    )
    head = {"layer": 0, "head": 0}
    wanted = abs(direct.patch.effect().sel(head))
    scale = float(wanted.max())  # the direct path alone matters
    assert float(abs(exact.patch.effect().sel(head)).max()) < 1e-2 * scale  # cancelled
    assert float(abs(atp.patch.effect().sel(head)).max()) < 1e-2 * scale
    np.testing.assert_allclose(score.sel(head).values, wanted.values, rtol=1e-4, atol=1e-6 * scale)

    def rank(values: xr.DataArray) -> float:
        """Mean rank (1: largest) of head 0 of layer 0's cells among all cells."""
        cells = values.mean("example").transpose("layer", "pos", "head").values
        ranks = scipy.stats.rankdata(-cells.ravel()).reshape(cells.shape)
        return float(ranks[0, :, 0].mean())

    assert rank(score) < rank(abs(atp.patch.effect()))


def test_the_result_is_labelled_a_score_and_used_as_one(deep, tmp_path):
    """The result is a score: dims and coords of exact, attrs say so, effect() refuses it,
    verify ranks by it, agreement and plot_agreement compare it with |exact effect|."""
    from patchspec.plot import plot_agreement

    model = deep["gpt2"]
    clean, corrupted = prompts()
    spec = catalog.HEAD_OUT_BY_POS
    exact = spec.run(model, clean, corrupted, LD_EACH, progress=False)
    score = spec.run(model, clean, corrupted, LD_EACH, estimator="graddrop", progress=False)
    xr.testing.assert_identical(score.coords.to_dataset(), exact.coords.to_dataset())
    assert score.attrs["estimator"] == "graddrop" and score.attrs["exact"] is False
    assert score.attrs["quantity"] == "score" and "not an estimate" in score.attrs["meaning"]
    with pytest.raises(
        ps.InputError, match=r"is already a score \(attrs\['quantity'\] == 'score'\)"
    ):
        score.patch.effect()
    checked = verify(score, model, clean, corrupted, LD_EACH, top=4, random=3)
    assert (
        checked.attrs["estimate_quantity"] == "score" and checked.attrs["estimator"] == "graddrop"
    )
    ranked = np.argsort(-score.mean("example").values.ravel(), kind="stable")[:4]
    assert set(np.flatnonzero(checked.checked.values.ravel() == "top")) == set(ranked)
    agree = stats.agreement(exact, score)
    magnitude = abs(exact.patch.effect()).mean("example").values.ravel()
    expected = np.corrcoef(magnitude, score.mean("example").values.ravel())[0, 1]
    assert agree["pearson"] == pytest.approx(expected)
    with pytest.raises(ps.InputError, match="is a score"):
        stats.agreement(score, exact)
    fig = plot_agreement(exact, score, tmp_path / "agree.png")
    assert fig.axes[-1].get_xlabel() == "|exact effect|"
    assert fig.axes[-1].get_ylabel() == "graddrop score"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graddrop_in_half_precision(tmp_path, dtype):
    """GradDrop runs in float16 and bfloat16 and tracks the float32 scores."""
    clean, corrupted = prompts()
    spec = catalog.HEAD_OUT_BY_POS
    full = spec.run(
        tiny_model(VOCAB, tmp_path / "f", device="cpu"),
        clean,
        corrupted,
        LD,
        estimator="graddrop",
        progress=False,
    )
    half = spec.run(
        tiny_model(VOCAB, tmp_path / "h", dtype=dtype, device="cpu"),
        clean,
        corrupted,
        LD,
        estimator="graddrop",
        progress=False,
    )
    assert np.isfinite(half.values).all() and half.dims == full.dims
    assert np.corrcoef(half.values.ravel(), full.values.ravel())[0, 1] > 0.95


def test_graddrop_refuses_a_one_layer_model(tmp_path):
    """One layer leaves no other layer to drop: an InputError saying so."""
    model = tiny_model(VOCAB, tmp_path, n_layers=1, device="cpu")
    clean, corrupted = prompts()
    with pytest.raises(ps.InputError, match="needs a model with at least 2 layers"):
        catalog.RESID_PRE.run(model, clean, corrupted, LD, estimator="graddrop", progress=False)


def hand_qk_fix(model, clean, corrupted, activation, layer):
    """The QK fix by hand, per cell ``(pos, head)`` of ``activation`` (``"q"`` or ``"k"``) at
    ``layer``: the metric's gradient at the corrupted run's pattern from its own backward pass,
    and the pattern under the patch from a forward pass with a hook writing the clean value
    into that one cell (the pattern read at ``hook_pattern``)."""
    _, clean_cache = model.run_with_cache(clean)
    name = f"blocks.{layer}.attn.hook_{activation}"
    pattern_name = f"blocks.{layer}.attn.hook_pattern"
    kept = {}

    def keep(act, hook):
        kept["pattern"] = out = act.clone()
        return out

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(pattern_name, keep)])
        base = logits[:, -1, 5] - logits[:, -1, 7]
        (grad,) = torch.autograd.grad(base.sum(), [kept["pattern"]])
    pattern = kept["pattern"].detach()
    heads = clean_cache[name].shape[2]
    out = np.zeros((clean.shape[1], heads, clean.shape[0]))
    for pos in range(clean.shape[1]):
        for head in range(heads):
            seen = {}

            def patch(act, hook, pos=pos, head=head):
                act = act.clone()
                act[:, pos, head] = clean_cache[name][:, pos, head]
                return act

            def read(act, hook, seen=seen):
                seen["pattern"] = act.detach()
                return act

            with torch.no_grad():
                model.run_with_hooks(corrupted, fwd_hooks=[(name, patch), (pattern_name, read)])
            delta = ((seen["pattern"] - pattern) * grad).flatten(1).sum(-1)
            out[pos, head] = (base.detach() + delta).numpy()
    return out


@pytest.mark.parametrize("activation", ["q", "k"])
def test_the_qk_fix_on_a_rotary_grouped_query_model(qwen2, activation):
    """On Qwen2 (rotary, 4 query and 2 key/value heads) the QK fix equals the pattern recomputed
    by a hand-written hook patch on the bridge, linearised from the pattern on, to 1e-6."""
    clean, corrupted = prompts()
    spec = {"q": catalog.HEAD_Q_BY_POS, "k": catalog.HEAD_K_BY_POS}[activation].sel(layer=0)
    star = spec.run(qwen2, clean, corrupted, LD_EACH, estimator="atp*", progress=False)
    expected = hand_qk_fix(qwen2, clean, corrupted, activation, 0)
    values = star.isel(layer=0).values  # [pos, head or kv_head, example]
    assert values.shape == expected.shape and star.dims[2] == (
        "head" if activation == "q" else "kv_head"
    )
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)


def test_the_qk_fix_refuses_a_rotation_it_does_not_reproduce(qwen2, monkeypatch):
    """A rotary model whose rotation is not the rotate-half form (simulated by another cos) is
    refused with an InputError, not estimated wrongly."""
    from patchspec.attribution import qk

    clean, corrupted = prompts()
    real = qk.rotate
    monkeypatch.setattr(qk, "rotate", lambda x, cos, sin: real(x, cos.flip(-1), sin))
    with pytest.raises(ps.InputError, match="another rotary convention"):
        catalog.HEAD_Q_BY_POS.run(qwen2, clean, corrupted, LD, estimator="atp*", progress=False)


def test_the_name_is_accepted_where_estimators_are(tmp_path):
    """RunOptions, the CLI and experiment files take estimator='graddrop'; ig_steps with it is
    refused before any pass."""
    from patchspec import cli
    from patchspec.experiment import load_experiment
    from patchspec.options import RunOptions

    assert RunOptions(estimator="graddrop").estimator == "graddrop"
    assert "graddrop" in cli.ESTIMATORS
    with pytest.raises(ps.OptionError, match="but estimator is 'graddrop'"):
        RunOptions(estimator="graddrop", ig_steps=2)
    path = tmp_path / "exp.toml"
    path.write_text(
        '[model]\npath = "toy"\n[prompts]\nclean = ["milk cake sun milk cake"]\n'
        'corrupted = ["dog cake bus milk cake"]\n[metric]\nkind = "logit_diff"\nanswer = "sun"\n'
        'wrong = "bus"\n[[specs]]\ncatalog = "HEAD_OUT_BY_POS"\n[run]\nestimator = "graddrop"\n'
    )
    assert load_experiment(path).options == {"estimator": "graddrop"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_rotary_qk_fix_in_half_precision(tmp_path, dtype):
    """On a float16 / bfloat16 Qwen2 the rotation checks allow the model's own rounding, and the
    QK fix tracks the float32 one (the effects, ~1e-4 here, are below what half-precision exact
    patching resolves, so the float32 estimate is the reference)."""
    clean, corrupted = prompts()
    spec = catalog.HEAD_K_BY_POS
    runs = []
    for name, kind in (("f", torch.float32), ("h", dtype)):
        model = tiny_model(VOCAB, tmp_path / name, architecture="qwen2", dtype=kind, device="cpu")
        star = spec.run(model, clean, corrupted, LD, estimator="atp*", progress=False)
        runs.append(star.values - star.attrs["corrupted_baseline"])
    assert np.corrcoef(runs[0].ravel(), runs[1].ravel())[0, 1] > 0.999
