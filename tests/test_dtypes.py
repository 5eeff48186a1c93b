"""Half precision: both engines agree and match TransformerLens in float16 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl

import patchspec.compat as compat
from patchspec import catalog, metrics
from patchspec.tiny import tiny_model
from tests.models import VOCAB, prompts


@pytest.mark.parametrize("architecture", ["gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(tmp_path, dtype, architecture):
    """Batched == reference exactly-as-computed, both match TransformerLens, values are finite."""
    model = tiny_model(VOCAB, tmp_path, architecture=architecture, dtype=dtype, device="cpu")
    assert next(model.parameters()).dtype == dtype
    clean, corrupted = prompts()
    metric = metrics.logit_diff(5, 7)
    spec = catalog.HEAD_OUT_BY_POS
    batched = spec.run(model, clean, corrupted, metric, engine="batched", progress=False)
    reference = spec.run(model, clean, corrupted, metric, engine="reference", progress=False)
    assert torch.isfinite(torch.tensor(batched.values)).all()
    torch.testing.assert_close(torch.tensor(batched.values), torch.tensor(reference.values), rtol=2e-2, atol=2e-2)

    _, cache = model.run_with_cache(clean)

    def tl_metric(logits):
        return (logits[:, -1, 5].float() - logits[:, -1, 7].float()).mean()

    expected = tl.get_act_patch_resid_pre(model, corrupted, cache, tl_metric)
    got = compat.get_act_patch_resid_pre(model, corrupted, cache, tl_metric, progress=False)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
