"""Run the python code blocks of a Markdown page, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_python_blocks(relative: str, *, at_least: int = 1) -> dict[str, Any]:
    """Execute every python block of ``ROOT / relative``; return the shared namespace."""
    text = (ROOT / relative).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= at_least, f"{relative} has {len(blocks)} python blocks"
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, relative, "exec"), namespace)
    return namespace
