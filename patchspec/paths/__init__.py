"""Path patching: which sender's effect reaches the metric through which receiver.

:class:`PathSpec` (:mod:`.spec`) says what: senders, receivers, and whether only the direct
edge or also the paths through MLPs count; :mod:`.engine` computes it exactly, many (sender,
receiver) rows per forward pass; :mod:`.run` is the runner of path specs.
"""

from patchspec.paths.spec import PathSpec

__all__ = ["PathSpec"]
