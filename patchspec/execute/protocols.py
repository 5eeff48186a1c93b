"""The two seams every way of computing a sweep plugs into: estimators and executors.

An :class:`Estimator` turns chunks of a grid's cells into metric values: the exact batched
engine, the exact reference (an independent oracle), and later estimates such as attribution
patching. An :class:`Executor` decides where and in what order the chunks run: locally, or on
a cluster. A :class:`Task` is everything one sweep of one spec gives them, and its
:class:`Progress` is the one bar of the whole run that executors report finished cells to. A new method is one
estimator; a new place to run is one executor; both are registered by name in
:mod:`patchspec.execute.registry` (or passed as objects to ``spec.run``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        first: The first token position any of them can change: positions before it keep the
            receiving run's values in every block (causal suffix replay); the sequence length
            when none changes anything the metric reads.
    """

    cells: np.ndarray
    start: int | None = None
    first: int = 0

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def split(self) -> tuple[Chunk, Chunk]:
        """Two halves of this chunk (for retrying after running out of memory)."""
        half = len(self) // 2
        return attrs.evolve(self, cells=self.cells[:half]), attrs.evolve(self, cells=self.cells[half:])


@attrs.define(eq=False)
class Progress:
    """The one progress bar of a run, over every cell of every spec (a Sweep of 7 specs shows
    one bar); executors report finished cells with :meth:`update`.

    Attributes:
        bar: The ``tqdm`` bar, or ``None`` when the run shows none.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress.open(True, total=4, desc="patching 2 specs", file=out) as progress:
        ...     progress.spec("resid_pre")
        ...     progress.update(4)
        >>> "patching 2 specs" in out.getvalue() and "4/4" in out.getvalue()
        True
        >>> Progress.open(False, total=4, desc="quiet").enabled
        False
    """

    bar: Any = None

    @classmethod
    def open(cls, show: bool, *, total: int, desc: str, file: Any = None) -> Progress:
        """A bar of ``total`` cells, or a silent :class:`Progress` when ``show`` is false."""
        if not show:
            return cls()
        from tqdm.auto import tqdm

        return cls(tqdm(total=total, desc=desc, unit="cell", file=file, dynamic_ncols=True))

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown."""
        return self.bar is not None

    def update(self, cells: int) -> None:
        """Count ``cells`` more cells as done."""
        if self.bar is not None:
            self.bar.update(cells)

    def spec(self, label: str) -> None:
        """Show which spec is being run (the bar's postfix)."""
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)

    def chunks(self, label: str, done: int, total: int) -> None:
        """Show how many of a spec's chunks are done (the bar's postfix, e.g. ``z: 3/8 chunks``);
        the bar itself counts cells and their rate."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}: {done}/{total} chunks".lstrip(": "), refresh=False)

    def close(self) -> None:
        """Finish the bar (leaves its last state on screen)."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@attrs.frozen(eq=False)
class Origin:
    """What a task was built from, so that another process can build it again (a cluster
    worker runs :func:`patchspec.runner.prepare` and :func:`~patchspec.plan.grid.compile` on
    these and computes the same cells).

    Attributes:
        specs: Every spec of the run (their grids share one session).
        index: Which of ``specs`` the task sweeps.
        clean: The clean prompts or tokens, as given to ``spec.run``.
        corrupted: The corrupted prompts or tokens.
        metric: The metric (or metrics), as given.
        options: The run's options.
        positions: Named positions, as given.
        reference: Reference prompts, as given.
        token: Names this run (the same for every spec of it).
    """

    specs: tuple[Any, ...]
    index: int
    clean: Any
    corrupted: Any
    metric: Any
    options: Any
    positions: Any = None
    reference: Any = None
    token: str = ""


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
        progress: The run's progress bar (shared by every task of the run), or ``None``: the
            executor then shows its own bar when asked to.
        origin: What the task was built from (``None``: built by hand), for executors that
            rebuild it in other processes.
        on_chunk: Called by executors with each chunk and its values as soon as they arrive
            (a resumable store writes them), or ``None``.
    """

    grid: Grid
    cells: np.ndarray
    session: Session
    adapter: ModelAdapter
    evaluate: Evaluator
    label: str = ""
    memo: dict[Any, Any] = attrs.field(factory=dict)
    progress: Progress | None = None
    origin: Origin | None = None
    on_chunk: Callable[[Chunk, torch.Tensor], None] | None = None


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
        """The values of every cell of ``task.cells``, in that order, stacked on a leading dim.

        Report finished cells to ``task.progress`` when it is set (the run's one bar; then
        ``progress`` says whether it is shown), else show a bar of your own if ``progress``;
        call ``task.on_chunk(chunk, values)`` for each finished chunk when it is set.
        """
        ...
