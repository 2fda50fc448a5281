"""The runnable examples of docs/api.md: every ```python block after the heading
"# Solvers for importers" is executed as it is written (a user copies them)."""

from __future__ import annotations

from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MARKER = "# Solvers for importers"


def runnable_examples() -> list[tuple[str, str]]:
    text = API.read_text()
    assert MARKER in text, f"{API} lost its '{MARKER}' section"
    examples, heading, code = [], None, None
    for line in text[text.index(MARKER):].splitlines():
        if code is not None:
            if line.startswith("```"):
                examples.append((heading, "\n".join(code)))
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            code = []
        elif line.startswith("#"):
            heading = line.lstrip("# ").strip()
    return examples


def test_every_solver_section_has_an_example():
    headings = [heading for heading, _ in runnable_examples()]
    assert any(heading.startswith("FACIMS") for heading in headings), headings


@pytest.mark.parametrize("heading,code", runnable_examples(), ids=lambda value: str(value)[:40])
def test_example_runs(heading, code):
    exec(compile(code, f"docs/api.md ({heading})", "exec"), {"__name__": "docs_example"})
