"""python -m bench.seeds: the DVC pipeline over several seeds and settings, as mean ± std per report.

    python -m bench.seeds --seeds 0 1 2
    python -m bench.seeds --seeds 0 1 2 --grid views.train-views=0,4,16 --grid evaluate.tta=none,mean
    python -m bench.seeds --variant "" --variant "phase_a.tune=bias phase_a.classifier=head"

Each seed runs in its own copy of the project (tracked and untracked files, or ``--ref``'s) made into a
git repository, so ``dvc repro`` there is the README's pipeline, unchanged. The seed goes into every
key of ``--seed-keys``. A grid's settings (the product of every ``--grid``) or the ``--variant``s (each a
whole set of changes; "" is params.yaml as it is) run one after the other in the same copy,
so DVC re-runs only the stages a setting touches (Phase A once per seed for an adapter or view grid).
Prints one table row per (setting, report) and writes the runs to bench/results/seeds-<time>.json.
Results differ across CPU models (see README); compare rows of one run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ("zero_shot", "phase_a", "ballad")
COLUMNS = ("many", "medium", "few", "top1")


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file() and not f.startswith(("bench/results/", "dvc.lock"))]


def make_copy(dest: Path, ref: str | None = None) -> None:
    """The working tree's files (tracked and untracked), or the commit ``ref``'s, into ``dest``."""
    if ref:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / "dvc.lock").unlink(missing_ok=True)
    else:
        for f in project_files():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "bench copy"], cwd=dest, check=True)


def set_params(path: Path, settings: dict[str, str]) -> None:
    params = yaml.safe_load(path.read_text())
    for key, value in settings.items():
        parts = key.split(".")
        node = params
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def has_key(params: dict, key: str) -> bool:
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seed-keys", default="phase_a.seed,adapter.train.seed,views.view-seed",
                        help="params.yaml keys that take the seed (each must exist); the pretrained model stays fixed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fixed params.yaml change")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="settings to run in turn")
    parser.add_argument("--variant", action="append", default=[], metavar="'K=V K2=V2'",
                        help="a set of changes run as one setting (instead of --grid); \"\" = params.yaml; "
                             "quote a value holding spaces: \"data.args='--image-size 128 --max-side 37'\"")
    parser.add_argument("--ref", help="copy this commit (e.g. HEAD) instead of the working tree")
    parser.add_argument("--keep", help="keep the copies under this folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    fixed = dict(s.split("=", 1) for s in args.set)
    grid = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in args.grid)]
    if grid and args.variant:
        parser.error("--grid and --variant do not combine")
    settings = ([dict(kv.split("=", 1) for kv in shlex.split(v)) for v in args.variant] if args.variant else
                [dict(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])])
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ballad-seeds-"))
    env = {**os.environ, "BALLAD_PROGRESS": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    from bench.common import machine

    out = ROOT / "bench" / "results" / f"seeds-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        work = base / f"seed-{seed}"
        if not work.exists():
            work.mkdir(parents=True)
            make_copy(work, args.ref)
        original = (work / "params.yaml").read_text()
        params = yaml.safe_load(original)
        missing = [k for k in args.seed_keys.split(",") if not has_key(params, k)]
        if missing:
            sys.exit(f"--seed-keys: params.yaml has no {', '.join(missing)}")
        seed_set = {k: str(seed) for k in args.seed_keys.split(",")}
        for setting in settings:
            (work / "params.yaml").write_text(original)  # a variant's changes never leak into the next
            set_params(work / "params.yaml", {**fixed, **seed_set, **setting})
            t0 = time.perf_counter()
            # the copy's own packages, not the editable install's working tree (which may change meanwhile)
            proc = subprocess.run(["dvc", "repro", "-q"], cwd=work, env={**env, "PYTHONPATH": str(work)},
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                return proc.returncode
            metrics = {r: json.loads((work / "reports" / r / "metrics.json").read_text()) for r in REPORTS
                       if (work / "reports" / r / "metrics.json").is_file()}
            runs.append({"seed": seed, "seeded": seed_set, "setting": setting, "repro_s": round(time.perf_counter() - t0, 1),
                         "metrics": metrics})
            label = " ".join(f"{k}={v}" for k, v in setting.items()) or "params.yaml"
            print(f"seed {seed} {label}: " + "  ".join(f"{r} {m['top1']:.1f}" for r, m in metrics.items())
                  + f"  ({runs[-1]['repro_s']:.0f} s)", flush=True)
            out.write_text(json.dumps({"machine": machine(), "fixed": fixed, "runs": runs}, indent=1))  # so far
    print(f"\n| setting | model | {' | '.join(COLUMNS)} |\n|---|---|" + "---|" * len(COLUMNS))
    for setting in settings:
        label = " ".join(f"{k}={v}" for k, v in setting.items()) or "params.yaml"
        for report in REPORTS:
            rows = [r["metrics"][report] for r in runs if r["setting"] == setting and report in r["metrics"]]
            if not rows:
                continue
            cells = []
            for col in COLUMNS:
                vals = [m[col] for m in rows if m.get(col) is not None]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}" if vals else "–")
            print(f"| {label} | {report} | " + " | ".join(cells) + " |")
    print(f"→ {out}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
