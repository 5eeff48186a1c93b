"""Labels are unique and true; every malformed spec value is a SpecError naming it.

Restrictions that alias one index (``1`` and ``-1`` of a 2-layer model) are refused when the
model's sizes are known, before any forward pass; no result has a repeated dim or coordinate;
numpy and torch integers count as ints; every public entry point of the spec module refuses bad
values with patchspec's own error.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from patchspec import JointSpec, Layout, PatchSpec, SpecError, Sweep, catalog, spec_from_dict
from patchspec.plan import Cell, Sizes, compile, explicit_grid
from patchspec.plan.grid import check_labels
from patchspec.results import to_dataarray
from patchspec.sources import Zero
from tests.conftest import logit_diff_metric

#: A 2-layer model with 8 positions.
SIZES = Sizes(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8, d_head=2, d_mlp=6, batch=2, seq=8)


def _offsets(cell):
    return {"layer": cell["layer"]}


# --- aliasing restrictions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (catalog.RESID_PRE.sel(layer=[1, -1]), r"restriction layer=\(1, -1\) in spec 'resid_pre' names layer 1 more than once: 1 and -1 are the same index \(layer has 2 entries: model\.cfg\.n_layers\)"),
        (catalog.RESID_PRE.sel(pos=[7, -1]), r"restriction pos=\(7, -1\) in spec 'resid_pre' names pos 7 more than once: 7 and -1 are the same index \(pos has 8 entries: sequence length\)"),
        (catalog.RESID_PRE.sel(layer=[-2, 1, 0]), r"names layer 0 more than once: -2 and 0 are the same index"),
        (catalog.HEAD_OUT.sel(pos=[7, -1]), r"restriction pos=\(7, -1\) in spec 'head_out' names pos 7 more than once"),
        (PatchSpec("z", axes=("head",)).sel(layer=[0, -2]), r"restriction layer=\(0, -2\) .* names layer 0 more than once"),
        (catalog.HEAD_K.sel(kv_head=[1, -1]), r"names kv_head 1 more than once: 1 and -1 .*kv_head has 2 entries"),
        (catalog.HEAD_PATTERN.sel(src_pos=[0, -8]), r"names src_pos 0 more than once: 0 and -8"),
        (PatchSpec("z", axes=("layer",), rule=_offsets).sel(pos=[7, -1]), r"restriction pos=\(7, -1\) in spec 'z_by_layer' names pos 7 more than once"),
    ],
)
def test_restrictions_that_alias_one_index_are_refused_at_compile(spec, message):
    """Two restriction entries naming the same index (known once sizes are) are refused, naming
    the entries and the index they share, for swept and unswept dims alike."""
    with pytest.raises(SpecError, match=message):
        compile(spec, SIZES)


def test_repeated_values_are_refused_at_construction():
    """Literal repeats need no sizes: they are refused when the spec is built, numpy ones too."""
    with pytest.raises(SpecError, match=r"restriction layer=\[1, 1\] repeats a value \(1\)"):
        catalog.RESID_PRE.sel(layer=[1, 1])
    with pytest.raises(SpecError, match=r"repeats a value \(1\)"):
        catalog.RESID_PRE.sel(layer=[np.int64(1), 1])
    with pytest.raises(SpecError, match=r"restriction pos=\('END', -1\) mixes position names and ints"):
        catalog.RESID_PRE.sel(pos=["END", -1])


def test_a_rule_output_naming_one_index_twice_patches_it_once():
    """A rule's output is a region, not labels: indices that alias are merged, not refused."""
    spec = PatchSpec("z", axes=("layer",), rule=lambda cell: {"pos": [7, -1, 0]})
    (region, *_rest) = compile(spec, SIZES).cell(0).regions
    assert dict(region.index)["pos"] == (7, 0)


def test_aliasing_restrictions_fail_before_any_forward_pass(gpt2, tokens):
    """spec.run and Sweep.run refuse an aliasing restriction before the model runs at all (also
    when a good spec comes first in the sweep)."""
    clean, corrupted = tokens  # 6 positions
    calls: list[int] = []
    handle = gpt2.embed.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(SpecError, match=r"names layer 1 more than once: 1 and -1"):
            catalog.RESID_PRE.sel(layer=[1, -1]).run(gpt2, clean, corrupted, logit_diff_metric, progress=False)
        with pytest.raises(SpecError, match=r"names pos 5 more than once: 5 and -1"):
            Sweep(catalog.ATTN_OUT, catalog.HEAD_OUT.sel(pos=[5, -1])).run(
                gpt2, clean, corrupted, logit_diff_metric, progress=False
            )
        assert calls == []
        gpt2(clean)
        assert calls == [1]  # the hook does count forward passes
    finally:
        handle.remove()


# --- unique dims and coordinates ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("axis", "message"),
    [
        ("example", r"axis 'example' is reserved: the runner adds an 'example' dim to results \(one value per prompt\)"),
        ("metric", r"axis 'metric' is reserved: the runner adds a?n? ?'metric' dim"),
        ("clean_baseline", r"axis 'clean_baseline' is reserved for a coordinate of results"),
        ("pos_token", r"axis 'pos_token' is reserved for a coordinate"),
        ("head", r"custom-rule axis 'head' of a spec on 'resid_pre' reuses the name of the built-in dim 'head'"),
        ("pos_2", r"custom-rule axis 'pos_2' of a spec on 'resid_pre' looks like a joint spec's numbered copy of the built-in dim 'pos'"),
    ],
)
def test_custom_axes_cannot_take_reserved_or_built_in_names(axis, message):
    """A custom-rule axis named like a dim the runner adds, a coordinate, or a built-in dim
    (numbered or not) is refused when the spec is built."""
    with pytest.raises(SpecError, match=message):
        PatchSpec("resid_pre", axes=("layer", axis), restrictions={axis: (0, 1)}, rule=_offsets)


def test_joint_numbering_never_repeats_a_dim():
    """Shared axes are numbered by part; a custom axis that already has a numbered name is
    refused, naming both parts and the dim they would share."""
    assert (catalog.HEAD_OUT & catalog.HEAD_OUT).dims == ("layer_1", "head_1", "layer_2", "head_2")
    a = PatchSpec("z", axes=("offset", "offset_2"), restrictions={"offset": (0, 1), "offset_2": (0,)}, rule=_offsets)
    b = PatchSpec("z", axes=("offset",), restrictions={"offset": (0,)}, rule=_offsets, name="b")
    with pytest.raises(
        SpecError,
        match=r"joint spec dims clash: part 1 \('z_by_offset_offset_2'\) axis 'offset_2' and part 2 \('b'\) axis 'offset' would both be the result dim 'offset_2'",
    ):
        a & b


def test_check_labels_names_the_repeated_dim_or_coordinate():
    """The compile-time check names the labelled thing, the dim and the repeated labels."""
    with pytest.raises(SpecError, match=r"spec 'x' would have the dim 'pos' twice \(dims \('pos', 'pos'\)\)"):
        check_labels(("pos", "pos"), {"pos": (0, 1)}, "spec 'x'")
    with pytest.raises(SpecError, match=r"would label dim 'layer' with the coordinate 1 more than once \(coordinates \(1, 1\)\)"):
        check_labels(("layer",), {"layer": (1, 1)}, "spec 'x'")


@pytest.mark.parametrize(
    ("dims", "coords", "metrics", "message"),
    [
        (("cell", "cell"), {"cell": (0,)}, None, r"the result of 'm' would have the dim 'cell' twice"),
        (("cell",), {"cell": (0, 0)}, None, r"would label dim 'cell' with the coordinate 0 more than once"),
        (("metric",), {"metric": (0,)}, ["a"], r"would have the dim 'metric' twice"),
        (("cell",), {"cell": (0,)}, ["a", "a"], r"would label dim 'metric' with the coordinate 'a' more than once"),
    ],
)
def test_results_refuse_repeated_labels_as_a_patchspec_error(dims, coords, metrics, message):
    """The last safety net in results.to_dataarray raises SpecError, never only an xarray
    warning, for hand-built grids that repeat a dim or a coordinate."""
    n = 1
    for d in dict.fromkeys(dims):
        n *= len(coords[d])
    grid = explicit_grid(dims, coords, [Cell((0,) * len(dims), ())] * n, SIZES)
    values = torch.zeros(n) if metrics is None else torch.zeros(n, len(metrics))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SpecError, match=message):
            to_dataarray(grid, values, name="m", labels=None, attrs={}, metrics=metrics)


# --- numpy and torch integers; bad slices ------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "plain"),
    [
        (np.int64(1), 1),
        (np.int32(-1), -1),
        (np.uint8(1), 1),
        (torch.tensor(1), 1),
        (np.array([0, 1]), [0, 1]),
        (np.arange(2), [0, 1]),
        (torch.tensor([1, 0]), [1, 0]),
        ([np.int64(0), torch.tensor(1)], [0, 1]),
        (range(2), [0, 1]),
        (slice(np.int64(0), torch.tensor(2)), slice(0, 2)),
    ],
    ids=repr,
)
def test_numpy_and_torch_integers_are_ints(given, plain):
    """Numpy and torch integer scalars and arrays restrict like the Python ints they hold: the
    specs are equal, hash alike, round-trip through dicts and compile alike."""
    spec, twin = catalog.RESID_PRE.sel(layer=given), catalog.RESID_PRE.sel(layer=plain)
    assert spec == twin and hash(spec) == hash(twin)
    assert PatchSpec.from_dict(spec.to_dict()) == twin
    assert compile(spec, SIZES).coords == compile(twin, SIZES).coords


def test_rule_outputs_take_numpy_and_torch_integers():
    """A custom rule may return numpy or torch indices."""
    spec = PatchSpec("z", axes=("layer",), rule=lambda c: {"pos": np.int64(2), "head": torch.tensor([0, 3])})
    (region, *_rest) = compile(spec, SIZES).cell(0).regions
    assert dict(region.index)["pos"] == (2,) and dict(region.index)["head"] == (0, 3)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (True, r"restriction layer=True is a bool"),
        (np.bool_(True), r"restriction layer=np\.True_ is a bool"),
        (torch.tensor(True), r"restriction layer=tensor\(True\) is a bool"),
        (np.array([True, False]), r"restriction layer=True must be an int"),
        (torch.tensor(1.0), r"restriction layer=1\.0 must be an int"),
        (np.float64(1.0), r"restriction layer=np\.float64\(1\.0\) must be an int"),
        (np.array([[0, 1]]), r"holds \[0, 1\], a list; give a flat list"),
        (slice(0, 2, 0), r"restriction layer=slice\(0, 2, 0\): slice step cannot be 0"),
        (slice(0.5, 2), r"slice start 0\.5 must be an int or None \(got float\)"),
        (slice("a", None), r"slice start 'a' must be an int or None \(got str\)"),
        (slice(None, True), r"slice stop True must be an int or None \(got bool\)"),
        ([slice(0, 1)], r"holds a slice inside a list"),
    ],
    ids=repr,
)
def test_bools_floats_and_bad_slices_are_refused(given, message):
    """Bools (numpy and torch ones too), floats, nested arrays and malformed slices are
    SpecErrors naming the value."""
    with pytest.raises(SpecError, match=message):
        catalog.RESID_PRE.sel(layer=given)


def test_a_rule_that_raises_is_a_spec_error_naming_the_cell():
    """An exception inside a custom rule surfaces at compile as a SpecError naming the spec and
    the cell, with the original exception as its cause."""
    spec = PatchSpec("z", axes=("layer",), rule=lambda c: {"pos": c["pos"]}, name="r")
    with pytest.raises(SpecError, match=r"rule of spec 'r' raised KeyError: 'pos' for cell \{'layer': 0\}") as info:
        compile(spec, SIZES)
    assert isinstance(info.value.__cause__, KeyError)


def test_a_rule_returning_a_bad_slice_is_a_spec_error():
    """A slice of step 0 from a rule fails at compile, naming the cell."""
    spec = PatchSpec("z", axes=("layer",), rule=lambda c: {"pos": slice(0, 2, 0)})
    with pytest.raises(SpecError, match=r"rule output for cell \{'layer': 0\}: pos=slice\(0, 2, 0\) .*slice step cannot be 0"):
        compile(spec, SIZES)


# --- every public entry point --------------------------------------------------------------------

SPEC = catalog.HEAD_OUT


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PatchSpec(None, axes=("layer",)), r"unknown activation None; valid activations are resid_pre"),
        (lambda: PatchSpec(["z"], axes=("layer",)), r"unknown activation \['z'\]"),
        (lambda: PatchSpec("z", axes=None), r"axes must be a dim name or a sequence of them .*got NoneType: None"),
        (lambda: PatchSpec("z", axes=3), r"axes must be a dim name .*got int: 3"),
        (lambda: PatchSpec("z", axes={"layer"}), r"axes must be a dim name .*got set"),
        (lambda: PatchSpec("z", axes=("",)), r"axis '' must be a non-empty string naming a dim"),
        (lambda: PatchSpec("z", axes=(None,)), r"axis None must be a non-empty string"),
        (lambda: PatchSpec("z", axes=("layer",), restrictions=3), r"restrictions must be a dict \{name: values\}, got int: 3"),
        (lambda: PatchSpec("z", axes=("layer",), restrictions={1: 0}), r"restriction names must be strings naming an axis or dim, got 1 \(int\)"),
        (lambda: PatchSpec("z", axes=("layer",), restrictions=[("pos",)]), r"got the entry \('pos',\)"),
        (lambda: PatchSpec("z", axes=("layer",), restrictions=[("pos", 0), ("pos", 1)]), r"restriction 'pos' is given twice"),
        (lambda: SPEC.sel(pos=None), r"restriction pos=None: give an int, a list or a slice \(leave 'pos' out"),
        (lambda: SPEC.sel(pos=True), r"restriction pos=True is a bool"),
        (lambda: SPEC.sel(pos=1.5), r"restriction pos=1\.5 must be an int or a position name"),
        (lambda: SPEC.sel(pos=[]), r"restriction pos=\[\] selects nothing"),
        (lambda: SPEC.sel(pos=[[0]]), r"restriction pos=\[\[0\]\] holds \[0\], a list"),
        (lambda: SPEC.sel(pos={0, 1}), r"restriction pos=\{0, 1\} is a set; give an int, a list"),
        (lambda: SPEC.sel(pos={0: 1}), r"restriction pos=\{0: 1\} is a dict"),
        (lambda: SPEC.sel(pos=b"ab"), r"restriction pos=b'ab' must be an int or a position name"),
        (lambda: SPEC.sel(heads=0), r"restriction 'heads' is neither an axis nor a dim of activation 'z'.*did you mean 'head'\?"),
        (lambda: catalog.HEAD_K.sel(head=0), r"restriction 'head' is neither .* 'k' .*did you mean 'kv_head'\?"),
        (lambda: SPEC.over(None), r"axis None must be a non-empty string"),
        (lambda: SPEC.over("heads"), r"axis 'heads' is not a dim of activation 'z'.*did you mean 'head'\?"),
        (lambda: SPEC.over("layer", "layer"), r"axis 'layer' is listed twice"),
        (lambda: SPEC.over("example"), r"axis 'example' is reserved"),
        (lambda: SPEC.using("clean"), r"source must be a patchspec\.sources\.Source, got str"),
        (lambda: SPEC.using(None), r"source must be a patchspec\.sources\.Source, got NoneType"),
        (lambda: SPEC.named(3), r"PatchSpec name must be a non-empty string or None, got int: 3"),
        (lambda: SPEC.named(""), r"PatchSpec name must be a non-empty string or None, got str: ''"),
        (lambda: SPEC.over_sources(), r"restriction source=\(\) selects nothing"),
        (lambda: SPEC.over_sources("zero"), r"axis 'source' sweeps value sources and needs them listed"),
        (lambda: SPEC.over_sources(Zero(), Zero()), r"restriction source=.* repeats a value \(Zero\(receiver='clean'\)\)"),
        (lambda: SPEC & 3, r"& joins a spec with a PatchSpec or JointSpec, got int: 3"),
        (lambda: SPEC & None, r"& joins a spec with a PatchSpec or JointSpec, got NoneType"),
        (lambda: JointSpec(SPEC), r"JointSpec takes a sequence of specs \(or write a & b\), got PatchSpec"),
        (lambda: JointSpec(None), r"JointSpec takes a sequence of specs .*got NoneType"),
        (lambda: JointSpec([SPEC]), r"a joint spec needs at least two parts, got 1"),
        (lambda: JointSpec([SPEC, "z"]), r"a joint spec combines PatchSpecs, got str"),
        (lambda: JointSpec([SPEC, SPEC], name=1), r"JointSpec name must be a non-empty string or None, got int: 1"),
        (lambda: Sweep(), r"a Sweep needs at least one spec"),
        (lambda: Sweep([SPEC, catalog.RESID_PRE]), r"Sweep takes its specs as separate arguments: Sweep\(a, b\)"),
        (lambda: Sweep(3), r"expected a PatchSpec or JointSpec, got int: 3"),
        (lambda: Sweep(SPEC, SPEC), r"specs in a Sweep need distinct names; \['head_out'\] repeat"),
        (lambda: Sweep(SPEC, name=3), r"Sweep name must be a non-empty string or None, got int: 3"),
        (lambda: Layout("x", ("batch", "expert"), "mine"), r"layout 'x': dim 'expert' has no known size"),
        (lambda: Layout("x", ("batch", "pos"), "mine", hook="b.{layer}.{n}"), r"hook template 'b\.\{layer\}\.\{n\}' may hold only '\{layer\}'"),
        (lambda: Layout("x", ("batch",), "mine", writer="nope"), r"writer 'nope' is not one of direct, resid_mid"),
    ],
)
def test_every_entry_point_refuses_bad_values_with_a_spec_error(build, message):
    """Constructors, derived-spec methods, &, JointSpec, Sweep and Layout: a SpecError naming
    the bad value and what is valid."""
    with pytest.raises(SpecError, match=message):
        build()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SPEC.sel(layer=10**30), r"restriction layer=1000000000000000000000000000000 in spec 'head_out' is outside the valid range -2\.\.1"),
        (SPEC.sel(head=slice(4, None)), r"restriction head=slice\(4, None, None\) in spec 'head_out' selects nothing \(head has 4 entries\)"),
        (SPEC.sel(pos="S2"), r"restriction pos='S2' in spec 'head_out' names a position, but the sweep got no positions"),
    ],
)
def test_restrictions_that_need_sizes_fail_at_compile(spec, message):
    """Huge ints, empty slices and names without positions are refused at compile."""
    with pytest.raises(SpecError, match=message):
        compile(spec, SIZES)


# --- dicts ---------------------------------------------------------------------------------------

GOOD = {"activation": "z", "axes": ["layer"]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, r"a spec dict must be a dict, got NoneType: None"),
        ("z", r"a spec dict must be a dict, got str: 'z'"),
        ([GOOD], r"a spec dict must be a dict, got list"),
        ({"activation": "z"}, r"a spec dict needs 'axes', got keys \['activation'\]"),
        ({}, r"a spec dict needs 'activation' and 'axes', got keys \[\]"),
        ({**GOOD, "axis": ["layer"]}, r"unknown spec key 'axis'; valid keys are activation, axes, restrictions, source, name; did you mean 'axes'\?"),
        ({**GOOD, 1: 2}, r"a spec dict has a key 1 that is not a string"),
        ({**GOOD, "sweep": []}, r"unknown spec key 'sweep'.*\(a dict with 'sweep' is read by Sweep\.from_dict\)"),
        ({**GOOD, "axes": 3}, r"a spec dict's 'axes' must be a list of dim names, got int: 3"),
        ({**GOOD, "axes": [1]}, r"axis 1 must be a non-empty string naming a dim"),
        ({**GOOD, "activation": "zz"}, r"unknown activation 'zz'.*did you mean 'z'\?"),
        ({**GOOD, "restrictions": [1]}, r"a spec dict's 'restrictions' must be a dict \{name: values\}, got list: \[1\]"),
        ({**GOOD, "restrictions": {"pos": {"slice": 3}}}, r"restriction 'pos' in a spec dict: a dict there must be \{'slice': \[start, stop, step\]\}"),
        ({**GOOD, "restrictions": {"pos": {"slice": [1, 2, 3, 4]}}}, r"a dict there must be \{'slice'"),
        ({**GOOD, "restrictions": {"pos": {"start": 1}}}, r"a dict there must be \{'slice'.*got \{'start': 1\}"),
        ({**GOOD, "restrictions": {"pos": {"slice": [0, 2, 0]}}}, r"restriction pos=\{'slice': \[0, 2, 0\]\}: slice step cannot be 0"),
        ({**GOOD, "restrictions": {"pos": {"slice": [0.5]}}}, r"slice stop 0\.5 must be an int or None"),
        ({**GOOD, "restrictions": {"pos": [[1]]}}, r"restriction pos=\[\[1\]\] holds \[1\], a list"),
        ({**GOOD, "restrictions": {"pos": True}}, r"restriction pos=True is a bool"),
        ({**GOOD, "source": "clean"}, r"'source' must be a source dict with a string 'kind' \(e\.g\. \{'kind': 'zero'\}\), got 'clean'"),
        ({**GOOD, "source": {"kind": ["zero"]}}, r"'source' must be a source dict with a string 'kind'"),
        ({**GOOD, "source": {"kind": "zeor"}}, r"unknown source kind 'zeor'.*did you mean 'zero'\?"),
        ({**GOOD, "source": {"kind": "zero", "reciever": "clean"}}, r"unknown field 'reciever' for source kind 'zero'.*did you mean 'receiver'\?"),
        ({**GOOD, "source": {"kind": "zero", "receiver": "both"}}, r"Zero\.receiver must be 'clean' or 'corrupted', got 'both'"),
        ({**GOOD, "axes": ["source", "layer"], "restrictions": {"source": [{"kind": 3}]}}, r"restriction 'source' must be a source dict with a string 'kind'"),
        ({**GOOD, "name": 3}, r"PatchSpec name must be a non-empty string or None, got int: 3"),
    ],
    ids=repr,
)
def test_malformed_spec_dicts_are_spec_errors(data, message):
    """PatchSpec.from_dict (and spec_from_dict) refuse malformed dicts, naming the key or value."""
    with pytest.raises(SpecError, match=message):
        PatchSpec.from_dict(data)
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"joint": 3}, r"a joint spec dict's 'joint' must be a list of spec dicts, got int: 3"),
        ({"joint": [GOOD, {"activation": "z"}]}, r"part 2 of a joint spec dict: a spec dict needs 'axes'"),
        ({"joint": [GOOD, GOOD], "nmae": "j"}, r"unknown joint spec key 'nmae'; valid keys are joint, name; did you mean 'name'\?"),
        ({"joint": [GOOD]}, r"a joint spec needs at least two parts, got 1"),
        ({"joint": [GOOD, GOOD], "name": ""}, r"JointSpec name must be a non-empty string or None"),
    ],
)
def test_malformed_joint_dicts_are_spec_errors(data, message):
    """spec_from_dict refuses malformed joint dicts, naming the part."""
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, r"a sweep dict must be a dict, got NoneType: None"),
        ({}, r"a sweep dict needs 'sweep', got keys \[\]"),
        ({"sweep": 3}, r"a sweep dict's 'sweep' must be a list of spec dicts, got int: 3"),
        ({"sweep": "z"}, r"a sweep dict's 'sweep' must be a list of spec dicts, got str"),
        ({"sweep": [3]}, r"spec 1 of a sweep dict: a spec dict must be a dict, got int: 3"),
        ({"sweep": [GOOD, {"activation": "zz", "axes": []}]}, r"spec 2 of a sweep dict: unknown activation 'zz'"),
        ({"sweep": [GOOD], "nmae": "s"}, r"unknown sweep key 'nmae'; valid keys are sweep, name; did you mean 'name'\?"),
        ({"sweep": [GOOD], "activation": "z"}, r"unknown sweep key 'activation'.*read by PatchSpec\.from_dict"),
        ({"sweep": [GOOD], "name": 1}, r"Sweep name must be a non-empty string or None, got int: 1"),
    ],
)
def test_malformed_sweep_dicts_are_spec_errors(data, message):
    """Sweep.from_dict refuses malformed dicts, naming the spec and the key or value."""
    with pytest.raises(SpecError, match=message):
        Sweep.from_dict(data)
