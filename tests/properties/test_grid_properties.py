"""Hypothesis, model-free: compiled grids and their vectorised masks against plain oracles.

The batched engine's masks (``execute.masks``) are checked entry by entry against masks built
by hand from each cell's explicit regions (``Grid.cell``), which is what the reference
estimator writes from; named positions that differ per prompt and swept sources included.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from patchspec import Clean, PatchSpec, Zero, catalog
from patchspec.execute.masks import part_writes, region_writes
from patchspec.plan import PerExample, Region, Sizes, compile, resolve_positions
from tests.properties.test_spec_properties import SIZES, specs

CPU = torch.device("cpu")


def oracle(region: Region, sizes: Sizes) -> np.ndarray:
    """The region's mask over its activation ``[batch, ...]``, by plain indexing."""
    shape = sizes.shape(region.activation)
    mask = np.zeros(shape, dtype=bool)
    for b in range(shape[0]):
        index: list[object] = [b]
        for axis, (_dim, selection) in enumerate(region.index, start=1):
            if selection is None:
                index.append(np.arange(shape[axis]))
            elif isinstance(selection, PerExample):
                index.append(np.asarray(selection.values[b]))
            else:
                index.append(np.asarray(selection))
        mask[np.ix_(*[np.atleast_1d(i) for i in index])] = True
    return mask


def check_masks(grid, cells: np.ndarray) -> None:
    """Every write of the chunk ``cells`` equals the oracle of each cell's regions."""
    sizes = grid.sizes
    writes = []
    for part in grid.parts:
        writes += part_writes(grid, part, cells, sizes, CPU, {})
    got: dict[tuple[int, str, int, str], np.ndarray] = {}
    for activation, layer, source, mask in writes:
        dense = np.broadcast_to(
            mask.dense().numpy(), (len(cells), *sizes.shape(activation))
        )
        for k in range(len(cells)):
            key = (k, activation, layer, source.label)
            got[key] = got.get(key, np.zeros(dense.shape[1:], dtype=bool)) | dense[k]
    want: dict[tuple[int, str, int, str], np.ndarray] = {}
    for k, flat in enumerate(cells):
        for region in grid.cell(int(flat)).regions:
            key = (k, region.activation, region.layer, region.source.label)
            want[key] = want.get(key, np.zeros(sizes.shape(region.activation), dtype=bool)) | oracle(
                region, sizes
            )
    for key in set(got) | set(want):
        expected = want.get(key)
        if expected is None:
            assert not got[key].any(), key
        else:
            np.testing.assert_array_equal(got.get(key, np.zeros_like(expected)), expected, err_msg=str(key))


@given(specs(), st.data())
def test_vectorised_masks_equal_the_per_cell_oracle(spec: PatchSpec, data: st.DataObject) -> None:
    """For random specs and random chunks, the batched engine's masks are the cells' own regions."""
    grid = compile(spec, SIZES)
    cells = np.asarray(
        data.draw(st.lists(st.integers(0, grid.n_cells - 1), min_size=1, max_size=6)), dtype=np.int64
    )
    check_masks(grid, cells)


@given(specs(), specs(), st.data())
def test_joint_masks_equal_the_oracle(a: PatchSpec, b: PatchSpec, data: st.DataObject) -> None:
    """The same for joint specs, whose parts may share hooks."""
    grid = compile(a & b, SIZES)
    cells = np.asarray(
        data.draw(st.lists(st.integers(0, grid.n_cells - 1), min_size=1, max_size=4)), dtype=np.int64
    )
    check_masks(grid, cells)


def test_named_positions_and_sources_equal_the_oracle() -> None:
    """Per-prompt named positions and a swept source axis, swept and fixed, match the oracle."""
    sizes = Sizes(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=6, batch=3, seq=7)
    lengths = {"clean": [7, 6, 5], "corrupted": [7, 6, 5]}
    positions = resolve_positions({"S": [2, 3, 1], "END": -1}, lengths=lengths)
    for spec in (
        catalog.HEAD_OUT_BY_POS,
        catalog.HEAD_PATTERN_DEST_SRC.sel(src_pos="S"),
        catalog.RESID_PRE.over_sources(Clean(), Zero(receiver="corrupted")),
        PatchSpec("k", axes=("layer", "kv_head")).sel(pos=["S", "END"]),
    ):
        grid = compile(spec, sizes, positions=positions)
        check_masks(grid, np.arange(grid.n_cells, dtype=np.int64))


def test_explicit_region_masks_equal_the_oracle() -> None:
    """Masks from explicitly listed regions (custom rules, explicit cells) match the oracle too."""
    rule = lambda cell: {"layer": cell["layer"], "pos": [cell["layer"], 3]}  # noqa: E731
    spec = PatchSpec("z", axes=("layer", "head"), rule=rule)
    grid = compile(spec, SIZES)
    cells = grid.cells()
    writes = region_writes([c.regions for c in cells], SIZES, CPU)
    for activation, layer, _source, mask in writes:
        dense = np.broadcast_to(mask.dense().numpy(), (len(cells), *SIZES.shape(activation)))
        for k, cell in enumerate(cells):
            want = np.zeros(SIZES.shape(activation), dtype=bool)
            for region in cell.regions:
                if region.layer == layer:
                    want |= oracle(region, SIZES)
            np.testing.assert_array_equal(dense[k], want)


def test_compile_is_cached_and_cells_are_implicit() -> None:
    """compile() returns the same grid for the same spec and sizes; coordinates unravel in C order."""
    sizes = Sizes(n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64, d_mlp=3072, batch=1, seq=64)
    grid = compile(catalog.HEAD_PATTERN_DEST_SRC, sizes)
    assert compile(catalog.HEAD_PATTERN_DEST_SRC, sizes) is grid
    assert grid.n_cells == 589_824
    flat = np.asarray([0, 1, 4095, 4096, 589_823], dtype=np.int64)
    np.testing.assert_array_equal(
        grid.coordinate_indices(flat), np.stack(np.unravel_index(flat, grid.shape), axis=-1)
    )
    assert grid.labels(589_823) == (11, 11, 63, 63)
    subset = grid.with_rows([[1, 2, 3, 4]])
    assert subset.n_cells == 1 and subset.labels(0) == (1, 2, 3, 4)
