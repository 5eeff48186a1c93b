"""How a compiled grid becomes values: estimators (what is computed) on executors (where).

* :mod:`~patchspec.execute.protocols`: the :class:`Estimator` and :class:`Executor`
  protocols, :class:`Chunk` and :class:`Task`;
* :mod:`~patchspec.execute.batched`: the exact batched estimator (the default);
* :mod:`~patchspec.execute.reference`: the exact reference estimator (an independent oracle);
* :mod:`~patchspec.execute.local`: the local executor;
* :mod:`~patchspec.execute.registry`: both by name;
* :mod:`~patchspec.execute.distributed`: the Dask executor (``executor=client``; imported on
  use, it needs ``pip install 'patchspec[distributed]'``);
* :mod:`~patchspec.execute.store`: resumable sweeps (``store="sweep.zarr"``);
* :mod:`~patchspec.execute.masks`, :mod:`~patchspec.execute.writer`,
  :mod:`~patchspec.execute.schedule`, :mod:`~patchspec.execute.hooks`: the batched engine's parts.
"""

from patchspec.execute.batched import BatchedEstimator
from patchspec.execute.local import LocalExecutor
from patchspec.execute.protocols import Chunk, Estimator, Executor, Task
from patchspec.execute.reference import ReferenceEstimator
from patchspec.execute.registry import (
    ESTIMATORS,
    EXECUTORS,
    register_estimator,
    register_executor,
)

__all__ = [
    "ESTIMATORS",
    "EXECUTORS",
    "BatchedEstimator",
    "Chunk",
    "Estimator",
    "Executor",
    "LocalExecutor",
    "ReferenceEstimator",
    "Task",
    "register_estimator",
    "register_executor",
]
