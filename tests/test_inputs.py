"""Unusable inputs and metric arguments are patchspec errors, raised before any forward pass.

Each case names the bad value and what is valid. Forward passes are counted with a hook on the
first block, so "before any forward pass" is checked, not assumed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchspec import InputError, MetricError, catalog, metrics
from patchspec.metrics import Metric
from tests.models import prompts

SPEC = catalog.RESID_PRE.sel(layer=0, pos=0)
LD = metrics.logit_diff(5, 7)


@pytest.fixture
def forwards(gpt2):
    """Counts forward passes of the tiny GPT-2 (calls of its first block) during the test."""
    calls: list[int] = []
    handle = gpt2.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


def run(model, clean, corrupted, metric=LD, **options):
    return SPEC.run(model, clean, corrupted, metric, progress=False, **options)


CLEAN, CORRUPTED = prompts()  # 2 prompts of 6 tokens
MASK = torch.ones(2, 6, dtype=torch.long)

INPUTS = {
    "float tokens": (CLEAN.float(), r"clean tokens must be integers \(token ids of any integer dtype\), got dtype torch.float32"),
    "bool tokens": (CLEAN.bool(), r"got dtype torch.bool"),
    "no prompts (list)": ([], r"clean has no prompts \(got an empty list\)"),
    "no prompts (tensor)": (torch.empty(0, 6, dtype=torch.long), r"clean has no prompts \(tokens of shape \(0, 6\)\)"),
    "no tokens": (torch.empty(2, 0, dtype=torch.long), r"clean prompts have no tokens \(tokens of shape \(2, 0\)\)"),
    "empty string": ("", r"clean prompt 0 is an empty string \(''\)"),
    "empty string in a list": (["w1 w2", " "], r"clean prompt 1 is an empty string \(' '\)"),
    "empty token list": ([[0, 4], []], r"clean prompt 1 has no tokens"),
    "longer than n_ctx": (torch.zeros(2, 33, dtype=torch.long), r"clean prompt 0 has 33 tokens, more than the model's context of 32 tokens \(cfg.n_ctx\)"),
    "text longer than n_ctx": (" ".join(["w1"] * 40), r"clean prompt 0 has 41 tokens, more than the model's context of 32"),
    "id beyond the vocabulary": (torch.tensor([[0, 5, 48, 6, 7, 8]] * 2), r"clean prompt 0 has token id 48 at position 2; token ids must be 0\.\.47 \(d_vocab=48\)"),
    "negative id (int8)": (CLEAN.to(torch.int8) * -1, r"clean prompt 0 has token id -\d+ at position 1"),
    "uint8 id beyond the vocabulary": (torch.full((2, 6), 200, dtype=torch.uint8), r"token id 200 at position 0"),
    "mapping without input_ids": ({"ids": CLEAN}, r"clean given as a mapping must hold 'input_ids'"),
    "mask of the wrong shape": ({"input_ids": CLEAN, "attention_mask": MASK[:, :5]}, r"clean attention_mask has shape \(2, 5\) but its tokens have shape \(2, 6\)"),
    "mask that is not 0/1": ({"input_ids": CLEAN, "attention_mask": MASK * 2}, r"clean attention_mask must hold only 0 and 1, found \[2\]"),
    "mask with holes": ({"input_ids": CLEAN, "attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1]] * 2)}, r"clean prompt 0 has an attention mask with holes"),
    "mask with no real token": ({"input_ids": CLEAN, "attention_mask": torch.tensor([[1] * 6, [0] * 6])}, r"clean prompt 1 has no real tokens"),
    "left-padded mask": ({"input_ids": CLEAN, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])}, r"clean prompt 0 is left-padded \(its attention mask starts with 2 zeros\)"),
    "not prompts at all": (3.5, r"clean must be a string, a list of strings, a \[batch, pos\] token tensor or a mapping"),
    "a different number of prompts": (CLEAN[:1], r"clean has 1 prompts but corrupted has 2"),
}


@pytest.mark.parametrize("case", INPUTS)
def test_bad_inputs_are_input_errors_before_any_pass(gpt2, forwards, case):
    """Each unusable clean input is an InputError naming it, and no forward pass ran."""
    clean, message = INPUTS[case]
    with pytest.raises(InputError, match=message):
        run(gpt2, clean, CORRUPTED)
    assert forwards == []


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_every_integer_dtype_is_accepted(gpt2, dtype):
    """Token ids of any integer dtype (and numpy arrays) give the int64 numbers."""
    want = run(gpt2, CLEAN, CORRUPTED)
    got = run(gpt2, CLEAN.to(dtype), CORRUPTED.to(dtype))
    array = run(gpt2, CLEAN.numpy().astype(np.int32), CORRUPTED.numpy())
    np.testing.assert_allclose(got.values, want.values, atol=1e-6)
    np.testing.assert_allclose(array.values, want.values, atol=1e-6)


BUILT = {
    "reduce='sum'": (lambda: metrics.logit_diff(3, 7, reduce="sum"), r"reduce must be 'mean' \(one value over prompts\) or 'none' \(one value per prompt\), got 'sum'"),
    "reduce=None for a built-in": (lambda: metrics.loss(reduce=None), r"reduce must be 'mean' .* got None"),
    "reduce of a Metric": (lambda: Metric("m", lambda logits, ctx: logits, reduce="max"), r"got 'max'"),
    "negative answer": (lambda: metrics.logit_diff(-1, 7), r"answer token id -1 is negative; token ids are 0\.\.d_vocab-1"),
    "float answer": (lambda: metrics.prob(1.5), r"answer must be a token id \(int\), a token string, or one per prompt, got 1.5 \(float\)"),
    "bool answer": (lambda: metrics.logprob(True), r"got True \(bool\)"),
    "empty answers": (lambda: metrics.logit_diff([], 7), r"answer=\[\] gives no tokens"),
    "float answer tensor": (lambda: metrics.logit_diff(torch.tensor([1.0]), 7), r"answer token ids must be integers, got dtype torch.float32"),
    "float pos": (lambda: metrics.logit_diff(3, 7, pos=1.5), r"pos must be an int \(negative counts from each prompt's own end\), a position name such as 'END', or one per prompt, got 1.5"),
    "bool pos": (lambda: metrics.kl_to_clean(pos=True), r"got True \(bool\)"),
    "empty pos": (lambda: metrics.prob(3, pos=[]), r"pos=\[\] gives no positions"),
    "bad Metric.positions": (lambda: Metric("m", lambda logits, ctx: logits, positions=(1.5,)), r"positions must be an int"),
}


@pytest.mark.parametrize("case", BUILT)
def test_bad_metric_arguments_fail_when_the_metric_is_built(case):
    """Metric arguments that can be checked without a model fail at construction."""
    build, message = BUILT[case]
    with pytest.raises(MetricError, match=message):
        build()


PREPARED = {
    "answer beyond the vocabulary": (metrics.logit_diff(48, 7), r"metric 'logit_diff' measured on the corrupted run: answer token id 48 is outside the vocabulary \(d_vocab=48: valid 0\.\.47\)"),
    "answer that is not one token": (metrics.prob("w1 w2"), r"answer token 'w1 w2' is not a single token of the model"),
    "answers for the wrong batch": (metrics.logit_diff([3, 4, 5], 7), r"answer has 3 tokens but there are 2 prompts; give one or one per prompt"),
    "position outside the prompts": (metrics.logit_diff(5, 7, pos=6), r"position 6 is outside the prompt in corrupted prompt 0, which has 6 real tokens \(valid: -6\.\.5"),
    "positions for the wrong batch": (metrics.logprob(5, pos=[1, 2, 3]), r"pos=\[1, 2, 3\] gives 3 positions but there are 2 prompts"),
    "unknown position name": (metrics.logit_diff(5, 7, pos="S3"), r"pos='S3' is not a named position; valid: 'S2', 'END' .*; did you mean 'S2'\?"),
    "custom metric declaring a bad position": (Metric("m", lambda logits, ctx: logits[:, 0, 0], positions=(-7,), rowwise=True), r"metric 'm' measured on the corrupted run: position -7 is outside the prompt"),
}


@pytest.mark.parametrize("case", PREPARED)
def test_metric_arguments_that_do_not_fit_fail_before_any_pass(gpt2, forwards, case):
    """Token ids, names and positions are checked against the model and prompts up front."""
    metric, message = PREPARED[case]
    with pytest.raises(MetricError, match=message):
        run(gpt2, CLEAN, CORRUPTED, metric, positions={"S2": [1, 2]})
    assert forwards == []


def test_reading_padding_or_a_one_token_loss_fails_before_any_pass(gpt2, forwards):
    """A position that is padding in one prompt, and loss of a prompt with no target."""
    texts = ["w1 w2 w3", "w4"]
    with pytest.raises(MetricError, match=r"position 3 is padding in corrupted prompt 1, which has 2 real tokens"):
        run(gpt2, texts, texts, metrics.logit_diff(5, 7, pos=3))
    with pytest.raises(MetricError, match=r"loss needs at least two real tokens per prompt .* corrupted prompt 0 has 1"):
        one = torch.tensor([[0], [0]])  # BOS alone: nothing to predict
        catalog.RESID_PRE.sel(layer=0).run(gpt2, one, one, metrics.loss(), progress=False)
    assert forwards == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"metric 'bad' returned NoneType \(None\) at the clean baseline; it must return a tensor"),
        ("x", r"metric 'bad' returned str \('x'\) at the clean baseline"),
        ([1.0, 2.0], r"metric 'bad' returned list"),
    ],
)
def test_metric_returning_a_non_tensor_is_a_metric_error(gpt2, forwards, value, message):
    """Only the unpatched runs ran (a metric's output is known only from logits); no patched pass."""

    def bad(logits):
        return value

    with pytest.raises(MetricError, match=message):
        run(gpt2, CLEAN, CORRUPTED, bad)
    assert len(forwards) == 2  # the unpatched clean and corrupted runs, nothing patched


def test_numpy_and_torch_integers_are_ints(gpt2):
    """np.int64 / torch scalars work wherever an int does: answers, positions, per-prompt lists."""
    want = run(gpt2, CLEAN, CORRUPTED, metrics.logit_diff(3, 7, pos=-1, reduce="none"))
    for metric in (
        metrics.logit_diff(np.int64(3), np.int32(7), pos=np.int64(-1), reduce="none"),
        metrics.logit_diff(torch.tensor(3), torch.tensor([7, 7]), pos=torch.tensor(-1), reduce="none"),
        metrics.logit_diff([np.int64(3), 3], 7, pos=np.array([5, 5]), reduce="none"),
        metrics.logit_diff(3, 7, pos="END", reduce="none"),
    ):
        np.testing.assert_allclose(run(gpt2, CLEAN, CORRUPTED, metric).values, want.values, atol=1e-6)


def test_a_metric_that_raises_is_a_metric_error_naming_it(gpt2, forwards):
    """An exception inside a user's metric names the metric and the cell; the cause is kept."""

    def broken(logits):
        return logits[:, 99999]

    with pytest.raises(MetricError, match=r"metric 'broken' raised IndexError at the clean baseline") as info:
        run(gpt2, CLEAN, CORRUPTED, broken)
    assert isinstance(info.value.__cause__, IndexError)
    assert len(forwards) == 2  # the two unpatched passes the baselines need, no patched one


def test_a_word_outside_the_vocabulary_is_not_the_unknown_token(gpt2, forwards):
    """A word the tokenizer maps to its unknown token is refused, not measured as <unk>."""
    with pytest.raises(MetricError, match=r"answer token 'zzzz' is not in the model's vocabulary.*'<unk>'"):
        run(gpt2, CLEAN, CORRUPTED, metrics.logit_diff("zzzz", "w1"))
    assert forwards == []


def test_numpy_and_torch_integers_are_accepted_as_options(gpt2):
    """cells_per_batch takes numpy and torch integer scalars like ints (bools stay refused)."""
    from patchspec.errors import OptionError

    want = run(gpt2, CLEAN, CORRUPTED, cells_per_batch=2)
    for count in (np.int64(2), torch.tensor(2)):
        got = run(gpt2, CLEAN, CORRUPTED, cells_per_batch=count)
        np.testing.assert_array_equal(got.values, want.values)
    with pytest.raises(OptionError, match=r"cells_per_batch must be a positive int or None, got np\.True_"):
        run(gpt2, CLEAN, CORRUPTED, cells_per_batch=np.bool_(True))
