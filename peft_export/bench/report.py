"""The report writer: a JSON file with the machine and every row, and a Markdown table beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .machine import machine_info, machine_line

Columns = list[tuple[str, str, str]]  # (row key, header, format spec)


def markdown_table(rows: list[dict[str, Any]], columns: Columns) -> list[str]:
    """The lines of a Markdown table; a missing value is shown as "-"."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else (format(value, spec) if spec else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(folder: Path, stem: str, data: dict[str, Any], markdown: str) -> Path:
    """``stem.json`` (``data``) and ``stem.md`` (``markdown``) in ``folder``; the Markdown file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (folder / f"{stem}.md").write_text(markdown)
    return folder / f"{stem}.md"


@dataclass
class Report:
    title: str
    machine: dict[str, Any] = field(default_factory=machine_info)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def markdown(self, columns: Columns) -> str:
        lines = [f"## {self.title}", "", machine_line(self.machine), "", *markdown_table(self.rows, columns)]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, stem: str, columns: Columns) -> Path:
        return write_report(folder, stem, {"title": self.title, "machine": self.machine, "rows": self.rows,
                                           "notes": self.notes, **self.extra}, self.markdown(columns))
