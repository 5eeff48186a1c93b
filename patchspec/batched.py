"""Former home of the batched engine; it now lives in :mod:`patchspec.execute.batched`.

Kept so that existing imports keep working.
"""

from patchspec.execute.batched import BatchedEstimator, Stats, start_layers
from patchspec.execute.schedule import (
    CPU_BUDGET,
    CPU_TOKENS_PER_FORWARD,
    CUDA_SHARE,
    bytes_per_cell,
    choose_cells_per_batch,
    default_budget,
)
from patchspec.model.replay import Replay
from patchspec.options import parse_memory

__all__ = [
    "CPU_BUDGET",
    "CPU_TOKENS_PER_FORWARD",
    "CUDA_SHARE",
    "BatchedEstimator",
    "Replay",
    "Stats",
    "bytes_per_cell",
    "choose_cells_per_batch",
    "default_budget",
    "parse_memory",
    "start_layers",
]
