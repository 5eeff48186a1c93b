"""Tiny seeded TransformerLens models built locally (no model hub), for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from patchspec.tiny import tiny_model

VOCAB = ["<bos>", "<pad>", "<unk>"] + [f"w{i}" for i in range(45)]


def build(kind: str, folder: Path, *, seed: int = 0) -> TransformerBridge:
    """A tiny ``"gpt2"`` (multi-head) or ``"qwen2"`` (grouped-query: 4 query, 2 key/value heads;
    rotary) bridge over :data:`VOCAB`, in eval mode."""
    return tiny_model(VOCAB, folder, architecture=kind, seed=seed, device="cpu")  # type: ignore[arg-type]


def prompts(n: int = 2, length: int = 6, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded clean and corrupted token tensors ``[n, length]`` (BOS first)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, len(VOCAB), (n, length), generator=gen)
    corrupted = torch.randint(3, len(VOCAB), (n, length), generator=gen)
    clean[:, 0] = corrupted[:, 0] = 0
    return clean, corrupted
