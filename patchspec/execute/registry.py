"""Estimators and executors by name: explicit tables, filled here, with no import side effects.

``spec.run(..., engine="reference")`` looks the estimator up in :data:`ESTIMATORS`, and
``executor="local"`` in :data:`EXECUTORS`. Add your own with :func:`register_estimator` /
:func:`register_executor`, or pass an object implementing the protocol directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchspec.errors import OptionError, did_you_mean
from patchspec.execute.batched import BatchedEstimator
from patchspec.execute.local import LocalExecutor
from patchspec.execute.protocols import Estimator, Executor
from patchspec.execute.reference import ReferenceEstimator

#: The default estimator's name.
DEFAULT_ESTIMATOR = "batched"
#: The default executor's name.
DEFAULT_EXECUTOR = "local"

#: Estimator factories by name: ``factory(**batching_options) -> Estimator``.
ESTIMATORS: dict[str, Callable[..., Estimator]] = {
    "batched": BatchedEstimator,
    "reference": ReferenceEstimator,
}
#: Executor factories by name.
EXECUTORS: dict[str, Callable[[], Executor]] = {"local": LocalExecutor}


def register_estimator(name: str, factory: Callable[..., Estimator], *, replace: bool = False) -> None:
    """Make ``engine=name`` build an estimator with ``factory(**options)``.

    Raises:
        OptionError: the name is taken and ``replace`` is false.
    """
    if name in ESTIMATORS and not replace:
        raise OptionError(f"an estimator named {name!r} exists; pass replace=True")
    ESTIMATORS[name] = factory


def register_executor(name: str, factory: Callable[[], Executor], *, replace: bool = False) -> None:
    """Make ``executor=name`` use ``factory()``.

    Raises:
        OptionError: the name is taken and ``replace`` is false.
    """
    if name in EXECUTORS and not replace:
        raise OptionError(f"an executor named {name!r} exists; pass replace=True")
    EXECUTORS[name] = factory


def estimator_factory(value: Any) -> Callable[..., Estimator] | None:
    """The factory of a named estimator, or ``None`` for an estimator object.

    Raises:
        OptionError: an unknown name, or an object that is not an estimator.
    """
    if value is None:
        value = DEFAULT_ESTIMATOR
    if isinstance(value, str):
        if value not in ESTIMATORS:
            raise OptionError(
                f"unknown engine {value!r}; valid engines are {', '.join(ESTIMATORS)}"
                f"{did_you_mean(value, ESTIMATORS)}"
            )
        return ESTIMATORS[value]
    if not isinstance(value, Estimator):
        raise OptionError(
            f"engine must be a name ({', '.join(ESTIMATORS)}) or an Estimator (with name, exact, "
            f"chunks() and estimate()), got {type(value).__name__}"
        )
    return None


def make_estimator(value: Any, batching: dict[str, Any]) -> Estimator:
    """The estimator for ``engine=value``, given the batching options the user set.

    Raises:
        OptionError: an unknown engine, or batching options it does not take.
    """
    factory = estimator_factory(value)
    if factory is None:
        if batching:
            raise OptionError(
                f"options {sorted(batching)} configure a named engine; configure the estimator "
                f"object {value!r} itself instead"
            )
        return value  # type: ignore[no-any-return]
    try:
        return factory(**batching)
    except TypeError:
        name = value or DEFAULT_ESTIMATOR
        raise OptionError(
            f"engine {name!r} takes no options {sorted(batching)} (they configure the 'batched' "
            "engine)"
        ) from None


def is_client(value: Any) -> bool:
    """Whether ``value`` is a ``dask.distributed.Client`` (without importing distributed)."""
    cls = type(value)
    return cls.__name__ == "Client" and cls.__module__.split(".")[0] == "distributed"


def executor_for(value: Any) -> Executor:
    """The executor for ``executor=value`` (a name, an :class:`Executor`, or a
    ``dask.distributed.Client``: a :class:`~patchspec.execute.distributed.DaskExecutor` on it).

    Raises:
        OptionError: an unknown name, or an object that is not an executor.
    """
    if value is None:
        value = DEFAULT_EXECUTOR
    if is_client(value):
        from patchspec.execute.distributed import DaskExecutor

        return DaskExecutor(value)
    if isinstance(value, str):
        if value not in EXECUTORS:
            raise OptionError(
                f"unknown executor {value!r}; valid executors are {', '.join(EXECUTORS)}"
                f"{did_you_mean(value, EXECUTORS)}"
            )
        return EXECUTORS[value]()
    if not isinstance(value, Executor):
        raise OptionError(
            f"executor must be a name ({', '.join(EXECUTORS)}), an Executor (with name and "
            f"run()) or a dask.distributed.Client, got {type(value).__name__}"
        )
    return value
