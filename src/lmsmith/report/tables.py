"""Small result tables shared by eval, compress and report: built once, rendered as markdown or HTML.

A table is stored in results.json as `{"columns": [...], "rows": [[...], ...]}` with cells already
formatted as strings, so every rendering shows the same digits. Only the standard library is used.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any


def format_number(value: float | int | None, signed: bool = False) -> str:
    """Readable digits: integers as is, large values with one decimal, others with two (or 4 significant)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:+d}" if signed else str(value)
    sign = "+" if signed else ""
    if value != 0 and abs(value) < 0.01:
        return f"{value:{sign}.3g}"
    if abs(value) >= 1000:
        return f"{value:{sign},.1f}"
    return f"{value:{sign}.2f}"


@dataclass
class Table:
    """Rows of formatted cells. `numeric` tables right-align every column but the first (the label)."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    numeric: bool = True

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table has {len(self.columns)} columns")
        self.rows.append([cell if isinstance(cell, str) else format_number(cell) for cell in cells])

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "rows": [list(row) for row in self.rows]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Table":
        return cls(columns=[str(c) for c in data["columns"]], rows=[[str(c) for c in row] for row in data["rows"]])

    def to_markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |"

        aligns = ["---"] + ["---:" if self.numeric else "---"] * (len(self.columns) - 1)
        return "\n".join([line(self.columns), "| " + " | ".join(aligns) + " |"] + [line(r) for r in self.rows])

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in self.rows
        )
        css_class = "numeric" if self.numeric else "text"
        return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _markdown_cell(cell: str) -> str:
    """One table cell: pipes escaped, newlines flattened, and angle brackets escaped so that model
    output such as "<script>" shows as text instead of being rendered as HTML by a markdown viewer."""
    return cell.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")
