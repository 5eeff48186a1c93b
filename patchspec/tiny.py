"""Tiny seeded models with random weights, booted locally: for tests, examples and your own checks.

No model hub is needed: a ``transformers`` config is instantiated with seeded random weights, saved
with a word-level tokenizer to a folder, and booted with ``TransformerBridge.boot_transformers``.
Use them to check a custom spec or rule quickly; they know nothing (see :mod:`patchspec.toy` for a
trained model).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

from patchspec.errors import InputError
from patchspec.toy import quiet_loading

SPECIALS = ("<bos>", "<pad>", "<unk>")
Architecture = Literal["gpt2", "qwen2"]


def word_tokenizer(words: Sequence[str]) -> object:
    """A word-level ``PreTrainedTokenizerFast``: whitespace split, one id per word.

    ``<bos>``, ``<pad>`` and ``<unk>`` get ids 0, 1, 2 unless ``words`` already places them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [s for s in SPECIALS if s not in words] + list(words)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(
    words: Sequence[str],
    folder: str | Path | None = None,
    *,
    architecture: Architecture = "gpt2",
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_model: int = 32,
    n_ctx: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """A seeded random-weight model over a word vocabulary, booted as a ``TransformerBridge``.

    Args:
        words: The vocabulary (``<bos> <pad> <unk>`` are added first when missing).
        folder: Where to save the model and tokenizer (default: a new temporary folder).
        architecture: ``"gpt2"`` (multi-head, learned positions) or ``"qwen2"`` (rotary,
            grouped-query attention with ``n_kv_heads`` key/value heads, default ``n_heads // 2``).
        n_layers, n_heads, d_model, n_ctx: Sizes.
        seed: Seed of the random weights.
        device: Default: CUDA when available, else CPU.
        dtype: Parameter dtype (``torch.float16`` and ``torch.bfloat16`` work too).

    Returns:
        The model, in eval mode.

    Example:
        >>> model = tiny_model(["a", "b", "c"])
        >>> model.to_tokens("a b c").tolist()
        [[0, 3, 4, 5]]
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = word_tokenizer(words)
    vocab_size = len(tokenizer)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    if architecture == "gpt2":
        hf: torch.nn.Module = GPT2LMHeadModel(
            GPT2Config(
                n_layer=n_layers, n_head=n_heads, n_embd=d_model, vocab_size=vocab_size, n_positions=n_ctx,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )
        )
    elif architecture == "qwen2":
        hf = Qwen2ForCausalLM(
            Qwen2Config(
                num_hidden_layers=n_layers, num_attention_heads=n_heads,
                num_key_value_heads=n_kv_heads or max(1, n_heads // 2), hidden_size=d_model,
                intermediate_size=2 * d_model, vocab_size=vocab_size, max_position_embeddings=n_ctx,
            )
        )
    else:
        raise InputError(f"architecture must be 'gpt2' or 'qwen2', got {architecture!r}")
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="patchspec-tiny-"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with quiet_loading():  # no "Writing model shards" / "Loading weights" bars
        hf.save_pretrained(folder)  # type: ignore[operator]
        tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
        # AutoTokenizer would pick the architecture's own tokenizer class; load ours explicitly.
        model = TransformerBridge.boot_transformers(
            str(folder), device=device, dtype=dtype, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder)
        )
    model.eval()
    return model
