"""``python -m bench --check``: a fresh ``--quick`` run's headline ratios against the last recorded ones.

Only ratios are compared, the summary rows in × (both sides timed in the same run, interleaved):
absolute times change with the CPU and its load, a ratio far less. A ratio regresses when it moved
the wrong way (down for a speedup, up for a slowdown) by more than a factor 1 + tolerance. A recorded
result is comparable when it is a ``--quick`` run on the same kind of device; anything else is a SKIP
with its reason, never a failure.
"""
from __future__ import annotations

# A factor 1.5: ratios timed side by side still move with the load of a shared machine (item 4's text ratio,
# same sizes: 3.57× under load, 4.39× quieter), and a regression worth a look is a large one.
TOLERANCE = 0.5


def not_comparable(recorded: dict | None, device: str) -> str | None:
    """Why ``recorded`` (a benchmark's last result JSON, None when there is none) cannot be compared with a
    fresh --quick run on ``device``, or None when it can."""
    if recorded is None:
        return "nothing recorded: run `python -m bench --quick` first"
    if not recorded.get("quick"):
        return "the recorded run was full-size, not --quick"
    was = str(recorded.get("machine", {}).get("device", "")).split(":")[0]
    if was != device.split(":")[0]:
        return f"the recorded run was on {was or 'an unnamed device'}, this one on {device}"
    return None


def verdicts(fresh: dict, recorded: dict | None, device: str, tolerance: float = TOLERANCE) -> list[tuple[str, str]]:
    """(PASS | REGRESSED | SKIP, line) for each ratio in ``fresh``'s summary against ``recorded``'s."""
    why = not_comparable(recorded, device)
    before = {} if why else {row["what"]: row.get("ratio") for row in recorded.get("summary", [])}
    out = []
    for row in fresh.get("summary", []):
        if "ratio" not in row:
            continue
        old, new = before.get(row["what"]), row["ratio"]
        if old is None:
            reason = why or "no recorded ratio (re-record with `python -m bench --quick`)"
            out.append(("SKIP", f"{row['what']}: {reason}"))
            continue
        worse = old / new if row["higher_is_better"] else new / old
        verdict = "REGRESSED" if worse > 1 + tolerance else "PASS"
        out.append((verdict, f"{row['what']}: {new:.4g}× (recorded {old:.4g}×, {new / old - 1:+.0%}; "
                             f"{'higher' if row['higher_is_better'] else 'lower'} is better, "
                             f"tolerance a factor {1 + tolerance:g})"))
    return out
