"""Guard test: the public API may only grow.

``tests/api_snapshot.json`` records the public names of :data:`MODULES` (``__all__`` where
defined, else the public names defined in the module), their kinds and, for callables, their
parameters; for public classes also their public methods and properties. It was written from
the pristine pre-refactor code with::

    cd /tmp/pristine && PYTHONPATH=/tmp/pristine python tests/test_api_snapshot.py --write \\
        /path/to/repo/tests/api_snapshot.json

The test fails, listing every problem, when a recorded name disappears or changes kind, or
when a recorded parameter disappears, is renamed, changes kind or default, or when a new
parameter without a default appears. Allowed: new names, new parameters with defaults (or
keyword-only with defaults), new ``*args``/``**kwargs``, changed annotations. One documented
exception: a recorded ``**options``/``**kwargs`` (VAR_KEYWORD) parameter may be replaced by
explicit keyword-only parameters with defaults (the options it accepted become named).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).resolve().parent / "api_snapshot.json"
#: Names removed on purpose, each with its reason (the architecture issue listed them as debts).
REMOVED = {
    "patchspec.metrics.checked": "dead code: no caller; Evaluator checks every metric value",
}
MODULES = ("patchspec", "patchspec.compat", "patchspec.metrics", "patchspec.sources")


def _kind(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "other"


def _params(obj: Any) -> list[dict[str, Any]] | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        {
            "name": p.name,
            "kind": p.kind.name,
            "has_default": p.default is not inspect.Parameter.empty,
            "default": None if p.default is inspect.Parameter.empty else repr(p.default),
        }
        for p in signature.parameters.values()
    ]


def _members(cls: type) -> dict[str, dict[str, Any]]:
    """Public methods and properties of a class (inherited ones included, not ``object``'s)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name)
        if any(name in vars(base) for base in (object, type)) and name not in vars(cls):
            continue
        if isinstance(raw, property):
            out[name] = {"kind": "property"}
        elif isinstance(raw, classmethod | staticmethod):
            out[name] = {"kind": type(raw).__name__, "params": _params(getattr(cls, name))}
        elif inspect.isfunction(raw):
            out[name] = {"kind": "method", "params": _params(raw)}
        elif inspect.isclass(raw) or callable(raw):
            continue
        else:
            out[name] = {"kind": "attribute"}
    return out


def _public_names(module: types.ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return sorted(module.__all__)
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", module.__name__) == module.__name__
        and (callable(value) or inspect.isclass(value))
    )


def snapshot() -> dict[str, Any]:
    """The public API of :data:`MODULES` as plain data."""
    api: dict[str, Any] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        entries: dict[str, Any] = {}
        for name in _public_names(module):
            obj = getattr(module, name)
            entry: dict[str, Any] = {"kind": _kind(obj)}
            if entry["kind"] in ("function", "class"):
                entry["params"] = _params(obj)
            if entry["kind"] == "class":
                entry["members"] = _members(obj)
            entries[name] = entry
        api[module_name] = entries
    return api


def _check_params(where: str, old: list[dict] | None, new: list[dict] | None) -> list[str]:
    if old is None:
        return []
    if new is None:
        return [f"{where}: its signature can no longer be read"]
    problems = []
    by_name = {p["name"]: p for p in new}
    for p in old:
        q = by_name.get(p["name"])
        if q is None:
            if p["kind"] == "VAR_KEYWORD":
                # The one allowed exception: **options may become explicit keyword-only
                # parameters (checked below: new parameters need defaults).
                continue
            problems.append(f"{where}: parameter {p['name']!r} was removed")
            continue
        if q["kind"] != p["kind"]:
            problems.append(f"{where}: parameter {p['name']!r} kind {p['kind']} -> {q['kind']}")
        if q["has_default"] != p["has_default"] or q["default"] != p["default"]:
            before = p["default"] if p["has_default"] else "<none>"
            after = q["default"] if q["has_default"] else "<none>"
            problems.append(f"{where}: parameter {p['name']!r} default {before} -> {after}")
    old_names = [p["name"] for p in old]
    new_order = [p["name"] for p in new if p["name"] in old_names]
    positional = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    old_pos = [p["name"] for p in old if p["kind"] in positional]
    new_pos = [n for n in new_order if by_name[n]["kind"] in positional]
    if old_pos != new_pos:
        problems.append(f"{where}: positional parameter order {old_pos} -> {new_pos}")
    for q in new:
        if q["name"] in old_names or q["kind"] in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            continue
        if not q["has_default"]:
            problems.append(f"{where}: new parameter {q['name']!r} has no default")
    return problems


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every removal or incompatible change from ``old`` to ``new``."""
    problems = []
    for module_name, entries in old.items():
        current = new.get(module_name)
        if current is None:
            problems.append(f"module {module_name} is gone")
            continue
        for name, entry in entries.items():
            where = f"{module_name}.{name}"
            now = current.get(name)
            if now is None:
                if where not in REMOVED:
                    problems.append(f"{where} was removed")
                continue
            if now["kind"] != entry["kind"]:
                problems.append(f"{where}: kind {entry['kind']} -> {now['kind']}")
                continue
            problems += _check_params(where, entry.get("params"), now.get("params"))
            for member, info in entry.get("members", {}).items():
                mwhere = f"{where}.{member}"
                got = now.get("members", {}).get(member)
                if got is None:
                    problems.append(f"{mwhere} was removed")
                elif got["kind"] != info["kind"]:
                    problems.append(f"{mwhere}: kind {info['kind']} -> {got['kind']}")
                else:
                    problems += _check_params(mwhere, info.get("params"), got.get("params"))
    return problems


def test_api_only_grows() -> None:
    """Every recorded public name, parameter and default is still there (additions only)."""
    old = json.loads(SNAPSHOT.read_text())
    problems = compare(old, snapshot())
    assert not problems, "the public API lost or changed:\n  " + "\n  ".join(problems)


def test_compare_catches_changes() -> None:
    """The checker itself: removals and changes are reported; additions are not."""
    p = {"name": "x", "kind": "KEYWORD_ONLY", "has_default": True, "default": "1"}
    opts = {"name": "options", "kind": "VAR_KEYWORD", "has_default": False, "default": None}
    old = {"m": {"f": {"kind": "function", "params": [p, opts]}, "g": {"kind": "other"}}}
    assert compare(old, old) == []
    grown = {"m": {**old["m"], "h": {"kind": "other"}}}
    assert compare(old, grown) == []
    named = {"name": "cells", "kind": "KEYWORD_ONLY", "has_default": True, "default": "None"}
    explicit = {"m": {**old["m"], "f": {"kind": "function", "params": [p, named]}}}
    assert compare(old, explicit) == []
    changed = {**p, "default": "2"}
    broken = {
        "m": {"f": {"kind": "function", "params": [changed, {**named, "has_default": False}]}}
    }
    problems = compare(old, broken)
    assert any("m.g was removed" in x for x in problems)
    assert any("'x' default 1 -> 2" in x for x in problems)
    assert any("'cells' has no default" in x for x in problems)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--write":
        out = Path(sys.argv[2]) if len(sys.argv) > 2 else SNAPSHOT
        out.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")
    else:
        print(json.dumps(snapshot(), indent=1, sort_keys=True))
