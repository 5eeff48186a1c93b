"""The sizes of every named dim, for one model and one input shape."""

from __future__ import annotations

from typing import Any

import attrs

from patchspec.errors import SpecError, did_you_mean
from patchspec.layouts import DIM_SIZES, layout


@attrs.frozen
class Sizes:
    """Sizes of every dim, read from the model (by its adapter) and the inputs.

    Example:
        >>> s = Sizes(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=8, d_mlp=64, batch=3, seq=6)
        >>> s.size("kv_head"), s.shape("k")
        (2, (3, 6, 2, 8))
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    batch: int
    seq: int

    @classmethod
    def of(cls, model: Any, batch: int, seq: int) -> Sizes:
        """Sizes of a TransformerLens model and an input shape (see ``ModelAdapter.sizes``)."""
        from patchspec.model.adapter import ModelAdapter

        return ModelAdapter.of(model).sizes(batch, seq)

    def size(self, dim: str) -> int:
        """The size of a named dim (``layer`` included).

        Raises:
            SpecError: an unknown dim name (also a ``ValueError``).
        """
        table = {
            "layer": self.n_layers,
            "batch": self.batch,
            "pos": self.seq,
            "dest_pos": self.seq,
            "src_pos": self.seq,
            "head": self.n_heads,
            "kv_head": self.n_kv_heads,
            "neuron": self.d_mlp,
            "d_model": self.d_model,
            "d_head": self.d_head,
        }
        if dim not in table:
            raise SpecError(
                f"dim {dim!r} has no known size; sized dims are {', '.join(table)}"
                f"{did_you_mean(dim, table)}"
            )
        return table[dim]

    def shape(self, activation: str) -> tuple[int, ...]:
        """The full shape of ``activation`` at one layer."""
        return tuple(self.size(d) for d in layout(activation).dims)


def size_origin(dim: str) -> str:
    """Where the size of ``dim`` comes from, for errors (``"model.cfg.n_heads"``)."""
    return DIM_SIZES.get(dim, dim)
