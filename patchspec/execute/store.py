"""Resumable sweeps: every finished chunk written to a zarr store as it arrives.

``spec.run(..., store="sweep.zarr")`` keeps, for each spec of the run, the flat values of its
cells (``values_<i>``, ``[cells, ...]``, NaN until written) and which cells are written
(``done_<i>``). A chunk's values are written to its cells' region (an orthogonal-selection
write) before its cells are marked done, so a sweep stopped at any moment (an exception, a
killed process, a lost cluster) leaves a store whose done cells hold their final values.
Rerunning the same sweep with the same store reads those back and runs only the chunks that
are not done.

The store records what it was written for: the specs, their grids (dims and sizes), the model
(name and weights fingerprint), a hash of the inputs (tokens, named positions, reference
tokens), the metric names and the estimator. A rerun that differs in any of these is refused
with an :class:`~patchspec.errors.InputError` before any forward pass. Metrics are recorded by
name only: a changed metric under the same name is not detected.

A new store is created in a temporary folder next to ``path`` and moved into place once its
record is written, so ``path`` never holds a half-made store; the labelled result is returned
by ``spec.run`` as usual (save it with :func:`patchspec.save`, which writes atomically).

Example:
    >>> from patchspec import catalog
    >>> catalog.RESID_PRE.run(model, clean, corrupted, metric, store="sweep.zarr")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch

from patchspec.errors import InputError, SpecError
from patchspec.execute.protocols import Chunk, Estimator, Executor, Task
from patchspec.results import tokens_hash

if TYPE_CHECKING:
    from patchspec.plan.grid import Grid
    from patchspec.runner import Run

#: Format version written to (and required of) a store.
FORMAT = 1
#: Keys of a store's record that must match the run, and what each means in errors.
CHECKED = {
    "specs": "specs",
    "grids": "grids (dims and sizes)",
    "model": "model",
    "model_fingerprint": "model weights (fingerprint)",
    "inputs_sha256": "inputs (tokens, named positions, reference tokens)",
    "metric": "metric names",
    "estimator": "estimator",
}


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise InputError(
            "store= needs the zarr package: pip install 'patchspec[zarr]'"
        ) from None
    return zarr


def _spec_record(spec: Any) -> Any:
    try:
        return spec.to_dict()
    except SpecError:  # a custom rule is code: keep its repr
        return repr(spec)


def record(run: Run, specs: Sequence[Any], grids: Sequence[Grid]) -> dict[str, Any]:
    """What a store written by this run must match (no forward pass: weights and tokens only)."""
    session = run.session
    inputs = hashlib.sha256()
    inputs.update(run.provenance.get("tokens_sha256", "").encode())
    if run.positions is not None:
        table = {"clean": run.positions.clean, "corrupted": run.positions.corrupted}
        inputs.update(json.dumps(table, sort_keys=True, default=list).encode())
    for name in sorted(getattr(session, "_references", {})):
        inputs.update(name.encode())
        inputs.update(tokens_hash(session._reference_inputs(name).tokens).encode())
    return {
        "specs": [_spec_record(spec) for spec in specs],
        "grids": [
            {"label": spec.label, "dims": list(grid.dims), "shape": list(grid.shape), "cells": grid.n_cells}
            for spec, grid in zip(specs, grids, strict=True)
        ],
        "model": run.provenance.get("model", ""),
        "model_fingerprint": run.provenance.get("model_fingerprint", ""),
        "inputs_sha256": inputs.hexdigest(),
        "metric": [m.name for m in run.metrics],
        "estimator": run.estimator.name,
    }


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


@attrs.define(eq=False)
class SweepStore:
    """A zarr store holding the values of every spec of one run, chunk by chunk.

    Attributes:
        path: The store's folder.
        group: The open zarr group.
        grids: The grids of the run's specs.
    """

    path: Path
    group: Any
    grids: tuple[Grid, ...]

    @classmethod
    def open(cls, path: str | os.PathLike[str], run: Run, specs: Sequence[Any], grids: Sequence[Grid]) -> SweepStore:
        """Open (or create) the store at ``path`` for this run, before any forward pass.

        Raises:
            InputError: ``path`` holds something other than a patchspec sweep store, or a
                store written for other specs, model, inputs, metric or estimator.
        """
        zarr = _zarr()
        path = Path(path)
        expected = _plain({"patchspec_store": FORMAT, **record(run, specs, grids)})
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                zarr.open_group(str(tmp), mode="w-").attrs.update(expected)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            group = zarr.open_group(str(path), mode="r+")
            stored = dict(group.attrs)
        except Exception as err:  # not a zarr group at all
            raise InputError(
                f"store {str(path)!r} exists and is not a patchspec sweep store ({err}); give a "
                "new path, or delete it"
            ) from None
        if stored.get("patchspec_store") != FORMAT:
            raise InputError(
                f"store {str(path)!r} exists and is not a patchspec sweep store (format "
                f"{FORMAT}); give a new path, or delete it"
            )
        for key, what in CHECKED.items():
            if stored.get(key) != expected[key]:
                raise InputError(
                    f"store {str(path)!r} was written for other {what}: it holds "
                    f"{_short(stored.get(key))}, this run has {_short(expected[key])}; give "
                    "another store path to start afresh, or delete it"
                )
        return cls(path, group, tuple(grids))

    def spec(self, index: int) -> SpecStore:
        """The part of the store of the run's ``index``-th spec."""
        return SpecStore(self.group, index, self.grids[index].n_cells)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _numpy(values: torch.Tensor) -> np.ndarray:
    values = values.detach()
    if values.dtype == torch.bfloat16:  # no numpy bfloat16; float32 holds every value exactly
        values = values.float()
    return values.cpu().numpy()


@attrs.define(eq=False)
class SpecStore:
    """One spec's values and done mask in a :class:`SweepStore`.

    Attributes:
        group: The store's zarr group.
        index: The spec's index in the run.
        n_cells: Cells of its grid.
    """

    group: Any
    index: int
    n_cells: int

    @property
    def _values_name(self) -> str:
        return f"values_{self.index}"

    @property
    def _done_name(self) -> str:
        return f"done_{self.index}"

    def done(self) -> np.ndarray:
        """``[n_cells]``: which cells hold their final values."""
        if self._done_name not in self.group:
            return np.zeros(self.n_cells, dtype=bool)
        return np.asarray(self.group[self._done_name][:], dtype=bool)

    def _array(self, name: str, shape: tuple[int, ...], dtype: Any, chunk: int, fill: Any) -> Any:
        if name in self.group:
            return self.group[name]
        chunks = (max(1, chunk), *shape[1:])
        create = getattr(self.group, "create_array", None) or self.group.create_dataset
        return create(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill)

    def write(self, cells: np.ndarray, values: torch.Tensor) -> None:
        """Write ``values`` (``[len(cells), ...]``) to ``cells``' region, then mark them done.

        Raises:
            InputError: the values' shape per cell differs from what the store holds.
        """
        cells = np.asarray(cells, dtype=np.int64)
        order = np.argsort(cells, kind="stable")
        data = _numpy(values)[order]
        shape = (self.n_cells, *data.shape[1:])
        array = self._array(self._values_name, shape, data.dtype, len(cells), np.nan)
        if tuple(array.shape) != shape:
            raise InputError(
                f"store holds values of shape {tuple(array.shape)} for spec {self.index}, this "
                f"run gives {shape}; give another store path"
            )
        array.attrs["torch_dtype"] = str(values.dtype).removeprefix("torch.")
        array.oindex[cells[order]] = data
        done = self._array(self._done_name, (self.n_cells,), bool, self.n_cells, False)
        done.oindex[cells[order]] = np.ones(len(cells), dtype=bool)

    def read(self, cells: np.ndarray, device: torch.device) -> torch.Tensor:
        """The stored values of ``cells``, in that order, with the dtype they were computed in."""
        array = self.group[self._values_name]
        cells = np.asarray(cells, dtype=np.int64)
        order = np.argsort(cells, kind="stable")
        data = np.empty((len(cells), *array.shape[1:]), dtype=array.dtype)
        data[order] = array.oindex[cells[order]]
        dtype = getattr(torch, str(array.attrs.get("torch_dtype", "float32")))
        return torch.from_numpy(data).to(device=device, dtype=dtype)

    def run(
        self,
        executor: Executor,
        estimator: Estimator,
        task: Task,
        chunks: Sequence[Chunk],
        *,
        progress: bool,
    ) -> torch.Tensor:
        """The values of ``task.cells``: chunks already done are read back, the others run on
        ``executor`` and written as each finishes."""
        done = self.done()
        pending = [c for c in chunks if not done[c.cells].all()]
        skipped = len(task.cells) - sum(len(c) for c in pending)
        if task.progress is not None and skipped:
            task.progress.update(skipped)
        if pending:
            written = np.zeros(self.n_cells, dtype=bool)

            def on_chunk(chunk: Chunk, values: torch.Tensor) -> None:
                self.write(chunk.cells, values)
                written[chunk.cells] = True
                if task.on_chunk is not None:
                    task.on_chunk(chunk, values)

            cells = np.concatenate([c.cells for c in pending])
            rest = attrs.evolve(task, cells=cells, on_chunk=on_chunk)
            values = executor.run(estimator, rest, pending, progress=progress)
            missing = ~written[cells]
            if missing.any():  # an executor that does not report chunks as they finish
                self.write(cells[missing], values[torch.as_tensor(missing, device=values.device)])
        return self.read(task.cells, task.adapter.device)
