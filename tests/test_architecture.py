"""The package's shape: no import circle, light spec modules, explicit registries, compat current."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import patchspec

PACKAGE = Path(patchspec.__file__).parent
#: Modules that must import neither torch nor TransformerLens at module level.
LIGHT = ("spec", "sources", "layouts", "options", "errors", "catalog", "paths/spec")


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - child.level + 1], base])
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _top_level_imports(path) if m in modules and m != name}
    return graph


def test_no_import_circle_between_modules():
    """Module-level imports form no cycle (packages' __init__ re-exports aside)."""
    graph = {k: {m for m in v if not _is_init(m)} for k, v in _graph().items() if not _is_init(k)}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def _is_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def test_value_modules_import_no_torch():
    """Specs, sources, layouts and options are plain values: no torch or TransformerLens import."""
    for name in LIGHT:
        imports = _top_level_imports(PACKAGE / f"{name}.py")
        heavy = sorted(m for m in imports if m.split(".")[0] in ("torch", "transformer_lens"))
        assert not heavy, f"patchspec.{name} imports {heavy} at module level"


def test_registries_are_filled_in_one_place():
    """Estimators and executors are listed in the registry module; no engine registers itself."""
    from patchspec.execute import registry
    from patchspec.execute.batched import BatchedEstimator
    from patchspec.execute.local import LocalExecutor
    from patchspec.execute.reference import ReferenceEstimator

    assert {"batched": BatchedEstimator, "reference": ReferenceEstimator} == registry.ESTIMATORS
    assert {"local": LocalExecutor} == registry.EXECUTORS
    for module in ("batched", "reference", "local", "masks", "writer", "schedule"):
        assert "patchspec.execute.registry" not in _top_level_imports(PACKAGE / "execute" / f"{module}.py")


def test_reference_shares_no_mask_or_writer_code():
    """The reference estimator imports neither the batched masks nor its writer: an independent oracle."""
    imports = _top_level_imports(PACKAGE / "execute" / "reference.py")
    assert not {m for m in imports if m.startswith(("patchspec.execute.masks", "patchspec.execute.writer"))}


def test_generated_compat_is_up_to_date():
    """patchspec/compat.py's generated block is what scripts/generate_compat.py writes now."""
    script = PACKAGE.parent / "scripts" / "generate_compat.py"
    spec = importlib.util.spec_from_file_location("generate_compat", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate_compat"] = module
    spec.loader.exec_module(module)
    text = (PACKAGE / "compat.py").read_text()
    assert module.render(text) == text, "run scripts/generate_compat.py"


def test_compat_functions_are_ordinary_definitions():
    """Each drop-in is a def in compat.py (visible to IDEs), not made through globals()."""
    from patchspec import catalog

    tree = ast.parse((PACKAGE / "compat.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    wanted = {e.tl_function for e in catalog.TABLE} | {s.tl_function for s in catalog.STACKS}
    assert wanted <= defined
    assert "globals()" not in (PACKAGE / "compat.py").read_text()
