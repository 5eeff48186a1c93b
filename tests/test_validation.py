"""Every spec of a sweep is validated before the first forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from patchspec import Mean, Resample, Sweep, catalog
from patchspec.errors import InputError
from tests.conftest import per_example_metric


@contextmanager
def no_forward(model) -> Iterator[None]:
    """Fail the test if the model's embedding runs (i.e. any forward pass starts)."""
    calls: list[int] = []
    handle = model.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    assert calls == [], f"{len(calls)} forward passes ran before the error"


@pytest.mark.parametrize(
    ("bad", "reference", "match"),
    [
        (Resample(), None, r"Resample needs at least two prompts .* got 1"),
        (Mean(over="x"), None, r"Mean\(over='x'\) needs a reference dataset 'x'.*given: none"),
        (Mean(over="x"), {"y": torch.zeros(1, 6, dtype=torch.long)}, r"given: 'y'"),
        (Mean(over="x"), {"x": torch.zeros(3, 4, dtype=torch.long)}, r"'x' has prompts of 4 tokens.*have 6"),
    ],
)
def test_second_spec_errors_come_before_the_first_sweep(gpt2, tokens, bad, reference, match) -> None:
    """An error only the second spec's source causes is raised before any pass of the first."""
    clean, corrupted = (t[:1] for t in tokens)
    sweep = Sweep(catalog.RESID_PRE, catalog.HEAD_OUT.using(bad))
    with no_forward(gpt2), pytest.raises(InputError, match=match):
        sweep.run(gpt2, clean, corrupted, per_example_metric, reference=reference)


def test_swept_sources_are_checked_too(gpt2, tokens) -> None:
    """A source on the ``source`` axis is checked like a fixed one."""
    clean, corrupted = (t[:1] for t in tokens)
    spec = catalog.RESID_PRE.over_sources(Mean(), Resample())
    with no_forward(gpt2), pytest.raises(InputError, match="at least two prompts"):
        spec.run(gpt2, clean, corrupted, per_example_metric)


def test_sweep_of_different_coordinates_joins_them(gpt2, tokens) -> None:
    """Specs measured at different positions share one Dataset: NaN where not measured."""
    clean, corrupted = tokens
    sweep = Sweep(catalog.RESID_PRE, catalog.ATTN_OUT.sel(pos=[-1]))
    ds = sweep.run(gpt2, clean, corrupted, per_example_metric)
    assert list(ds.pos.values) == list(range(6)) and len(ds.pos_token) == 6
    assert bool(ds.attn_out.sel(pos=slice(0, 4)).isnull().all())
    assert not bool(ds.attn_out.sel(pos=5).isnull().any())
    assert ds.attn_out.attrs["spec_name"] != ds.resid_pre.attrs["spec_name"]


def test_sweep_mixing_named_and_index_coordinates_is_refused(gpt2, tokens) -> None:
    """Position names in one spec and token indices in another cannot share a dim."""
    clean, corrupted = tokens
    sweep = Sweep(catalog.RESID_PRE.sel(pos=[0, 1]), catalog.ATTN_OUT.sel(pos=["END"]))
    with no_forward(gpt2), pytest.raises(InputError, match=r"both have dim 'pos', with index .* and name"):
        sweep.run(gpt2, clean, corrupted, per_example_metric, positions={"END": [5, 5]})


def test_sweep_union_keeps_position_names_in_table_order(gpt2, tokens) -> None:
    """Named positions of different specs join in the positions table's order, not A-Z."""
    clean, corrupted = tokens
    table = {"S2": [3, 3], "END": -1, "A": [1, 1]}
    sweep = Sweep(catalog.RESID_PRE.sel(pos=["S2", "END"]), catalog.ATTN_OUT.sel(pos=["END", "A"]))
    ds = sweep.run(gpt2, clean, corrupted, per_example_metric, positions=table)
    assert list(ds.pos.values) == ["S2", "END", "A"]
    assert bool(ds.resid_pre.sel(pos="A").isnull().all()) and bool(ds.attn_out.sel(pos="S2").isnull().all())
    alone = catalog.ATTN_OUT.sel(pos=["END", "A"]).run(gpt2, clean, corrupted, per_example_metric, positions=table)
    assert ds.pos_token.sel(pos="A").item() == alone.pos_token.sel(pos="A").item()
    np.testing.assert_array_equal(ds.attn_out.sel(pos=["END", "A"]).values, alone.values)
