"""Writing measured tables into docs/: each script owns a marked section of a markdown file."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replaces the block between <!-- name:start --> and <!-- name:end --> (appends it if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else f"{title}\n\nTables written by the scripts in scripts/.\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
