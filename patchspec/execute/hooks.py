"""Guards shared by every estimator: each registered hook must fire exactly as planned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from patchspec.errors import HookError

Hook = tuple[str, Callable[..., Any]]

#: Phases of the hooks registered at one hook point, run in this order whatever the order of a
#: joint patch's parts: plain writes, then writes derived from other activations (``resid_mid``
#: rewrites ``attn_out`` from the patched ``resid_pre``), then reads for such derived writes.
WRITE, DERIVED, READ = 0, 1, 2


def phased(fn: Callable[..., Any], phase: int) -> Callable[..., Any]:
    """``fn`` marked to run in ``phase`` among the hooks of its hook point (see :func:`ordered`)."""
    fn.phase = phase  # type: ignore[attr-defined]
    return fn


def ordered(hooks: list[Hook]) -> list[Hook]:
    """``hooks`` in phase order (stable), so that a joint patch does not depend on its order.

    TransformerLens runs the hooks of one hook point in registration order; reading
    ``resid_pre`` for a ``resid_mid`` write must come after every write to ``resid_pre``, and
    the derived ``attn_out`` write after the plain ones.

    Example:
        >>> read, write = phased(lambda a, h: None, READ), phased(lambda a, h: a, WRITE)
        >>> [fn is write for _, fn in ordered([("x", read), ("x", write)])]
        [True, False]
    """
    return sorted(hooks, key=lambda hook: getattr(hook[1], "phase", WRITE))


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
