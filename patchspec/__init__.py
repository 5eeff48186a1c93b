"""patchspec: declarative, labelled, fast activation patching for TransformerLens models."""

from patchspec import catalog, metrics, sources
from patchspec.errors import HookError, InputError, MetricError, PatchSpecError, SpecError
from patchspec.layouts import LAYOUTS
from patchspec.sources import Clean, Corrupted
from patchspec.spec import JointSpec, PatchSpec, spec_from_dict
from patchspec.sweep import Sweep, run

__all__ = [
    "LAYOUTS",
    "Clean",
    "Corrupted",
    "HookError",
    "InputError",
    "JointSpec",
    "MetricError",
    "PatchSpec",
    "PatchSpecError",
    "SpecError",
    "Sweep",
    "catalog",
    "metrics",
    "run",
    "sources",
    "spec_from_dict",
]
