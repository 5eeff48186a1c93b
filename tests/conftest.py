"""Shared fixtures: tiny multi-head and grouped-query models, prompts and a metric."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from tests.models import build, prompts

torch.set_num_threads(1)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer, 4-head GPT-2 bridge with a word-level tokenizer."""
    return build("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer Qwen2 bridge with 4 query heads and 2 key/value heads (grouped-query, rotary)."""
    return build("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session", params=["gpt2", "qwen2"])
def model(request: pytest.FixtureRequest):
    """Each tiny model in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted tokens, 2 prompts of 6 tokens."""
    return prompts()


def logit_diff_metric(logits: torch.Tensor) -> torch.Tensor:
    """A scalar metric: mean logit difference of two fixed tokens at the last position."""
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def per_example_metric(logits: torch.Tensor) -> torch.Tensor:
    """The same metric per prompt."""
    return logits[:, -1, 5] - logits[:, -1, 7]
