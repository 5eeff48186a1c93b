"""The local executor: runs chunks one after another in this process, reporting to the run's bar.

A chunk that runs out of memory is split in two and retried, and every later chunk is kept
to the smaller size.

Each chunk's values are read once: one device-to-host copy per chunk, on which the metric
evaluator's finiteness check runs (:meth:`patchspec.metrics.Evaluator.deferring`), so that
nothing else on the hot path waits for the device. The values are assembled on the host.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import ClassVar

import attrs
import torch

from patchspec.execute.protocols import Chunk, Estimator, Progress, Task

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the device (or the host) ran out of memory."""
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


@attrs.define
class LocalExecutor:
    """Runs every chunk here, in order."""

    name: ClassVar[str] = "local"
    splits: int = 0

    def run(
        self, estimator: Estimator, task: Task, chunks: Sequence[Chunk], *, progress: bool
    ) -> torch.Tensor:
        """The values of ``task.cells``, in order, stacked on a leading dim (on the host).

        Raises:
            MetricError: a metric returned a non-finite value (naming the cell), checked on
                each chunk's host copy.
        """
        parts: list[tuple[Chunk, torch.Tensor]] = []
        limit = max((len(c) for c in chunks), default=1)
        bar: contextlib.AbstractContextManager[Progress]
        if task.progress is not None:  # the run's one bar, over every spec
            bar = contextlib.nullcontext(task.progress)
        else:  # called on its own: a bar for this task
            desc = f"patching {task.label} ({estimator.name})".replace("  ", " ")
            bar = Progress.open(progress, total=len(task.cells), desc=desc)
        with bar as shown:
            pending = list(chunks)
            while pending:
                chunk = pending.pop(0)
                if len(chunk) > limit:
                    pending[:0] = chunk.split()
                    continue
                try:
                    with _deferring(task):
                        values = estimator.estimate(task, chunk)
                        host = _to_host(values)  # the chunk's one read of the device
                        _check_pending(task, values, host)
                    values = host
                except (RuntimeError, MemoryError) as err:
                    if not is_out_of_memory(err) or len(chunk) == 1:
                        raise
                    limit = len(chunk) // 2
                    self.splits += 1
                    log.debug("out of memory with %d cells per pass; splitting", len(chunk))
                    if task.adapter.device.type == "cuda":
                        torch.cuda.empty_cache()
                    pending[:0] = chunk.split()
                    continue
                parts.append((chunk, values))
                if task.on_chunk is not None:
                    task.on_chunk(chunk, values)
                shown.update(len(chunk))
                shown.chunks(task.label, len(parts), len(parts) + len(pending))
        return assemble(task, parts)


def _deferring(task: Task) -> contextlib.AbstractContextManager[None]:
    """The evaluator's deferred finiteness check, when it has one (a hand-made evaluator may not)."""
    deferring = getattr(task.evaluate, "deferring", None)
    return deferring() if deferring is not None else contextlib.nullcontext()


def _check_pending(task: Task, values: torch.Tensor, host: torch.Tensor) -> None:
    check = getattr(task.evaluate, "check_pending", None)
    if check is not None:
        check(values, host)


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """``values`` on the CPU: one copy (none when they are there already)."""
    if values.device.type == "cpu":
        return values
    return values.to("cpu")


def assemble(task: Task, parts: Sequence[tuple[Chunk, torch.Tensor]]) -> torch.Tensor:
    """The values of finished chunks (in any order) in ``task.cells`` order, stacked."""
    if not parts:
        return torch.empty(0)
    where = {int(c): i for i, c in enumerate(task.cells)}
    order = torch.as_tensor(
        [where[int(c)] for chunk, _v in parts for c in chunk.cells], dtype=torch.long
    )
    stacked = torch.cat([v.to(parts[0][1].device) for _c, v in parts])
    out = torch.empty_like(stacked)
    out[order.to(stacked.device)] = stacked
    return out
