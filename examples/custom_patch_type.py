"""Custom patch types: ablation sources, named positions per prompt, neurons and a custom rule.

Builds a tiny random GPT-2 (2 layers, word-level vocabulary) in a temporary folder, so it runs
anywhere in a few seconds without downloading anything; swap in any TransformerLens model::

    python examples/custom_patch_type.py

See docs/custom_patch_types.md for the concepts.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

import patchspec  # noqa: F401  (registers the .patch accessor)
from patchspec import Corrupted, Gaussian, Mean, PatchSpec, Resample, Zero, catalog, metrics
from patchspec.tiny import tiny_model

WORDS = ["<bos>", "<pad>", "<unk>", "Mary", "John", "Alice", "Bob", "went", "to", "the", "big",
         "shop", "park", "and", "then", "gave", "a", "drink", "book"]  # fmt: skip

# IOI-style prompts of different lengths: the names sit at different token indices.
CLEAN = [
    "Mary and John went to the shop and John gave a drink to",
    "Alice and Bob went to the big park and then Bob gave a book to",
    "John and Mary went to the park and then Mary gave a book to",
]
CORRUPTED = [
    "Mary and John went to the shop and Mary gave a drink to",
    "Alice and Bob went to the big park and then Alice gave a book to",
    "John and Mary went to the park and then John gave a book to",
]
#: One token index per prompt (BOS is index 0); -1 is each prompt's own last token.
POSITIONS = {"IO": [1, 1, 1], "S1": [3, 3, 3], "S2": [9, 11, 10], "END": -1}


def head_and_previous(cell: dict) -> dict:
    """A custom rule: head ``head`` at the named position and at the token before it."""
    return {"layer": cell["layer"], "head": cell["head"], "pos": (cell["pos"], f"{cell['pos']}-1")}


def main() -> None:
    torch.set_num_threads(1)
    model = tiny_model(WORDS, Path(tempfile.mkdtemp()))
    # Prompts are right-padded, so the metric reads each prompt's own last token.
    ends = [len(model.to_tokens(p)[0]) - 1 for p in CORRUPTED]
    metric = metrics.logit_diff(
        answer=["Mary", "Alice", "John"], wrong=["John", "Bob", "Mary"], pos=ends, reduce="none"
    )
    run = {"positions": POSITIONS, "progress": False}

    # 1. Denoising by named position: the result's pos dim is labelled IO, S1, S2, END.
    resid = catalog.RESID_PRE.run(model, CLEAN, CORRUPTED, metric, **run)
    print("resid_pre by named position (mean over prompts):")
    print(resid.mean("example").to_pandas().round(3), end="\n\n")

    # 2. Ablations of each head at END, in the clean run, compared along a `source` dim.
    heads = catalog.HEAD_OUT.sel(pos="END")
    sources = (Corrupted(), Zero(), Mean(), Resample(seed=0), Gaussian(scale=1.0, relative=True))
    ablations = heads.over_sources(*sources).run(model, CLEAN, CORRUPTED, metric, **run)
    drop = (ablations - ablations["clean_baseline"]).mean("example")  # per-prompt baselines
    print("change in the logit difference when a layer-1 head is ablated at END:")
    print(drop.sel(layer=1).to_pandas().round(3), end="\n\n")

    # 3. MLP neurons by layer, and a custom rule: a head at S2 and the token before it.
    neurons = PatchSpec("post", axes=("layer", "neuron")).sel(neuron=slice(0, 8), pos="S2")
    top = neurons.run(model, CLEAN, CORRUPTED, metric, **run).patch.top(3)  # ranked by effect
    cells = zip(
        top.layer.values.tolist(),
        top.neuron.values.tolist(),
        top.values.round(3).tolist(),
        strict=True,
    )
    print("most restoring MLP neurons at S2 (layer, neuron, value):", list(cells))
    positions = {**POSITIONS, "S2-1": [i - 1 for i in POSITIONS["S2"]]}
    pairs = PatchSpec("z", axes=("layer", "head", "pos"), rule=head_and_previous).sel(pos="S2")
    paired = pairs.run(model, CLEAN, CORRUPTED, metric, positions=positions, progress=False)
    print("head at S2 and S2-1:", paired.mean("example").squeeze("pos").values.round(3).tolist())

    # 4. Every spec without a custom rule is plain data.
    print("\nspec as JSON:", json.dumps(heads.over_sources(*sources).to_dict()))


if __name__ == "__main__":
    main()
