"""Guards shared by every estimator: each registered hook must fire exactly as planned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from patchspec.errors import HookError
from patchspec.sources import Source

Hook = tuple[str, Callable[..., Any]]

#: The last phase: reads of an upstream activation for a derived write (``resid_mid``).
READ = 4


def write_phase(source: Source, *, derived: bool) -> int:
    """When a write runs among the hooks of its hook point (see :func:`ordered`).

    Plain writes come before derived ones (``resid_mid`` rewrites ``attn_out`` from the
    patched ``resid_pre``), and within each, ablations (values made from the receiving run:
    zero, mean, resample, noise) before values from the other run, which therefore win where
    the two overlap: causal tracing noises the subject and restores one clean state there.
    """
    return 2 * int(derived) + int(source.interchange)


def phased(fn: Callable[..., Any], phase: int) -> Callable[..., Any]:
    """``fn`` marked to run in ``phase`` among the hooks of its hook point (see :func:`ordered`)."""
    fn.phase = phase  # type: ignore[attr-defined]
    return fn


def ordered(hooks: list[Hook]) -> list[Hook]:
    """``hooks`` in phase order (stable), so that a joint patch does not depend on its order.

    TransformerLens runs the hooks of one hook point in registration order; reading
    ``resid_pre`` for a ``resid_mid`` write must come after every write to ``resid_pre``, the
    derived ``attn_out`` write after the plain ones, and of two overlapping writes the one that
    wins must not be the one registered last.

    Example:
        >>> read, write = phased(lambda a, h: None, READ), phased(lambda a, h: a, 0)
        >>> [fn is write for _, fn in ordered([("x", read), ("x", write)])]
        [True, False]
    """
    return sorted(hooks, key=lambda hook: getattr(hook[1], "phase", 0))


class FireCounter:
    """Counts how often each registered hook fires, to prove every patch was applied."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so that each call is counted under ``name``."""
        key = f"{name}#{len(self.counts)}"
        self.counts[key] = 0

        def counted(act: torch.Tensor, hook: Any) -> Any:
            self.counts[key] += 1
            return fn(act, hook)

        return counted

    def counted(self, hooks: list[Hook]) -> list[Hook]:
        """Every hook of ``hooks`` wrapped by :meth:`wrap`."""
        return [(name, self.wrap(name, fn)) for name, fn in hooks]

    def check(self, times: int = 1) -> None:
        """Raise unless every wrapped hook fired exactly ``times`` times.

        Raises:
            HookError: a hook fired a different number of times.
        """
        for key, count in self.counts.items():
            if count != times:
                name = key.rsplit("#", 1)[0]
                raise HookError(
                    f"hook {name!r} fired {count} times in one forward pass, expected {times}; "
                    "its patch was not applied as planned (does this model run that hook point?)"
                )
