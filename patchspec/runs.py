"""Former home of the unpatched runs; see :mod:`patchspec.model.session`."""

from patchspec.model.session import Session, pad_to, prompt_texts, to_tokens

__all__ = ["Session", "pad_to", "prompt_texts", "to_tokens"]
