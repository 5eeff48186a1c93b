"""A joint patch does not depend on the order of its parts: ``a & b == b & a``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from patchspec import Mean, PatchSpec, Zero
from patchspec.errors import SpecError
from patchspec.layouts import LAYOUTS
from tests.conftest import per_example_metric

#: Every activation kind but the gated ``result`` (it needs ``use_attn_result``).
KINDS = sorted(name for name, row in LAYOUTS.items() if row.gate is None)
#: The axis a part sweeps, first that its activation has.
SWEPT = ("pos", "dest_pos", "head", "kv_head")


def _part(kind: str, layer: int, swept: bool) -> PatchSpec:
    dims = LAYOUTS[kind].dims
    axes = tuple(d for d in SWEPT if d in dims)[:1] if swept else ()
    return PatchSpec(kind, axes=axes).sel(layer=layer)


@given(
    a=st.sampled_from(KINDS),
    b=st.sampled_from(KINDS),
    layers=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    engine=st.sampled_from(["batched", "reference"]),
)
def test_joint_patch_is_order_free(gpt2, tokens, a, b, layers, engine) -> None:
    """Every pair of activation kinds gives the same cells in either order, on both engines."""
    clean, corrupted = tokens
    left, right = _part(a, layers[0], True), _part(b, layers[1], False)
    one = (left & right).run(gpt2, clean, corrupted, per_example_metric, engine=engine)
    two = (right & left).run(gpt2, clean, corrupted, per_example_metric, engine=engine)
    assert one.dims == two.dims
    np.testing.assert_allclose(one.values, two.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upstream", ["resid_pre", "attn_out"])
def test_resid_mid_written_after_upstream_patches(gpt2, tokens, upstream) -> None:
    """A whole resid_mid patch makes the clean run, whatever is patched upstream in its block."""
    clean, corrupted = tokens
    mid = PatchSpec("resid_mid", axes=()).sel(layer=1)
    pre = PatchSpec(upstream, axes=("pos",)).sel(layer=1).using(Zero(receiver="corrupted"))
    for joint in (mid & pre, pre & mid):
        result = joint.run(gpt2, clean, corrupted, per_example_metric)
        expected = np.asarray(result.attrs["clean_baseline"])
        np.testing.assert_allclose(result.values, np.broadcast_to(expected, result.shape), atol=1e-5)


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_other_run_values_win_over_an_ablation(gpt2, tokens, engine) -> None:
    """Where an ablation and a clean patch overlap, the clean values win, in either order."""
    clean, corrupted = tokens
    restore = PatchSpec("resid_pre", axes=()).sel(layer=1)
    ablate = PatchSpec("resid_pre", axes=("pos",)).sel(layer=1).using(Zero(receiver="corrupted"))
    for joint in (restore & ablate, ablate & restore):
        result = joint.run(gpt2, clean, corrupted, per_example_metric, engine=engine)
        expected = np.asarray(result.attrs["clean_baseline"])
        np.testing.assert_allclose(result.values, np.broadcast_to(expected, result.shape), atol=1e-5)


def test_overlapping_parts_with_different_ablations_are_refused(gpt2, tokens) -> None:
    """Two ablations writing one element with different values are refused before any pass."""
    clean, corrupted = tokens
    a = PatchSpec("resid_pre", axes=("pos",)).sel(layer=1).using(Mean(receiver="corrupted"))
    b = PatchSpec("resid_pre", axes=()).sel(layer=1).using(Zero(receiver="corrupted"))
    calls = []
    handle = gpt2.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(SpecError, match=r"parts 0 .* and 1 .* both write 'resid_pre' at layers \[1\]"):
            (a & b).run(gpt2, clean, corrupted, per_example_metric)
    finally:
        handle.remove()
    assert calls == []


def test_disjoint_parts_with_different_sources_run(gpt2, tokens) -> None:
    """Parts on disjoint positions may take different sources; the order does not matter."""
    clean, corrupted = tokens
    a = PatchSpec("resid_pre", axes=()).sel(layer=1, pos=[1, 2])
    b = PatchSpec("resid_pre", axes=()).sel(layer=1, pos=[4]).using(Zero(receiver="corrupted"))
    one = (a & b).run(gpt2, clean, corrupted, per_example_metric)
    two = (b & a).run(gpt2, clean, corrupted, per_example_metric)
    torch.testing.assert_close(torch.as_tensor(one.values), torch.as_tensor(two.values))
