"""The batched engine's hook writer: ``torch.where(mask, patched, act)`` over stacked copies.

The activation at a hook holds ``copies`` copies of the batch stacked on its first dim
(``[copies * batch, ...]``, copy-major); it is viewed as ``[copies, batch, ...]``, against
which a chunk's dense mask (``[copies, 1 | batch, ...]``) and the source values (``[batch,
...]``) broadcast. A ``resid_mid`` write reads ``resid_pre`` and rewrites ``attn_out`` of the
same block so that the residual stream itself takes the values (the model adapter names the
points). A source with a :meth:`~patchspec.sources.Source.combine` makes the written value a
function of the activation as it arrives (``h + s (h_src - h) P``, ``h + c d``), still written
only where the mask is True.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch

from patchspec.execute.hooks import READ, Hook, phased
from patchspec.layouts import Writer
from patchspec.sources import Combine


def write_hooks(
    points: Sequence[str],
    writer: Writer,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    copies: int = 1,
    phase: int = 0,
    combine: Combine | None = None,
) -> list[Hook]:
    """Forward hooks that write ``values`` into the activation where ``mask``.

    Args:
        points: The adapter's write points: the activation's hook, or for ``resid_mid`` the
            block's ``resid_pre`` and ``attn_out`` hooks.
        writer: How the activation is written.
        values: ``[batch, ...]`` patched values.
        mask: ``[copies, 1 | batch, ...]`` booleans broadcasting against the activation.
        copies: Number of stacked copies of the batch in the activation.
        phase: The phase of the write (:func:`patchspec.execute.hooks.write_phase`).
        combine: The source's :meth:`~patchspec.sources.Source.combine`: the value written
            is ``combine(act, values)``, ``act`` being the activation as it arrives (viewed as
            ``[copies, batch, ...]``; for ``resid_mid`` the residual ``resid_pre + attn_out``).
    """
    cast: dict[torch.dtype, torch.Tensor] = {}

    def target(act: torch.Tensor) -> torch.Tensor:
        if act.dtype not in cast:
            cast[act.dtype] = values.to(act.dtype)
        return cast[act.dtype]

    def write(act: torch.Tensor, new: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """``act`` taking ``new`` where ``mask`` (``new - offset`` when the activation written
        is the patched one minus ``offset``, as ``attn_out = resid_mid - resid_pre``)."""
        stacked = einops.rearrange(act, "(copy batch) ... -> copy batch ...", copy=copies)
        if combine is not None:
            new = combine(stacked if offset is None else stacked + offset, new)
        if offset is not None:
            new = new - offset
        return einops.rearrange(torch.where(mask, new, stacked), "copy batch ... -> (copy batch) ...")

    if writer == "resid_mid":
        pre_name, attn_out_name = points
        seen: dict[str, torch.Tensor] = {}

        def read_resid_pre(act: torch.Tensor, hook: object) -> None:
            seen["resid_pre"] = act

        def write_attn_out(act: torch.Tensor, hook: object) -> torch.Tensor:
            # resid_mid = resid_pre + attn_out, so this attn_out makes resid_mid == values here.
            resid_pre = einops.rearrange(
                seen.pop("resid_pre"), "(copy batch) ... -> copy batch ...", copy=copies
            )
            return write(act, target(act), resid_pre)

        return [
            (pre_name, phased(read_resid_pre, READ)),
            (attn_out_name, phased(write_attn_out, phase)),
        ]

    (hook_name,) = points

    def overwrite(act: torch.Tensor, hook: object) -> torch.Tensor:
        return write(act, target(act))

    return [(hook_name, phased(overwrite, phase))]
