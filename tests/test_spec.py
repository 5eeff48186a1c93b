"""PatchSpec and JointSpec: validation, restriction, composition, serialisation."""

from __future__ import annotations

import pytest

from patchspec import JointSpec, PatchSpec, SpecError, catalog, spec_from_dict
from patchspec.layouts import LAYOUTS, layout
from patchspec.sources import Corrupted


def test_repr_reads_like_the_constructor():
    """The repr shows only what differs from the defaults, as the constructor call."""
    spec = PatchSpec("z", axes=("layer", "head")).sel(pos=-1)
    assert repr(spec) == "PatchSpec('z', axes=('layer', 'head'), restrictions={'pos': -1})"
    assert eval(repr(spec), {"PatchSpec": PatchSpec}) == spec


def test_equal_specs_hash_equal_and_are_immutable():
    """Specs are values: equal when built alike, hashable, frozen."""
    a = PatchSpec("resid_pre", axes=["layer", "pos"], restrictions={"layer": [0, 1]})
    b = PatchSpec("resid_pre", axes=("layer", "pos"), restrictions={"layer": (0, 1)})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.activation = "z"  # type: ignore[misc]


def test_sel_returns_a_new_spec_and_keeps_the_old():
    """Restricting gives a new object; the original is untouched."""
    spec = catalog.HEAD_OUT_BY_POS
    narrow = spec.sel(layer=slice(1, None), pos=[-1, -2])
    assert spec.restrictions == ()
    assert dict(narrow.restrictions)["pos"] == (-1, -2)
    assert narrow.sel(pos=0).restriction("pos") == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "zz", "axes": ("layer",)}, r"unknown activation 'zz'; valid activations are .*did you mean 'z'\?"),
        ({"activation": "z", "axes": ("layer", "heads")}, r"axis 'heads' is not a dim of activation 'z' \(batch, pos, head, d_head\); did you mean 'head'\?"),
        ({"activation": "k", "axes": ("layer", "head")}, r"axis 'head' is not a dim of activation 'k' \(batch, pos, kv_head, d_head\); keys and values have one head per key/value group: did you mean 'kv_head'\?"),
        ({"activation": "z", "axes": ("layer", "layer")}, r"axis 'layer' is listed twice"),
        ({"activation": "z", "axes": ("batch",)}, r"axis 'batch' cannot be swept"),
        ({"activation": "z", "axes": ("layer",), "restrictions": {"poss": 1}}, r"restriction 'poss' is neither an axis nor a dim of activation 'z'.*did you mean 'pos'\?"),
        ({"activation": "z", "axes": ("layer",), "restrictions": {"pos": 1.5}}, r"restriction pos=1.5 must be an int"),
        ({"activation": "z", "axes": ("layer",), "restrictions": {"pos": []}}, r"restriction pos=\[\] selects nothing"),
        ({"activation": "z", "axes": ("layer",), "restrictions": {"pos": [1, 1]}}, r"repeats a value"),
        ({"activation": "z", "axes": ("layer", "offset")}, r"axis 'offset' is not a dim of activation 'z'"),
        ({"activation": "z", "axes": ("layer", "offset"), "rule": lambda c: {}}, r"a custom-rule axis needs its values listed"),
    ],
)
def test_bad_specs_are_clear_errors(kwargs, message):
    """Each malformed spec raises SpecError naming the bad value and what is valid."""
    activation = kwargs.pop("activation")
    with pytest.raises(SpecError, match=message):
        PatchSpec(activation, **kwargs)


def test_custom_rule_axis_with_listed_values_is_valid():
    """A custom rule may sweep an axis of its own when its values are listed."""
    spec = PatchSpec(
        "z", axes=("layer", "offset"), restrictions={"offset": (0, 1)}, rule=lambda c: {"layer": c["layer"]}
    )
    assert spec.dims == ("layer", "offset")
    with pytest.raises(SpecError, match="custom rule"):
        spec.to_dict()


@pytest.mark.parametrize("spec", list(catalog.SPECS.values()), ids=list(catalog.SPECS))
def test_catalogue_round_trips_through_dict(spec):
    """Every catalogue spec survives to_dict -> from_dict unchanged."""
    assert PatchSpec.from_dict(spec.to_dict()) == spec
    assert spec_from_dict(spec.to_dict()) == spec


def test_dict_round_trip_with_slice_and_source():
    """Slices and non-default sources serialise to plain data and back."""
    spec = catalog.RESID_PRE.sel(layer=slice(1, None, 2), pos=-1).using(Corrupted())
    data = spec.to_dict()
    assert data["restrictions"]["layer"] == {"slice": [1, None, 2]}
    assert data["source"] == {"kind": "corrupted"}
    assert PatchSpec.from_dict(data) == spec


def test_from_dict_rejects_unknown_keys():
    """Typos in a spec dict are named, with a suggestion."""
    with pytest.raises(SpecError, match=r"unknown spec key 'axis'.*did you mean 'axes'\?"):
        PatchSpec.from_dict({"activation": "z", "axis": ["layer"]})


def test_joint_spec_numbers_shared_axes_and_flattens():
    """a & b & c is one flat JointSpec; shared axis names get part numbers."""
    a, b = catalog.HEAD_OUT, catalog.RESID_PRE
    joint = a & b & a
    assert isinstance(joint, JointSpec) and len(joint.parts) == 3
    assert joint.dims == ("layer_1", "head_1", "layer_2", "pos", "layer_3", "head_3")
    assert spec_from_dict(joint.to_dict()) == joint


def test_joint_spec_refuses_mixed_receivers():
    """Denoising and noising cannot share a forward pass."""
    with pytest.raises(SpecError, match="must patch the same run"):
        catalog.HEAD_OUT & catalog.HEAD_OUT.using(Corrupted())


def test_layouts_name_every_dim_once():
    """Every layout starts with batch and uses the package's dim spellings."""
    allowed = {"batch", "pos", "head", "kv_head", "d_head", "d_model", "dest_pos", "src_pos", "neuron"}
    for name, lay in LAYOUTS.items():
        assert lay.dims[0] == "batch" and set(lay.dims) <= allowed, name
        assert layout(name).hook_name(2).startswith("blocks.2.")
