"""Labelled analysis of a patching sweep: per-prompt results, statistics, save/load and a heatmap.

Builds a tiny random GPT-2 (2 layers, word-level vocabulary) in a temporary folder, so it runs
anywhere in a few seconds without downloading anything; swap in any TransformerLens model::

    python examples/labelled_analysis.py [output-folder]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import patchspec
from patchspec import catalog, metrics
from patchspec.tiny import tiny_model

WORDS = ["<bos>", "<pad>", "<unk>", "Mary", "John", "Alice", "Bob", "went", "to", "the", "shop",
         "park", "and", "gave", "a", "drink", "book"]  # fmt: skip


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_model(WORDS, out / "model")
    clean = [
        "Mary and John went to the shop and John gave a drink to",
        "Alice and Bob went to the park and Bob gave a book to",
        "John and Mary went to the park and Mary gave a book to",
        "Bob and Alice went to the shop and Alice gave a drink to",
    ]
    corrupted = [
        "Mary and John went to the shop and Mary gave a drink to",
        "Alice and Bob went to the park and Alice gave a book to",
        "John and Mary went to the park and John gave a book to",
        "Bob and Alice went to the shop and Bob gave a drink to",
    ]
    # One logit difference per prompt (reduce="none") gives the result an `example` dim.
    metric = metrics.logit_diff(
        answer=["Mary", "Alice", "John", "Bob"],
        wrong=["John", "Bob", "Mary", "Alice"],
        reduce="none",
    )
    result = catalog.RESID_PRE.run(model, clean, corrupted, metric)
    print(result.sizes, "baselines per prompt:", result["clean_baseline"].values.round(3))

    recovery = result.patch.normalized()  # 0: the patch did nothing, 1: clean behaviour back
    summary = recovery.mean("example").to_dataframe().reset_index()
    print(summary.head())

    ci = recovery.patch.bootstrap_ci(n_resamples=500, seed=0)  # a `bound` dim: low / high
    pvalue = result.patch.permutation_pvalue()  # exact sign-flip test, BH-corrected over cells
    print("most important cells:\n", recovery.patch.top(3).to_dataframe())
    print("95% interval at layer 1, last position:", ci.sel(layer=1).isel(pos=-1).values.round(3))
    print("p-values at layer 1:", pvalue.sel(layer=1).values.round(3))

    path = patchspec.save(result, out / "resid_pre.nc")
    loaded = patchspec.load(path)
    assert loaded.identical(result)
    rebuilt = patchspec.PatchSpec.from_dict(loaded.attrs["spec"])
    print(
        "saved to", path, "- spec", rebuilt, "- weights", loaded.attrs["model_fingerprint"][:12]
    )

    figure = recovery.patch.plot(out / "resid_pre.png", title="recovery per layer and token")
    print("heatmap:", out / "resid_pre.png", f"({len(figure.axes)} axes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="patchspec-")))
