"""Declarative experiment files: a TOML file -> a model, prompts, a metric, specs -> results.

A file looks like this (every key is documented in ``docs/cli.md``)::

    [model]
    path = "toy"                 # the bundled toy model, or a folder for boot_transformers
                                 # (relative to this file); or: name = "gpt2" (a model id)

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

    [tensors]                    # run-time tensors specs name by key (Subspace, Add, SAELatent)
    basis = "basis.pt"           # a .pt file (a tensor, or a dict of tensors for an SAE) or .npy

    [output]
    folder = "patchspec-out"
    plots = true

    [run]
    engine = "batched"

:func:`load_experiment` checks the whole file before anything runs: every section and key (an
unknown one is an error with a did-you-mean), every value's type (``plots = "false"`` is an
error, not ``True``), that the files it names exist (relative paths are relative to the
experiment file), that every spec builds, that spec names are distinct and safe as file names,
and that the metric's tokens, named positions and reference datasets fit the prompts and specs.
"""

from __future__ import annotations

import inspect
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from patchspec import catalog, metrics
from patchspec.errors import PatchSpecError, did_you_mean
from patchspec.layouts import POSITION_DIMS
from patchspec.options import RunOptions
from patchspec.sources import Mean
from patchspec.spec import AnySpec, PatchSpec, Sweep, spec_from_dict

METRICS: dict[str, Callable[..., metrics.Metric]] = {
    "logit_diff": metrics.logit_diff,
    "logprob": metrics.logprob,
    "prob": metrics.prob,
    "loss": metrics.loss,
    "kl_to_clean": metrics.kl_to_clean,
}
#: The keys of each section (``specs`` entries are checked by the spec they build).
KEYS: dict[str, tuple[str, ...]] = {
    "model": ("path", "name", "device"),
    "prompts": ("clean", "corrupted", "file"),
    "metric": ("kind", "answer", "wrong", "pos", "reduce"),
    "specs": (),
    "paths": (),
    "positions": (),
    "reference": (),
    "tensors": (),
    "output": ("folder", "plots"),
    "run": (
        "engine",
        "cells_per_batch",
        "max_memory",
        "start_at_layer",
        "hash_weights",
        "estimator",
        "ig_steps",
    ),
}
SECTIONS = set(KEYS)
#: The keys of a line of a JSON-lines prompts file.
ROW_KEYS = ("clean", "corrupted", "answer", "wrong", "positions")
#: The keys of a ``[[specs]]`` entry naming a catalogue spec or sweep.
CATALOG_KEYS = ("catalog", "name")
#: The longest spec name: its files (``<name>.png``) must fit a 255-byte file name.
MAX_NAME_BYTES = 200


class ExperimentError(PatchSpecError):
    """An experiment file is malformed; the message names the file, key and what was expected."""


@attrs.frozen
class Experiment:
    """A parsed, fully checked experiment file.

    Attributes:
        source: The experiment file.
        model: ``{"path": absolute folder or "toy"}`` or ``{"name": model id}``, and
            ``"device"`` when given; what :func:`load_model` takes.
        clean: Clean prompts.
        corrupted: Corrupted prompts, as many.
        metric: The metric.
        specs: The specs, catalogue sweeps expanded, in file order.
        folder: The output folder (absolute).
        plots: Whether to write heatmaps.
        engine: ``[run] engine`` (None: the default).
        positions: The named positions table (``[positions]`` or the prompts file's
            ``positions``), or None.
        reference: ``{name: prompts}`` of the ``[reference]`` section, or None.
        options: Every ``[run]`` option given (``engine`` included), for ``Sweep.run``.
        tensors: ``{key: file}`` of the ``[tensors]`` section (bases, directions, SAEs the
            specs name; ``.pt`` or ``.npy`` files, read by :func:`load_tensors`), or None.
    """

    source: str
    model: Mapping[str, Any]
    clean: list[str]
    corrupted: list[str]
    metric: metrics.Metric
    specs: tuple[AnySpec, ...]
    folder: Path
    plots: bool
    engine: str | None
    positions: Mapping[str, list[int]] | None = None
    reference: Mapping[str, list[str]] | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict)
    tensors: Mapping[str, Path] | None = None
    #: The ``[[paths]]`` entries: :class:`~patchspec.paths.PathSpec` s, run after the specs.
    paths: tuple[Any, ...] = ()

    @property
    def sweep(self) -> Sweep:
        """All specs as one :class:`~patchspec.Sweep` (checked when the file was loaded)."""
        return Sweep(*self.specs)


def _fail(source: str, where: str, message: str) -> ExperimentError:
    return ExperimentError(f"{source}: {where} {message}")


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


class _Checker:
    """Type checks of one file's values; every error names the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ExperimentError:
        return _fail(self.source, where, message)

    def table(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"must be a table, got {value!r}")
        return value

    def keys(self, section: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
        for key in section:
            if key not in valid:
                raise self.fail(
                    f"{where} {key}",
                    f"is not a key of {where}; valid keys are {', '.join(valid)}"
                    f"{did_you_mean(key, valid)}",
                )

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(
                where, f"must be a non-empty string, got {value!r} ({_type_name(value)})"
            )
        return value

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(
                where,
                f"must be true or false (a TOML boolean, no quotes), got {value!r} "
                f"({_type_name(value)})",
            )
        return value

    def integer(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, got {value!r} ({_type_name(value)})")
        return value

    def strings(self, value: Any, where: str) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(
                where, f"must be a string or a non-empty list of strings, got {value!r}"
            )
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(f"{where}[{i}]", f"must be a non-empty string, got {item!r}")
        return value

    def token(self, value: Any, where: str) -> int | str:
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            raise self.fail(
                where,
                f"must be a token (a string or a token id), got {value!r} ({_type_name(value)})",
            )
        return value

    def tokens(self, value: Any, where: str, n: int) -> int | str | list[int | str]:
        if not isinstance(value, list):
            return self.token(value, where)
        if len(value) != n:
            raise self.fail(
                where,
                f"has {len(value)} tokens but there are {n} prompts; give one or one per prompt",
            )
        return [self.token(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def path(self, value: Any, base: Path, where: str) -> Path:
        path = Path(self.string(value, where)).expanduser()
        return path if path.is_absolute() else base / path


def _model(section: Any, base: Path, check: _Checker) -> dict[str, Any]:
    model = check.table(section, "[model]")
    check.keys(model, KEYS["model"], "[model]")
    given = [k for k in ("path", "name") if k in model]
    if len(given) != 1:
        problem = "gives both" if given else "needs one of"
        raise check.fail(
            "[model]",
            f'{problem} path = "toy" (the bundled model) or a model folder, and name = a model '
            "id for TransformerBridge.boot_transformers",
        )
    out: dict[str, Any] = {}
    if "path" in model:
        raw = check.string(model["path"], "[model] path")
        if raw == "toy":
            out["path"] = "toy"
        else:
            path = check.path(raw, base, "[model] path").resolve()
            if not path.is_dir():
                raise check.fail(
                    "[model] path",
                    f"= {raw!r} is not a folder: {str(path)!r} (relative paths are relative to "
                    "the experiment file; use name = ... for a model id)",
                )
            if not (path / "config.json").is_file():
                raise check.fail(
                    "[model] path",
                    f"= {raw!r} is not a model folder: {str(path)!r} has no config.json (save a "
                    "model there with save_pretrained, or use name = ... for a model id)",
                )
            out["path"] = str(path)
    else:
        out["name"] = check.string(model["name"], "[model] name")
    if "device" in model:
        device = check.string(model["device"], "[model] device")
        unusable = device_problem(device)
        if unusable:
            raise check.fail("[model] device", f"= {device!r} {unusable}")
        out["device"] = device
    return out


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot hold a model here (not a device name, or not on this machine);
    ``None`` when it can.

    Example:
        >>> device_problem("cpu") is None
        True
        >>> device_problem("gpu")
        "is not a device (valid: 'cpu', 'cuda', 'cuda:1', 'mps', ...)"
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return "is not a device (valid: 'cpu', 'cuda', 'cuda:1', 'mps', ...)"
    kind = parsed.type
    if kind == "cpu" or kind == "meta":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"torch {torch.__version__} here is a CPU-only build"
                if torch.version.cuda is None
                else "no CUDA device found"
            )
            return f"is not available: {why}; use 'cpu'"
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            return f"is not available: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        return None
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "is not available: no Apple MPS device here; use 'cpu'"
        return None
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    if callable(available) and not available():
        return "is not available on this machine; use 'cpu'"
    return None


def _rows(path: Path, check: _Checker) -> list[dict[str, Any]]:
    """The lines of a JSON-lines prompts file, each checked; errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise check.fail("[prompts] file", f"{str(path)!r} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise check.fail("[prompts] file", f"{str(path)!r} cannot be read: {err}") from None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"[prompts] file {str(path)!r} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise check.fail(where, f"is not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise check.fail(
                where, f"must be a JSON object with 'clean' and 'corrupted', got {line.strip()!r}"
            )
        check.keys(row, ROW_KEYS, where)
        for key in ("clean", "corrupted"):
            if key not in row:
                raise check.fail(where, f"has no {key!r} key (a string)")
            check.string(row[key], f"{where} {key!r}")
        for key in ("answer", "wrong"):
            if key in row:
                check.token(row[key], f"{where} {key!r}")
        if "positions" in row:
            table = check.table(row["positions"], f"{where} 'positions'")
            for name, index in table.items():
                check.integer(index, f"{where} 'positions' {name!r}")
        rows.append(row)
        lines.append(number)
    if not rows:
        raise check.fail("[prompts] file", f"{str(path)!r} holds no prompts")
    for key in ("answer", "wrong", "positions"):
        having = [n for n, row in zip(lines, rows, strict=True) if key in row]
        lacking = [n for n, row in zip(lines, rows, strict=True) if key not in row]
        if having and lacking:
            raise check.fail(
                f"[prompts] file {str(path)!r} line {lacking[0]}",
                f"has no {key!r} but line {having[0]} has one; give it on every line or on none",
            )
    if "positions" in rows[0]:
        names = list(rows[0]["positions"])
        for n, row in zip(lines, rows, strict=True):
            if list(row["positions"]) != names:
                raise check.fail(
                    f"[prompts] file {str(path)!r} line {n}",
                    f"names positions {list(row['positions'])}, but line {lines[0]} names {names}; "
                    "every line must name the same positions",
                )
    return rows


def _prompts(
    section: Any, base: Path, check: _Checker
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Clean and corrupted prompts, and the columns the prompts file gives besides."""
    prompts = check.table(section, "[prompts]")
    check.keys(prompts, KEYS["prompts"], "[prompts]")
    if "file" in prompts:
        inline = [k for k in ("clean", "corrupted") if k in prompts]
        if inline:
            raise check.fail("[prompts]", f"gives both 'file' and {inline[0]!r}; give one")
        path = check.path(prompts["file"], base, "[prompts] file")
        if not path.is_file():
            raise check.fail(
                "[prompts] file",
                f"{str(path)!r} does not exist (relative paths are relative to the experiment file)",
            )
        rows = _rows(path, check)
        extra: dict[str, Any] = {
            k: [row[k] for row in rows] for k in ("answer", "wrong") if k in rows[0]
        }
        if "positions" in rows[0]:
            extra["positions"] = {
                name: [row["positions"][name] for row in rows] for name in rows[0]["positions"]
            }
        return [r["clean"] for r in rows], [r["corrupted"] for r in rows], extra
    missing = [k for k in ("clean", "corrupted") if k not in prompts]
    if missing:
        raise check.fail(
            "[prompts]", f"needs {missing[0]!r} (a list of strings) or 'file' (a JSON-lines file)"
        )
    clean = check.strings(prompts["clean"], "[prompts] clean")
    corrupted = check.strings(prompts["corrupted"], "[prompts] corrupted")
    if len(clean) != len(corrupted):
        raise check.fail(
            "[prompts]", f"has {len(clean)} clean but {len(corrupted)} corrupted prompts"
        )
    return clean, corrupted, {}


def _metric(section: Any, defaults: Mapping[str, Any], n: int, check: _Checker) -> metrics.Metric:
    metric = check.table(section, "[metric]")
    check.keys(metric, KEYS["metric"], "[metric]")
    if "kind" not in metric:
        raise check.fail("[metric]", f"needs kind = one of {', '.join(METRICS)}")
    kind = metric["kind"]
    if kind not in METRICS:
        raise check.fail(
            "[metric] kind",
            f"= {kind!r} is not a metric; valid: {', '.join(METRICS)}{did_you_mean(str(kind), METRICS)}",
        )
    factory = METRICS[kind]
    takes = [p for p in inspect.signature(factory).parameters if p in KEYS["metric"]]
    args: dict[str, Any] = {}
    for key, value in metric.items():
        if key == "kind":
            continue
        where = f"[metric] {key}"
        if key not in takes:
            raise check.fail(
                where, f"is not an argument of {kind!r}; it takes {', '.join(takes) or 'none'}"
            )
        if key in ("answer", "wrong"):
            if key in defaults:
                raise check.fail(
                    where, "is given here and in the prompts file; give it in one place"
                )
            args[key] = check.tokens(value, where, n)
        elif key == "pos":
            args[key] = (
                [check.integer(v, f"{where}[{i}]") for i, v in enumerate(value)]
                if isinstance(value, list)
                else check.integer(value, where)
            )
        elif key == "reduce" and value not in ("mean", "none"):
            raise check.fail(where, f'must be "mean" or "none", got {value!r}')
        else:
            args[key] = value
    for key in ("answer", "wrong"):
        if key not in args and key in defaults and key in takes:
            args[key] = defaults[key]
    required = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in args
    ]
    if required:
        raise check.fail(
            "[metric]", f"{kind!r} needs {required[0]!r} (here or in the prompts file)"
        )
    try:
        return factory(**args)
    except (PatchSpecError, TypeError, ValueError) as err:
        raise check.fail("[metric]", f"has bad arguments for {kind!r}: {err}") from None


def unsafe_file_name(name: str) -> str | None:
    """Why ``name`` cannot name an output file (``<name>.nc``), or None.

    Example:
        >>> unsafe_file_name("heads/last"), unsafe_file_name("heads_last")
        ("contains a '/'", None)
    """
    if not name:
        return "is empty"
    if set(name) <= {"."}:
        return "is only dots"
    for bad, what in (("/", "a '/'"), ("\\", "a '\\'"), ("\x00", "a NUL byte")):
        if bad in name:
            return f"contains {what}"
    if not name.isprintable():
        return "contains a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def _specs(section: Any, check: _Checker) -> tuple[AnySpec, ...]:
    if isinstance(section, Mapping):
        raise check.fail("[specs]", "must be written [[specs]] (two brackets), once per spec")
    if not isinstance(section, list) or not section:
        raise check.fail(
            "[[specs]]", "needs at least one entry (catalog = NAME, or an inline spec)"
        )
    out: list[AnySpec] = []
    entries: list[str] = []
    known: dict[str, PatchSpec | Sweep] = {**catalog.SPECS, **catalog.SWEEPS}
    for i, entry in enumerate(section):
        where = f"[[specs]] entry {i + 1}"
        entry = check.table(entry, where)
        if "catalog" in entry:
            check.keys(entry, CATALOG_KEYS, where)
            name = entry["catalog"]
            if name not in known:
                raise check.fail(
                    f"{where} catalog",
                    f"= {name!r} is not a catalogue name; valid: {', '.join(known)}{did_you_mean(str(name), known)}",
                )
            item = known[name]
            if isinstance(item, Sweep):
                if "name" in entry:
                    raise check.fail(
                        f"{where} name",
                        f"cannot rename {name!r}, a sweep of {len(item.specs)} specs",
                    )
                found = list(item.specs)
            else:
                found = [
                    item.named(check.string(entry["name"], f"{where} name"))
                    if "name" in entry
                    else item
                ]
        else:
            if "joint" in entry:
                check.keys(entry, ("joint", "name"), where)
            if "axes" in entry:
                axes = entry["axes"]
                if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
                    raise check.fail(
                        f"{where} axes",
                        f'must be a list of dim names, e.g. ["layer", "head"], got {axes!r}',
                    )
            if "restrictions" in entry:
                check.table(entry["restrictions"], f"{where} restrictions")
            try:
                found = [spec_from_dict(entry)]
            except (PatchSpecError, TypeError, ValueError) as err:
                raise check.fail(where, f"is not a valid spec: {err}") from None
        for spec in found:
            problem = unsafe_file_name(spec.label)
            if problem:
                raise check.fail(
                    where,
                    f"names its results {spec.label!r}, which {problem} and cannot name the output "
                    "files; give the spec a name = ... of letters, digits, '_', '-' or '.'",
                )
        out.extend(found)
        entries.extend([where] * len(found))
    seen: dict[str, int] = {}
    for i, spec in enumerate(out):
        key = spec.label.casefold()
        if key in seen:
            first = out[seen[key]].label
            raise check.fail(
                entries[i],
                f"names its results {spec.label!r}, as {entries[seen[key]]} does ({first!r}); "
                "spec names must be distinct (also ignoring case, as some file systems do)",
            )
        seen[key] = i
    try:
        Sweep(*out)
    except PatchSpecError as err:
        raise check.fail("[[specs]]", f"do not form a sweep: {err}") from None
    return tuple(out)


def _paths(section: Any, check: _Checker) -> tuple[Any, ...]:
    """The ``[[paths]]`` entries: ``catalog = "PATH_HEAD_TO_HEAD_K"`` (optionally with
    ``through`` and ``name``), or an inline path spec (``sender``, ``receiver``, ``through``,
    ``name``, as :meth:`patchspec.paths.PathSpec.to_dict` writes)."""
    import attrs as _attrs

    from patchspec.paths import PathSpec

    if not isinstance(section, list) or not section:
        raise check.fail("[[paths]]", "must be written [[paths]] (two brackets), once per path spec")
    out: list[Any] = []
    for i, entry in enumerate(section):
        where = f"[[paths]] entry {i + 1}"
        entry = check.table(entry, where)
        try:
            if "catalog" in entry:
                check.keys(entry, ("catalog", "through", "name"), where)
                name = entry["catalog"]
                if name not in catalog.PATHS:
                    raise check.fail(
                        f"{where} catalog",
                        f"= {name!r} is not a catalogue path; valid: {', '.join(catalog.PATHS)}"
                        f"{did_you_mean(str(name), catalog.PATHS)}",
                    )
                changes = {k: entry[k] for k in ("through", "name") if k in entry}
                spec = _attrs.evolve(catalog.PATHS[name], **changes)
            else:
                spec = PathSpec.from_dict(entry)
        except ExperimentError:
            raise
        except (PatchSpecError, TypeError, ValueError) as err:
            raise check.fail(where, f"is not a valid path spec: {err}") from None
        problem = unsafe_file_name(spec.label)
        if problem:
            raise check.fail(where, f"names its results {spec.label!r}, which {problem}")
        out.append(spec)
    return tuple(out)


def _positions(
    section: Any, extra: Mapping[str, Any], n: int, check: _Checker
) -> dict[str, list[int]] | None:
    if section is None:
        return extra.get("positions")
    if "positions" in extra:
        raise check.fail(
            "[positions]", "is given here and in the prompts file; give it in one place"
        )
    table = check.table(section, "[positions]")
    if not table:
        raise check.fail("[positions]", "names no positions")
    out: dict[str, list[int]] = {}
    for name, value in table.items():
        where = f"[positions] {name}"
        if isinstance(value, list):
            if len(value) != n:
                raise check.fail(
                    where,
                    f"has {len(value)} indices but there are {n} prompts; give one or one per prompt",
                )
            out[name] = [check.integer(v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            out[name] = [check.integer(value, where)] * n
    return out


def _reference(section: Any, check: _Checker) -> dict[str, list[str]] | None:
    if section is None:
        return None
    table = check.table(section, "[reference]")
    if not table:
        raise check.fail("[reference]", "names no reference datasets")
    return {name: check.strings(value, f"[reference] {name}") for name, value in table.items()}


#: Files a ``[tensors]`` entry may name: a torch file (a tensor, or a dict of tensors for an
#: SAE) or a numpy array.
TENSOR_SUFFIXES = (".pt", ".pth", ".npy")


def _tensors(section: Any, base: Path, check: _Checker) -> dict[str, Path] | None:
    if section is None:
        return None
    table = check.table(section, "[tensors]")
    if not table:
        raise check.fail("[tensors]", "names no tensors")
    out: dict[str, Path] = {}
    for name, value in table.items():
        where = f"[tensors] {name}"
        path = check.path(value, base, where)
        if path.suffix not in TENSOR_SUFFIXES:
            raise check.fail(where, f"= {str(value)!r} must be a {', '.join(TENSOR_SUFFIXES)} file")
        if not path.is_file():
            raise check.fail(where, f"= {str(value)!r}: no such file ({path})")
        out[name] = path
    return out


def load_tensors(files: Mapping[str, Path] | None) -> dict[str, Any] | None:
    """The tensors of an experiment's ``[tensors]`` section, read from their files.

    A ``.pt``/``.pth`` file holds a tensor or a dict of tensors (an SAE), read with
    ``torch.load(weights_only=True)``; a ``.npy`` file holds one array.

    Raises:
        ExperimentError: a file cannot be read.
    """
    if files is None:
        return None
    import numpy as np

    out: dict[str, Any] = {}
    for name, path in files.items():
        try:
            if path.suffix == ".npy":
                out[name] = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                out[name] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ExperimentError(
                f"[tensors] {name} = {str(path)!r} cannot be read: {type(err).__name__}: {err}"
            ) from err
    return out


def _cross_check(
    specs: Sequence[AnySpec],
    positions: Mapping[str, Any] | None,
    reference: Mapping[str, Any] | None,
    check: _Checker,
    tensors: Mapping[str, Any] | None = None,
) -> None:
    """Named positions, reference datasets and tensors the specs use must be given."""
    for spec in specs:
        where = f"[[specs]] {spec.label!r}"
        for key in dict.fromkeys(k for s in spec.sources for k in s.tensor_keys()):
            if tensors is None or key not in tensors:
                have = f"; given: {', '.join(tensors)}" if tensors else ""
                raise check.fail(
                    where,
                    f"names the tensor {key!r}, which no [tensors] entry gives "
                    f"({key} = \"file.pt\"){have}{did_you_mean(key, tensors or ())}",
                )
        for part in spec.parts:
            for dim, selector in part.restrictions:
                values = selector if isinstance(selector, tuple) else (selector,)
                names = [v for v in values if dim in POSITION_DIMS and isinstance(v, str)]
                for name in names:
                    if positions is None or name not in positions:
                        have = f"; given: {', '.join(positions)}" if positions else ""
                        raise check.fail(
                            where,
                            f"restricts {dim} to the named position {name!r}, which no "
                            f"[positions] table (or prompts file 'positions') gives{have}"
                            f"{did_you_mean(name, positions or ())}",
                        )
        for source in spec.sources:
            needed = source.over if isinstance(source, Mean) and source.over != "batch" else None
            if needed is not None and (reference is None or needed not in reference):
                have = f"; given: {', '.join(reference)}" if reference else ""
                raise check.fail(
                    where,
                    f"takes means over the reference dataset {needed!r}, which the "
                    f"[reference] section does not give{have}",
                )


def _run(section: Any, check: _Checker) -> dict[str, Any]:
    run = check.table(section, "[run]")
    check.keys(run, KEYS["run"], "[run]")
    options: dict[str, Any] = {}
    for key, value in run.items():
        where = f"[run] {key}"
        if key in ("start_at_layer", "hash_weights"):
            options[key] = check.flag(value, where)
        elif key in ("cells_per_batch", "ig_steps"):
            options[key] = check.integer(value, where)
        elif key == "max_memory":
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise check.fail(
                    where, f'must be a number of bytes or a string such as "2GB", got {value!r}'
                )
            options[key] = value
        else:
            options[key] = check.string(value, where)
    try:
        RunOptions.from_kwargs(**options)
    except PatchSpecError as err:
        raise check.fail("[run]", f"is invalid: {err}") from None
    return options


def load_experiment(path: str | Path) -> Experiment:
    """Parse and check an experiment file; no model is loaded and nothing runs.

    Every error a file could cause before its results are written is raised here, so a
    malformed file fails in a second, not after the sweep.

    Args:
        path: The TOML file. Relative paths in it are relative to its folder.

    Returns:
        The checked :class:`Experiment`.

    Raises:
        ExperimentError: naming the file, the section and key, what it got and what is valid.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "exp.toml").write_text('''
        ... [model]
        ... path = "toy"
        ... [prompts]
        ... clean = ["a b c"]
        ... corrupted = ["d e f"]
        ... [metric]
        ... kind = "logprob"
        ... answer = "c"
        ... [[specs]]
        ... catalog = "RESID_PRE"
        ... [output]
        ... plots = "false"
        ... ''')
        >>> load_experiment(folder / "exp.toml")
        Traceback (most recent call last):
        ...
        patchspec.experiment.ExperimentError: ...exp.toml: [output] plots must be true or false (a TOML boolean, no quotes), got 'false' (a string)
    """
    path = Path(path)
    source = str(path)
    check = _Checker(source)
    if path.is_dir():
        raise ExperimentError(f"{source}: is a folder, not an experiment file (a .toml file)")
    if not path.is_file():
        raise ExperimentError(f"{source}: no such experiment file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{source}: not valid TOML: {err}") from None
    except OSError as err:
        raise ExperimentError(f"{source}: cannot be read: {err.strerror or err}") from None
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise check.fail(
            f"[{unknown[0]}]",
            f"is not a section; valid sections are {', '.join(sorted(SECTIONS))}{did_you_mean(unknown[0], SECTIONS)}",
        )

    def required(name: str) -> Any:
        if name not in data:
            raise check.fail(f"[{name}]", "is missing")
        return data[name]

    base = path.resolve().parent
    model = _model(required("model"), base, check)
    clean, corrupted, extra = _prompts(required("prompts"), base, check)
    metric = _metric(required("metric"), extra, len(clean), check)
    paths = _paths(data["paths"], check) if "paths" in data else ()
    specs = _specs(data.get("specs"), check) if "specs" in data or not paths else ()
    positions = _positions(data.get("positions"), extra, len(clean), check)
    reference = _reference(data.get("reference"), check)
    tensors = _tensors(data.get("tensors"), base, check)
    _cross_check(specs, positions, reference, check, tensors)
    output = check.table(data.get("output", {}), "[output]")
    check.keys(output, KEYS["output"], "[output]")
    folder = check.path(output.get("folder", "patchspec-out"), base, "[output] folder").resolve()
    if folder.exists() and not folder.is_dir():
        raise check.fail("[output] folder", f"{str(folder)!r} exists and is not a folder")
    plots = check.flag(output.get("plots", True), "[output] plots")
    options = _run(data.get("run", {}), check)
    return Experiment(
        source, model, clean, corrupted, metric, specs, folder, plots, options.get("engine"),
        positions=positions, reference=reference, options=options, tensors=tensors,
        paths=paths,
    )  # fmt: skip


def load_model(spec: Mapping[str, Any]) -> Any:
    """The model an experiment names: the toy model, a folder or a model id.

    Args:
        spec: :attr:`Experiment.model`: ``{"path": "toy" or an absolute folder}`` or
            ``{"name": a model id}``, and optionally ``"device"``. A relative ``path`` here is
            relative to the working directory; :func:`load_experiment` resolves paths against
            the experiment file first.

    Returns:
        A ``TransformerBridge`` in eval mode.

    Raises:
        ExperimentError: the model cannot be loaded (the message names it and why).
    """
    device = spec.get("device")
    where = f"path {spec['path']!r}" if "path" in spec else f"name {spec.get('name')!r}"
    if device is not None and device_problem(device):
        raise ExperimentError(f"[model] device = {device!r} {device_problem(device)}")
    try:
        if spec.get("path") == "toy":
            from patchspec.toy import toy_model

            return toy_model(device=device)
        from transformer_lens.model_bridge import TransformerBridge

        from patchspec.toy import quiet_loading

        with quiet_loading():
            model = TransformerBridge.boot_transformers(
                str(spec.get("path", spec.get("name"))), device=device
            )
    except Exception as err:
        raise ExperimentError(
            f"[model] {where} cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    model.eval()
    return model
