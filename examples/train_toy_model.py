#!/usr/bin/env python
"""Train the toy induction model bundled with patchspec.

The model is a 2-layer, 4-head GPT-2 (``transformers.GPT2LMHeadModel``: d_model 64,
d_mlp 256, LayerNorm, learned absolute positions, no dropout) trained from scratch on
word-level sequences in which the only way to predict the next word is induction
("the last time the current word occurred, it was followed by B, so predict B").

Training data. For every sequence, pick ``K`` (6..24) of the 48 words and put them in a
random cyclic order; the sequence starts at a random word and then either steps to the
next word of the cycle or, with a jump probability drawn per batch from [0, 0.5],
jumps to a random word of the set. Whenever the current word has occurred before,
its successor is predictable from the earlier occurrence. The loss is the next-token
loss at exactly those positions (the jumps and first occurrences are unpredictable
and are not scored). With no jumps a sequence is just ``s s s ...``, the classic
repeated-random-tokens task that ``patchspec.toy.induction_prompts`` uses.

Two details make the model learn the textbook circuit (a previous-token head in
layer 0 feeding an induction head in layer 1) rather than a shortcut:

* jumps: because the same word occurs after different predecessors, matching on more
  than the one previous token is unreliable, so layer 0 must focus on offset -1;
* random position offsets: every training sequence gets ``position_ids`` shifted by a
  random 0..24, so the model cannot use absolute positions (without this it learns to
  look back a fixed fraction of the context, which solves ``<bos> s s`` but is not
  induction). At inference positions start at 0 as usual.

Run from the repository root (CPU only; 4000 steps take about 3.5 minutes on one
thread; bit-for-bit deterministic for a given ``--seed`` and ``--threads``)::

    python examples/train_toy_model.py

It prints the held-out task accuracy and loss (second copy of ``<bos> s s``) and the
attention scores of the circuit while training and at the end.

It writes ``config.json``, ``generation_config.json``, ``model.safetensors``
(float32) and the tokenizer files to ``patchspec/data/toy_model/`` (see ``--out``),
which ``TransformerBridge.boot_transformers(folder)`` and ``patchspec.toy.toy_model()``
load. The training facts and head scores are recorded in ``docs/toy_model.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "patchspec" / "data" / "toy_model"

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]  # ids 0, 1, 2, 3
# 48 short, distinct English words; ids 4..51.
WORDS = (  # noqa: SIM905 - one string reads better than 48 quoted words
    "cat dog sun moon tree fish bird frog lamp book door cup "
    "hat key box pen car bus ship road rain snow wind fire "
    "milk tea cake egg apple pear plum rice salt corn bean nut "
    "red blue green gold pink gray king queen duke fox owl bee"
).split()
assert len(WORDS) == len(set(WORDS)) == 48
FIRST_WORD_ID = len(SPECIAL_TOKENS)

N_CTX = 64  # n_positions of the model
SEQ_LEN = 40  # training sequence length (incl. <bos>)
MAX_POS_OFFSET = N_CTX - SEQ_LEN  # position_ids are shifted by 0..24 in training
MIN_K, MAX_K = 6, 24  # words per training sequence
MAX_JUMP_PROB = 0.5


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace split, one id per word, ``<bos>`` prepended."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # add_bos_token=True installs a TemplateProcessing post-processor ("<bos> $A") that
    # is saved in tokenizer.json, so plain AutoTokenizer use matches the training data.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        model_max_length=N_CTX,
        padding_side="right",
    )


def build_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(SPECIAL_TOKENS) + len(WORDS),
        n_positions=N_CTX,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=256,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=True,
        attn_implementation="eager",  # so output_attentions works; not saved to config.json
    )
    return GPT2LMHeadModel(config)


def sample_cycles(batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """Training batch ``[batch, seq_len]``: <bos> + a walk on a random cycle of words.

    Each sequence uses K random words in a random cyclic order and walks along the cycle,
    jumping to a random word of the set with probability ``jump`` (one per batch).
    """
    jump = rng.uniform(0.0, MAX_JUMP_PROB)
    tokens = np.zeros((batch_size, seq_len), dtype=np.int64)
    for row in tokens:
        k = int(rng.integers(MIN_K, MAX_K + 1))
        cycle = rng.choice(len(WORDS), size=k, replace=False) + FIRST_WORD_ID
        pos = int(rng.integers(k))
        row[1] = cycle[pos]
        for t in range(2, seq_len):
            pos = int(rng.integers(k)) if rng.random() < jump else (pos + 1) % k
            row[t] = cycle[pos]
    return torch.from_numpy(tokens)


def induction_mask(tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq_len - 1]``: True where ``logits[:, q]`` is predictable by induction.

    That is where ``tokens[:, q]`` occurred before, at ``p < q - 1``, and the word that
    followed its most recent earlier occurrence, ``tokens[:, p + 1]``, is the true next
    word ``tokens[:, q + 1]``.
    """
    seq_len = tokens.shape[1]
    idx = torch.arange(seq_len)
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, q, p]
    earlier = idx[None, :, None] > idx[None, None, :] + 1  # p < q - 1
    last = torch.where(same & earlier, idx, -1).amax(dim=-1)  # most recent such p, or -1
    follower = tokens.gather(1, (last + 1).clamp(min=0))
    ok = (last >= 0)[:, :-1] & (follower[:, :-1] == tokens[:, 1:])
    return ok


def make_repeats(batch_size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Held-out task batch ``[batch, 1 + 2 * length]``: <bos> + s + s, s distinct words."""
    order = torch.rand(batch_size, len(WORDS), generator=gen).argsort(dim=-1)
    seq = order[:, :length] + FIRST_WORD_ID
    bos = torch.zeros(batch_size, 1, dtype=torch.long)
    return torch.cat([bos, seq, seq], dim=1)


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, length: int, n: int, seed: int) -> dict:
    """Task metrics on fresh ``<bos> s s`` sequences (positions start at 0, as at inference).

    Returns:
        ``acc`` / ``loss``: next-token accuracy and loss on the second copy (predictions
        made at its words 1..length-1; the prediction at the last word of the first copy
        is unpredictable and skipped). ``prev``: per layer-0 head, mean attention from
        each position q >= 1 to q - 1. ``induction``: per layer-1 head, mean attention
        from the scored second-copy positions to the word after the earlier occurrence.
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = make_repeats(n, length, gen)
    out = model(tokens, output_attentions=True)
    logits, targets = out.logits[:, length + 1 : -1], tokens[:, length + 2 :]
    acc = (logits.argmax(-1) == targets).float().mean().item()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
    att0, att1 = out.attentions[0], out.attentions[1]  # [batch, head, q, k]
    prev = att0.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))
    # q = length + 1 + j attends to k = j + 2, i.e. offset -(length - 1), j = 0..length-2.
    ind = att1.diagonal(offset=-(length - 1), dim1=-2, dim2=-1)[..., 2:-1].mean(dim=(0, 2))
    return {"acc": acc, "loss": loss, "prev": prev.tolist(), "induction": ind.tolist()}


def fmt(scores: list[float]) -> str:
    return "[" + " ".join(f"{s:.2f}" for s in scores) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (results depend on it)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pos_gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    model = build_model(args.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    warmup = max(1, args.steps // 40)

    def lr_lambda(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {n_params:,} parameters for {args.steps} steps", flush=True)

    running = 0.0
    positions = torch.arange(SEQ_LEN)[None, :]
    for step in range(args.steps):
        tokens = sample_cycles(args.batch_size, SEQ_LEN, rng)
        mask = induction_mask(tokens)
        offset = torch.randint(MAX_POS_OFFSET + 1, (args.batch_size, 1), generator=pos_gen)
        logits = model(tokens, position_ids=positions + offset).logits[:, :-1]
        loss = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 250 == 0 or step == 0:
            model.eval()
            ev = evaluate(model, 10, 256, seed=10_000 + args.seed)
            model.train()
            print(
                f"step {step + 1:5d}  train loss (ema) {running:.3f}  "
                f"<bos> s s: acc {ev['acc']:.3f} loss {ev['loss']:.3f}  "
                f"prev-token L0 {fmt(ev['prev'])}  induction L1 {fmt(ev['induction'])}  "
                f"[{time.perf_counter() - t0:.0f}s]",
                flush=True,
            )
    train_time = time.perf_counter() - t0

    model.eval()
    # Fresh held-out sequences, from generator seeds never used in training.
    print("\nheld-out <bos> + s + s, 1024 fresh sequences per length (2nd-copy predictions):")
    for length in (3, 4, 6, 8, 10, 12, 16, 20, 24, 31):
        ev = evaluate(model, length, 1024, seed=20_000 + length)
        print(f"  length {length:2d}: accuracy {ev['acc']:.4f}  loss {ev['loss']:.4f}")
    final = evaluate(model, 10, 1024, seed=30_000)
    print(f"FINAL train loss (ema, induction positions) {running:.4f}")
    print(
        f"FINAL task (<bos> + 10 random words twice, 2nd copy): "
        f"accuracy {final['acc']:.4f}  loss {final['loss']:.4f}"
    )
    print(f"FINAL prev-token attention, layer-0 heads: {fmt(final['prev'])}")
    print(f"FINAL induction attention, layer-1 heads:  {fmt(final['induction'])}")
    print(f"training time {train_time:.1f}s on {args.threads} thread(s)")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # config.json + model.safetensors (float32)
    build_tokenizer().save_pretrained(args.out)
    weights = (args.out / "model.safetensors").read_bytes()
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    print(f"model.safetensors sha256 {hashlib.sha256(weights).hexdigest()}")


if __name__ == "__main__":
    main()
