"""Activation layouts: for each patchable activation, its hook name and its named dims.

A layout is pure data (no torch, no TransformerLens at import time), so specs can be validated
without a model. Hook names come from TransformerLens's own ``get_act_name`` helper.

Dims are named once for the whole package: ``batch pos head kv_head dest_pos src_pos neuron
d_model d_head``. Keys and values of a grouped-query model have ``kv_head`` heads (one per
key/value group), which are never labelled as query heads; on a multi-head model ``kv_head``
simply counts the same heads as ``head``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

from patchspec.errors import SpecError, did_you_mean

#: How a patched value reaches the model. ``"direct"``: overwrite the activation at its hook.
#: ``"resid_mid"``: TransformerBridge's ``hook_resid_mid`` only feeds the second norm, so the
#: residual stream itself is patched by rewriting the attention output of the same block.
Writer = Literal["direct", "resid_mid"]

#: Where the size of each dim comes from (model config or inputs).
DIM_SIZES: Mapping[str, str] = {
    "batch": "number of prompts",
    "pos": "sequence length",
    "dest_pos": "sequence length",
    "src_pos": "sequence length",
    "head": "model.cfg.n_heads",
    "kv_head": "model.cfg.n_key_value_heads (or n_heads)",
    "neuron": "model.cfg.d_mlp",
    "d_model": "model.cfg.d_model",
    "d_head": "model.cfg.d_head",
}


@attrs.frozen
class Layout:
    """Where an activation lives and what its dims are called.

    Attributes:
        name: The activation's short name, as in ``get_act_name`` (``"z"``, ``"resid_pre"``).
        dims: Named dims of the activation tensor, batch first.
        description: What the activation is, for docs and errors.
        writer: How a patch of this activation is written into the model.
    """

    name: str
    dims: tuple[str, ...]
    description: str
    writer: Writer = "direct"

    def hook_name(self, layer: int) -> str:
        """The hook point that holds this activation at ``layer``.

        Example:
            >>> LAYOUTS["z"].hook_name(3)
            'blocks.3.attn.hook_z'
        """
        from transformer_lens.utilities import get_act_name

        return str(get_act_name(self.name, layer))

    @property
    def patch_dims(self) -> tuple[str, ...]:
        """Dims a spec may sweep or restrict: ``layer`` and every dim but ``batch``."""
        return ("layer", *(d for d in self.dims if d != "batch"))


_RESID = ("batch", "pos", "d_model")
_HEAD_VECTOR = ("batch", "pos", "head", "d_head")
_KV_VECTOR = ("batch", "pos", "kv_head", "d_head")
_ATTN = ("batch", "head", "dest_pos", "src_pos")
_MLP = ("batch", "pos", "neuron")

LAYOUTS: Mapping[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("resid_pre", _RESID, "residual stream entering the block"),
        Layout(
            "resid_mid",
            _RESID,
            "residual stream between attention and MLP (patched as the residual itself)",
            writer="resid_mid",
        ),
        Layout("resid_post", _RESID, "residual stream leaving the block"),
        Layout("attn_out", _RESID, "output of the attention layer"),
        Layout("mlp_out", _RESID, "output of the MLP layer"),
        Layout("q", _HEAD_VECTOR, "attention queries"),
        Layout("k", _KV_VECTOR, "attention keys"),
        Layout("v", _KV_VECTOR, "attention values"),
        Layout("z", _HEAD_VECTOR, "attention head outputs before W_O (head outputs)"),
        Layout("result", ("batch", "pos", "head", "d_model"), "each head's output after W_O (gated: model.set_use_attn_result(True))"),
        Layout("pattern", _ATTN, "attention pattern (softmaxed)"),
        Layout("attn_scores", _ATTN, "attention scores (pre-softmax)"),
        Layout("pre", _MLP, "MLP pre-activations"),
        Layout("post", _MLP, "MLP post-activations"),
    )
}


def layout(activation: str) -> Layout:
    """Look up the layout of ``activation``, with a helpful error for unknown names.

    Raises:
        SpecError: ``activation`` is not one of :data:`LAYOUTS`.
    """
    try:
        return LAYOUTS[activation]
    except KeyError:
        raise SpecError(
            f"unknown activation {activation!r}; valid activations are "
            f"{', '.join(LAYOUTS)}{did_you_mean(activation, LAYOUTS)}"
        ) from None
