"""Sweeps of one model from several threads give the numbers each gives alone."""

from __future__ import annotations

import threading

import numpy as np

from patchspec import catalog
from patchspec.model.adapter import ModelAdapter
from tests.conftest import per_example_metric
from tests.models import prompts


def test_concurrent_sweeps_on_one_model_do_not_mix(gpt2) -> None:
    """Two threads sweeping one model serialise on its lock: never each other's hooks."""
    inputs = [prompts(2, 6, seed=1), prompts(3, 6, seed=7)]
    specs = [catalog.RESID_PRE, catalog.HEAD_OUT]
    alone = [
        spec.run(gpt2, *pair, per_example_metric, engine=engine).values
        for spec, pair, engine in zip(specs, inputs, ("batched", "reference"), strict=True)
    ]
    together: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def sweep(i: int, engine: str) -> None:
        try:
            start.wait()
            for _ in range(3):
                together[i] = specs[i].run(gpt2, *inputs[i], per_example_metric, engine=engine).values
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [
        threading.Thread(target=sweep, args=(i, engine))
        for i, engine in enumerate(("batched", "reference"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(2):
        np.testing.assert_array_equal(together[i], alone[i])


def test_model_lock_is_shared_by_adapters_and_reentrant(gpt2) -> None:
    """Any adapter of one model takes the same lock, and a thread may take it twice."""
    one, two = ModelAdapter.of(gpt2), ModelAdapter(gpt2)
    entered = threading.Event()
    with one.exclusive(), two.exclusive():
        waiter = threading.Thread(target=lambda: (one.exclusive().__enter__(), entered.set()))
        waiter.daemon = True
        waiter.start()
        assert not entered.wait(0.2)  # the other thread waits for the lock
    assert entered.wait(5)
