"""Finding named positions in prompts: the table a sweep's ``positions=`` takes.

Real prompts put the tokens that matter at different indices ("S2", the second mention of the
subject; "END", the last token). :func:`find_positions` looks them up per prompt, counting
tokens exactly as the sweep does (each prompt on its own, as ``model.to_tokens(prompt)`` gives
them, BOS included), so its table can be passed straight to ``run(..., positions=...)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

import torch

from patchspec.errors import InputError, did_you_mean
from patchspec.model.session import read_inputs

#: Which occurrence of a word: the first, the last, or the ``k``-th (0-based; negative from the
#: last).
Occurrence: TypeAlias = Literal["first", "last"] | int


def _which(occurrence: Any, name: str) -> int:
    if occurrence == "first":
        return 0
    if occurrence == "last":
        return -1
    if isinstance(occurrence, numbers.Integral) and not isinstance(occurrence, bool):
        return int(occurrence)
    raise InputError(
        f"find_positions: occurrence of {name!r} must be 'first', 'last' or an int (0-based, "
        f"negative from the last), got {occurrence!r}"
    )


def _word_id(model: Any, word: str, name: str) -> int:
    """The single token id of ``word`` (as it appears inside a prompt)."""
    if not word:
        raise InputError(f"find_positions: {name!r} is an empty string; give a word or an index")
    try:
        ids = torch.as_tensor(model.to_tokens(word, prepend_bos=False)).reshape(-1).tolist()
    except Exception as err:
        raise InputError(f"find_positions: cannot tokenize {name!r} = {word!r}: {err}") from None
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids] if hasattr(model, "tokenizer") else ids
        raise InputError(
            f"find_positions: {name!r} = {word!r} is {len(ids)} tokens of the model ({pieces}), "
            "not one; give a single token as it appears in the prompt (with its leading space "
            "for GPT-2-style tokenizers), or an index"
        )
    return int(ids[0])


def find_positions(
    model: Any,
    prompts: Any,
    names: Mapping[str, str | int],
    *,
    occurrence: Occurrence | Mapping[str, Occurrence] = "first",
) -> dict[str, list[int]]:
    """The token index of each named word or index in each prompt.

    Args:
        model: The model whose tokenizer the sweep uses.
        prompts: The prompts as a sweep takes them: text, or tokens (with an attention mask for
            padded ones).
        names: ``name -> what``: a word (one token of the model, as it appears in the prompt)
            found in each prompt, or an int index counted in each prompt on its own (``0``:
            the first token; negative from the prompt's own end: ``-1`` is the last real one).
        occurrence: Which occurrence of a word: ``"first"`` (default), ``"last"`` or the
            ``k``-th (0-based, negative from the last); one for every name, or a mapping
            ``name -> occurrence`` (names not in it take the first).

    Returns:
        ``{name: [index of prompt 0, index of prompt 1, ...]}``, in the order of ``names``: the
        table ``run(..., positions=...)`` takes.

    Raises:
        InputError: a word that is missing from a prompt (naming the prompt) or is several
            tokens, an index outside a prompt, or a bad ``occurrence``.

    Example:
        >>> from patchspec.tiny import tiny_model
        >>> model = tiny_model(["Mary", "John", "went", "home", "and", "saw"])
        >>> prompts = ["Mary and John went home and John saw", "John saw Mary"]
        >>> find_positions(model, prompts, {"S1": "John", "S2": "John", "END": -1},
        ...                occurrence={"S2": "last"})
        {'S1': [3, 1], 'S2': [7, 1], 'END': [8, 3]}
    """
    if not isinstance(names, Mapping) or not names:
        raise InputError(
            f"find_positions needs a mapping of names to words or indices, got {names!r}"
        )
    if isinstance(occurrence, Mapping):
        unknown = [k for k in occurrence if k not in names]
        if unknown:
            raise InputError(
                f"find_positions: occurrence names {unknown[0]!r}, which is not in names "
                f"({', '.join(map(repr, names))}){did_you_mean(str(unknown[0]), map(str, names))}"
            )
        which = {n: _which(occurrence.get(n, "first"), n) for n in names}
    else:
        which = {n: _which(occurrence, n) for n in names}
    inputs = read_inputs(model, prompts, "prompts")
    rows = [inputs.tokens[b, :n].tolist() for b, n in enumerate(inputs.lengths)]
    texts = inputs.texts
    out: dict[str, list[int]] = {}
    for name, what in names.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"find_positions: names must be non-empty strings, got {name!r}")
        if isinstance(what, numbers.Integral) and not isinstance(what, bool):
            found = []
            for b, row in enumerate(rows):
                n = len(row)
                if not -n <= int(what) < n:
                    raise InputError(
                        f"find_positions: {name!r} = {int(what)} is outside prompt {b}, which has "
                        f"{n} tokens (valid: {-n}..{n - 1})"
                    )
                found.append(int(what) % n)
            out[name] = found
        elif isinstance(what, str):
            token = _word_id(model, what, name)
            k = which[name]
            found = []
            for b, row in enumerate(rows):
                hits = [i for i, t in enumerate(row) if t == token]
                shown = f" ({texts[b]!r})" if texts is not None else ""
                if not hits:
                    raise InputError(
                        f"find_positions: {name!r} = {what!r} does not occur in prompt {b}{shown}"
                    )
                if not -len(hits) <= k < len(hits):
                    raise InputError(
                        f"find_positions: {name!r} = {what!r} occurs {len(hits)} time(s) in "
                        f"prompt {b}{shown}, so occurrence {k} does not exist"
                    )
                found.append(hits[k])
            out[name] = found
        else:
            raise InputError(
                f"find_positions: {name!r} must be a word (a string) or an int index, got "
                f"{what!r} ({type(what).__name__})"
            )
    return out
