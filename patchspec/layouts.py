"""Activation layouts: for each patchable activation, one row of data saying where it lives.

A layout names the activation's hook (by TransformerLens's ``get_act_name`` or a template of
its own), its named dims, which of them index token positions, how a patch is written into the
model (its *writer*) and the ``set_use_*`` flag, if any, that must be on for its hook to run.
Layouts are pure data (no torch, no TransformerLens at import time), so specs are validated
without a model. :func:`register_layout` adds a row, e.g. for an architecture whose hooks
differ; the model adapter (:mod:`patchspec.model.adapter`) is the only reader of the rest.

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
WRITERS: tuple[str, ...] = ("direct", "resid_mid")

#: Dims that index token positions; their restrictions may name positions (``pos="S2"``).
POSITION_DIMS: tuple[str, ...] = ("pos", "dest_pos", "src_pos")

#: Where the size of each dim comes from (model config or inputs).
DIM_SIZES: Mapping[str, str] = {
    "layer": "model.cfg.n_layers",
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
        hook: A hook-name template with ``{layer}`` (default: ``get_act_name(name, layer)``).
        gate: The ``model.cfg`` flag that must be on for the hook to run (``"use_attn_result"``),
            set with the ``model.set_<gate>(True)`` call named in errors.

    Example:
        >>> Layout("my_act", ("batch", "pos", "d_model"), "mine", hook="blocks.{layer}.hook_mine").hook_name(2)
        'blocks.2.hook_mine'
    """

    name: str
    dims: tuple[str, ...] = attrs.field(converter=lambda v: tuple(v) if isinstance(v, list) else v)
    description: str
    writer: Writer = "direct"
    hook: str | None = None
    gate: str | None = None

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"a layout's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.dims, tuple) or not all(isinstance(d, str) for d in self.dims):
            raise SpecError(
                f"layout {self.name!r}: dims must be a sequence of dim names, got {self.dims!r}"
            )
        if not self.dims or self.dims[0] != "batch":
            raise SpecError(f"layout {self.name!r}: dims must start with 'batch', got {self.dims!r}")
        if len(set(self.dims)) != len(self.dims):
            raise SpecError(f"layout {self.name!r}: dims {self.dims!r} repeat a name")
        sized = [d for d in DIM_SIZES if d != "layer"]
        for dim in self.dims:
            if dim not in sized:
                raise SpecError(
                    f"layout {self.name!r}: dim {dim!r} has no known size; activation dims are "
                    f"named from {', '.join(sized)}{did_you_mean(dim, sized)}"
                )
        if self.writer not in WRITERS:
            raise SpecError(
                f"layout {self.name!r}: writer {self.writer!r} is not one of {', '.join(WRITERS)}"
            )
        if self.gate is not None and not isinstance(self.gate, str):
            raise SpecError(f"layout {self.name!r}: gate must be a cfg flag name, got {self.gate!r}")
        if self.hook is not None:
            if not isinstance(self.hook, str) or "{layer}" not in self.hook:
                raise SpecError(
                    f"layout {self.name!r}: hook template {self.hook!r} needs '{{layer}}'"
                )
            try:
                self.hook.format(layer=0)
            except (KeyError, IndexError, ValueError) as err:
                raise SpecError(
                    f"layout {self.name!r}: hook template {self.hook!r} may hold only "
                    f"'{{layer}}' ({type(err).__name__}: {err})"
                ) from None

    def hook_name(self, layer: int) -> str:
        """The hook point that holds this activation at ``layer``.

        Example:
            >>> LAYOUTS["z"].hook_name(3)
            'blocks.3.attn.hook_z'
        """
        if self.hook is not None:
            return self.hook.format(layer=layer)
        from transformer_lens.utilities import get_act_name

        return str(get_act_name(self.name, layer))

    @property
    def patch_dims(self) -> tuple[str, ...]:
        """Dims a spec may sweep or restrict: ``layer`` and every dim but ``batch``."""
        return ("layer", *(d for d in self.dims if d != "batch"))

    @property
    def position_dims(self) -> tuple[int, ...]:
        """Axes of the activation tensor that index token positions (``(1,)`` for ``z``)."""
        return tuple(i for i, d in enumerate(self.dims) if d in POSITION_DIMS)


_RESID = ("batch", "pos", "d_model")
_HEAD_VECTOR = ("batch", "pos", "head", "d_head")
_KV_VECTOR = ("batch", "pos", "kv_head", "d_head")
_ATTN = ("batch", "head", "dest_pos", "src_pos")
_MLP = ("batch", "pos", "neuron")

_STANDARD = (
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
    Layout(
        "result",
        ("batch", "pos", "head", "d_model"),
        "each head's output after W_O (gated: model.set_use_attn_result(True))",
        gate="use_attn_result",
    ),
    Layout("pattern", _ATTN, "attention pattern (softmaxed)"),
    Layout("attn_scores", _ATTN, "attention scores (pre-softmax)"),
    Layout("pre", _MLP, "MLP pre-activations"),
    Layout("post", _MLP, "MLP post-activations"),
)

#: Every known activation by name: the standard rows, plus any added by :func:`register_layout`.
LAYOUTS: dict[str, Layout] = {row.name: row for row in _STANDARD}


def register_layout(row: Layout, *, replace: bool = False) -> Layout:
    """Make ``row`` patchable by name (``PatchSpec(row.name, ...)``).

    Args:
        row: The new layout.
        replace: Allow replacing an existing row of the same name.

    Raises:
        SpecError: a row of that name exists and ``replace`` is false.

    Example:
        >>> register_layout(Layout("embed_out", ("batch", "pos", "d_model"), "block input",
        ...                        hook="blocks.{layer}.hook_resid_pre")).name
        'embed_out'
        >>> del LAYOUTS["embed_out"]
    """
    if not isinstance(row, Layout):
        raise SpecError(f"register_layout takes a Layout, got {type(row).__name__}")
    if row.name in LAYOUTS and not replace and LAYOUTS[row.name] != row:
        raise SpecError(f"activation {row.name!r} already has a layout; pass replace=True")
    LAYOUTS[row.name] = row
    return row


def layout(activation: str) -> Layout:
    """Look up the layout of ``activation``, with a helpful error for unknown names.

    Raises:
        SpecError: ``activation`` is not one of :data:`LAYOUTS`.
    """
    try:
        return LAYOUTS[activation]
    except (KeyError, TypeError):
        raise SpecError(
            f"unknown activation {activation!r}; valid activations are "
            f"{', '.join(LAYOUTS)}{did_you_mean(str(activation), LAYOUTS)}"
        ) from None
