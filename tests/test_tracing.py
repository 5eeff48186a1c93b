"""Causal tracing: a hand-written noise-and-restore hook, both engines, seeds, the plot."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from patchspec.errors import InputError, SpecError
from patchspec.sources import Gaussian
from patchspec.tracing import causal_trace, embedding_std, plot_trace, trace_specs, window_layers

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def prompt(tokens):
    return tokens[0][0]


def _hand_trace(model, prompt, answer, subject, samples, seed, layer, pos):
    """The answer's mean probability with noise on the subject and resid_post (layer, pos) restored."""
    batch = prompt.reshape(1, -1).repeat(samples, 1)
    scale = 3.0 * float(model.W_E.detach().float().std())
    noise = Gaussian(scale=scale, seed=seed, receiver="corrupted").noise(
        "blocks.0.hook_resid_pre", (samples, batch.shape[1], model.cfg.d_model)
    )
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n == name)
    clean = cache[name]

    def add_noise(act, hook):
        act = act.clone()
        act[:, subject] = (act.float() + noise * scale)[:, subject].to(act.dtype)
        return act

    def restore(act, hook):
        act = act.clone()
        act[:, pos] = clean[:, pos]
        return act

    with torch.inference_mode():
        logits = model.run_with_hooks(
            batch, fwd_hooks=[("blocks.0.hook_resid_pre", add_noise), (name, restore)]
        )
    return float(logits[:, -1].float().softmax(-1)[:, answer].mean())


def test_trace_equals_a_hand_written_hook_on_both_engines(gpt2, prompt):
    """Every resid_post cell equals the hook; MLP/attn windows agree across engines; seeded."""
    subject = [1, 2]
    fast = causal_trace(gpt2, prompt, answer=5, subject=subject, samples=3, seed=1, window=2)
    slow = causal_trace(gpt2, prompt, answer=5, subject=subject, samples=3, seed=1, window=2, engine="reference")
    for name in fast.data_vars:
        torch.testing.assert_close(
            torch.as_tensor(fast[name].values), torch.as_tensor(slow[name].values), atol=1e-6, rtol=1e-5
        )
    for layer in range(gpt2.cfg.n_layers):
        for pos in (0, 2, 5):
            want = _hand_trace(gpt2, prompt, 5, subject, 3, 1, layer, pos)
            assert abs(float(fast["resid_post"].sel(layer=layer, pos=pos)) - want) < 1e-6
    again = causal_trace(gpt2, prompt, answer=5, subject=subject, samples=3, seed=1, window=2, kinds=("mlp_out",))
    assert (again["mlp_out"] == fast["mlp_out"]).all()
    other = causal_trace(gpt2, prompt, answer=5, subject=subject, samples=3, seed=2, window=2, kinds=("mlp_out",))
    assert not (other["mlp_out"] == fast["mlp_out"]).all()
    assert fast.attrs["low_score"] < fast.attrs["high_score"] or fast.attrs["low_score"] != fast.attrs["high_score"]
    assert fast.attrs["subject"] == subject and fast.attrs["noise_std"] == pytest.approx(3 * embedding_std(gpt2))
    fig = plot_trace(fast)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[1].endswith("*") and labels[2].endswith("*") and not labels[0].endswith("*")
    assert len([ax for ax in fig.axes if ax.get_title()]) == 3


def test_window_layers_follow_rome():
    """ROME's window: layer - w//2 up to layer - (-w//2), clipped to the model."""
    assert window_layers(3, 10, 12) == tuple(range(0, 8))
    assert window_layers(11, 4, 12) == (9, 10, 11)
    assert window_layers(2, 1, 4) == (2,)


def test_bad_trace_settings_are_refused(gpt2, prompt):
    """No subject, a bad window, a subject outside the prompt, a multi-token answer, bad samples."""
    with pytest.raises(SpecError, match="at least one subject position"):
        trace_specs([], n_layers=2, scale=1.0)
    with pytest.raises(SpecError, match="window must be a positive int"):
        trace_specs([1], n_layers=2, scale=1.0, window=0)
    with pytest.raises(InputError, match="subject position 40 is outside"):
        causal_trace(gpt2, prompt, answer=5, subject=[40])
    with pytest.raises(InputError, match="samples must be a positive int"):
        causal_trace(gpt2, prompt, answer=5, subject=[1], samples=0)
