"""Guard tests: results of the public API must match the goldens frozen before the refactor.

A few cases froze a bug that a later issue fixed (``REVISED`` in :mod:`tests.golden.cases`, each
with its reason); those are checked against each prompt run alone instead.

The goldens (``tests/golden/golden_<model>.nc``, described by ``tests/golden/manifest.json``)
were written by ``tests/golden/make_golden.py`` from pristine code; the cases are shared via
:mod:`tests.golden.cases`. Every case is recomputed with both engines and compared: dims,
coords (``*_token`` labels, baselines, prompts included), values (1e-6), the baselines attrs
(1e-6) and the semantic attrs (spec, metric, sources, positions). Provenance attrs (hashes,
versions, model, engine) are not compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import xarray as xr

import patchspec as ps
from tests.golden.cases import (
    BASELINE_ATTRS,
    CASES,
    ENGINES,
    MODELS,
    REVISED,
    SEMANTIC_ATTRS,
    as_arrays,
    decode,
    golden_path,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
#: Dataset attrs of a Sweep result compared (provenance left out).
SWEEP_ATTRS = ("metric", "sweep")


@pytest.fixture(scope="module")
def goldens() -> dict[str, xr.Dataset]:
    return {name: ps.load(golden_path(name)) for name in MODELS}


def _assert_close(actual: Any, expected: Any, what: str) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    if expected.dtype.kind in "iufc" and actual.dtype.kind in "iufc":
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        np.testing.assert_allclose(actual, expected, err_msg=what, **TOL)
    else:
        assert actual.tolist() == expected.tolist(), f"{what}: {actual!r} != {expected!r}"


def _compare(actual: xr.DataArray, expected: xr.DataArray, what: str) -> None:
    assert actual.dims == expected.dims, f"{what}: dims {actual.dims} != {expected.dims}"
    assert sorted(map(str, actual.coords)) == sorted(map(str, expected.coords)), (
        f"{what}: coords {sorted(map(str, actual.coords))} != {sorted(map(str, expected.coords))}"
    )
    for key in expected.coords:
        coord, golden = actual.coords[key], expected.coords[key]
        assert coord.dims == golden.dims, f"{what}: coord {key} dims {coord.dims} != {golden.dims}"
        _assert_close(coord.values, golden.values, f"{what}: coord {key}")
    _assert_close(actual.values, expected.values, f"{what}: values")
    for key in BASELINE_ATTRS:
        assert (key in actual.attrs) == (key in expected.attrs), f"{what}: attr {key} presence"
        if key in expected.attrs:
            _assert_close(actual.attrs[key], expected.attrs[key], f"{what}: attr {key}")
    for key in (*SEMANTIC_ATTRS, "result_name"):
        assert actual.attrs.get(key) == expected.attrs.get(key), (
            f"{what}: attr {key}: {actual.attrs.get(key)!r} != {expected.attrs.get(key)!r}"
        )


PARAMS = [
    pytest.param(model, engine, name, id=f"{model}-{engine}-{name}")
    for model in MODELS
    for engine in ENGINES
    for name, case in CASES.items()
    if model in case.models
]


@pytest.mark.parametrize(("model_name", "engine", "name"), PARAMS)
def test_golden(
    request: pytest.FixtureRequest,
    goldens: dict[str, xr.Dataset],
    model_name: str,
    engine: str,
    name: str,
) -> None:
    golden = goldens[model_name]
    assert name in golden.attrs["patchspec_golden_cases"], f"no golden for {name} (regenerate?)"
    model = request.getfixturevalue(model_name)
    result = CASES[name].run(model, engine)
    expected, expected_attrs = decode(golden, name)
    actual = as_arrays(result)
    what = f"{model_name}/{engine}/{name}"
    if name in REVISED:
        expected = {k: _revised(model, CASES[name], engine, v) for k, v in expected.items()}
    assert list(actual) == list(expected), f"{what}: variables {list(actual)} != {list(expected)}"
    for key in expected:
        _compare(actual[key], expected[key], f"{what}[{key}]")
    if isinstance(result, xr.Dataset):
        for key in BASELINE_ATTRS:
            _assert_close(result.attrs[key], expected_attrs[key], f"{what}: Dataset attr {key}")
        for key in SWEEP_ATTRS:
            assert result.attrs.get(key) == expected_attrs.get(key), f"{what}: Dataset attr {key}"


def _revised(model: Any, case: Any, engine: str, frozen: xr.DataArray) -> xr.DataArray:
    """The expected result of a :data:`REVISED` case: the frozen labels with the values (and
    baselines) of each prompt run alone, averaged as the case's mean metric averages them."""
    clean, corrupted = case.inputs()
    alone = [
        case.target.run(model, [c], [k], case.metric(), engine=engine, progress=False, **case.kwargs())
        for c, k in zip(clean, corrupted, strict=True)
    ]
    mean = sum(a.values for a in alone) / len(alone)
    assert not np.allclose(frozen.values, mean, **TOL), "the frozen values are right after all"
    expected = frozen.copy(data=mean)
    expected.attrs = dict(frozen.attrs)
    for key in BASELINE_ATTRS:
        expected.attrs[key] = float(np.mean([a.attrs[key] for a in alone]))
    return expected


def test_every_golden_case_is_tested(goldens: dict[str, xr.Dataset]) -> None:
    """The golden files hold exactly the cases of the table (none silently dropped)."""
    for model_name, golden in goldens.items():
        stored = list(golden.attrs["patchspec_golden_cases"])
        expected = [name for name, case in CASES.items() if model_name in case.models]
        assert stored == expected, f"{model_name}: golden cases {stored} != table {expected}"
