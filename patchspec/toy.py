"""A tiny bundled GPT-2 with a known induction circuit, for examples, tests and docs.

The model in ``patchspec/data/toy_model/`` is a 2-layer, 4-head GPT-2 (d_model 64,
with MLPs) over a word-level vocabulary of 48 English words plus ``<bos>``,
``<eos>``, ``<pad>`` and ``<unk>``. It was trained from scratch by
``examples/train_toy_model.py`` on an induction task and solves it essentially
perfectly: given ``<bos> s s[:-1]`` for a random sequence ``s`` of distinct words, it
predicts the next word of the repeat. The circuit is the textbook one: a
previous-token head in layer 0 (head 0.0) feeds induction heads in layer 1 (all four
heads, 1.0 to 1.3). See ``docs/toy_model.md`` for the training recipe and the
measured head scores.

Prompts are plain space-separated words without ``<bos>``: the bridge's
``to_tokens`` prepends ``<bos>`` itself, so writing ``"<bos> ..."`` would give two.

Example:
    >>> from patchspec.toy import induction_prompts, toy_model
    >>> model = toy_model("cpu")
    >>> prompts = induction_prompts(4, length=8, seed=0)
    >>> clean = model.to_tokens(prompts.clean)  # [4, 16]: <bos> + 8 + 7 words
    >>> logits = model(clean)[:, -1]
    >>> [model.tokenizer.decode(i) for i in logits.argmax(-1)] == prompts.answer
    True
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

from patchspec.errors import InputError

__all__ = [
    "TOY_MODEL_DIR",
    "InductionPrompts",
    "detected_heads",
    "induction_prompts",
    "toy_model",
    "toy_words",
]

TOY_MODEL_DIR: Path = Path(__file__).resolve().parent / "data" / "toy_model"
"""Folder holding the bundled model (``config.json``, ``model.safetensors``, tokenizer)."""

#: How a corrupted induction prompt differs from its clean twin (see :func:`induction_prompts`).
Corruption = Literal["answer", "query"]

_MAX_LENGTH = 32  # 2 * length tokens must fit the model's 64 positions


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide Hugging Face's "Loading weights" / "Writing model shards" bars while saving or
    booting a model, then restore them (``patchspec.tiny``, ``patchspec.toy`` and the command
    line load models inside it)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a TransformerLens dependency
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


_quiet_loading = quiet_loading  # the name it had


def toy_model(device: str | torch.device | None = None) -> TransformerBridge:
    """Load the bundled toy induction model as a TransformerLens bridge in eval mode.

    Every call boots a fresh copy (about a second; the weights are 0.4 MB), so callers
    may hook or modify it freely.

    Args:
        device: Where to put the model. Defaults to ``"cuda"`` when available, else
            ``"cpu"``.

    Returns:
        A ``TransformerBridge`` (raw HuggingFace weights, no compatibility-mode
        processing) whose tokenizer prepends ``<bos>``.

    Example:
        >>> model = toy_model("cpu")
        >>> model.to_str_tokens("cat dog sun")
        ['<bos>', 'cat', 'dog', 'sun']
        >>> model.cfg.n_layers, model.cfg.n_heads, model.training
        (2, 4, False)
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with quiet_loading():
        model = TransformerBridge.boot_transformers(str(TOY_MODEL_DIR), device=device)
    model.eval()
    return model


@functools.cache
def _words() -> tuple[str, ...]:
    vocab: dict[str, int] = json.loads((TOY_MODEL_DIR / "tokenizer.json").read_text())["model"][
        "vocab"
    ]
    return tuple(w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if not w.startswith("<"))


def toy_words() -> list[str]:
    """The toy model's 48 ordinary words (no special tokens), in vocabulary order.

    Example:
        >>> toy_words()[:4]
        ['cat', 'dog', 'sun', 'moon']
    """
    return list(_words())


@dataclass(frozen=True)
class InductionPrompts:
    """Clean / corrupted prompt pairs for the induction task, with their answers.

    All lists have one entry per prompt. Prompts are space-separated words without
    ``<bos>`` (``model.to_tokens`` adds it), and every clean and corrupted prompt
    tokenizes to the same number of tokens, ``2 * length``.

    Attributes:
        clean: ``s + s[:-1]`` for a random sequence ``s`` of ``length`` distinct words:
            the last word's successor in the first copy is the answer.
        corrupted: the same second half after a different first half ``c``: ``c``
            keeps the query word (the prompt's last word) at its place but follows it
            with ``wrong``; its other words are fresh (not in ``s`` whenever
            ``length <= 24``).
        answer: the word induction predicts on ``clean``, ``s[-1]``.
        wrong: the word induction predicts on ``corrupted``; it does not occur in
            ``clean``.
    """

    clean: list[str]
    corrupted: list[str]
    answer: list[str]
    wrong: list[str]

    def __len__(self) -> int:
        return len(self.clean)


def induction_prompts(
    n: int = 1, *, length: int = 8, seed: int = 0, corruption: Corruption = "answer"
) -> InductionPrompts:
    """Make ``n`` seeded clean / corrupted induction prompt pairs for the toy model.

    For each pair, a random sequence ``s`` of ``length`` distinct words is drawn. The
    clean prompt is ``s`` followed by its first ``length - 1`` words, so the next word
    is ``answer = s[-1]``. The corrupted prompt has the same second half but a new
    first half ``c`` (same length), in which the query word ``s[-2]`` sits at the same
    place and is followed by ``wrong`` instead of ``answer``. So the model predicts
    ``answer`` on clean and ``wrong`` on corrupted, and the logit difference
    ``answer - wrong`` flips sign between the two: patching it back is the job of the
    induction circuit (the ``answer`` / ``wrong`` word position in the first half, the
    previous-token head there and the induction heads at the last position).

    With ``corruption="query"`` the corrupted first half is ``s`` with the query word
    ``s[-2]`` replaced by a fresh word (``wrong``), so the last word has no earlier
    occurrence and induction has nothing to copy. This breaks the previous-token link
    instead of the copied content, so patching reveals the previous-token head (at the
    answer's first-half position) as well as the induction heads; measure it with
    ``metrics.logprob(answer)`` (``wrong`` is only a control word here).

    Args:
        n: Number of prompt pairs.
        length: Length of ``s``, 2 to 32; each prompt has ``2 * length`` tokens with
            ``<bos>``. The model is near-perfect up to 31; 3 to 24 is the clean range
            (fresh first-half words in corrupted prompts need ``length <= 24``).
        seed: Seed for the word choices; equal arguments give equal prompts.
        corruption: ``"answer"`` (replace the answer word in the first half) or
            ``"query"`` (replace the query word in the first half).

    Returns:
        An :class:`InductionPrompts` with ``n`` entries in each field.

    Raises:
        InputError: If ``n < 1``, ``length`` is outside 2..32 or ``corruption`` is unknown.

    Example:
        >>> p = induction_prompts(1, length=4, seed=0)
        >>> len(p.clean[0].split()), len(p.corrupted[0].split())
        (7, 7)
        >>> p.clean[0].split()[:4][-1] == p.answer[0]
        True
    """
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    if corruption not in ("answer", "query"):
        raise InputError(f"corruption must be 'answer' or 'query', got {corruption!r}")
    if not 2 <= length <= _MAX_LENGTH:
        raise InputError(f"length must be between 2 and {_MAX_LENGTH}, got {length}")
    words = _words()
    rng = random.Random(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for _ in range(n):
        s = rng.sample(words, length)
        query, ans = s[-2], s[-1]
        fresh = [w for w in words if w not in s]
        rng.shuffle(fresh)
        wrong_word = fresh.pop()
        # Fill the rest of the corrupted first half with fresh words, then, only if
        # length > 24 leaves too few, with words of s other than the query and answer.
        spare = [w for w in s if w not in (query, ans)]
        rng.shuffle(spare)
        filler = (fresh + spare)[: length - 2]
        c = [*filler, query, wrong_word] if corruption == "answer" else [*s[:-2], wrong_word, ans]
        clean.append(" ".join(s + s[:-1]))
        corrupted.append(" ".join(c + s[:-1]))
        answer.append(ans)
        wrong.append(wrong_word)
    return InductionPrompts(clean=clean, corrupted=corrupted, answer=answer, wrong=wrong)


def detected_heads(
    model: TransformerBridge, *, n: int = 8, length: int = 10, seed: int = 99
) -> dict[str, torch.Tensor]:
    """TransformerLens's own head-detector scores on sequences of random words repeated 3 times.

    An independent check of what patching finds: ``transformer_lens.head_detector.detect_head``
    scores every head for previous-token and induction attention.

    Returns:
        ``{"previous_token_head": [n_layers, n_heads], "induction_head": [n_layers, n_heads]}``.
        The induction score counts the first copy's rows too, so its maximum is 20/31 = 0.645.
    """
    from transformer_lens.head_detector import detect_head

    rng = random.Random(seed)
    words = _words()
    seqs = [" ".join(rng.sample(words, length) * 3) for _ in range(n)]
    return {
        name: detect_head(model, seqs, name).detach().cpu()
        for name in ("previous_token_head", "induction_head")
    }
