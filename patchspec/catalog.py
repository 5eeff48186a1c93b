"""The standard specs: every TransformerLens ``get_act_patch_*`` function as one line of data.

:data:`TABLE` pairs each spec with the TransformerLens function it replaces, the activation
name and index axes TransformerLens uses, and its patch setter; the drop-in functions in
:mod:`patchspec.compat` and their docstrings are generated from it.
"""

from __future__ import annotations

import attrs

from patchspec.spec import PatchSpec, Sweep

# fmt: off
RESID_PRE             = PatchSpec("resid_pre",   axes=("layer", "pos"),                          name="resid_pre")
RESID_MID             = PatchSpec("resid_mid",   axes=("layer", "pos"),                          name="resid_mid")
RESID_POST            = PatchSpec("resid_post",  axes=("layer", "pos"),                          name="resid_post")
ATTN_OUT              = PatchSpec("attn_out",    axes=("layer", "pos"),                          name="attn_out")
MLP_OUT               = PatchSpec("mlp_out",     axes=("layer", "pos"),                          name="mlp_out")
HEAD_OUT_BY_POS       = PatchSpec("z",           axes=("layer", "pos", "head"),                  name="head_out_by_pos")
HEAD_Q_BY_POS         = PatchSpec("q",           axes=("layer", "pos", "head"),                  name="head_q_by_pos")
HEAD_K_BY_POS         = PatchSpec("k",           axes=("layer", "pos", "kv_head"),               name="head_k_by_pos")
HEAD_V_BY_POS         = PatchSpec("v",           axes=("layer", "pos", "kv_head"),               name="head_v_by_pos")
HEAD_PATTERN_BY_DEST  = PatchSpec("pattern",     axes=("layer", "head", "dest_pos"),             name="head_pattern_by_dest")
HEAD_PATTERN_DEST_SRC = PatchSpec("pattern",     axes=("layer", "head", "dest_pos", "src_pos"),  name="head_pattern_dest_src")
HEAD_OUT              = PatchSpec("z",           axes=("layer", "head"),                         name="head_out")
HEAD_Q                = PatchSpec("q",           axes=("layer", "head"),                         name="head_q")
HEAD_K                = PatchSpec("k",           axes=("layer", "kv_head"),                      name="head_k")
HEAD_V                = PatchSpec("v",           axes=("layer", "kv_head"),                      name="head_v")
HEAD_PATTERN          = PatchSpec("pattern",     axes=("layer", "head"),                         name="head_pattern")
MLP_NEURON_POST       = PatchSpec("post",        axes=("layer", "neuron"),                       name="mlp_neuron_post")
MLP_NEURON_PRE        = PatchSpec("pre",         axes=("layer", "neuron"),                       name="mlp_neuron_pre")

BLOCK_EVERY           = Sweep(RESID_PRE, ATTN_OUT, MLP_OUT)
HEAD_ALL_POS_EVERY    = Sweep(HEAD_OUT, HEAD_Q, HEAD_K, HEAD_V, HEAD_PATTERN)
HEAD_BY_POS_EVERY     = Sweep(HEAD_OUT_BY_POS, HEAD_Q_BY_POS, HEAD_K_BY_POS, HEAD_V_BY_POS, HEAD_PATTERN_BY_DEST)
# fmt: on


@attrs.frozen
class Entry:
    """One catalogue spec beside the TransformerLens function it replaces.

    Attributes:
        spec: The patchspec spec.
        tl_function: Name of the ``transformer_lens.patching`` function.
        tl_activation: The ``activation_name`` TransformerLens passes to ``get_act_name``.
        tl_axes: TransformerLens's ``index_axis_names`` (its order is the output's axis order).
        tl_setter: Name of TransformerLens's patch setter for it.
        what: What is patched, for generated docstrings.
    """

    spec: PatchSpec
    tl_function: str
    tl_activation: str
    tl_axes: tuple[str, ...]
    tl_setter: str
    what: str


# fmt: off
TABLE: tuple[Entry, ...] = (
    Entry(RESID_PRE,             "get_act_patch_resid_pre",                      "resid_pre", ("layer", "pos"),                             "layer_pos_patch_setter",                      "the residual stream at the start of each block, by position"),
    Entry(RESID_MID,             "get_act_patch_resid_mid",                      "resid_mid", ("layer", "pos"),                             "layer_pos_patch_setter",                      "the residual stream between attention and MLP, by position"),
    Entry(ATTN_OUT,              "get_act_patch_attn_out",                       "attn_out",  ("layer", "pos"),                             "layer_pos_patch_setter",                      "the output of each attention layer, by position"),
    Entry(MLP_OUT,               "get_act_patch_mlp_out",                        "mlp_out",   ("layer", "pos"),                             "layer_pos_patch_setter",                      "the output of each MLP layer, by position"),
    Entry(HEAD_OUT_BY_POS,       "get_act_patch_attn_head_out_by_pos",           "z",         ("layer", "pos", "head"),                     "layer_pos_head_vector_patch_setter",          "the output (z) of each attention head, by position"),
    Entry(HEAD_Q_BY_POS,         "get_act_patch_attn_head_q_by_pos",             "q",         ("layer", "pos", "head"),                     "layer_pos_head_vector_patch_setter",          "the query of each attention head, by position"),
    Entry(HEAD_K_BY_POS,         "get_act_patch_attn_head_k_by_pos",             "k",         ("layer", "pos", "head"),                     "layer_pos_head_vector_patch_setter",          "the key of each key/value head, by position"),
    Entry(HEAD_V_BY_POS,         "get_act_patch_attn_head_v_by_pos",             "v",         ("layer", "pos", "head"),                     "layer_pos_head_vector_patch_setter",          "the value of each key/value head, by position"),
    Entry(HEAD_PATTERN_BY_DEST,  "get_act_patch_attn_head_pattern_by_pos",       "pattern",   ("layer", "head_index", "dest_pos"),          "layer_head_pos_pattern_patch_setter",         "the attention pattern of each head, by destination position"),
    Entry(HEAD_PATTERN_DEST_SRC, "get_act_patch_attn_head_pattern_dest_src_pos", "pattern",   ("layer", "head_index", "dest_pos", "src_pos"), "layer_head_dest_src_pos_pattern_patch_setter", "each (destination, source) entry of each head's attention pattern"),
    Entry(HEAD_OUT,              "get_act_patch_attn_head_out_all_pos",          "z",         ("layer", "head"),                            "layer_head_vector_patch_setter",              "the output (z) of each attention head, at all positions"),
    Entry(HEAD_Q,                "get_act_patch_attn_head_q_all_pos",            "q",         ("layer", "head"),                            "layer_head_vector_patch_setter",              "the query of each attention head, at all positions"),
    Entry(HEAD_K,                "get_act_patch_attn_head_k_all_pos",            "k",         ("layer", "head"),                            "layer_head_vector_patch_setter",              "the key of each key/value head, at all positions"),
    Entry(HEAD_V,                "get_act_patch_attn_head_v_all_pos",            "v",         ("layer", "head"),                            "layer_head_vector_patch_setter",              "the value of each key/value head, at all positions"),
    Entry(HEAD_PATTERN,          "get_act_patch_attn_head_pattern_all_pos",      "pattern",   ("layer", "head_index"),                      "layer_head_pattern_patch_setter",             "the whole attention pattern of each head"),
)
# fmt: on


@attrs.frozen
class Stack:
    """A TransformerLens ``*_every`` helper: several catalogue entries stacked on ``patch_type``.

    Attributes:
        sweep: The labelled equivalent.
        tl_function: Name of the ``transformer_lens.patching`` function.
        entries: The stacked entries' TransformerLens functions, in ``patch_type`` order.
        tl_axes: The stacked output's axes.
        what: What is patched, for generated docstrings.
        type_names: TransformerLens's ``patch_type_names`` for it.
    """

    sweep: Sweep
    tl_function: str
    entries: tuple[str, ...]
    tl_axes: tuple[str, ...]
    what: str
    type_names: tuple[str, ...] = ()


STACKS: tuple[Stack, ...] = (
    Stack(BLOCK_EVERY, "get_act_patch_block_every", ("get_act_patch_resid_pre", "get_act_patch_attn_out", "get_act_patch_mlp_out"), ("patch_type", "layer", "pos"), "the residual stream, attention output and MLP output of every block, by position", ("resid_pre", "attn_out", "mlp_out")),
    Stack(HEAD_ALL_POS_EVERY, "get_act_patch_attn_head_all_pos_every", ("get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_pattern_all_pos"), ("patch_type", "layer", "head"), "every head's output, query, key, value and pattern, at all positions", ("out", "q", "k", "v", "pattern")),
    Stack(HEAD_BY_POS_EVERY, "get_act_patch_attn_head_by_pos_every", ("get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_by_pos"), ("patch_type", "layer", "pos", "head"), "every head's output, query, key, value and pattern, by position", ("out", "q", "k", "v", "pattern")),
)

SPECS: dict[str, PatchSpec] = {
    name: value for name, value in globals().items() if isinstance(value, PatchSpec) and name.isupper()
}
SWEEPS: dict[str, Sweep] = {
    name: value for name, value in globals().items() if isinstance(value, Sweep) and name.isupper()
}


# --- path patching (patchspec.paths; issue 12) ----------------------------------------------------
from patchspec.paths.spec import PathSpec  # noqa: E402  (the path specs build on the ones above)

# fmt: off
PATH_HEAD_TO_HEAD_Q   = PathSpec(sender=HEAD_OUT, receiver="q",      name="path_head_to_head_q")
PATH_HEAD_TO_HEAD_K   = PathSpec(sender=HEAD_OUT, receiver="k",      name="path_head_to_head_k")
PATH_HEAD_TO_HEAD_V   = PathSpec(sender=HEAD_OUT, receiver="v",      name="path_head_to_head_v")
PATH_HEAD_TO_LOGITS   = PathSpec(sender=HEAD_OUT, receiver="logits", name="path_head_to_logits")
# fmt: on

#: The standard path specs by name (``PATH_HEAD_TO_HEAD_Q`` ... ``PATH_HEAD_TO_LOGITS``);
#: ``compat.get_act_patch_direct_path*`` are the first three's TransformerLens twins.
PATHS: dict[str, PathSpec] = {k: v for k, v in globals().items() if isinstance(v, PathSpec)}
