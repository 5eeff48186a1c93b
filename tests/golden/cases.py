"""The golden cases: shared by ``make_golden.py`` (which writes the goldens) and
``tests/test_golden.py`` (which recomputes them with the current code).

Every case uses only the public API (``import patchspec as ps``). A case's result (a DataArray
or, for a :class:`~patchspec.Sweep`, a Dataset) is turned by :func:`encode` into a Dataset whose
variable and dim names are prefixed with the case name, so that all cases of one model fit in
one netCDF file (``golden_<model>.nc``) written with :func:`patchspec.save`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

import patchspec as ps
from tests.models import prompts

GOLDEN_DIR = Path(__file__).resolve().parent
MODELS = ("gpt2", "qwen2")
ENGINES = ("batched", "reference")
#: Separates the case name from a variable or dim name in the golden files.
SEP = "__"
#: Result attrs compared exactly (besides the baselines, compared to a tolerance). Provenance
#: (hashes, versions, model name) and ``engine`` are deliberately left out.
SEMANTIC_ATTRS = ("spec", "spec_name", "activation", "source", "sources", "metric", "positions")
BASELINE_ATTRS = ("clean_baseline", "corrupted_baseline")


def golden_path(model_name: str) -> Path:
    """The golden file of one model."""
    return GOLDEN_DIR / f"golden_{model_name}.nc"


def default_prompts() -> tuple[Any, Any]:
    """Clean and corrupted tokens: 2 prompts of 6 tokens (seed 1)."""
    return prompts(n=2, length=6, seed=1)


def text_prompts() -> tuple[list[str], list[str]]:
    """Text prompts of different lengths (padded on the right by patchspec)."""
    clean = ["w1 w2 w3 w4 w5", "w6 w7 w8"]
    corrupted = ["w9 w10 w11 w12 w13", "w14 w15 w16"]
    return clean, corrupted


@dataclass(frozen=True)
class Case:
    """One golden case.

    Attributes:
        name: Stable name (the prefix of its variables in the golden files).
        target: A spec (``PatchSpec``/``JointSpec``) or a ``Sweep``.
        metric: Builds the metric argument (a fresh metric object per run).
        metric_desc: How the metric is built, for the manifest.
        inputs: Builds ``(clean, corrupted)``.
        kwargs: Extra keyword arguments of ``run`` (``positions``, ``reference``), for both
            engines; built lazily by a callable.
        batched_options: Options passed only with ``engine="batched"``.
        note: What the case guards.
        models: The models the case runs on.
    """

    name: str
    target: Any
    metric: Callable[[], Any]
    metric_desc: str
    inputs: Callable[[], tuple[Any, Any]] = default_prompts
    kwargs: Callable[[], dict[str, Any]] = dict
    kwargs_desc: dict[str, Any] = field(default_factory=dict)
    batched_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    models: tuple[str, ...] = MODELS

    def run(self, model: Any, engine: str) -> xr.DataArray | xr.Dataset:
        """Run the case on ``model`` with ``engine``."""
        clean, corrupted = self.inputs()
        options = dict(self.kwargs())
        if engine == "batched":
            options.update(self.batched_options)
        return self.target.run(
            model, clean, corrupted, self.metric(), engine=engine, progress=False, **options
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description for the manifest."""
        target = self.target
        if isinstance(target, ps.Sweep):
            spec: Any = {"sweep": [_spec_dict(s) for s in target.specs], "name": target.name}
        else:
            spec = _spec_dict(target)
        return {
            "kind": type(target).__name__,
            "spec": spec,
            "repr": repr(target),
            "metric": self.metric_desc,
            "inputs": self.inputs.__name__,
            "run_kwargs": self.kwargs_desc,
            "batched_options": self.batched_options,
            "note": self.note,
            "models": list(self.models),
        }


def _spec_dict(spec: Any) -> Any:
    try:
        return spec.to_dict()
    except ps.SpecError:
        return repr(spec)


def _logit_diff() -> Any:
    return ps.metrics.logit_diff(5, 7)


LOGIT_DIFF = "ps.metrics.logit_diff(5, 7)"
POSITIONS_DESC = {"positions": {"A": [2, 3], "END": -1}}


def _positions() -> dict[str, Any]:
    return {"positions": {"A": [2, 3], "END": -1}}


def _reference() -> dict[str, Any]:
    return {"reference": prompts(n=3, length=6, seed=2)[0]}


def _text_positions() -> dict[str, Any]:
    return {"positions": {"FIRST": 1, "END": -1}}


def _cases() -> list[Case]:
    c = ps.catalog
    cases = [
        Case(f"spec_{name.lower()}", spec, _logit_diff, LOGIT_DIFF, note=f"catalog.{name}")
        for name, spec in sorted(c.SPECS.items())
    ]
    cases += [
        Case(
            "per_example",
            c.HEAD_OUT,
            lambda: ps.metrics.logit_diff(5, 7, reduce="none"),
            "ps.metrics.logit_diff(5, 7, reduce='none')",
            note="per-example metric: an example dim and per-example baseline coords",
        ),
        Case(
            "multi_metric",
            c.RESID_PRE,
            lambda: [
                ps.metrics.logit_diff(5, 7),
                ps.metrics.kl_to_clean(),
                ps.metrics.prob(4, pos=1),
            ],
            "[ps.metrics.logit_diff(5, 7), ps.metrics.kl_to_clean(), ps.metrics.prob(4, pos=1)]",
            note="a list of metrics: a metric dim",
        ),
        Case(
            "multi_metric_per_example",
            c.HEAD_OUT.sel(layer=1),
            lambda: [
                ps.metrics.logit_diff(5, 7, reduce="none"),
                ps.metrics.logprob(3, reduce="none"),
            ],
            "[ps.metrics.logit_diff(5, 7, reduce='none'), ps.metrics.logprob(3, reduce='none')]",
            note="several per-example metrics: metric and example dims",
        ),
        Case(
            "noising_resid_pre",
            c.RESID_PRE.using(ps.Corrupted()),
            _logit_diff,
            LOGIT_DIFF,
            note="noising: Corrupted() patches the clean run",
        ),
        Case(
            "noising_head_out_by_pos",
            c.HEAD_OUT_BY_POS.using(ps.Corrupted()),
            _logit_diff,
            LOGIT_DIFF,
            note="noising, by position and head",
        ),
        Case("zero_head_out", c.HEAD_OUT.using(ps.Zero()), _logit_diff, LOGIT_DIFF),
        Case(
            "zero_corrupted_head_out",
            c.HEAD_OUT.using(ps.Zero(receiver="corrupted")),
            _logit_diff,
            LOGIT_DIFF,
            note="zero ablation inside the corrupted run",
        ),
        Case("mean_head_out", c.HEAD_OUT.using(ps.Mean()), _logit_diff, LOGIT_DIFF),
        Case(
            "mean_reference_mlp_out",
            c.MLP_OUT.using(ps.Mean(over="reference")),
            _logit_diff,
            LOGIT_DIFF,
            kwargs=_reference,
            kwargs_desc={"reference": "prompts(n=3, length=6, seed=2)[0]"},
            note="mean over a reference dataset",
        ),
        Case("resample_head_out", c.HEAD_OUT.using(ps.Resample()), _logit_diff, LOGIT_DIFF),
        Case(
            "resample_donor_resid_pre",
            c.RESID_PRE.using(ps.Resample(seed=3, donor="corrupted")),
            _logit_diff,
            LOGIT_DIFF,
        ),
        Case(
            "gaussian_head_out",
            c.HEAD_OUT.using(ps.Gaussian(scale=0.5)),
            _logit_diff,
            LOGIT_DIFF,
        ),
        Case(
            "gaussian_relative_resid_post",
            c.RESID_POST.using(ps.Gaussian(scale=0.5, seed=2, relative=True)),
            _logit_diff,
            LOGIT_DIFF,
        ),
        Case(
            "sources_swept_clean_receiver",
            c.HEAD_OUT.over_sources(
                ps.Corrupted(), ps.Zero(), ps.Mean(), ps.Resample(), ps.Gaussian(scale=0.5)
            ),
            _logit_diff,
            LOGIT_DIFF,
            note="a swept source axis; every source patches the clean run",
        ),
        Case(
            "sources_swept_corrupted_receiver",
            c.RESID_PRE.over_sources(ps.Clean(), ps.Zero(receiver="corrupted")),
            _logit_diff,
            LOGIT_DIFF,
            note="a swept source axis; every source patches the corrupted run",
        ),
        Case(
            "joint_head_out_mlp_out",
            c.HEAD_OUT.sel(layer=0) & c.MLP_OUT.sel(layer=1),
            _logit_diff,
            LOGIT_DIFF,
            note="JointSpec of two different specs",
        ),
        Case(
            "joint_shared_axes",
            c.HEAD_OUT & c.HEAD_OUT.sel(layer=1),
            _logit_diff,
            LOGIT_DIFF,
            note="JointSpec numbering shared axes (layer_1, head_1, layer_2, head_2)",
        ),
        Case(
            "restricted_resid_pre",
            c.RESID_PRE.sel(layer=1, pos=[-1, 2]),
            _logit_diff,
            LOGIT_DIFF,
            note="restrictions of swept axes (negative and unsorted positions)",
        ),
        Case(
            "restricted_slice_head_out_by_pos",
            c.HEAD_OUT_BY_POS.sel(pos=slice(1, None, 2), head=[3, 0]),
            _logit_diff,
            LOGIT_DIFF,
            note="a slice restriction and a reordered head list",
        ),
        Case(
            "narrowed_head_out",
            c.HEAD_OUT.sel(pos=-1),
            _logit_diff,
            LOGIT_DIFF,
            note="a restriction of an unswept dim narrows the patched region",
        ),
        Case(
            "named_pos_restricted",
            c.RESID_PRE.sel(pos="A"),
            _logit_diff,
            LOGIT_DIFF,
            kwargs=_positions,
            kwargs_desc=POSITIONS_DESC,
            note="a position restricted to a name (one index per prompt)",
        ),
        Case(
            "named_pos_swept",
            c.HEAD_OUT_BY_POS,
            _logit_diff,
            LOGIT_DIFF,
            kwargs=_positions,
            kwargs_desc=POSITIONS_DESC,
            note="a swept position axis without restriction sweeps the names",
        ),
        Case(
            "named_pattern_dest",
            c.HEAD_PATTERN_DEST_SRC.sel(dest_pos="END", src_pos=["A", "END"]),
            _logit_diff,
            LOGIT_DIFF,
            kwargs=_positions,
            kwargs_desc=POSITIONS_DESC,
            note="named dest and src positions of the attention pattern",
        ),
        Case(
            "text_prompts_padded",
            c.RESID_PRE.using(ps.Mean()),
            lambda: ps.metrics.logit_diff(5, 7, pos=1, reduce="none"),
            "ps.metrics.logit_diff(5, 7, pos=1, reduce='none')",
            inputs=text_prompts,
            note="text prompts of different lengths (right padding, masked mean)",
            # The tiny qwen2 tokenizer turns "w1 w2" into BOS alone (at HEAD), so text
            # prompts are only meaningful on gpt2.
            models=("gpt2",),
        ),
        Case(
            "text_prompts_named_end",
            c.RESID_PRE,
            _logit_diff,
            LOGIT_DIFF,
            inputs=text_prompts,
            kwargs=_text_positions,
            kwargs_desc={"positions": {"FIRST": 1, "END": -1}},
            note="named positions resolved per prompt length on padded text prompts",
            # The tiny qwen2 tokenizer turns "w1 w2" into BOS alone (at HEAD), so text
            # prompts are only meaningful on gpt2.
            models=("gpt2",),
        ),
        Case(
            "chunked_head_out_by_pos",
            c.HEAD_OUT_BY_POS,
            _logit_diff,
            LOGIT_DIFF,
            batched_options={"cells_per_batch": 5},
            note="batched engine with small uneven chunks",
        ),
        Case(
            "full_forward_head_k",
            c.HEAD_K_BY_POS,
            _logit_diff,
            LOGIT_DIFF,
            batched_options={"start_at_layer": False, "cells_per_batch": 7},
            note="batched engine running every block",
        ),
        Case(
            "sweep_block_every",
            c.BLOCK_EVERY,
            _logit_diff,
            LOGIT_DIFF,
            note="a Sweep: a Dataset with a variable per spec",
        ),
        Case(
            "sweep_head_by_pos_every_noising",
            ps.Sweep(*(s.using(ps.Corrupted()) for s in c.HEAD_BY_POS_EVERY.specs), name="noised"),
            lambda: ps.metrics.logit_diff(5, 7, reduce="none"),
            "ps.metrics.logit_diff(5, 7, reduce='none')",
            note="a named Sweep of noising specs with a per-example metric",
        ),
    ]
    names = [case.name for case in cases]
    assert len(set(names)) == len(names), names
    return cases


CASES: dict[str, Case] = {case.name: case for case in _cases()}


#: Cases whose frozen values recorded a bug that a later issue fixed, with the fix. The golden
#: test checks these against an independent oracle (each prompt run alone) instead, and checks
#: that the frozen values still differ, so the entry cannot outlive its reason.
REVISED: dict[str, str] = {
    "text_prompts_named_end": (
        "issue 10: the default metric position read the pad column of the shorter padded prompt; "
        "it now reads each prompt's last real token"
    ),
}


def encode(name: str, result: xr.DataArray | xr.Dataset) -> xr.Dataset:
    """A case's result as a Dataset whose variables and dims are prefixed ``<name>__``.

    A DataArray becomes the variable ``<name>__result`` (its own name is kept in its attrs as
    ``result_name``); a Dataset's variables keep their names after the prefix and its attrs go
    to the attr ``<name>__attrs`` of the returned Dataset. Each variable's attrs are packed into
    one attr ``golden_attrs`` (HDF5 stores many attributes per variable expensively).
    """
    if isinstance(result, xr.DataArray):
        ds = result.to_dataset(name="result", promote_attrs=False)
        ds["result"].attrs = {**result.attrs, "result_name": result.name}
        case_attrs: dict[str, Any] = {}
    else:
        ds = result.copy(deep=False)
        case_attrs = dict(result.attrs)
        ds.attrs = {}
    mapping = {str(k): f"{name}{SEP}{k}" for k in [*ds.variables, *ds.dims]}
    out = ds.rename(mapping)
    for variable in out.variables.values():
        variable.attrs = {"golden_attrs": dict(variable.attrs)} if variable.attrs else {}
    out.attrs = {f"{name}{SEP}attrs": case_attrs} if case_attrs else {}
    return out


def decode(golden: xr.Dataset, name: str) -> tuple[dict[str, xr.DataArray], dict[str, Any]]:
    """One case of a golden Dataset: ``{variable: DataArray}`` with the original variable,
    dim and coord names and attrs, and the case's Dataset attrs (``{}`` for a DataArray)."""
    prefix = f"{name}{SEP}"
    keys = [str(k) for k in golden.variables if str(k).startswith(prefix)]
    ds = golden[keys].copy()
    ds = ds.rename({k: k[len(prefix) :] for k in [*ds.variables, *ds.dims] if k.startswith(prefix)})
    for variable in ds.variables.values():
        variable.attrs = dict(variable.attrs.get("golden_attrs", {}))
    arrays = {str(k): ds[k] for k in ds.data_vars}
    return arrays, dict(golden.attrs.get(f"{name}{SEP}attrs", {}))


def as_arrays(result: xr.DataArray | xr.Dataset) -> dict[str, xr.DataArray]:
    """A fresh result in the form :func:`decode` gives (a DataArray is named ``result``)."""
    if isinstance(result, xr.DataArray):
        array = result.copy()
        array.attrs = {**result.attrs, "result_name": result.name}
        return {"result": array.rename(None)}
    return {str(k): result[k] for k in result.data_vars}
