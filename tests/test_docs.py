"""The README's and the docs' Python blocks run, so what they show stays true."""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text()), start=1):
            found.append((f"{page.relative_to(ROOT)}#{number}", match.group(1)))
    return found


BLOCKS = _blocks()


def test_there_are_blocks_to_run() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_block_runs(where: str, code: str) -> None:
    # A real module, as a script would have, so pydantic can resolve its annotations.
    module = types.ModuleType("servekit_docs_block")
    sys.modules[module.__name__] = module
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, where, "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    # Where a block says what a print shows (``print(x)  # shown``), check it.
    expected = [
        m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+)$", code, re.MULTILINE)
    ]
    printed = out.getvalue().splitlines()
    if expected and len(expected) == len(printed):
        for got, want in zip(printed, expected, strict=True):
            assert want.startswith(got) or got.startswith(want), (where, got, want)
