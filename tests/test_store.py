"""Resumable sweeps: a store written chunk by chunk, rerun computing only what is missing."""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np
import pytest
import torch
import xarray as xr

from patchspec import Sweep, catalog
from patchspec.errors import InputError, OptionError
from patchspec.execute.batched import BatchedEstimator
from patchspec.execute.protocols import Chunk, Task
from tests.conftest import logit_diff_metric, per_example_metric


class Interrupted(RuntimeError):
    """Raised by :class:`Counting` after its budget of chunks."""


@attrs.define
class Counting:
    """The batched estimator, counting chunks and cells it computes, raising after ``stop``."""

    name: ClassVar[str] = "batched"
    exact: ClassVar[bool] = True
    inner: BatchedEstimator = attrs.field(factory=lambda: BatchedEstimator(cells_per_batch=3, lean=False))
    stop: int | None = None
    calls: int = 0
    cells: list[int] = attrs.field(factory=list)

    def chunks(self, task: Task) -> list[Chunk]:
        return self.inner.chunks(task)

    def estimate(self, task: Task, chunk: Chunk) -> torch.Tensor:
        if self.stop is not None and self.calls >= self.stop:
            raise Interrupted(f"stopped after {self.calls} chunks")
        self.calls += 1
        self.cells += chunk.cells.tolist()
        return self.inner.estimate(task, chunk)


def test_interrupted_sweep_resumes_computing_only_the_rest(model, tokens, tmp_path) -> None:
    """A sweep stopped after 2 chunks and rerun with the same store runs only the other chunks,
    and gives the result of an uninterrupted run."""
    clean, corrupted = tokens
    spec = catalog.RESID_PRE
    expected = spec.run(model, clean, corrupted, logit_diff_metric, engine=Counting())
    store = tmp_path / "sweep.zarr"
    first = Counting(stop=2)
    with pytest.raises(Interrupted):
        spec.run(model, clean, corrupted, logit_diff_metric, engine=first, store=store)
    assert first.calls == 2 and store.exists()
    second = Counting()
    result = spec.run(model, clean, corrupted, logit_diff_metric, engine=second, store=store)
    total = expected.size
    assert sorted(first.cells + second.cells) == list(range(total))  # each cell once
    assert second.calls == -(-total // 3) - 2
    xr.testing.assert_identical(result.drop_attrs(), expected.drop_attrs())
    assert result.attrs == expected.attrs
    third = Counting()  # everything is in the store: no patched pass at all
    again = spec.run(model, clean, corrupted, logit_diff_metric, engine=third, store=store)
    assert third.calls == 0
    xr.testing.assert_identical(again, result)


def test_sweep_with_store_resumes_per_spec_and_keeps_example_dims(gpt2, tokens, tmp_path) -> None:
    """A Sweep of two specs with a per-example metric resumes the second spec after the first."""
    clean, corrupted = tokens
    sweep = Sweep(catalog.ATTN_OUT, catalog.MLP_OUT)
    expected = sweep.run(gpt2, clean, corrupted, per_example_metric, engine=Counting())
    n_first = expected[sweep.specs[0].label].size // 2  # cells (per-example values share a cell)
    chunks_first = -(-n_first // 3)
    store = tmp_path / "s.zarr"
    with pytest.raises(Interrupted):
        sweep.run(gpt2, clean, corrupted, per_example_metric, engine=Counting(stop=chunks_first + 1), store=store)
    rest = Counting()
    result = sweep.run(gpt2, clean, corrupted, per_example_metric, engine=rest, store=store)
    assert min(rest.cells) >= 0 and rest.calls == sum(
        -(-expected[s.label].size // 2 // 3) for s in sweep.specs
    ) - chunks_first - 1
    xr.testing.assert_identical(result, expected)


def test_store_for_another_spec_model_or_inputs_is_refused(gpt2, qwen2, tokens, tmp_path) -> None:
    """A store written for one spec, model or inputs is refused for others before any pass."""
    clean, corrupted = tokens
    store = tmp_path / "a.zarr"
    catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, store=store)
    never = Counting(stop=0)
    with pytest.raises(InputError, match=r"store .*a\.zarr' was written for other specs"):
        catalog.ATTN_OUT.run(gpt2, clean, corrupted, logit_diff_metric, engine=never, store=store)
    with pytest.raises(InputError, match=r"was written for other (grids|model)"):
        catalog.RESID_PRE.run(qwen2, clean, corrupted, logit_diff_metric, engine=never, store=store)
    with pytest.raises(InputError, match=r"was written for other inputs"):
        catalog.RESID_PRE.run(gpt2, corrupted, clean, logit_diff_metric, engine=never, store=store)
    with pytest.raises(InputError, match=r"was written for other metric names"):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, {"m": logit_diff_metric}, engine=never, store=store)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"not a patchspec sweep store"):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, store=tmp_path / "plain")
    with pytest.raises(OptionError, match=r"store must be a path"):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, store=3)


def test_bfloat16_values_round_trip_exactly(tmp_path) -> None:
    """Values computed in bfloat16 come back from the store bit for bit, in bfloat16."""
    from patchspec.execute.store import SpecStore

    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    part = SpecStore(group, 0, 5)
    values = torch.randn(3, 2).to(torch.bfloat16)
    part.write(np.array([4, 0, 2]), values)
    assert part.done().tolist() == [True, False, True, False, True]
    back = part.read(np.array([4, 0, 2]), torch.device("cpu"))
    assert back.dtype == torch.bfloat16 and torch.equal(back, values)
    assert np.isnan(group["values_0"][:][1]).all()  # not written is NaN, never 0


def test_resumed_sweep_progress_counts_every_cell_and_shows_chunks(gpt2, tokens, tmp_path, capsys) -> None:
    """The bar of a resumed sweep counts the cells read back too, and shows chunks done."""
    clean, corrupted = tokens
    store = tmp_path / "p.zarr"
    with pytest.raises(Interrupted):
        catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, engine=Counting(stop=1), store=store)
    capsys.readouterr()
    catalog.RESID_PRE.run(gpt2, clean, corrupted, logit_diff_metric, engine=Counting(), store=store, progress=True)
    bar = capsys.readouterr().err
    assert "12/12" in bar and "resid_pre: 3/3 chunks" in bar  # 4 chunks, 1 read back
