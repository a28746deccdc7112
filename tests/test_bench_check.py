"""`python -m bench --check`: the comparison of a fresh run's ratios with the recorded ones (no timing here)."""
from __future__ import annotations

import pytest

from bench.check import verdicts
from bench.common import check

SPEEDUP = "Phase B cached vs BALLAD-style, RN50"
SLOWDOWN = "Phase B epoch, views streamed / no views"


def result(speedup: float, slowdown: float, quick: bool = True, device: str = "cpu") -> dict:
    """A benchmark's result JSON as the runner writes it: a speedup, a slowdown, and two rows --check leaves
    alone: an absolute time and a ratio that varies by nature."""
    return {"quick": quick, "machine": {"device": device}, "summary": [
        check(SPEEDUP, speedup, 500, unit="×"),
        check(SLOWDOWN, slowdown, None, higher_is_better=False, unit="×"),
        check("Phase B ImageNet-LT 10 epochs, cpu", 100.0, 75, False, " s"),
        check("store read vs np.load, cold", speedup / 1000, unit="×", compared=False)]}


@pytest.mark.parametrize("speedup, slowdown, expected", [
    (2000, 2.0, ["PASS", "PASS"]),
    (1700, 2.4, ["PASS", "PASS"]),  # worse, but within a factor 1.25
    (1500, 2.0, ["REGRESSED", "PASS"]),  # 2000 / 1500 = 1.33
    (2000, 2.6, ["PASS", "REGRESSED"]),  # 2.6 / 2.0 = 1.3: a slowdown regresses upwards
    (9000, 0.5, ["PASS", "PASS"]),  # better either way is never a regression
], ids=["same", "within-tolerance", "speedup-fell", "slowdown-grew", "improved"])
def test_only_ratios_are_compared_each_in_its_own_direction(speedup, slowdown, expected):
    lines = verdicts(result(speedup, slowdown), result(2000, 2.0), "cpu", tolerance=0.25)
    assert [v for v, _ in lines] == expected  # neither the absolute time (s) nor the cold read
    assert lines[0][1].startswith(f"{SPEEDUP}: {speedup:.4g}× (recorded 2000×, ")
    assert "higher is better" in lines[0][1]
    assert lines[1][1].startswith(f"{SLOWDOWN}: ") and "lower is better" in lines[1][1]


def test_the_tolerance_decides():
    assert [v for v, _ in verdicts(result(1500, 2.0), result(2000, 2.0), "cpu", tolerance=0.5)] == ["PASS", "PASS"]
    strict = verdicts(result(1900, 2.0), result(2000, 2.0), "cpu", tolerance=0.01)
    assert [v for v, _ in strict] == ["REGRESSED", "PASS"]


@pytest.mark.parametrize("recorded, device, reason", [
    (None, "cpu", "nothing recorded: run `python -m bench --quick` first"),
    (result(2000, 2.0, quick=False), "cpu", "the recorded run was full-size, not --quick"),
    (result(2000, 2.0, device="cuda"), "cpu", "the recorded run was on cuda, this one on cpu"),
    ({"quick": True, "machine": {"device": "cpu"}, "summary": []}, "cpu",
     "no recorded ratio (re-record with `python -m bench --quick`)"),
], ids=["nothing-recorded", "full-size", "other-device", "row-not-recorded"])
def test_what_cannot_be_compared_is_skipped_with_its_reason(recorded, device, reason):
    assert verdicts(result(1, 100), recorded, device) == [("SKIP", f"{SPEEDUP}: {reason}"),
                                                          ("SKIP", f"{SLOWDOWN}: {reason}")]


def test_a_cuda_index_is_the_same_kind_of_device():
    assert [v for v, _ in verdicts(result(2000, 2.0), result(2000, 2.0, device="cuda:0"), "cuda")] == ["PASS", "PASS"]
