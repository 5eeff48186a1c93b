"""Extension points used from outside the package, through ``patchspec``'s public API only.

A new activation layout, a new value source, a new estimator and a new executor, each defined
here and run through ``spec.run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import pytest
import torch

import patchspec as ps
from tests.conftest import logit_diff_metric
from tests.models import prompts


@pytest.fixture
def block_input():
    """A layout of our own: the block input, under a hook template of its own."""
    row = ps.register_layout(
        ps.Layout("block_input", ("batch", "pos", "d_model"), "the block's input",
                  hook="blocks.{layer}.hook_resid_pre")
    )
    yield row
    del ps.LAYOUTS[row.name]


def test_new_layout_patches_like_the_standard_one(model, block_input):
    """A registered layout with its own hook template gives the standard layout's numbers."""
    clean, corrupted = prompts()
    mine = ps.PatchSpec("block_input", axes=("layer", "pos")).run(model, clean, corrupted, logit_diff_metric)
    standard = ps.catalog.RESID_PRE.run(model, clean, corrupted, logit_diff_metric)
    assert mine.dims == ("layer", "pos")
    np.testing.assert_allclose(mine.values, standard.values, rtol=1e-6, atol=1e-6)


@ps.register_source
@attrs.frozen
class Blend(ps.sources.Source):
    """A source of our own: ``weight`` x clean + (1 - ``weight``) x corrupted."""

    kind: ClassVar[str] = "test_blend"
    weight: float = 0.5

    def values(self, hook_name: str, runs: Any) -> torch.Tensor:
        clean = runs.activation("clean", hook_name)
        return self.weight * clean + (1 - self.weight) * runs.activation("corrupted", hook_name)

    def needs(self) -> tuple[str, ...]:
        return ("clean", "corrupted")


def test_new_source_runs_and_round_trips(gpt2):
    """A registered source patches as defined (weight 1 is denoising) and survives to_dict."""
    clean, corrupted = prompts()
    spec = ps.catalog.HEAD_OUT
    full = spec.using(Blend(weight=1.0)).run(gpt2, clean, corrupted, logit_diff_metric)
    denoise = spec.run(gpt2, clean, corrupted, logit_diff_metric)
    np.testing.assert_allclose(full.values, denoise.values, rtol=1e-6, atol=1e-6)
    none = spec.using(Blend(weight=0.0)).run(gpt2, clean, corrupted, logit_diff_metric)
    np.testing.assert_allclose(none.values, none.attrs["corrupted_baseline"], rtol=1e-5, atol=1e-5)
    half = spec.using(Blend(weight=0.5))
    assert ps.PatchSpec.from_dict(half.to_dict()) == half


@attrs.frozen
class OneCellAtATime:
    """An estimator of our own: one forward per cell, each region written by a boolean mask."""

    name: ClassVar[str] = "one_at_a_time"
    exact: ClassVar[bool] = True

    def chunks(self, task: ps.Task) -> Sequence[ps.Chunk]:
        return [ps.Chunk(task.cells[i : i + 1]) for i in range(len(task.cells))]

    def estimate(self, task: ps.Task, chunk: ps.Chunk) -> torch.Tensor:
        out = []
        tokens = task.session.tokens(task.grid.receiver)
        for flat in chunk.cells:
            hooks = []
            for region in task.grid.cell(int(flat)).regions:
                values = region.source.values(region.hook_name, task.session)
                keep = np.ones(tuple(values.shape), dtype=bool)
                for axis, (_dim, selection) in enumerate(region.index, start=1):
                    if selection is not None:
                        chosen = np.zeros(values.shape[axis], dtype=bool)
                        chosen[list(selection)] = True
                        shape = [1] * values.ndim
                        shape[axis] = -1
                        keep &= chosen.reshape(shape)
                mask = torch.from_numpy(keep)

                def hook(act: torch.Tensor, hook: Any, values=values, mask=mask) -> torch.Tensor:
                    return torch.where(mask, values, act)

                hooks.append((region.hook_name, hook))
            logits = task.adapter.run_with_hooks(tokens, hooks)
            out.append(task.evaluate(logits, int(flat)))
        return torch.stack(out)


@attrs.define
class Backwards:
    """An executor of our own: runs the chunks last first, and counts them."""

    name: ClassVar[str] = "backwards"
    ran: int = 0

    def run(self, estimator: Any, task: ps.Task, chunks: Sequence[ps.Chunk], *, progress: bool) -> torch.Tensor:
        values: dict[int, torch.Tensor] = {}
        for chunk in reversed(chunks):
            for flat, value in zip(chunk.cells, estimator.estimate(task, chunk), strict=True):
                values[int(flat)] = value
            self.ran += 1
        return torch.stack([values[int(c)] for c in task.cells])


@pytest.mark.parametrize("spec", [ps.catalog.HEAD_OUT_BY_POS, ps.catalog.MLP_OUT.sel(pos=[1, -1])], ids=str)
def test_new_estimator_and_executor_through_spec_run(model, spec):
    """Our estimator (an object, or registered by name) on our executor equals the batched engine."""
    clean, corrupted = prompts()
    want = spec.run(model, clean, corrupted, logit_diff_metric)
    executor = Backwards()
    got = spec.run(model, clean, corrupted, logit_diff_metric, engine=OneCellAtATime(), executor=executor)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-5)
    assert executor.ran == want.size
    assert (got.attrs["estimator"], got.attrs["executor"], got.attrs["exact"]) == (
        "one_at_a_time", "backwards", True
    )
    ps.register_estimator("test_one_at_a_time", OneCellAtATime, replace=True)
    try:
        by_name = spec.run(model, clean, corrupted, logit_diff_metric, engine="test_one_at_a_time")
    finally:
        del ps.execute.ESTIMATORS["test_one_at_a_time"]
    np.testing.assert_allclose(by_name.values, want.values, rtol=1e-5, atol=1e-5)


def test_bad_extensions_are_clear_errors(gpt2):
    """An object that is not an estimator or executor is refused before any forward pass."""
    clean, corrupted = prompts()
    with pytest.raises(ps.OptionError, match="engine must be a name"):
        ps.catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, engine=object())
    with pytest.raises(ps.OptionError, match="executor must be a name"):
        ps.catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, executor=42)
    with pytest.raises(ps.OptionError, match="configure the estimator object"):
        ps.catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, engine=OneCellAtATime(), cells_per_batch=2)
