"""Run options as one validated value, checked before any forward pass.

:class:`RunOptions` holds how a sweep runs (which estimator, on which executor, chunk sizes,
memory budget, progress, provenance hashing); it is built from the keyword arguments of
``spec.run`` / ``Sweep.run`` and validated when built, so a bad value or a misspelt keyword
(``max_mem=``) is an :class:`~patchspec.errors.OptionError` naming the valid choices before
the model runs at all.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import attrs

from patchspec.errors import OptionError, did_you_mean

P = ParamSpec("P")
R = TypeVar("R")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value: str | int | float) -> int:
    """A memory size in bytes, from bytes or a string such as ``"2GB"``, ``"512 MiB"``.

    Example:
        >>> parse_memory("2GB"), parse_memory("1.5 KiB"), parse_memory(4096)
        (2000000000, 1536, 4096)

    Raises:
        OptionError: not a positive size.
    """
    number: float | None
    if isinstance(value, bool):
        number, unit = None, ""
    elif isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        number, unit = (float(match.group(1)), match.group(2).lower()) if match else (None, "")
    else:
        number, unit = None, ""
    if number is None or unit not in _UNITS or not number > 0:
        raise OptionError(
            f"max_memory={value!r} is not a memory size; give a positive number of bytes or a "
            f"string such as '2GB', '512MiB' (units: {', '.join(u for u in _UNITS if u)})"
        )
    return max(1, int(number * _UNITS[unit]))


def as_int(value: Any) -> Any:
    """attrs converter: numpy and torch integer scalars to ``int``; anything else unchanged
    (bools and floats stay what they are, for the validator to refuse).

    Example:
        >>> import numpy as np
        >>> as_int(np.int64(3)), as_int(True), as_int("x")
        (3, True, 'x')
    """
    if isinstance(value, bool | int):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    dtype = str(getattr(value, "dtype", ""))
    if getattr(value, "ndim", None) == 0 and "int" in dtype:  # a torch integer scalar
        return int(value)
    return value


def optional_count(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``None`` or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise OptionError(f"{attribute.name} must be a positive int or None, got {value!r}")


def optional_memory(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``None`` or a memory size (see :func:`parse_memory`)."""
    if value is not None:
        parse_memory(value)


def _optional_flag(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise OptionError(f"{attribute.name} must be True, False or None, got {value!r}")


def flag(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise OptionError(f"{attribute.name} must be True or False, got {value!r}")


def _engine(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    from patchspec.execute.registry import estimator_factory

    if value is not None:
        estimator_factory(value)


def _estimator(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    from patchspec.attribution import check_estimator

    check_estimator(value)
def _store(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, str | os.PathLike):
        raise OptionError(
            f"store must be a path (a str or os.PathLike) of a zarr store, or None, got {value!r}"
        )


def _executor(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    from patchspec.execute.registry import executor_for

    if value is not None:
        executor_for(value)


@attrs.frozen(kw_only=True)
class RunOptions:
    """How a sweep runs; every field is validated when the value is built.

    Attributes:
        engine: The estimator: ``"batched"`` (default, exact, many cells per forward pass),
            ``"reference"`` (exact, one plain forward pass per cell), a registered name, or an
            :class:`~patchspec.execute.Estimator` object.
        executor: Where chunks run: ``"local"`` (default), an
            :class:`~patchspec.execute.Executor` object, or a ``dask.distributed.Client``
            (see :mod:`patchspec.execute.distributed`).
        progress: Show a progress bar (default: for sweeps of 64 cells or more, on a terminal).
        cells_per_batch: Cells per forward pass of the batched engine (default: from memory).
        max_memory: Memory budget of one batched pass, bytes or ``"2GB"`` (default: half the
            free CUDA memory, or 1 GiB on the CPU).
        start_at_layer: Start each batched pass at its cells' first patched block.
        hash_weights: Record a full SHA-256 of the weights in provenance (default: a cheap
            fingerprint of names, shapes, dtypes and a sample of values).
        estimator: ``"exact"`` (default: exact patching by ``engine``), ``"atp"`` (attribution
            patching, a first-order estimate of every cell from one gradient pass), ``"atp*"``
            (AtP with the QK fix for query, key and score cells), ``"graddrop"`` (AtP* with
            GradDrop: an unsigned ranking score per cell, ``attrs["quantity"] == "score"``, not
            an estimate of the effect), ``"ig"``
            (integrated gradients along each hook point's path), or an estimator object (see
            :mod:`patchspec.attribution`).
        ig_steps: Steps along the path of ``estimator="ig"`` (default 8).
        store: A zarr path that makes the sweep resumable: each finished chunk is written to
            it, and a rerun with the same store computes only the chunks not yet there (see
            :mod:`patchspec.execute.store`).

    Example:
        >>> RunOptions(max_memory="2GB").max_memory
        '2GB'
        >>> RunOptions.from_kwargs(max_mem="2GB")
        Traceback (most recent call last):
        ...
        patchspec.errors.OptionError: unknown option 'max_mem'; valid options are ...; did you mean 'max_memory'?
    """

    engine: Any = attrs.field(default=None, validator=_engine)
    executor: Any = attrs.field(default=None, validator=_executor)
    progress: bool | None = attrs.field(default=None, validator=_optional_flag)
    cells_per_batch: int | None = attrs.field(default=None, converter=as_int, validator=optional_count)
    max_memory: str | int | float | None = attrs.field(default=None, validator=optional_memory)
    start_at_layer: bool = attrs.field(default=True, validator=flag)
    hash_weights: bool = attrs.field(default=False, validator=flag)
    estimator: Any = attrs.field(default=None, validator=_estimator)
    ig_steps: int | None = attrs.field(default=None, converter=as_int, validator=optional_count)
    store: str | os.PathLike[str] | None = attrs.field(default=None, validator=_store)

    def __attrs_post_init__(self) -> None:
        if self.estimator is None or self.estimator == "exact":
            if self.ig_steps is not None:
                raise OptionError(
                    f"ig_steps={self.ig_steps!r} sets the steps of estimator='ig', but estimator "
                    f"is {self.estimator or 'exact'!r}"
                )
            return
        if self.engine is not None:
            raise OptionError(
                f"engine={self.engine!r} chooses the exact engine, but estimator="
                f"{self.estimator!r} runs none; leave engine unset or use estimator='exact'"
            )
        if self.batching.keys() - {"max_memory"}:
            raise OptionError(
                f"options {sorted(self.batching.keys() - {'max_memory'})} configure the exact "
                f"batched engine, which estimator={self.estimator!r} does not run"
            )
        from patchspec.attribution import attribution_estimator

        attribution_estimator(self.estimator, ig_steps=self.ig_steps)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RunOptions:
        """Build options from keywords, naming an unknown one with a did-you-mean.

        Raises:
            OptionError: an unknown keyword or an invalid value.
        """
        check_names(kwargs, [f.name for f in attrs.fields(cls)], "option")
        return cls(**kwargs)

    @property
    def batching(self) -> dict[str, Any]:
        """The options only the batched engine reads, where they differ from the defaults."""
        out = {"cells_per_batch": self.cells_per_batch, "max_memory": self.max_memory}
        out = {k: v for k, v in out.items() if v is not None}
        if not self.start_at_layer:
            out["start_at_layer"] = False
        return out


def check_names(given: Any, valid: list[str], what: str) -> None:
    """Raise :class:`OptionError` for the first name in ``given`` that is not in ``valid``."""
    for name in given:
        if name not in valid:
            raise OptionError(
                f"unknown {what} {name!r}; valid {what}s are {', '.join(valid)}"
                f"{did_you_mean(name, valid)}"
            )


def checked_keywords(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` raising :class:`OptionError` with a did-you-mean for a misspelt keyword.

    The signature (and so IDE help and type checking) stays ``fn``'s own.
    """
    signature = inspect.signature(fn)
    keywords = [
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    ]

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        check_names([k for k in kwargs if k not in signature.parameters], keywords, "option")
        return fn(*args, **kwargs)

    return wrapper
