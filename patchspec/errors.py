"""The exceptions patchspec raises, all rooted in :class:`PatchSpecError`.

Messages say what was wrong, what was given and what is valid, e.g.
``axis 'heads' is not a dim of activation 'z' (batch, pos, head, d_head); did you mean 'head'?``
"""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path


class PatchSpecError(ValueError):
    """Base class of every error patchspec raises on bad input."""


class SpecError(PatchSpecError):
    """A spec is malformed: unknown activation, axis, restriction or rule output."""


class InputError(PatchSpecError):
    """Prompts, tokens, caches or the model are unusable for the requested sweep."""


class HookError(PatchSpecError):
    """A hook point is missing, gated behind a flag, or did not fire."""


class MetricError(PatchSpecError):
    """A metric returned the wrong shape or a non-finite value."""


class ExecutorError(PatchSpecError):
    """An executor could not compute some cells: a chunk kept killing the cluster workers it
    ran on, or the workers could not rebuild the sweep as the caller built it."""


class PatchSpecWarning(UserWarning):
    """A run that is computed as asked, but probably not as meant (e.g. clean and corrupted
    prompts of different lengths, or tokens that look padded but come without a mask)."""


class OptionError(PatchSpecError, TypeError):
    """An unknown or invalid run option (``engine=``, ``max_memory=``, a misspelt keyword).

    It is also a ``TypeError``, as Python raises for an unexpected keyword argument.
    """


def did_you_mean(bad: str, valid: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(bad, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


_PACKAGE = str(Path(__file__).resolve().parent)


def warn(message: str) -> None:
    """Warn with a :class:`PatchSpecWarning`, attributed to the first caller outside patchspec."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, PatchSpecWarning, stacklevel=level)
