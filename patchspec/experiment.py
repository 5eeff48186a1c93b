"""Declarative experiment files: a TOML file -> a model, prompts, a metric, specs -> results.

A file looks like this (every key is documented in ``docs/cli.md``)::

    [model]
    path = "toy"                 # the bundled toy model, or a folder for boot_transformers

    [prompts]
    clean = ["<bos> a b c a b", "..."]
    corrupted = ["<bos> d e f a b", "..."]
    # or: file = "pairs.jsonl"   (one {"clean": ..., "corrupted": ..., "answer": ..., "wrong": ...} a line)

    [metric]
    kind = "logit_diff"          # logit_diff | logprob | prob | loss | kl_to_clean
    answer = ["c", "..."]        # one token, or one per prompt
    wrong = ["f", "..."]

    [[specs]]
    catalog = "HEAD_OUT_BY_POS"  # a catalogue spec or sweep name ...
    [[specs]]
    activation = "z"             # ... or an inline spec dict (see PatchSpec.to_dict)
    axes = ["layer", "head"]
    restrictions = { pos = -1 }
    name = "heads_at_last_pos"

    [output]
    folder = "patchspec-out"
    plots = true

    [run]
    engine = "batched"
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from patchspec import catalog, metrics
from patchspec.errors import PatchSpecError, did_you_mean
from patchspec.spec import AnySpec, PatchSpec, Sweep, spec_from_dict

METRICS: dict[str, Callable[..., metrics.Metric]] = {
    "logit_diff": metrics.logit_diff,
    "logprob": metrics.logprob,
    "prob": metrics.prob,
    "loss": metrics.loss,
    "kl_to_clean": metrics.kl_to_clean,
}
SECTIONS = {"model", "prompts", "metric", "specs", "output", "run"}


class ExperimentError(PatchSpecError):
    """An experiment file is malformed; the message names the file, key and what was expected."""


@attrs.frozen
class Experiment:
    """A parsed experiment file."""

    source: str
    model: Mapping[str, Any]
    clean: list[str]
    corrupted: list[str]
    metric: metrics.Metric
    specs: tuple[AnySpec, ...]
    folder: Path
    plots: bool
    engine: str | None


def _fail(source: str, where: str, message: str) -> ExperimentError:
    return ExperimentError(f"{source}: {where} {message}")


def _section(data: Mapping[str, Any], name: str, source: str, *, required: bool = True) -> Any:
    if name not in data:
        if required:
            raise _fail(source, f"[{name}]", "is missing")
        return {}
    return data[name]


def _strings(value: Any, source: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(source, where, f"must be a string or a non-empty list of strings, got {value!r}")
    return value


def _prompts(section: Any, base: Path, source: str) -> tuple[list[str], list[str], dict[str, list[str]]]:
    if not isinstance(section, Mapping):
        raise _fail(source, "[prompts]", f"must be a table, got {section!r}")
    if "file" in section:
        path = base / str(section["file"])
        if not path.exists():
            raise _fail(source, "[prompts] file", f"{str(path)!r} does not exist")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows):
            for key in ("clean", "corrupted"):
                if key not in row:
                    raise _fail(source, f"[prompts] file line {i + 1}", f"has no {key!r} key")
        extra = {k: [row[k] for row in rows] for k in ("answer", "wrong") if all(k in row for row in rows)}
        return [r["clean"] for r in rows], [r["corrupted"] for r in rows], extra
    missing = [k for k in ("clean", "corrupted") if k not in section]
    if missing:
        raise _fail(source, "[prompts]", f"needs {missing[0]!r} (a list of strings) or 'file' (a JSON-lines file)")
    clean = _strings(section["clean"], source, "[prompts] clean")
    corrupted = _strings(section["corrupted"], source, "[prompts] corrupted")
    if len(clean) != len(corrupted):
        raise _fail(source, "[prompts]", f"has {len(clean)} clean but {len(corrupted)} corrupted prompts")
    return clean, corrupted, {}


def _metric(section: Any, defaults: Mapping[str, list[str]], source: str) -> metrics.Metric:
    if not isinstance(section, Mapping) or "kind" not in section:
        raise _fail(source, "[metric]", f"needs kind = one of {', '.join(METRICS)}")
    kind = section["kind"]
    if kind not in METRICS:
        raise _fail(source, "[metric] kind", f"= {kind!r} is not a metric; valid: {', '.join(METRICS)}{did_you_mean(str(kind), METRICS)}")
    args = {k: v for k, v in section.items() if k != "kind"}
    for key in ("answer", "wrong"):
        if key not in args and key in defaults:
            args[key] = defaults[key]
    try:
        return METRICS[kind](**args)
    except TypeError as err:
        raise _fail(source, "[metric]", f"has bad arguments for {kind!r}: {err}") from None


def _specs(section: Any, source: str) -> tuple[AnySpec, ...]:
    if not isinstance(section, list) or not section:
        raise _fail(source, "[[specs]]", "needs at least one entry (catalog = NAME, or an inline spec)")
    out: list[AnySpec] = []
    known: dict[str, PatchSpec | Sweep] = {**catalog.SPECS, **catalog.SWEEPS}
    for i, entry in enumerate(section):
        where = f"[[specs]] entry {i + 1}"
        if not isinstance(entry, Mapping):
            raise _fail(source, where, f"must be a table, got {entry!r}")
        if "catalog" in entry:
            name = entry["catalog"]
            if name not in known:
                raise _fail(source, f"{where} catalog", f"= {name!r} is not a catalogue name; valid: {', '.join(known)}{did_you_mean(str(name), known)}")
            item = known[name]
            out.extend(item.specs if isinstance(item, Sweep) else [item])
            continue
        try:
            out.append(spec_from_dict(entry))
        except PatchSpecError as err:
            raise _fail(source, where, f"is not a valid spec: {err}") from None
    return tuple(out)


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate an experiment file (no model is loaded yet).

    Raises:
        ExperimentError: the file is not valid TOML or a key is missing or malformed.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ExperimentError(f"{source}: no such experiment file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"{source}: not valid TOML: {err}") from None
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise _fail(source, f"[{unknown[0]}]", f"is not a section; valid sections are {', '.join(sorted(SECTIONS))}{did_you_mean(unknown[0], SECTIONS)}")
    model = _section(data, "model", source)
    if not isinstance(model, Mapping) or "path" not in model:
        raise _fail(source, "[model]", "needs path = \"toy\" or a model folder")
    clean, corrupted, defaults = _prompts(_section(data, "prompts", source), path.parent, source)
    metric = _metric(_section(data, "metric", source), defaults, source)
    specs = _specs(data.get("specs"), source)
    output = _section(data, "output", source, required=False)
    run = _section(data, "run", source, required=False)
    folder = (path.parent / str(output.get("folder", "patchspec-out"))).resolve()
    return Experiment(source, model, clean, corrupted, metric, specs, folder, bool(output.get("plots", True)), run.get("engine"))


def load_model(spec: Mapping[str, Any]) -> Any:
    """The model an experiment names: ``"toy"`` or a folder for ``boot_transformers``."""
    device = spec.get("device")
    if spec["path"] == "toy":
        from patchspec.toy import toy_model

        return toy_model(device=device)
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(str(spec["path"]), device=device)
    model.eval()
    return model
