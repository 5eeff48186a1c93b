"""Guards shared by every estimator: each registered hook must fire exactly as planned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from patchspec.errors import HookError

Hook = tuple[str, Callable[..., Any]]


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
