"""The bundled toy model loads, solves induction with the expected circuit, and its prompts fit."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.head_detector import detect_head

from patchspec.toy import TOY_MODEL_DIR, InductionPrompts, induction_prompts, toy_model, toy_words


@pytest.fixture(scope="module")
def toy():
    return toy_model("cpu")


def repeated_words(n: int, length: int, copies: int, seed: int) -> torch.Tensor:
    """``[n, 1 + copies * length]`` token ids: <bos> + s * copies, s of distinct random words."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(n, len(toy_words()), generator=gen).argsort(dim=-1)
    s = order[:, :length] + 4  # word ids follow <bos>, <eos>, <pad>, <unk>
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), s.repeat(1, copies)], dim=1)


def test_bundle_is_small_and_complete():
    names = {p.name for p in TOY_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in TOY_MODEL_DIR.iterdir()) < 3_000_000


def test_loads_in_eval_mode(toy):
    assert not toy.training
    assert not any(module.training for module in toy.modules())
    assert (toy.cfg.n_layers, toy.cfg.n_heads, toy.cfg.d_model) == (2, 4, 64)
    assert str(toy.cfg.device) == "cpu"


def test_tokenizer_prepends_one_bos_and_knows_every_word(toy):
    words = toy_words()
    assert len(words) == 48
    tokens = toy.to_tokens("cat dog sun")
    assert tokens.tolist() == [
        [toy.tokenizer.bos_token_id, *(toy.to_single_token(w) for w in ("cat", "dog", "sun"))]
    ]
    assert toy.to_str_tokens("cat dog sun") == ["<bos>", "cat", "dog", "sun"]
    assert toy.to_tokens("cat dog sun", prepend_bos=False).shape == (1, 3)
    all_ids = toy.to_tokens(" ".join(words), prepend_bos=False)[0]
    assert all_ids.tolist() == list(range(4, 52))  # no <unk>, one id per word


def test_model_solves_induction(toy):
    length = 10
    tokens = repeated_words(128, length, copies=2, seed=1234)
    with torch.no_grad():
        logits = toy(tokens)
    # Predictions made at words 1..length-1 of the second copy (the first is unpredictable).
    preds = logits[:, length + 1 : -1].argmax(-1)
    accuracy = (preds == tokens[:, length + 2 :]).float().mean().item()
    assert accuracy > 0.9


def test_head_detector_finds_previous_token_and_induction_heads(toy):
    words = toy_words()
    tokens = repeated_words(8, 10, copies=3, seed=99)
    seqs = [" ".join(words[i - 4] for i in row[1:].tolist()) for row in tokens]
    prev = detect_head(toy, seqs, "previous_token_head")
    induction = detect_head(toy, seqs, "induction_head")
    assert prev.shape == induction.shape == (2, 4)
    # The "mul" induction score counts every row of the pattern, and the rows of the
    # first copy can't score: the best possible value here is 20 / 31 = 0.645.
    assert prev[0].max() > 0.5
    assert induction[1].max() > 0.5
    # ...and the roles are not swapped.
    assert prev[1].max() < 0.5 and induction[0].max() < 0.5


@pytest.mark.parametrize("length", [2, 5, 8, 24, 32])
def test_induction_prompts_match_in_length_and_predictions(toy, length):
    prompts = induction_prompts(6, length=length, seed=length)
    assert isinstance(prompts, InductionPrompts) and len(prompts) == 6
    clean, corrupted = toy.to_tokens(prompts.clean), toy.to_tokens(prompts.corrupted)
    assert clean.shape == corrupted.shape == (6, 2 * length)
    assert not (clean == toy.tokenizer.unk_token_id).any()
    assert not (corrupted == toy.tokenizer.unk_token_id).any()
    assert torch.equal(clean[:, length + 1 :], corrupted[:, length + 1 :])  # same second half
    answer = torch.tensor([toy.to_single_token(w) for w in prompts.answer])
    wrong = torch.tensor([toy.to_single_token(w) for w in prompts.wrong])
    with torch.no_grad():
        assert torch.equal(toy(clean)[:, -1].argmax(-1), answer)
        assert torch.equal(toy(corrupted)[:, -1].argmax(-1), wrong)
    for text, w in zip(prompts.clean, prompts.wrong, strict=True):
        assert w not in text.split()


def test_induction_prompts_are_seeded():
    assert induction_prompts(3, seed=7) == induction_prompts(3, seed=7)
    assert induction_prompts(3, seed=7) != induction_prompts(3, seed=8)
    with pytest.raises(ValueError):
        induction_prompts(0)
    with pytest.raises(ValueError):
        induction_prompts(1, length=33)
