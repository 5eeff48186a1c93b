"""A CPU-meaningful guard against host syncs: counts every Python-level read of a tensor's
values (``item``, ``tolist``, ``bool``, ``int``, ``float``, ``cpu``, ``numpy``, moves to the
host) and the ops that must read the device to size their output (``nonzero``, ``unique``,
``masked_select``), wherever they are called from. On CUDA the same reads would block on the
device; ``torch.cuda.set_sync_debug_mode`` catches them there, this catches them anywhere."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import torch

METHODS = (
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
    "nonzero", "unique", "masked_select",
)
FUNCTIONS = ("nonzero", "unique", "masked_select", "equal", "is_nonzero")


class Syncs:
    """The reads seen while :func:`counting` is active, with where each came from."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.active = False

    def note(self, name: str) -> None:
        if self.active:
            self.active = False  # the guard's own work is not counted
            try:
                frames = traceback.extract_stack()[:-3]
                where = next(
                    (f"{f.filename}:{f.lineno} {f.name}" for f in reversed(frames) if "patchspec" in f.filename),
                    "?",
                )
                self.seen.append(f"{name} at {where}")
            finally:
                self.active = True


@contextlib.contextmanager
def counting(monkeypatch: Any) -> Iterator[Syncs]:
    """Patch the reads for the block; turn counting on with ``syncs.active = True``."""
    syncs = Syncs()

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            syncs.note(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in METHODS:
        wrap(torch.Tensor, name)
    for name in FUNCTIONS:
        wrap(torch, name)
    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str | torch.device) and torch.device(target).type == "cpu" and self.device.type != "cpu":
            syncs.note("to('cpu')")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    yield syncs
