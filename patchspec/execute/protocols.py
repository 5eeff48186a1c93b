"""The two seams every way of computing a sweep plugs into: estimators and executors.

An :class:`Estimator` turns chunks of a grid's cells into metric values: the exact batched
engine, the exact reference (an independent oracle), and later estimates such as attribution
patching. An :class:`Executor` decides where and in what order the chunks run: locally, or on
a cluster. A :class:`Task` is everything one sweep of one spec gives them. A new method is one
estimator; a new place to run is one executor; both are registered by name in
:mod:`patchspec.execute.registry` (or passed as objects to ``spec.run``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs
import numpy as np
import torch

if TYPE_CHECKING:
    from patchspec.metrics import Evaluator
    from patchspec.model.adapter import ModelAdapter
    from patchspec.model.session import Session
    from patchspec.plan.grid import Grid


@attrs.frozen(eq=False)
class Chunk:
    """Some cells of a grid that an estimator computes together.

    Attributes:
        cells: Flat cell indices into the task's grid.
        start: The first block any of them patches (``None``: outside the block stack).
    """

    cells: np.ndarray
    start: int | None = None

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def split(self) -> tuple[Chunk, Chunk]:
        """Two halves of this chunk (for retrying after running out of memory)."""
        half = len(self) // 2
        return attrs.evolve(self, cells=self.cells[:half]), attrs.evolve(self, cells=self.cells[half:])


@attrs.frozen(eq=False)
class Task:
    """One spec's sweep, as an estimator sees it.

    Attributes:
        grid: The compiled grid.
        cells: The flat cell indices to compute (all of them, or a subset).
        session: The unpatched runs (tokens, caches, replay).
        adapter: The model adapter.
        evaluate: The metric evaluator (see :class:`patchspec.metrics.Evaluator`).
        label: The spec's label, for progress and errors.
        memo: Scratch space an estimator may keep per task (e.g. source values).
    """

    grid: Grid
    cells: np.ndarray
    session: Session
    adapter: ModelAdapter
    evaluate: Evaluator
    label: str = ""
    memo: dict[Any, Any] = attrs.field(factory=dict)


@runtime_checkable
class Estimator(Protocol):
    """Turns chunks of a grid into values.

    Attributes:
        name: Recorded in results' ``attrs["estimator"]``.
        exact: Whether values are exact patching results (``False``: estimates).
    """

    @property
    def name(self) -> str:
        """The estimator's name."""
        ...

    @property
    def exact(self) -> bool:
        """Whether its values are exact."""
        ...

    def chunks(self, task: Task) -> Sequence[Chunk]:
        """Cut ``task.cells`` into the chunks to run (each cell exactly once)."""
        ...

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        """The values of ``chunk``'s cells, stacked on a leading dim in ``chunk.cells`` order:
        ``[cells]``, ``[cells, example]``, ``[cells, metric]`` or ``[cells, metric, example]``
        as the evaluator gives them."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs an estimator's chunks somewhere and gathers their values.

    Attributes:
        name: Recorded in results' ``attrs["executor"]``.
    """

    @property
    def name(self) -> str:
        """The executor's name."""
        ...

    def run(
        self, estimator: Estimator, task: Task, chunks: Sequence[Chunk], *, progress: bool
    ) -> torch.Tensor:
        """The values of every cell of ``task.cells``, in that order, stacked on a leading dim."""
        ...
