"""Former home of the engine protocol and the reference executor.

They now live in :mod:`patchspec.execute` (protocols, estimators, executors); this module is
kept so that existing imports keep working.
"""

from patchspec.execute.hooks import FireCounter, Hook
from patchspec.execute.protocols import Chunk, Estimator, Executor, Task
from patchspec.execute.reference import ReferenceEstimator
from patchspec.execute.registry import ESTIMATORS, EXECUTORS

__all__ = [
    "ESTIMATORS",
    "EXECUTORS",
    "Chunk",
    "Estimator",
    "Executor",
    "FireCounter",
    "Hook",
    "ReferenceEstimator",
    "Task",
]
