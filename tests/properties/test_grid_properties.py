"""Hypothesis, model-free: compiled grids and their vectorised masks against plain oracles;
unique labels of compiled grids and plain-dict round trips of random specs.

The batched engine's masks (``execute.masks``) are checked entry by entry against masks built
by hand from each cell's explicit regions (``Grid.cell``), which is what the reference
estimator writes from; named positions that differ per prompt and swept sources included.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from patchspec import (
    Clean,
    Corrupted,
    Gaussian,
    JointSpec,
    Mean,
    PatchSpec,
    Resample,
    SpecError,
    Sweep,
    Zero,
    catalog,
    spec_from_dict,
)
from patchspec.execute.masks import part_writes, region_writes
from patchspec.layouts import LAYOUTS
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


# --- labels: unique dims and coordinates, and plain-dict round trips ---------------------------

SOURCES = (Clean(), Corrupted(), Zero(), Zero(receiver="corrupted"), Mean(), Gaussian(scale=0.1), Resample(seed=3))


def indices(size: int) -> st.SearchStrategy[object]:
    """An index of a dim of ``size``, possibly negative, as a Python, numpy or torch int."""
    return st.integers(-size, size - 1).flatmap(
        lambda v: st.sampled_from([v, np.int64(v), torch.tensor(v)])
    )


@st.composite
def selectors(draw: st.DrawFn, size: int) -> object:
    """Any restriction of a dim of ``size``: indices that may alias (``1`` and ``-1``), lists of
    them, slices with any bounds and non-zero steps, numpy and torch arrays."""
    bound = st.none() | st.integers(-size - 2, size + 2)
    return draw(
        st.one_of(
            indices(size),
            st.lists(st.integers(-size, size - 1), unique=True, min_size=1, max_size=size + 1),
            st.lists(st.integers(-size, size - 1), unique=True, min_size=1, max_size=3).map(np.asarray),
            st.lists(st.integers(-size, size - 1), unique=True, min_size=1, max_size=3).map(torch.tensor),
            st.builds(slice, bound, bound, st.none() | st.integers(-3, 3).filter(bool)),
        )
    )


@st.composite
def any_specs(draw: st.DrawFn, receiver: str | None = None) -> PatchSpec:
    """A random spec with any restrictions (aliasing ones included), a source of the given
    receiving run (or any), and maybe a name and a swept source axis."""
    activation = draw(st.sampled_from(sorted(LAYOUTS)))
    dims = list(LAYOUTS[activation].patch_dims)
    axes = draw(st.lists(st.sampled_from(dims), unique=True, max_size=3))
    restrictions = {
        dim: draw(selectors(SIZES.size(dim)))
        for dim in draw(st.lists(st.sampled_from(dims), unique=True, max_size=3))
    }
    pool = [s for s in SOURCES if receiver is None or s.receiver == receiver]
    source = draw(st.sampled_from(pool))
    spec = PatchSpec(
        activation,
        axes=tuple(axes),
        restrictions=restrictions,
        source=source,
        name=draw(st.none() | st.text("abcxyz_", min_size=1, max_size=6)),
    )
    if draw(st.booleans()):
        same = [s for s in SOURCES if s.receiver == source.receiver]
        spec = spec.over_sources(*draw(st.lists(st.sampled_from(same), unique=True, min_size=1, max_size=3)))
    return spec


def _compiled_or_refused(spec: PatchSpec | JointSpec):
    """The grid, or None where compile refuses the restrictions with a SpecError that names the
    reason (an alias, an empty or out-of-range selection)."""
    try:
        return compile(spec, SIZES)
    except SpecError as err:
        assert re.search(r"more than once|selects nothing|outside the valid range", str(err)), err
        return None


def _assert_unique_labels(grid) -> None:
    assert len(set(grid.dims)) == len(grid.dims)
    for dim in grid.dims:
        assert len(set(grid.coords[dim])) == len(grid.coords[dim]), (dim, grid.coords[dim])
    assert grid.n_cells == math.prod(len(grid.coords[d]) for d in grid.dims)


@given(any_specs())
def test_compiled_coordinates_and_dims_are_unique(spec: PatchSpec) -> None:
    """However a spec is restricted, a compiled grid has distinct dims and, along each, distinct
    coordinates: restrictions that alias one index (1 and -1 of 2 layers) are refused."""
    grid = _compiled_or_refused(spec)
    if grid is not None:
        _assert_unique_labels(grid)
        for part in grid.parts:
            for _dim, selection in part.fixed:
                if isinstance(selection, tuple):
                    assert len(set(selection)) == len(selection)


@given(st.sampled_from(["clean", "corrupted"]).flatmap(lambda r: st.lists(any_specs(r), min_size=2, max_size=3)))
def test_joint_grids_have_unique_dims_and_coordinates(parts: list[PatchSpec]) -> None:
    """Joint specs of any parts (the same spec twice included) number shared axes apart."""
    grid = _compiled_or_refused(JointSpec(parts))
    if grid is not None:
        _assert_unique_labels(grid)
        assert grid.dims == JointSpec(parts).dims


def _round_trip(value, load):
    """``load(json(value.to_dict()))``: plain data through JSON and back."""
    return load(json.loads(json.dumps(value.to_dict())))


@given(any_specs())
def test_spec_dict_round_trip_through_json(spec: PatchSpec) -> None:
    """Every spec (slices, negative and numpy indices, sources, names) survives to_dict -> JSON
    -> from_dict as an equal value with an equal hash."""
    again = _round_trip(spec, PatchSpec.from_dict)
    assert again == spec and hash(again) == hash(spec)
    assert spec_from_dict(spec.to_dict()) == spec


@given(
    st.sampled_from(["clean", "corrupted"]).flatmap(lambda r: st.lists(any_specs(r), min_size=2, max_size=3)),
    st.none() | st.text("jk", min_size=1, max_size=3),
)
def test_joint_spec_dict_round_trip(parts: list[PatchSpec], name: str | None) -> None:
    """Joint specs round-trip through spec_from_dict, names included."""
    joint = JointSpec(parts, name=name)
    assert _round_trip(joint, spec_from_dict) == joint


@given(st.lists(any_specs(), min_size=1, max_size=3, unique_by=lambda s: s.label), st.none() | st.text("s", min_size=1, max_size=2))
def test_sweep_dict_round_trip(specs_: list[PatchSpec], name: str | None) -> None:
    """Sweeps round-trip through Sweep.from_dict."""
    sweep = Sweep(*specs_, name=name)
    assert _round_trip(sweep, Sweep.from_dict) == sweep


#: Any plain value a user might pass where a spec takes one.
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True)
    | st.text(max_size=4)
    | st.binary(max_size=3)
    | st.builds(slice, st.none() | st.integers(-9, 9) | st.floats() | st.text(max_size=1), st.none() | st.integers(-9, 9), st.none() | st.integers(-3, 3) | st.booleans())
    | st.sampled_from([np.int64(1), np.bool_(False), np.float32(2.0), torch.tensor(1), torch.tensor(True), torch.tensor([1.5]), np.array([[0, 1]]), np.array(["S", "T"]), object()]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2) | st.frozensets(st.integers(0, 3), max_size=2),
    max_leaves=6,
)


def _spec_error_or_fine(build) -> object:
    """``build()``'s value, or None where it raised a SpecError (any other error fails)."""
    try:
        return build()
    except SpecError:
        return None


@given(any_specs(), st.sampled_from(["layer", "pos", "head", "kv_head", "neuron", "src_pos", "x"]), JUNK)
def test_any_restriction_value_is_fine_or_a_spec_error(spec: PatchSpec, dim: str, value: object) -> None:
    """Whatever value restricts whatever dim, building and compiling the spec either works or
    raises SpecError: never a raw TypeError, ValueError, KeyError or IndexError."""
    narrowed = _spec_error_or_fine(lambda: spec.sel(**{dim: value}))
    if isinstance(narrowed, PatchSpec):
        grid = _spec_error_or_fine(lambda: compile(narrowed, SIZES))
        if grid is not None:
            _assert_unique_labels(grid)
        assert PatchSpec.from_dict(narrowed.to_dict()) == narrowed


@given(
    st.dictionaries(
        st.sampled_from(["activation", "axes", "restrictions", "source", "name", "joint", "sweep", "nmae"]),
        JUNK | st.sampled_from(["z", "resid_pre", ["layer"], ["layer", "pos"], {"pos": -1}, {"kind": "zero"}]),
        max_size=5,
    )
)
def test_any_dict_is_a_spec_or_a_spec_error(data: dict) -> None:
    """from_dict of any dict (and of its parts as joint and sweep lists) builds a value or
    raises SpecError."""
    _spec_error_or_fine(lambda: PatchSpec.from_dict(data))
    _spec_error_or_fine(lambda: spec_from_dict(data))
    _spec_error_or_fine(lambda: Sweep.from_dict(data))
    _spec_error_or_fine(lambda: spec_from_dict({"joint": [data, data]}))
    _spec_error_or_fine(lambda: Sweep.from_dict({"sweep": [data]}))
