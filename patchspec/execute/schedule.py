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


#: What one more forward pass costs, in recomputed token positions: the fixed per-pass cost of
#: launching every block's operations. Splitting cells by their first position saves work only
#: where it saves more than this (a scheduling heuristic; results never depend on it).
PASS_OVERHEAD_TOKENS = {"cpu": 24, "other": 16384}


def chunks_by_suffix(
    cells: np.ndarray,
    starts: np.ndarray,
    firsts: np.ndarray,
    *,
    seq: int,
    batch: int,
    capacity: Callable[[int], int],
    overhead: int,
) -> list[Chunk]:
    """Chunks sharing a start layer, each replayed from the first position of its cells.

    Within a start layer, cells are sorted by their first changed position and cut into
    segments replayed from the segment's first position; the cut minimises
    ``passes x overhead + cells x batch x recomputed positions`` (dynamic programming over the
    distinct first positions), where a segment replayed from ``p`` holds at most
    ``capacity(seq - p)`` cells per pass. Cells whose first position is ``seq`` change nothing
    the metric reads and come in chunks of their own (``first == seq``).

    Args:
        cells: Flat cell indices.
        starts: The start layer of each cell (``-1``: none, run from the embeddings).
        firsts: The first position each cell can change (``seq``: none).
        seq: Sequence length.
        batch: Prompts per copy.
        capacity: The most cells per pass when ``rows`` positions are recomputed.
        overhead: :data:`PASS_OVERHEAD_TOKENS` for the device.

    Example:
        >>> chunks = chunks_by_suffix(np.arange(4), np.array([0, 0, 0, -1]), np.array([0, 3, 3, 0]),
        ...                           seq=4, batch=1, capacity=lambda rows: 8, overhead=0)
        >>> [(c.start, c.first, c.cells.tolist()) for c in chunks]
        [(0, 0, [0]), (0, 3, [1, 2]), (None, 0, [3])]
    """
    out: list[Chunk] = []
    for layer in sorted(set(starts.tolist()), key=lambda x: (x < 0, x)):
        these = cells[starts == layer]
        if layer < 0:
            out += [attrs.evolve(c, first=0) for c in chunks_by_start(these, np.full(len(these), -1), capacity(seq))]
            continue
        order = np.argsort(firsts[starts == layer], kind="stable")
        these, first = these[order], firsts[starts == layer][order]
        noop = first >= seq
        if noop.any():
            for piece in np.array_split(these[noop], -(-int(noop.sum()) // capacity(1))):
                out.append(Chunk(piece, int(layer), seq))
            these, first = these[~noop], first[~noop]
        if not these.size:
            continue
        values, counts = np.unique(first, return_counts=True)
        total = np.concatenate(([0], np.cumsum(counts)))
        m = len(values)
        best = np.full(m + 1, np.inf)
        cut = np.zeros(m + 1, dtype=np.int64)
        best[0] = 0.0
        caps = np.asarray([max(1, capacity(seq - int(v))) for v in values], dtype=np.float64)
        for j in range(1, m + 1):
            starts_at = np.arange(j)
            n = total[j] - total[starts_at]
            rows = seq - values[starts_at]
            cost = best[starts_at] + np.ceil(n / caps[starts_at]) * overhead + n * batch * rows
            k = int(np.argmin(cost))
            best[j], cut[j] = cost[k], k
        segments = []
        j = m
        while j > 0:
            segments.append((int(cut[j]), j))
            j = int(cut[j])
        for i, j in reversed(segments):
            piece, piece_first = these[total[i] : total[j]], first[total[i] : total[j]]
            n_chunks = -(-piece.size // int(caps[i]))
            for part in np.array_split(np.arange(piece.size), n_chunks):
                out.append(Chunk(piece[part], int(layer), int(piece_first[part].min())))
    return out
