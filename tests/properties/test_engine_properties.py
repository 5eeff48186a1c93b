"""Hypothesis: the batched engine equals the reference executor, whatever the spec and K.

Random specs (catalogue entries or any activation with random axes), random restrictions,
joint specs, value sources, metrics, batch sizes 1-3 and forced small chunks, on the
multi-head GPT-2 and the grouped-query, rotary Qwen2 fixtures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchspec import PatchSpec, catalog, metrics
from patchspec.layouts import LAYOUTS
from patchspec.model.adapter import GATES
from patchspec.plan import Sizes
from patchspec.sources import Clean, Corrupted, Mean, Zero
from tests.conftest import logit_diff_metric, per_example_metric
from tests.models import prompts

SEQ = 5
#: Sizes valid on both fixtures (Qwen2 has 2 key/value heads and d_mlp 64; GPT-2 more).
#: Values kept per swept axis, so a joint spec stays a few dozen cells.
MAX_PER_AXIS = 3


@st.composite
def restricted(draw: st.DrawFn, spec: PatchSpec, sizes: Sizes, per_axis: int) -> PatchSpec:
    """``spec`` with every swept axis cut to a few random values and maybe a dim narrowed."""
    cuts: dict[str, Any] = {}
    for axis in spec.axes:
        size = sizes.size(axis)
        values = draw(
            st.lists(st.integers(0, size - 1), min_size=1, max_size=per_axis, unique=True)
        )
        values = [v - size if draw(st.booleans()) else v for v in values]  # negatives: from the end
        cuts[axis] = values if len(values) > 1 or draw(st.booleans()) else values[0]
    unswept = [d for d in spec.layout.patch_dims if d not in spec.axes]
    if unswept and draw(st.booleans()):
        dim = draw(st.sampled_from(unswept))
        size = sizes.size(dim)
        start = draw(st.integers(0, size - 1))
        cuts[dim] = draw(st.sampled_from([slice(start, None), start - size, [start]]))
    return spec.sel(**cuts)


@st.composite
def specs(draw: st.DrawFn, sizes: Sizes, per_axis: int = MAX_PER_AXIS) -> PatchSpec:
    """A catalogue spec, or any activation swept over random axes; restricted; any source."""
    if draw(st.booleans()):
        spec = draw(st.sampled_from(CATALOGUE))
    else:
        activation = draw(st.sampled_from(ACTIVATIONS))
        dims = list(LAYOUTS[activation].patch_dims)
        axes = draw(st.lists(st.sampled_from(dims), unique=True, max_size=3))
        spec = PatchSpec(activation, axes=tuple(axes))
    sources = [Clean(), Corrupted(), Zero(), Mean()]
    spec = spec.using(draw(st.sampled_from(sources)))
    return draw(restricted(spec, sizes, per_axis))


#: Activations (and catalogue specs) whose hook is not gated behind a ``set_use_*`` flag.
ACTIVATIONS = sorted(
    a
    for a in LAYOUTS
    if LAYOUTS[a].gate is None and LAYOUTS[a].hook_name(0).rsplit(".", 1)[-1] not in GATES
)
CATALOGUE = sorted(
    (s for s in catalog.SPECS.values() if s.activation in ACTIVATIONS), key=lambda s: s.label
)

METRICS = {
    "plain": logit_diff_metric,
    "plain per prompt": per_example_metric,
    "logit_diff": metrics.logit_diff(5, 7),
    "logprob per prompt at 2": metrics.logprob(3, pos=2, reduce="none"),
    "several": [metrics.logit_diff(5, 7), metrics.kl_to_clean(), metrics.prob(4, pos=1)],
}


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    """One random sweep: inputs, spec (maybe joint), metric and chunk size."""
    batch = draw(st.integers(1, 3))
    sizes = Sizes(
        n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=8, d_mlp=64, batch=batch, seq=SEQ
    )
    if draw(st.booleans()):
        first = draw(specs(sizes, per_axis=2))
        second = draw(
            specs(sizes, per_axis=2).filter(lambda s: s.source.receiver == first.source.receiver)
        )
        spec: Any = first & second
    else:
        spec = draw(specs(sizes))
    return {
        "batch": batch,
        "spec": spec,
        "metric": draw(st.sampled_from(sorted(METRICS))),
        "cells_per_batch": draw(st.integers(1, 7)),
        "seed": draw(st.integers(0, 3)),
    }


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_batched_equals_reference(model, case):
    """For random specs, restrictions, joint specs, sources, batch sizes and K: batched == reference."""
    spec = case["spec"]
    clean, corrupted = prompts(n=case["batch"], length=SEQ, seed=case["seed"])
    metric = METRICS[case["metric"]]
    want = spec.run(model, clean, corrupted, metric, engine="reference", progress=False)
    got = spec.run(
        model,
        clean,
        corrupted,
        metric,
        engine="batched",
        progress=False,
        cells_per_batch=case["cells_per_batch"],
    )
    assert got.dims == want.dims
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-5)
