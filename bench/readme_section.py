"""Replaces a generated section of README.md: the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``;
and the stored-or-measured results a benchmark renders there."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, markdown: str, readme: Path = README) -> None:
    """Writes ``markdown`` between the section's markers; a README without them is an error naming the section."""
    start, end = markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{markdown}\n{end}{rest.split(end, 1)[1]}")


def section_text(name: str, readme: Path = README) -> str | None:
    """The text of a generated section (between its markers), or None when the file or the section is missing."""
    start, end = markers(name)
    text = readme.read_text() if readme.exists() else ""
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def stored_or_measured(results: Path, render_only: bool, measure: Callable[[], Any]) -> Any:
    """A benchmark's results: those stored in ``results`` with ``render_only``, else ``measure()``'s, stored there."""
    if render_only:
        return json.loads(results.read_text())
    rows = measure()
    results.write_text(json.dumps(rows, indent=2) + "\n")
    return rows
