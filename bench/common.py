"""What every benchmark shares: an interleaved median timer, the machine's description, a table
printer and the JSON writer (to $OUT when set, as on the GPU machine, else bench/results/)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_many(fns: dict[str, Callable[[], object]], device="cpu", repeat: int = 3, warmup: int = 1,
              before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each fn, ``before`` (untimed) ahead of every call. Rounds are
    interleaved (a, b, a, b, …) so that load from other processes on a shared machine falls on every
    contender alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeat):
        for name, fn in fns.items():
            if before is not None:
                before()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine(device="cpu") -> dict:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            # other processes on the machine change CPU numbers; the load says how busy it was
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def results_dir() -> Path:
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_result(name: str, result: dict, device, quick: bool) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "quick": quick, "machine": machine(device), **result},
                               indent=2) + "\n")
    return path


def read_result(name: str) -> dict | None:
    """The last result written for benchmark ``name`` (None when there is none)."""
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def print_table(title: str, rows: list[dict], cols: list[str] | None = None) -> None:
    """A plain aligned table of ``rows`` (dicts with the same keys; ``cols``: only those); floats get 4
    significant digits."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = cols or list(rows[0])
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def sizes(table: dict, quick: bool, device) -> dict:
    """A benchmark's problem sizes: ``table['quick']``, else the entry for the device type (cpu, cuda)."""
    return table["quick" if quick else torch.device(device).type]


def check(what: str, value: float, target: float | None = None, higher_is_better: bool = True, unit: str = "",
          compared: bool = True) -> dict:
    """One headline number against its target (None: reported without one), for the runner's summary. A
    ratio (unit ×: both sides timed side by side) also keeps its number for ``python -m bench --check``,
    unless ``compared`` is False (a ratio that varies from run to run by nature)."""
    row = {"what": what, "value": f"{value:.4g}{unit}", "target": "-", "met": "-"}
    if target is not None:
        met = value >= target if higher_is_better else value <= target
        row.update(target=f"{'≥' if higher_is_better else '≤'} {target:g}{unit}", met="yes" if met else "NO")
    if unit == "×" and compared:
        row.update(ratio=value, higher_is_better=higher_is_better)
    return row
