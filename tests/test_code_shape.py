"""The code stays easy to change (issue 17): short functions, and peft's internals read in one module only."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "continual_bench"
MAX_LINES = 80
LORA_TOOLKIT = PACKAGE / "methods" / "lora.py"
# peft's private per-adapter containers and the wrapped layer: reading them ties a file to peft's layout
PEFT_INTERNALS = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|scaling)\[|\.base_layer\b")


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in sorted(PACKAGE.rglob("*.py")) for f in _functions(p) if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not long, long


def test_peft_internals_are_read_in_the_lora_toolkit_only():
    assert PEFT_INTERNALS.search(LORA_TOOLKIT.read_text())  # the pattern still matches what the toolkit reads
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sorted(PACKAGE.rglob("*.py")) if p != LORA_TOOLKIT
                 for i, line in enumerate(p.read_text().splitlines(), 1) if PEFT_INTERNALS.search(line)]
    assert not offenders, offenders
