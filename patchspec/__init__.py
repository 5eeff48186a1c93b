"""patchspec: declarative, labelled, fast activation patching for TransformerLens models."""

# accessor registers the .patch accessor; batched registers the default engine ENGINES["batched"]
from patchspec import accessor, batched, catalog, metrics, sources, stats
from patchspec.errors import HookError, InputError, MetricError, PatchSpecError, SpecError
from patchspec.io import load, save
from patchspec.layouts import LAYOUTS
from patchspec.sources import Clean, Corrupted, Gaussian, Mean, Resample, Zero
from patchspec.spec import JointSpec, PatchSpec, spec_from_dict
from patchspec.sweep import Sweep, run

__all__ = [
    "LAYOUTS",
    "Clean",
    "Corrupted",
    "Gaussian",
    "HookError",
    "InputError",
    "JointSpec",
    "Mean",
    "MetricError",
    "PatchSpec",
    "PatchSpecError",
    "Resample",
    "SpecError",
    "Sweep",
    "Zero",
    "accessor",
    "batched",
    "catalog",
    "load",
    "metrics",
    "run",
    "save",
    "sources",
    "spec_from_dict",
    "stats",
]
