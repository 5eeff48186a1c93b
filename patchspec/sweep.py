"""Former home of :class:`~patchspec.Sweep`; it now lives beside the specs in
:mod:`patchspec.spec`, and the orchestration in :mod:`patchspec.runner`."""

from patchspec.spec import Sweep

__all__ = ["Sweep"]
