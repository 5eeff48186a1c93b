"""Labelled results: cell values -> ``xarray.DataArray`` with real coordinates.

Dims are exactly the swept axes (plus ``example`` for per-prompt metrics); layer, head and
position coordinates are integers; every position dim gets the token strings beside it as a
``<dim>_token`` coordinate; the metric, baselines and provenance ride in ``attrs``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import torch
import xarray as xr

from patchspec.accessor import BASELINE_KEYS  # re-exported: defined where no torch is needed
from patchspec.errors import SpecError
from patchspec.layouts import POSITION_DIMS
from patchspec.plan.grid import Grid, check_labels


@functools.cache
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


def named_token_labels(
    model: Any, tokens: torch.Tensor, index: Mapping[str, Sequence[int]]
) -> dict[str, str]:
    """One label per named position: the tokens at each prompt's own index, joined by ``|``."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return {
        name: token_labels(model, tokens[rows, torch.as_tensor(list(at), device=tokens.device)][:, None])[0]
        for name, at in index.items()
    }


def to_dataarray(
    plan: Grid,
    values: torch.Tensor,
    *,
    name: str,
    labels: Sequence[str] | None,
    attrs: Mapping[str, Any],
    prompts: Mapping[str, Sequence[str]] | None = None,
    metrics: Sequence[str] | None = None,
) -> xr.DataArray:
    """Lay the per-cell ``values`` (``[cells]`` or ``[cells, example]``) out over the grid's dims.

    With an ``example`` dim, per-example baselines in ``attrs`` (``clean_baseline``,
    ``corrupted_baseline``) are also laid along it as coordinates, so they follow ``sel`` and
    broadcast in arithmetic, and ``prompts`` (e.g. ``{"clean_prompt": [...]}``) become text
    coordinates along it.

    With ``metrics`` (several metrics evaluated on the same passes), ``values`` are ``[cells,
    metric]`` or ``[cells, metric, example]``: the result gets a ``metric`` dim whose
    coordinates are these names, and the baselines are laid along ``metric`` (and ``example``).
    """
    data = values.detach().float().cpu().numpy().astype(np.float64)
    lead: tuple[str, ...] = () if metrics is None else ("metric",)
    extra: tuple[str, ...] = (*lead, "example") if data.ndim == 2 + len(lead) else lead
    dims = (*plan.dims, *extra)
    labelled = {**plan.coords, **({"metric": tuple(metrics)} if metrics is not None else {})}
    check_labels(dims, {d: labelled.get(d, ()) for d in dims}, f"the result of {name!r}")
    if data.shape[0] != math.prod(plan.shape):
        raise SpecError(
            f"the result of {name!r} got values for {data.shape[0]} cells; its grid has "
            f"{math.prod(plan.shape)} ({dict(zip(plan.dims, plan.shape, strict=True))})"
        )
    data = data.reshape(plan.shape + data.shape[1:])
    coords: dict[str, Any] = {dim: list(plan.coords[dim]) for dim in plan.dims}
    if metrics is not None:
        coords["metric"] = list(metrics)
        for key in BASELINE_KEYS:
            value = np.asarray(attrs.get(key, ()), dtype=np.float64)
            if value.shape == data.shape[len(plan.shape) :]:
                coords[key] = (extra, value)
    if "example" in extra:
        n = data.shape[-1]
        coords["example"] = list(range(n))
        for key in BASELINE_KEYS:
            listed = attrs.get(key)
            if not lead and isinstance(listed, list | tuple) and len(listed) == n:
                coords[key] = ("example", [float(v) for v in listed])
        for key, texts in (prompts or {}).items():
            if len(texts) == n:
                coords[key] = ("example", list(texts))
    if labels is not None:
        for dim in plan.dims:
            if is_position_dim(dim) and all(isinstance(p, int) for p in plan.coords[dim]):
                coords[f"{dim}_token"] = (dim, [labels[p] for p in plan.coords[dim]])
    named = plan.positions.labels if plan.positions is not None else {}
    for dim in plan.dims:
        if is_position_dim(dim) and named and all(p in named for p in plan.coords[dim]):
            coords[f"{dim}_token"] = (dim, [named[p] for p in plan.coords[dim]])
    # Dim coordinates are lists; a (dims, values) pair under a dim's name would replace them.
    shadowed = [key for key, value in coords.items() if key in dims and isinstance(value, tuple)]
    if shadowed:
        raise SpecError(
            f"the result of {name!r} has a coordinate named like its dim {shadowed[0]!r}; "
            "rename the axis"
        )
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=dict(attrs))


def provenance(adapter: Any, *tokens: torch.Tensor | None, full_hash: bool = False) -> dict[str, str]:
    """Model name and fingerprint (and full weights hash if asked), hashes of the ``tokens``,
    and library versions.

    Args:
        adapter: The :class:`~patchspec.model.ModelAdapter`.
        *tokens: Token tensors to hash (``None`` counts as absent).
        full_hash: Also record a SHA-256 of every weight (see :func:`weights_hash`).
    """
    out = dict(adapter.fingerprint(full=full_hash))
    if tokens:
        out["tokens_sha256"] = tokens_hash(*tokens)
    out["patchspec_version"] = package_version("patchspec")
    out["transformer_lens_version"] = package_version("transformer-lens")
    return out


def _hash_tensor(hasher: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1).contiguous()
    hasher.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
    hasher.update(flat.view(torch.uint8).cpu().numpy().data)


def weights_hash(model: Any) -> str:
    """SHA-256 of a model's parameters (names, shapes, dtypes and bytes).

    Reads every byte; :meth:`patchspec.model.ModelAdapter.weights_hash` keeps the value until
    a parameter changes.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> weights_hash(m) == weights_hash(m), len(weights_hash(m))
        (True, 64)
    """
    hasher = hashlib.sha256()
    for name, p in model.named_parameters():
        hasher.update(name.encode())
        _hash_tensor(hasher, p)
    return hasher.hexdigest()


def tokens_hash(*tokens: torch.Tensor | None) -> str:
    """SHA-256 of token tensors (shapes and int64 ids, in order; ``None`` counts as absent).

    Example:
        >>> t = torch.tensor([[0, 5, 7]])
        >>> tokens_hash(t, t) == tokens_hash(t.clone(), t.clone()), tokens_hash(t) == tokens_hash(t, t)
        (True, False)
    """
    hasher = hashlib.sha256()
    for t in tokens:
        if t is None:
            hasher.update(b"none;")
        else:
            _hash_tensor(hasher, t.long())
    return hasher.hexdigest()
