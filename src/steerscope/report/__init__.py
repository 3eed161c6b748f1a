"""The HTML report: one self-contained file rendered from the tables the library produced.

The report never computes: :class:`ReportData` carries ``evaluation.json``'s content, the ranked
screen table and prepared feature cards, and :func:`render_report` only lays them out (figures
are drawn from those numbers by :mod:`.figures`). So the report can be re-rendered from a run
directory without the model, and what it shows is exactly what the JSON says.
"""

from __future__ import annotations

from pathlib import Path

from steerscope.report.data import FeatureCard, ReportData, Snippet, Steered
from steerscope.report.html import render_report
from steerscope.store import atomic_path


def write_report(path: str | Path, data: ReportData) -> Path:
    """Render ``data`` to ``path`` atomically (a killed run never leaves half a page)."""
    text = render_report(data)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


__all__ = ["FeatureCard", "ReportData", "Snippet", "Steered", "render_report", "write_report"]
