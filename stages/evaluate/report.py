"""Stage `report`: the paper's comparison (zero-shot / Phase A / BALLAD) as one table.

Reads the ``metrics.json`` that ``evaluate`` wrote under each report folder and renders rows of
many / medium / few / all top-1 accuracy, as in the paper's Tables 1–3, then top-1 at each taxonomy level
(genus … kingdom) that some row's metrics.json holds (iNaturalist's; stages/evaluate/score.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runtime import atomic_path
from stages.evaluate.config import ReportConfig
from store.shards import TAXONOMY_LEVELS

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


def _levels(m: dict) -> dict:
    """The taxonomy levels' top-1 of one metrics.json ({} without them)."""
    found = m.get("taxonomy")
    return found if isinstance(found, dict) else {}


def render_table(rows: list[tuple[str, dict]]) -> str:
    """A Markdown table; a missing value (e.g. an empty shot group) shows as '–'. The taxonomy columns,
    finest first, are those any row holds."""
    levels = [lv for lv in reversed(TAXONOMY_LEVELS) if any(lv in _levels(m) for _, m in rows)]
    header = "| model | " + " | ".join([*(name for _, name in COLUMNS), *levels]) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + len(levels) + 1)]
    for label, m in rows:
        values = [m.get(key) for key, _ in COLUMNS] + [_levels(m).get(lv) for lv in levels]
        cells = [f"{v:.1f}" if isinstance(v, (int, float)) else "–" for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
