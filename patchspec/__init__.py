"""patchspec: declarative, labelled, fast activation patching for TransformerLens models."""

# accessor defines the .patch accessor of results (xarray registers it when it is imported)
from patchspec import accessor, batched, catalog, metrics, sources, stats
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
from patchspec.io import load, save
from patchspec.layouts import LAYOUTS, Layout, register_layout
from patchspec.locate import find_positions
from patchspec.model import ModelAdapter
from patchspec.options import RunOptions
from patchspec.sources import Clean, Corrupted, Gaussian, Mean, Resample, Zero, register_source
from patchspec.spec import JointSpec, PatchSpec, Sweep, run, spec_from_dict

__all__ = [
    "LAYOUTS",
    "Chunk",
    "Clean",
    "Corrupted",
    "Estimator",
    "Executor",
    "Gaussian",
    "HookError",
    "InputError",
    "JointSpec",
    "Layout",
    "Mean",
    "MetricError",
    "ModelAdapter",
    "OptionError",
    "PatchSpec",
    "PatchSpecError",
    "PatchSpecWarning",
    "Resample",
    "RunOptions",
    "SpecError",
    "Sweep",
    "Task",
    "Zero",
    "accessor",
    "batched",
    "catalog",
    "find_positions",
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
]

