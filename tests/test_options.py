"""Run options: validated values, typos caught with a did-you-mean before any forward pass."""

from __future__ import annotations

import pytest

import patchspec as ps
from patchspec.options import RunOptions, parse_memory
from tests.conftest import logit_diff_metric
from tests.models import prompts


class NoForward:
    """Fails the test if the model runs: every error below must come first."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.original = self.model.forward

        def forbidden(*args, **kwargs):
            raise AssertionError("a forward pass ran before the error")

        self.model.forward = forbidden
        return self

    def __exit__(self, *exc):
        self.model.forward = self.original


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_mem": "2GB"}, r"unknown option 'max_mem'.*did you mean 'max_memory'\?"),
        ({"engin": "batched"}, r"unknown option 'engin'.*did you mean 'engine'\?"),
        ({"engine": "fast"}, r"unknown engine 'fast'; valid engines are batched, reference"),
        ({"engine": "refrence"}, r"did you mean 'reference'\?"),
        ({"executor": "dask"}, r"unknown executor 'dask'; valid executors are local"),
        ({"max_memory": "lots"}, r"max_memory='lots' is not a memory size"),
        ({"max_memory": -1}, r"max_memory=-1 is not a memory size"),
        ({"cells_per_batch": 0}, r"cells_per_batch must be a positive int or None, got 0"),
        ({"cells_per_batch": 2.5}, r"cells_per_batch must be a positive int"),
        ({"progress": "yes"}, r"progress must be True, False or None, got 'yes'"),
        ({"start_at_layer": None}, r"start_at_layer must be True or False"),
        ({"hash_weights": 1}, r"hash_weights must be True or False"),
        ({"engine": "reference", "cells_per_batch": 4}, r"engine 'reference' takes no options \['cells_per_batch'\]"),
    ],
)
def test_bad_options_fail_before_any_forward_pass(gpt2, options, message):
    """Every bad option is an OptionError naming it and what is valid, before the model runs."""
    clean, corrupted = prompts()
    with NoForward(gpt2), pytest.raises(ps.OptionError, match=message):
        ps.catalog.HEAD_OUT.run(gpt2, clean, corrupted, logit_diff_metric, **options)
    with NoForward(gpt2), pytest.raises(ps.OptionError, match=message):
        ps.Sweep(ps.catalog.HEAD_OUT).run(gpt2, clean, corrupted, logit_diff_metric, **options)


def test_option_error_is_a_type_error_too():
    """A misspelt keyword is also a TypeError, as Python's own is."""
    with pytest.raises(TypeError):
        RunOptions.from_kwargs(max_mem="1GB")


def test_options_are_values():
    """Options are frozen, comparable values; batching lists only what was set."""
    a = RunOptions(cells_per_batch=4, max_memory="1GB")
    assert a == RunOptions(cells_per_batch=4, max_memory="1GB")
    assert a.batching == {"cells_per_batch": 4, "max_memory": "1GB"}
    assert RunOptions(start_at_layer=False).batching == {"start_at_layer": False}
    with pytest.raises(AttributeError):
        a.cells_per_batch = 2  # type: ignore[misc]


def test_public_signatures_are_typed_and_explicit():
    """spec.run and Sweep.run list every option by name (no **options at the boundary)."""
    import inspect

    for fn in (ps.PatchSpec.run, ps.Sweep.run, ps.run):
        params = inspect.signature(fn).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
        for name in ("engine", "executor", "progress", "cells_per_batch", "max_memory", "start_at_layer"):
            assert params[name].kind is params[name].KEYWORD_ONLY
    assert parse_memory("1 KiB") == 1024


def test_estimator_objects_validate_their_own_options(gpt2):
    """A BatchedEstimator built by hand refuses bad sizes when built, like the keywords do."""
    from patchspec.execute import BatchedEstimator

    for bad in ({"cells_per_batch": 0}, {"cells_per_batch": -3}, {"max_memory": "much"}):
        with pytest.raises(ps.OptionError):
            BatchedEstimator(**bad)
