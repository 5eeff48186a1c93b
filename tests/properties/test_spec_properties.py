"""Hypothesis properties of specs and plans: round-trips, restriction invariants, plan sizes."""

from __future__ import annotations

import math

import attrs
from hypothesis import given
from hypothesis import strategies as st

from patchspec import PatchSpec
from patchspec.layouts import LAYOUTS
from patchspec.plan import Sizes, compile

SIZES = Sizes(n_layers=3, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=6, batch=2, seq=5)


@st.composite
def specs(draw: st.DrawFn) -> PatchSpec:
    """A random spec: any activation, a random subset of its dims, random restrictions."""
    activation = draw(st.sampled_from(sorted(LAYOUTS)))
    dims = list(LAYOUTS[activation].patch_dims)
    axes = draw(st.lists(st.sampled_from(dims), unique=True, max_size=3))
    restrictions = {}
    for dim in draw(st.lists(st.sampled_from(dims), unique=True, max_size=2)):
        size = SIZES.size(dim)
        restrictions[dim] = draw(
            st.one_of(
                st.integers(-size, size - 1),
                st.lists(st.integers(0, size - 1), unique=True, min_size=1, max_size=size),
                st.builds(slice, st.integers(0, size - 1), st.none() | st.integers(1, size)).filter(
                    lambda s, size=size: len(range(*s.indices(size))) > 0
                ),
            )
        )
    return PatchSpec(activation, axes=tuple(axes), restrictions=restrictions)


@given(specs())
def test_dict_round_trip(spec: PatchSpec) -> None:
    """to_dict -> from_dict gives an equal spec with an equal hash."""
    again = PatchSpec.from_dict(spec.to_dict())
    assert again == spec and hash(again) == hash(spec)


@given(specs())
def test_evolve_revalidates_and_preserves(spec: PatchSpec) -> None:
    """attrs.evolve goes back through validation and keeps untouched fields."""
    renamed = attrs.evolve(spec, name="x")
    assert renamed.name == "x" and renamed.axes == spec.axes and renamed.restrictions == spec.restrictions


@given(specs())
def test_plan_size_is_product_of_axis_sizes(spec: PatchSpec) -> None:
    """A plan has one cell per point of the product of the swept axes, and dims == axes."""
    p = compile(spec, SIZES)
    assert p.dims == spec.axes
    assert p.n_cells == math.prod(len(p.coords[d]) for d in p.dims)
    assert all(len(cell.coords) == len(spec.axes) for cell in p.cells())


@given(specs(), st.data())
def test_restriction_gives_a_sub_plan(spec: PatchSpec, data: st.DataObject) -> None:
    """Restricting a swept axis keeps exactly the matching cells of the full plan, in order."""
    if not spec.axes:
        return
    axis = data.draw(st.sampled_from(spec.axes))
    full = compile(spec, SIZES)
    keep = data.draw(st.lists(st.sampled_from(full.coords[axis]), unique=True, min_size=1))
    narrow = compile(spec.sel(**{axis: keep}), SIZES)
    i = spec.axes.index(axis)
    expected = [c.coords for c in full.cells() if c.coords[i] in keep]
    assert sorted(c.coords for c in narrow.cells()) == sorted(expected)
    by_coords = {c.coords: c for c in full.cells()}
    for cell in narrow.cells():
        twin = by_coords[cell.coords]
        assert [(r.layer, r.index) for r in cell.regions] == [(r.layer, r.index) for r in twin.regions]


@given(specs(), specs())
def test_joint_plan_is_product_of_parts(a: PatchSpec, b: PatchSpec) -> None:
    """A joint spec's cells are the product of its parts' cells; each patches both regions."""
    joint = a & b
    pa, pb, pj = compile(a, SIZES), compile(b, SIZES), compile(joint, SIZES)
    assert pj.n_cells == pa.n_cells * pb.n_cells
    assert len(pj.dims) == len(a.axes) + len(b.axes)
    first = pj.cell(0)
    assert len(first.regions) == len(pa.cell(0).regions) + len(pb.cell(0).regions)
