"""patchspec: declarative, labelled, fast activation patching for TransformerLens models.

Names are imported on first use (``patchspec.PatchSpec`` imports :mod:`patchspec.spec` and so
torch), so ``import patchspec`` and ``patchspec --help`` stay fast. The ``.patch`` accessor of
results (:mod:`patchspec.accessor`) is registered on every ``xarray.DataArray`` and ``Dataset``
as soon as both patchspec and xarray are imported, in either order.

Example:
    >>> import patchspec
    >>> patchspec.PatchSpec.__name__, "patchspec.accessor" in __import__("sys").modules
    ('PatchSpec', True)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__: str = _version("patchspec")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0+unknown"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from patchspec import accessor, batched, catalog, metrics, sources, stats
    from patchspec.attribution.verify import verify
    from patchspec.errors import (
        HookError,
        InputError,
        MetricError,
        OptionError,
        PatchSpecError,
        PatchSpecWarning,
        SpecError,
    )
    from patchspec.execute import (
        Chunk,
        Estimator,
        Executor,
        Task,
        register_estimator,
        register_executor,
    )
    from patchspec.interventions import Add, SAELatent, Subspace
    from patchspec.io import load, save
    from patchspec.layouts import LAYOUTS, Layout, register_layout
    from patchspec.locate import find_positions
    from patchspec.model import ModelAdapter
    from patchspec.options import RunOptions
    from patchspec.sources import Clean, Corrupted, Gaussian, Mean, Resample, Zero, register_source
    from patchspec.spec import JointSpec, PatchSpec, Sweep, run, spec_from_dict
    from patchspec.tracing import causal_trace

#: Where each public name lives: a module's name for a submodule, else ``(module, attribute)``.
_LAZY: dict[str, str | tuple[str, str]] = {
    **{
        m: f"patchspec.{m}"
        for m in ("accessor", "batched", "catalog", "interventions", "metrics", "sources", "stats", "tracing")
    },
    **{n: ("patchspec.interventions", n) for n in ("Add", "SAELatent", "Subspace")},
    "causal_trace": ("patchspec.tracing", "causal_trace"),
    **{
        n: ("patchspec.errors", n)
        for n in (
            "ExecutorError",
            "HookError",
            "InputError",
            "MetricError",
            "OptionError",
            "PatchSpecError",
            "PatchSpecWarning",
    "PathSpec",
            "SpecError",
        )
    },
    **{
        n: ("patchspec.execute", n)
        for n in ("Chunk", "Estimator", "Executor", "Task", "register_estimator", "register_executor")
    },
    "verify": ("patchspec.attribution.verify", "verify"),
    "DaskExecutor": ("patchspec.execute.distributed", "DaskExecutor"),
    "ModelSource": ("patchspec.execute.distributed", "ModelSource"),
    "load": ("patchspec.io", "load"),
    "save": ("patchspec.io", "save"),
    "LAYOUTS": ("patchspec.layouts", "LAYOUTS"),
    "Layout": ("patchspec.layouts", "Layout"),
    "register_layout": ("patchspec.layouts", "register_layout"),
    "find_positions": ("patchspec.locate", "find_positions"),
    "ModelAdapter": ("patchspec.model", "ModelAdapter"),
    "RunOptions": ("patchspec.options", "RunOptions"),
    "PathSpec": ("patchspec.paths", "PathSpec"),
    **{
        n: ("patchspec.sources", n)
        for n in ("Clean", "Corrupted", "Gaussian", "Mean", "Resample", "Zero", "register_source")
    },
    **{n: ("patchspec.spec", n) for n in ("JointSpec", "PatchSpec", "Sweep", "run", "spec_from_dict")},
}

__all__ = [
    "LAYOUTS",
    "Add",
    "Chunk",
    "Clean",
    "Corrupted",
    "DaskExecutor",
    "Estimator",
    "Executor",
    "ExecutorError",
    "Gaussian",
    "HookError",
    "InputError",
    "JointSpec",
    "Layout",
    "Mean",
    "MetricError",
    "ModelAdapter",
    "ModelSource",
    "OptionError",
    "PatchSpec",
    "PatchSpecError",
    "PatchSpecWarning",
    "Resample",
    "RunOptions",
    "SAELatent",
    "SpecError",
    "Subspace",
    "Sweep",
    "Task",
    "Zero",
    "accessor",
    "batched",
    "catalog",
    "causal_trace",
    "find_positions",
    "interventions",
    "load",
    "metrics",
    "register_estimator",
    "register_executor",
    "register_layout",
    "register_source",
    "run",
    "save",
    "sources",
    "spec_from_dict",
    "stats",
    "tracing",
    "verify",
]


class _AccessorOnXarray(importlib.abc.MetaPathFinder):
    """Registers the ``.patch`` accessor right after xarray is first imported (once)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "xarray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            importlib.import_module("patchspec.accessor")

        loader.exec_module = exec_module
        return spec


if "xarray" in sys.modules:
    importlib.import_module("patchspec.accessor")
elif not any(isinstance(f, _AccessorOnXarray) for f in sys.meta_path):
    sys.meta_path.insert(0, _AccessorOnXarray())


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and register the ``.patch`` accessor."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'patchspec' has no attribute {name!r}")
    if isinstance(where, str):
        value: Any = importlib.import_module(where)
    else:
        value = getattr(importlib.import_module(where[0]), where[1])
    importlib.import_module("patchspec.accessor")  # results read through .patch
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
