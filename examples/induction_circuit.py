"""Find the induction circuit of the bundled toy model by activation patching.

Run: python examples/induction_circuit.py   (about 10 s on 2 CPU cores)

The toy model (patchspec.toy) is a 2-layer transformer trained on repeated random words. Induction
needs two heads: a previous-token head (layer 0) writes "my previous token was X" at every position,
and an induction head (layer 1) at the last position looks for the position whose previous token is
the current token and copies what it finds. We corrupt the prompt by replacing the first occurrence
of the query word, which breaks that link, and patch clean activations back in.
"""

from __future__ import annotations

import patchspec as ps
from patchspec import catalog
from patchspec.toy import detected_heads, induction_prompts, toy_model

model = toy_model()
prompts = induction_prompts(n=8, length=8, seed=3, corruption="query")
metric = ps.metrics.logprob(prompts.answer, reduce="none")  # one value per prompt -> `example` dim

heads = catalog.HEAD_OUT.run(model, prompts.clean, prompts.corrupted, metric, progress=False)
recovery = heads.patch.normalized()  # denoising: attrs["formula"] is (patched - corrupted) / (clean - corrupted)
mean = recovery.mean("example")
low_high = recovery.patch.bootstrap_ci(n_resamples=500)
print("fraction of the clean log-probability restored by patching each head (mean over 8 prompts):")
print(mean.to_pandas().round(2))

prev_head = int(mean.sel(layer=0).argmax("head"))
induction_head = int(mean.sel(layer=1).argmax("head"))
print(f"\nprevious-token head: layer 0 head {prev_head}; induction head: layer 1 head {induction_head}")
print(
    "95% bootstrap interval of the induction head's recovery:",
    low_high.sel(layer=1, head=induction_head).values.round(2),
)

scores = detected_heads(model)
print("TransformerLens head detector, previous-token scores in layer 0:", scores["previous_token_head"][0].numpy().round(2))
print("TransformerLens head detector, induction scores in layer 1:     ", scores["induction_head"][1].numpy().round(2))
assert prev_head == int(scores["previous_token_head"][0].argmax()), "patching and the detector disagree"

# Where does the previous-token head matter? At the answer's first occurrence, one prompt at a time.
by_pos = catalog.HEAD_OUT_BY_POS.sel(layer=0, head=prev_head).run(
    model, prompts.clean[0], prompts.corrupted[0], ps.metrics.logprob(prompts.answer[0]), progress=False
)
best = by_pos.patch.normalized().patch.top(1, absolute=False)
print(f"\nprompt 0: {prompts.clean[0]!r}")
print(f"the previous-token head matters at pos {int(best['pos'][0])} ({str(best['pos_token'][0].values)!r})")
