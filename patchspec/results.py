"""Labelled results: cell values -> ``xarray.DataArray`` with real coordinates.

Dims are exactly the swept axes (plus ``example`` for per-prompt metrics); layer, head and
position coordinates are integers; every position dim gets the token strings beside it as a
``<dim>_token`` coordinate; the metric, baselines and provenance ride in ``attrs``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import torch
import xarray as xr

from patchspec.plan import Plan

POSITION_DIMS = ("pos", "dest_pos", "src_pos")


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``"unknown"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def is_position_dim(dim: str) -> bool:
    """Whether ``dim`` indexes token positions (``pos``, ``dest_pos``, ``src_pos_2`` ...)."""
    return re.sub(r"_\d+$", "", dim) in POSITION_DIMS


def token_labels(model: Any, tokens: torch.Tensor) -> list[str]:
    """One label per position: the token string (ids when the tokenizer knows no strings).

    Where prompts differ at a position, the distinct tokens are joined with ``|``.
    """
    tokenizer = getattr(model, "tokenizer", None)

    def label(token_id: int) -> str:
        if tokenizer is not None:
            try:
                text = tokenizer.decode([token_id])
            except Exception:
                text = ""
            if text:
                return text
        return str(token_id)

    columns = tokens.detach().cpu().T.tolist()
    labels = []
    for column in columns:
        distinct = list(dict.fromkeys(label(t) for t in column))
        labels.append("|".join(distinct))
    return labels


def to_dataarray(
    plan: Plan,
    values: torch.Tensor,
    *,
    name: str,
    labels: Sequence[str] | None,
    attrs: Mapping[str, Any],
) -> xr.DataArray:
    """Lay the per-cell ``values`` (``[cells]`` or ``[cells, example]``) out over the plan's dims."""
    data = values.detach().float().cpu().numpy().astype(np.float64)
    extra: tuple[str, ...] = ("example",) if data.ndim == 2 else ()
    data = data.reshape(plan.shape + data.shape[1:])
    coords: dict[str, Any] = {dim: list(plan.coords[dim]) for dim in plan.dims}
    if extra:
        coords["example"] = list(range(data.shape[-1]))
    if labels is not None:
        for dim in plan.dims:
            if is_position_dim(dim) and all(isinstance(p, int) for p in plan.coords[dim]):
                coords[f"{dim}_token"] = (dim, [labels[p] for p in plan.coords[dim]])
    return xr.DataArray(data, dims=(*plan.dims, *extra), coords=coords, name=name, attrs=dict(attrs))


def provenance(model: Any) -> dict[str, str]:
    """Model name and library versions for a result's attrs."""
    return {
        "model": str(getattr(model.cfg, "model_name", None) or type(model).__name__),
        "patchspec_version": package_version("patchspec"),
        "transformer_lens_version": package_version("transformer-lens"),
    }
