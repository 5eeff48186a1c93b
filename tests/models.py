"""Tiny seeded TransformerLens models built locally (no model hub), for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = ["<bos>", "<pad>", "<unk>"] + [f"w{i}" for i in range(45)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCAB`."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )


def build(kind: str, folder: Path, *, seed: int = 0) -> TransformerBridge:
    """A tiny ``"gpt2"`` (multi-head) or ``"qwen2"`` (grouped-query, rotary) bridge, in eval mode."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=len(VOCAB), n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        hf = GPT2LMHeadModel(config)
    elif kind == "qwen2":
        config = Qwen2Config(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
            intermediate_size=64, vocab_size=len(VOCAB), max_position_embeddings=32,
        )
        hf = Qwen2ForCausalLM(config)
    else:
        raise ValueError(kind)
    tokenizer = word_tokenizer()
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # AutoTokenizer would pick the architecture's own tokenizer class; load ours explicitly.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = TransformerBridge.boot_transformers(str(folder), device="cpu", tokenizer=tokenizer)
    model.eval()
    return model


def prompts(n: int = 2, length: int = 6, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded clean and corrupted token tensors ``[n, length]`` (BOS first)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, len(VOCAB), (n, length), generator=gen)
    corrupted = torch.randint(3, len(VOCAB), (n, length), generator=gen)
    clean[:, 0] = corrupted[:, 0] = 0
    return clean, corrupted
