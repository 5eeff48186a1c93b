"""All knowledge of the model: the adapter, the replay of its blocks, the session of a sweep.

* :mod:`~patchspec.model.adapter`: :class:`ModelAdapter` (sizes, hooks, gates, writers,
  blocks, caches, fingerprint);
* :mod:`~patchspec.model.replay`: :class:`Replay` of blocks ``L``..end;
* :mod:`~patchspec.model.session`: :class:`Session`, the unpatched runs of one sweep.
"""

from patchspec.model.adapter import ModelAdapter
from patchspec.model.replay import Replay
from patchspec.model.session import Session

__all__ = ["ModelAdapter", "Replay", "Session"]
