"""Every ```python block of README.md runs as written, each in a fresh namespace (a reader copies one
block at a time, so each defines what it uses: small stand-ins, nothing downloaded).

A block that cannot run here (it needs CUDA, say) carries a visible line in the README,
    # not run by tests/test_readme.py: <reason>
and is skipped with that reason.
"""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = "# not run by tests/test_readme.py:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python fence, in order."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_its_python_blocks():
    # a fence the pattern above misses would silently go untested
    assert len(BLOCKS) == README.read_text(encoding="utf-8").count("```python") >= 5


@pytest.fixture
def _quiet_threads():
    """The blocks are small: one thread keeps them steady beside other work, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, source, _quiet_threads):
    for text in source.splitlines():
        if text.strip().startswith(SKIP_MARK):
            pytest.skip(f"README.md line {line}: {text.strip()[len(SKIP_MARK):].strip()}")
    torch.manual_seed(0)
    code = compile("\n" * (line - 1) + source, str(README), "exec")  # tracebacks give README.md's own line numbers
    exec(code, {"__name__": "readme"})


def test_skip_marker_is_recognised():
    blocks = python_blocks("text\n```python\n" + SKIP_MARK + " needs CUDA\nx = 1\n```\n")
    assert blocks == [(3, SKIP_MARK + " needs CUDA\nx = 1\n")]
