"""The docs stay true to the code: every code block runs alone, printed outputs match, tables list
every catalogue entry."""

from __future__ import annotations

from pathlib import Path

import pytest

import patchspec
from patchspec import catalog
from tests.docblocks import Block, pages, python_blocks, run_block, run_python_blocks

ROOT = Path(__file__).resolve().parents[1]


BLOCKS = [block for page in pages() for block in python_blocks(page)]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_every_docs_block_runs_alone(block: Block, monkeypatch, tmp_path):
    """Each python block of README.md and docs/*.md runs in a fresh namespace, as if pasted into a
    new Python session, and prints what the ```output block after it shows."""
    monkeypatch.chdir(tmp_path)  # blocks may write files
    monkeypatch.setattr(patchspec.sources, "SOURCES", dict(patchspec.sources.SOURCES))
    run_block(block)


def test_every_page_with_code_is_checked():
    """The pages that teach by code have blocks here, and some show their printed output."""
    checked = {b.page for b in BLOCKS}
    assert {"README.md", "docs/tutorial.md", "docs/concepts.md", "docs/migration.md"} <= checked
    assert sum(b.output is not None for b in BLOCKS) >= 10


def test_migration_guide_lists_every_catalogue_spec():
    """Each TransformerLens function appears on the same table row as its catalogue spec."""
    rows = (ROOT / "docs" / "migration.md").read_text().splitlines()
    names = {id(v): k for k, v in catalog.SPECS.items()}
    for entry in catalog.TABLE:
        row = next((r for r in rows if f"`{entry.tl_function}`" in r), None)
        assert row is not None, entry.tl_function
        assert f"`catalog.{names[id(entry.spec)]}`" in row and repr(entry.spec) in row
    sweeps = {id(v): k for k, v in catalog.SWEEPS.items()}
    for stack in catalog.STACKS:
        row = next(r for r in rows if f"`{stack.tl_function}`" in r)
        assert f"`catalog.{sweeps[id(stack.sweep)]}`" in row


def test_readme_test_command_is_what_ci_runs():
    """CI calls the README's test command."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in readme and "scripts/test" in ci
    assert "scripts/demo" in readme


def test_readme_example_runs(monkeypatch, tmp_path):
    """The README's ten-line example computes and draws what its picture shows."""
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks("README.md")
    assert namespace["result"].dims == ("layer", "pos", "head")
    assert namespace["heads"] == catalog.HEAD_OUT_BY_POS
    assert (tmp_path / "head_out_by_pos.png").exists()
    readme = (ROOT / "README.md").read_text()
    assert "docs/images/demo_head_out_by_pos.png" in readme and "docs/tutorial.md" in readme
    assert readme.index("docs/tutorial.md") < readme.index("docs/concepts.md")  # listed first


def test_readme_install_names_the_extras_that_exist():
    """Every extra of pyproject.toml is in the README's install section, and no other."""
    import re
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install") : readme.index("## Quick start")]
    named = set(re.findall(r'patchspec\[(\w+)\]|"\.\[(\w+)\]"', install))
    assert {a or b for a, b in named} == extras


def test_architecture_page_runs_and_names_every_module():
    """The architecture page's example runs, and its table names every module of the package."""
    namespace = run_python_blocks("docs/architecture.md")
    assert namespace["spec"].dims == ("layer", "pos")
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "patchspec"
    for path in package.rglob("*.py"):
        if path.name == "__init__.py" or path.stem in ("__main__", "batched", "engine", "runs", "sweep"):
            continue  # package re-exports, and the old import paths kept for compatibility
        name = str(path.relative_to(package).with_suffix(""))
        assert f"`{name}`" in text or f"`{name.rsplit('/', 1)[-1]}`" in text, name


def test_block_runner_isolates_blocks_and_catches_stale_outputs(tmp_path):
    """A block cannot see another's names, and a printed output that changed fails, naming the line."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 2\nprint(x * 21)\n```\n\n```output\n42\n```\n\n"
        "```python\nprint(x)\n```\n\n"
        "```python\nprint('a', [1, 2, 3])\n```\n\n```output\na ...\n```\n"
    )
    first, second, third = python_blocks(str(page))
    assert (first.line, first.output) == (2, "42\n")
    run_block(first)
    run_block(third)  # `...` matches anything
    with pytest.raises(NameError, match="'x' is not defined"):
        run_block(second)
    page.write_text(page.read_text().replace("42", "43"))
    with pytest.raises(AssertionError, match=r"page\.md:2 prints\n42\n\nbut the page shows\n43"):
        run_block(python_blocks(str(page))[0])
    page.write_text("text\n\n```output\n42\n```\n")
    with pytest.raises(AssertionError, match="must directly follow a python block"):
        python_blocks(str(page))
