"""Find and run the python code blocks of the Markdown docs.

Conventions (docs/tutorial.md and every other page follow them):

* Every ```` ```python ```` block runs on its own, pasted into a fresh Python session: it imports and
  builds what it uses (``model = toy_model()`` at its top, where it needs a model).
  :func:`run_block` runs each in a new, empty namespace.
* A ```` ```output ```` block that follows a python block (with only blank lines or prose-free
  whitespace between them) is what that python block prints. It is compared with the captured
  stdout by :mod:`doctest`'s checker, with ``ELLIPSIS`` (``...`` matches anything) and
  ``NORMALIZE_WHITESPACE``, so printed outputs shown in the docs cannot go stale.
* Other fences (``bash``, ``text``, ``toml``, none) are not run.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_CHECKER = doctest.OutputChecker()
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Block:
    """One python block of a page, with the output the page says it prints (or None)."""

    page: str
    line: int
    code: str
    output: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    """README.md and every docs/*.md page, relative to the repository root."""
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def python_blocks(relative: str) -> list[Block]:
    """The python blocks of ``ROOT / relative``, each paired with the output block after it."""
    text = (ROOT / relative).read_text()
    fences = list(_FENCE.finditer(text))

    def follows_python(i: int) -> bool:  # fence i comes right after a python fence
        return i > 0 and fences[i - 1].group(1) == "python" and (
            text[fences[i - 1].end() : fences[i].start()].strip() == ""
        )

    blocks = []
    for i, fence in enumerate(fences):
        if fence.group(1) == "output":
            assert follows_python(i), f"{relative}: an output block must directly follow a python block"
        if fence.group(1) != "python":
            continue
        after = i + 1 < len(fences) and fences[i + 1].group(1) == "output" and follows_python(i + 1)
        output = fences[i + 1].group(2) if after else None
        line = text.count("\n", 0, fence.start()) + 2  # the first line of code
        blocks.append(Block(relative, line, fence.group(2), output))
    return blocks


def run_block(block: Block) -> dict[str, Any]:
    """Run one block alone in a fresh namespace; check what it prints; return the namespace."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    out = io.StringIO()
    # Line numbers in tracebacks point into the page.
    code = compile("\n" * (block.line - 1) + block.code, block.page, "exec")
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    got = out.getvalue()
    print(got, end="")  # still visible to pytest's capsys
    if block.output is not None:
        assert _CHECKER.check_output(block.output, got, _FLAGS), (
            f"{block.id} prints\n{got}\nbut the page shows\n{block.output}"
        )
    return namespace


def run_python_blocks(relative: str, *, at_least: int = 1) -> dict[str, Any]:
    """Run every python block of ``ROOT / relative``, each alone; return their merged namespaces.

    Each block runs in its own fresh namespace (so it must build what it uses); the returned dict
    has every block's names, later blocks winning, for tests that check a value a block made.
    """
    blocks = python_blocks(relative)
    assert len(blocks) >= at_least, f"{relative} has {len(blocks)} python blocks"
    merged: dict[str, Any] = {}
    for block in blocks:
        merged.update(run_block(block))
    return merged


def update_outputs(relative: str) -> int:
    """Rewrite the output blocks of ``ROOT / relative`` that no longer match; return how many.

    Run ``python -m tests.docblocks PAGE...`` after a change that moves printed numbers, and read the
    diff: an output block that still matches (an ``...`` one, say) is left as written.
    """
    path = ROOT / relative
    text = path.read_text()
    changed = 0
    for block in reversed(python_blocks(relative)):
        if block.output is None:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.code, block.page, "exec"), {"__name__": "__main__"})
        got = out.getvalue()
        if _CHECKER.check_output(block.output, got, _FLAGS):
            continue
        fresh = "\n".join(line.rstrip() for line in got.rstrip().splitlines()) + "\n"
        start = text.index(block.code)
        at = text.index("```output\n", start + len(block.code)) + len("```output\n")
        text = text[:at] + fresh + text[at + len(block.output) :]
        changed += 1
    path.write_text(text)
    return changed


if __name__ == "__main__":
    import sys

    for page in sys.argv[1:]:
        print(page, update_outputs(page), "output blocks rewritten")
