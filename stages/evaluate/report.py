"""Stage `report`: the paper's comparison (zero-shot / Phase A / BALLAD) as one table.

Reads the ``metrics.json`` that ``evaluate`` wrote under each report folder and renders rows of
many / medium / few / all top-1 accuracy, as in the paper's Tables 1–3.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runtime import atomic_path
from stages.evaluate.config import ReportConfig

ROWS = (("zero_shot", "zero-shot"), ("phase_a", "Phase A"), ("ballad", "BALLAD (Phase A + B)"))
COLUMNS = (("many", "many"), ("medium", "medium"), ("few", "few"), ("top1", "all"), ("top5", "top-5"))


def report(cfg: ReportConfig) -> str:
    """The table of ``cfg.reports``, also written to ``cfg.out`` when it names a file."""
    cfg.check()
    table = render_table(load_rows(cfg.reports))
    if cfg.out:
        with atomic_path(cfg.out) as tmp:
            tmp.write_text(table + "\n")
    return table


def load_rows(reports: str | Path, rows=ROWS) -> list[tuple[str, dict]]:
    reports = Path(reports)
    found = []
    for folder, label in rows:
        path = reports / folder / "metrics.json"
        if path.is_file():
            try:
                found.append((label, json.loads(path.read_text())))
            except json.JSONDecodeError:
                raise UserError(f"{path}: not valid JSON") from None
    if not found:
        raise UserError(f"{reports}: no metrics.json under {', '.join(f for f, _ in rows)}; run `dvc repro` first")
    return found


def render_table(rows: list[tuple[str, dict]]) -> str:
    """A Markdown table; a missing value (e.g. an empty shot group) shows as '–'."""
    header = "| model | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for label, m in rows:
        cells = [f"{m[key]:.1f}" if isinstance(m.get(key), (int, float)) else "–" for key, _ in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
