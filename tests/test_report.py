import json

import pytest

from pipeline.errors import UserError
from stages.evaluate.report import load_rows, render_table


def test_table_has_one_row_per_evaluated_model(tmp_path):
    (tmp_path / "phase_a").mkdir()
    (tmp_path / "phase_a/metrics.json").write_text(json.dumps({"many": 80.0, "medium": 50.25, "few": None, "top1": 61.0, "top5": 90.0}))
    (tmp_path / "ballad").mkdir()
    (tmp_path / "ballad/metrics.json").write_text(json.dumps({"many": 78.0, "medium": 60.0, "few": 40.0, "top1": 66.5, "top5": 93.0}))
    table = render_table(load_rows(tmp_path)).splitlines()
    assert len(table) == 4
    assert table[2] == "| Phase A | 80.0 | 50.2 | – | 61.0 | 90.0 |"
    assert table[3].startswith("| BALLAD (Phase A + B) | 78.0 | 60.0 | 40.0 | 66.5")


def test_no_reports_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.json"):
        load_rows(tmp_path)
