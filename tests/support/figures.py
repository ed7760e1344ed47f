"""A benchmark figure: its table, notes and plot, as ``tests/bench_suite.py`` writes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import load_config


def default_tuning(quick: bool) -> tuple[Path, float]:
    """The tuning database and minutes of a default ``boost-build compile`` (``[build]``), so a
    figure's TVM CPU build is the one a user gets; ``quick`` (the tests) never tunes."""
    build = load_config(None).build
    return build.tuning_db, 0.0 if quick else build.tune_minutes


@dataclass
class Figure:
    """One figure: a table (columns, rows), notes, and how to draw it."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot: Callable[[Any], None] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        lines += ["", *(f"- {n}" for n in self.notes), ""]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
