"""Scheduling a batched sweep: chunk sizes from a memory budget, chunks by start layer.

``K``, the number of cells that share one forward pass, comes from a memory budget
(``max_memory="2GB"``; by default half the free CUDA memory, or 1 GiB on the CPU, where
forwards are also kept to about 2,048 tokens because larger ones gain nothing there) or from
``cells_per_batch``. Cells are grouped by the first block they patch (their *start layer*) and
cut into chunks of at most ``K``, as even as possible. Results never depend on ``K``.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np
import torch

from patchspec.execute.protocols import Chunk
from patchspec.options import parse_memory
from patchspec.plan.sizes import Sizes

#: Memory budget on the CPU when none is given.
CPU_BUDGET = 1 << 30
#: Share of the free accelerator memory used when no budget is given.
CUDA_SHARE = 0.5
#: On the CPU, a forward of more tokens than this is no faster per token (cache misses).
CPU_TOKENS_PER_FORWARD = 2048


def default_budget(device: torch.device) -> int:
    """Bytes a chunk may use when no budget is given.

    Half the free CUDA memory; on other devices 1 GiB, or a quarter of the available memory
    when that is less (read with ``psutil`` when it is installed).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_SHARE)
    try:
        import psutil
    except ImportError:
        return CPU_BUDGET
    return int(min(CPU_BUDGET, psutil.virtual_memory().available // 4))


def bytes_per_cell(
    sizes: Sizes, d_vocab: int, n_positions: int, itemsize: int, rows: int | None = None
) -> int:
    """A generous estimate of the memory one cell (one copy of the batch) adds to a forward.

    Counts the live activations of one block (residual stream, attention scores and pattern,
    MLP hidden layer, patched copies) at ``rows`` recomputed positions (default: all), the
    logits at ``n_positions`` positions and the float32 temporaries of the metric.
    """
    seq = sizes.seq
    rows = seq if rows is None else rows
    block = rows * (16 * sizes.d_model + 4 * sizes.d_mlp + 6 * sizes.n_heads * seq) * itemsize
    logits = n_positions * d_vocab * (itemsize + 8)
    return sizes.batch * (block + logits)


def choose_cells_per_batch(
    sizes: Sizes,
    *,
    d_vocab: int,
    n_positions: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    cells_per_batch: int | None = None,
    max_memory: str | int | float | None = None,
    rows: int | None = None,
) -> int:
    """How many cells share one forward pass.

    ``cells_per_batch`` when given (capped by ``max_memory`` if that is given too); otherwise as
    many as the memory budget allows (``max_memory``, or :func:`default_budget`), and on the CPU
    without an explicit budget no more than :data:`CPU_TOKENS_PER_FORWARD` tokens per pass.
    ``rows`` is the number of positions each pass recomputes (default: all of them).

    Example:
        >>> sizes = Sizes(n_layers=2, n_heads=4, n_kv_heads=4, d_model=64, d_head=16,
        ...               d_mlp=256, batch=1, seq=16)
        >>> choose_cells_per_batch(sizes, d_vocab=1000, n_positions=1,
        ...                        device=torch.device("cpu"), max_memory="64MB")
        381
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = sizes.seq if rows is None else max(1, rows)
    per_cell = max(1, bytes_per_cell(sizes, d_vocab, n_positions, itemsize, rows))
    if max_memory is not None:
        by_memory = max(1, parse_memory(max_memory) // per_cell)
        return by_memory if cells_per_batch is None else min(cells_per_batch, by_memory)
    if cells_per_batch is not None:
        return cells_per_batch
    copies = max(1, default_budget(device) // per_cell)
    if device.type == "cpu":
        copies = min(copies, max(1, CPU_TOKENS_PER_FORWARD // max(1, sizes.batch * rows)))
    return copies


def chunks_by_start(cells: np.ndarray, starts: np.ndarray, limit: int) -> list[Chunk]:
    """Chunks of at most ``limit`` cells sharing a start layer, as even as possible.

    Args:
        cells: Flat cell indices.
        starts: The start layer of each cell (``-1``: none, run from the embeddings).
        limit: The most cells per chunk.

    Example:
        >>> [(c.start, c.cells.tolist()) for c in chunks_by_start(np.arange(5), np.array([1, 0, 1, 1, -1]), 2)]
        [(0, [1]), (1, [0, 2]), (1, [3]), (None, [4])]
    """
    if limit < 1:
        raise ValueError(f"chunks need room for at least one cell, got limit={limit}")
    out: list[Chunk] = []
    layers = sorted(set(starts.tolist()), key=lambda x: (x < 0, x))
    for layer in layers:
        pending = cells[starts == layer]
        while pending.size:
            n_chunks = -(-pending.size // limit)
            size = -(-pending.size // n_chunks)
            out.append(Chunk(pending[:size], None if layer < 0 else int(layer)))
            pending = pending[size:]
    return out


def chunks_by_suffix(
    cells: np.ndarray,
    starts: np.ndarray,
    firsts: np.ndarray,
    *,
    seq: int,
    capacity: Callable[[int], int],
) -> list[Chunk]:
    """Chunks of cells sharing a start layer and a first changed position, as even as possible.

    Cells that start at the same block and position are replayed together from there, at most
    ``capacity(seq - first)`` per pass. Cells are never replayed from an earlier position
    than their own, so a cell's value does not depend on which other cells share its pass (a
    verified subset equals the same cells of a full sweep bit for bit). Cells whose first
    position is ``seq`` change nothing the metric reads and come in chunks of their own.

    Args:
        cells: Flat cell indices.
        starts: The start layer of each cell (``-1``: none, run from the embeddings).
        firsts: The first position each cell can change (``seq``: none).
        seq: Sequence length.
        capacity: The most cells per pass when ``rows`` positions are recomputed.

    Example:
        >>> chunks = chunks_by_suffix(np.arange(4), np.array([0, 0, 0, -1]), np.array([0, 3, 3, 0]),
        ...                           seq=4, capacity=lambda rows: 8)
        >>> [(c.start, c.first, c.cells.tolist()) for c in chunks]
        [(0, 0, [0]), (0, 3, [1, 2]), (None, 0, [3])]
    """
    firsts = np.where(starts < 0, 0, np.minimum(firsts, seq))
    out: list[Chunk] = []
    for layer in sorted(set(starts.tolist()), key=lambda x: (x < 0, x)):
        at_layer = starts == layer
        for first in np.unique(firsts[at_layer]).tolist():
            group = cells[at_layer & (firsts == first)]
            limit = capacity(max(1, seq - first))
            for chunk in chunks_by_start(group, np.full(len(group), layer), limit):
                out.append(attrs.evolve(chunk, first=int(first)))
    return out
