"""Padded batches give each prompt exactly what it gets when run alone.

Prompts of different lengths are right-padded; padding is told by lengths and masks, never by
the pad id. On the tiny GPT-2 the pad id is made the BOS/EOS id (as on real GPT-2 bridges), and
one prompt really ends in that id. The tiny Qwen2 (grouped-query, rotary) gets token tensors
with masks, since its tokenizer turns the test vocabulary's text into BOS alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from patchspec import InputError, Mean, PatchSpecWarning, catalog, find_positions, metrics
from tests.models import VOCAB

TOL = {"rtol": 1e-5, "atol": 1e-5}
#: Texts of 5, 3 and 4 tokens (BOS included); the second really ends in "<bos>" (the pad id).
TEXTS = ["w1 w2 w3 w4", "w5 <bos>", "w6 w7 w8"]
CORRUPTED = ["w9 w10 w11 w12", "w13 <bos>", "w14 w15 w16"]


def metric_set():
    """Logit difference and log-probability at the default position, and loss, per prompt."""
    return {
        "ld": metrics.logit_diff(5, 7, reduce="none"),
        "end": metrics.logprob(9, pos="END", reduce="none"),
        "loss": metrics.loss(reduce="none"),
    }


@pytest.fixture
def gpt2_eos(gpt2):
    """The tiny GPT-2 whose pad token is its BOS/EOS token, as on real GPT-2 bridges."""
    pad = gpt2.tokenizer.pad_token
    gpt2.tokenizer.pad_token = "<bos>"
    assert gpt2.tokenizer.pad_token_id == gpt2.tokenizer.bos_token_id == 0
    try:
        yield gpt2
    finally:
        gpt2.tokenizer.pad_token = pad


def masked(rows):
    """Right-padded token lists with their attention mask (pad id 1, say)."""
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [1] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }


def qwen_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    return [[0, *torch.randint(3, len(VOCAB), (n - 1,), generator=gen).tolist()] for n in (5, 3, 4)]


def inputs_of(name, model):
    """Batched inputs and the same prompts one at a time, for either model."""
    if name == "gpt2":
        return TEXTS, CORRUPTED, [[t] for t in TEXTS], [[t] for t in CORRUPTED]
    clean, corrupted = qwen_rows(1), qwen_rows(2)
    alone = lambda rows: [torch.tensor([r]) for r in rows]  # noqa: E731
    return masked(clean), masked(corrupted), alone(clean), alone(corrupted)


SPECS = {
    "named_end": (catalog.RESID_PRE.sel(pos="END"), {"END": -1}),
    "integer_pos": (catalog.RESID_PRE.sel(layer=1, pos=[0, 1, 2]), None),
    "head_out": (catalog.HEAD_OUT.sel(layer=1), None),
}


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("model_name", ["gpt2", "qwen2"])
def test_padded_batch_equals_prompts_alone(request, model_name, spec_name):
    """Cells, baselines, per-prompt loss and the default position equal each prompt run alone."""
    model = request.getfixturevalue("gpt2_eos" if model_name == "gpt2" else model_name)
    spec, positions = SPECS[spec_name]
    clean, corrupted, clean_alone, corrupted_alone = inputs_of(model_name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchSpecWarning)  # nothing here is a guess
        got = spec.run(model, clean, corrupted, metric_set(), positions=positions, progress=False)
    for b in range(3):
        want = spec.run(
            model, clean_alone[b], corrupted_alone[b], metric_set(), positions=positions,
            engine="reference", progress=False,
        )
        torch.testing.assert_close(
            torch.as_tensor(got.isel(example=b).values),
            torch.as_tensor(want.isel(example=0).values),
            **TOL,
        )
        for key in ("clean_baseline", "corrupted_baseline"):
            torch.testing.assert_close(
                torch.as_tensor(got[key].isel(example=b).values),
                torch.as_tensor(want[key].isel(example=0).values),
                **TOL,
            )


def test_end_and_default_position_read_a_real_last_pad_id(gpt2_eos):
    """A prompt whose real last token is the pad id keeps it: END and pos=-1 read it."""
    clean, corrupted = TEXTS, CORRUPTED
    result = catalog.RESID_PRE.sel(layer=0, pos="END").run(
        gpt2_eos, clean, corrupted, metrics.logit_diff(5, 7, reduce="none"),
        positions={"END": -1}, engine="reference", progress=False,
    )
    assert result.attrs["positions"]["corrupted"]["END"] == [4, 2, 3]
    logits = gpt2_eos(corrupted[1]).detach()
    want = float(logits[0, -1, 5] - logits[0, -1, 7])
    assert float(result.attrs["corrupted_baseline"][1]) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("model_name", ["gpt2", "qwen2"])
def test_mean_ablation_averages_only_real_tokens(request, model_name):
    """Mean() of a padded batch is the mean over the prompts that have a token at each position,
    each prompt's activation taken from its own run alone."""
    model = request.getfixturevalue("gpt2_eos" if model_name == "gpt2" else model_name)
    clean, corrupted, clean_alone, _ = inputs_of(model_name, model)
    spec = catalog.RESID_PRE.sel(layer=1, pos=[1, 2, 3]).using(Mean())
    got = spec.run(model, clean, corrupted, metrics.logit_diff(5, 7, reduce="none"), progress=False)
    hook = "blocks.1.hook_resid_pre"
    acts = [model.run_with_cache(p[0])[1][hook][0] for p in clean_alone]
    for pos in (1, 2, 3):
        mean = torch.stack([a[pos] for a in acts if a.shape[0] > pos]).mean(0)
        for b, prompt in enumerate(clean_alone):
            if acts[b].shape[0] <= pos:
                continue  # padding in this prompt: patching it changes nothing there

            def write(act, hook, pos=pos, mean=mean):
                act = act.clone()
                act[0, pos] = mean
                return act

            logits = model.run_with_hooks(prompt[0], fwd_hooks=[(hook, write)]).detach()
            want = float(logits[0, -1, 5] - logits[0, -1, 7])
            assert float(got.sel(layer=1, pos=pos).isel(example=b)) == pytest.approx(want, abs=1e-5)


def test_loss_does_not_depend_on_the_batch(gpt2_eos):
    """A prompt's loss is the same batched with a longer prompt or alone (padding left out)."""
    spec = catalog.RESID_PRE.sel(layer=0, pos=0)
    loss = metrics.loss(reduce="none")
    short = spec.run(gpt2_eos, [TEXTS[1]], [CORRUPTED[1]], loss, progress=False)
    mixed = spec.run(gpt2_eos, TEXTS, CORRUPTED, loss, progress=False)
    assert mixed.values.reshape(3)[1] == pytest.approx(float(short.values.reshape(1)[0]), abs=1e-5)
    tokens = gpt2_eos.to_tokens(CORRUPTED[1])
    logits = gpt2_eos(tokens).detach()
    want = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert mixed.attrs["corrupted_baseline"][1] == pytest.approx(float(want), abs=1e-5)


def test_masked_tokens_equal_text(gpt2):
    """Token ids with their attention mask (a tokenizer's output) give the text's numbers."""
    spec = catalog.RESID_PRE.sel(layer=1)
    metric = metrics.logit_diff(5, 7, reduce="none")
    by_text = spec.run(gpt2, TEXTS[::2], CORRUPTED[::2], metric, progress=False)
    rows = {k: [gpt2.to_tokens(p)[0].tolist() for p in v] for k, v in (("c", TEXTS[::2]), ("k", CORRUPTED[::2]))}
    by_mask = spec.run(gpt2, masked(rows["c"]), masked(rows["k"]), metric, progress=False)
    ragged = spec.run(gpt2, rows["c"], rows["k"], metric, progress=False)  # token lists
    np.testing.assert_allclose(by_mask.values, by_text.values, atol=1e-6)
    np.testing.assert_allclose(ragged.values, by_text.values, atol=1e-6)


def test_length_mismatch_warns_naming_the_prompt(gpt2):
    """Clean and corrupted prompts of different real lengths warn, naming index and lengths."""
    clean, corrupted = ["w1 w2 w3", "w4 w5 w6"], ["w7 w8 w9", "w10 w11 w12 w13"]
    spec = catalog.RESID_PRE.sel(layer=0, pos=[0, 1])
    metric = metrics.logit_diff(5, 7)
    with pytest.warns(PatchSpecWarning, match=r"prompt 1: clean 4, corrupted 5 tokens"):
        result = spec.run(gpt2, clean, corrupted, metrics.logit_diff(5, 7, reduce="none"), progress=False)
    for b, text in enumerate(clean):  # the clean baseline reads each clean prompt's own end
        logits = gpt2(text).detach()
        assert result.attrs["clean_baseline"][b] == pytest.approx(float(logits[0, -1, 5] - logits[0, -1, 7]), abs=1e-5)
    with warnings.catch_warnings():  # names lined up with a pair of tables: no warning
        warnings.simplefilter("error", PatchSpecWarning)
        catalog.RESID_PRE.sel(layer=0, pos="END").run(
            gpt2, clean, corrupted, metric, positions=({"END": -1}, {"END": -1}), progress=False
        )


def test_positions_that_no_longer_line_up_are_refused(gpt2):
    """Donor padding written into a real token, or a fixed position that is padding, is an
    InputError before any forward pass."""
    calls = []
    handle = gpt2.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    clean, corrupted = ["w1 w2 w3", "w4 w5 w6"], ["w7 w8 w9", "w10 w11 w12 w13"]
    metric = metrics.logit_diff(5, 7)
    try:
        with pytest.warns(PatchSpecWarning), pytest.raises(
            InputError,
            match=r"writes clean values into corrupted prompt 1 \(5 real tokens\) at position 4, "
            r"but clean prompt 1 has 4 real tokens",
        ):
            catalog.RESID_PRE.sel(layer=0).run(gpt2, clean, corrupted, metric, progress=False)
        with pytest.raises(
            InputError, match=r"patches position 3, which is padding in clean prompt 0 \(3 real tokens\)"
        ):
            catalog.HEAD_OUT.sel(pos=3).using(Mean()).run(
                gpt2, ["w1 w2", "w3 w4 w5"], ["w6 w7", "w8 w9 w10"], metric, progress=False
            )
        for restricted in (catalog.HEAD_OUT.sel(pos=-1), catalog.RESID_PRE.sel(pos=[0, -1])):
            with pytest.raises(
                InputError, match=r"-1 counts from the end of the padded batch \(column 3\), but "
                r"corrupted prompt 0 has 3 real tokens of 4.*positions=\{'END': -1\}"
            ):
                restricted.run(gpt2, ["w1 w2", "w3 w4 w5"], ["w6 w7", "w8 w9 w10"], metric, progress=False)
        assert calls == []
    finally:
        handle.remove()


def test_unmasked_tokens_ending_in_the_pad_id_warn(gpt2):
    """Token tensors without a mask are all real; trailing pad ids are not a guess but a warning."""
    tokens = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 9]])
    with pytest.warns(PatchSpecWarning, match=r"corrupted prompts \[0\] end in the pad token id 1"):
        result = catalog.RESID_PRE.sel(layer=0, pos=0).run(
            gpt2, tokens, tokens, metrics.logit_diff(5, 7, reduce="none"), progress=False
        )
    left = torch.tensor([[1, 0, 5, 6], [0, 7, 8, 9]])
    with pytest.warns(PatchSpecWarning, match=r"corrupted prompts \[0\] start with the pad token id 1"):
        catalog.RESID_PRE.sel(layer=0, pos=0).run(gpt2, left, left, metrics.logit_diff(5, 7), progress=False)
    logits = gpt2(tokens).detach()
    np.testing.assert_allclose(
        result.attrs["corrupted_baseline"], (logits[:, -1, 5] - logits[:, -1, 7]).tolist(), atol=1e-5
    )


def test_plain_function_metric_on_padded_prompts_warns(gpt2):
    """A plain function of the logits cannot know the lengths: on padded prompts it warns."""
    with pytest.warns(PatchSpecWarning, match=r"plain functions of the padded logits"):
        catalog.RESID_PRE.sel(layer=0, pos=0).run(
            gpt2, TEXTS, CORRUPTED, lambda logits: logits[:, -1, 5].mean(), progress=False
        )


def test_find_positions(gpt2):
    """Words by occurrence, first and last real tokens; the table runs as positions=."""
    prompts = ["w1 w2 w3 w2", "w2 w4"]
    table = find_positions(
        gpt2, prompts, {"A": "w2", "B": "w2", "FIRST": 0, "END": -1}, occurrence={"B": "last"}
    )
    assert table == {"A": [2, 1], "B": [4, 1], "FIRST": [0, 0], "END": [4, 2]}
    with pytest.raises(InputError, match=r"'A' = 'w2' occurs 1 time\(s\) in prompt 1"):
        find_positions(gpt2, prompts, {"A": "w2"}, occurrence=1)
    with pytest.raises(InputError, match=r"'S' = 'w3' does not occur in prompt 1 \('w2 w4'\)"):
        find_positions(gpt2, prompts, {"S": "w3"})
    with pytest.raises(InputError, match=r"'S' = 'w3 w4' is 2 tokens of the model"):
        find_positions(gpt2, prompts, {"S": "w3 w4"})
    with pytest.raises(InputError, match=r"'X' = 3 is outside prompt 1, which has 3 tokens"):
        find_positions(gpt2, prompts, {"X": 3})
    with pytest.raises(InputError, match=r"occurrence names 'C', which is not in names"):
        find_positions(gpt2, prompts, {"A": "w2"}, occurrence={"C": "last"})
    result = catalog.RESID_PRE.sel(layer=0, pos=["B", "END"]).run(
        gpt2, prompts, ["w5 w6 w7 w6", "w6 w8"], metrics.logprob(3, pos="B", reduce="none"),
        positions=table, progress=False,
    )
    assert list(result.pos_token.values) == ["w2", "w2|w4"]


def test_reference_mean_and_relative_noise_leave_padding_out(gpt2):
    """Mean(over=...) averages a padded reference dataset over its real tokens only, and
    Gaussian(relative=True) takes the standard deviation over real positions only."""
    from patchspec import Gaussian
    from patchspec.model.session import Session

    hook = "blocks.1.hook_resid_pre"
    reference = ["w1 w2 w3 w4", "w5 w6"]  # 5 and 3 tokens, padded to the sweep's 5
    session = Session(gpt2, TEXTS[:1] * 2, CORRUPTED[:1] * 2, hook_names={hook}, reference={"r": reference})
    session.check_reference("r")
    got = Mean(over="r").values(hook, session)[0]
    alone = [gpt2.run_with_cache(text)[1][hook][0] for text in reference]
    for pos in range(5):
        want = torch.stack([a[pos] for a in alone if a.shape[0] > pos]).mean(0)
        torch.testing.assert_close(got[pos], want, **TOL)

    padded = Session(gpt2, TEXTS, CORRUPTED, hook_names={hook})
    act = padded.activation("clean", hook)
    real = torch.cat([act[b, :n] for b, n in enumerate(padded.lengths("clean"))])
    assert abs(float(act.float().std()) - float(real.float().std())) > 1e-4  # padding matters
    noise = Gaussian(scale=1.0, relative=True).values(hook, padded) - act
    unit = Gaussian(scale=1.0).values(hook, padded) - act
    torch.testing.assert_close(noise, unit * float(real.float().std()), **TOL)
