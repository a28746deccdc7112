"""python -m bench.faults [--trials N] [--stages prepare,phase-a,extract,adapter] [--seed S] [--work DIR]

Fault injection, outside CI (tests/test_reliability.py runs a few `prepare` trials). Per stage, one
uninterrupted run gives the reference output, its duration and when its output first appeared; each
trial then starts the same command on a fresh output and SIGKILLs its whole process group at a seeded
random moment, re-runs the command to the end and compares the final output with the reference bit for
bit:

- prepare: every file of the dataset directory (shards and dataset.json) byte for byte;
- phase-a (`--resume`, as dvc.yaml runs it): final.pt's tensors byte for byte and final.json's steps,
  selected epoch and val accuracy (a resumed run continues from last.pt's step with its saved RNG states, so it
  must end where the uninterrupted run did);
- extract: every array of the store (dtype, shape, bytes) and every attribute but `created`;
- adapter: the state dict (dtype, shape, bytes), the losses and the config.

Half the kills land anywhere in the run (most of a short run is start-up: imports, the model build);
the other half wait for the output (or a temporary file of it) to appear and land within the writing
window the reference took, where a kill can leave partial output behind. All on a tiny synthetic
dataset with the embedded ballad-tiny (random init, `--ckpt none`), through the CLI as a user runs it,
with OMP_NUM_THREADS=1 so that reductions split the same way every run. Outputs live in a temporary
directory (or --work, kept for inspection).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "phase-a", "extract", "adapter")
NEEDS = {"prepare": None, "phase-a": "prepare", "extract": "prepare", "adapter": "extract"}  # whose reference it reads
PREPARE = ["prepare", "synthetic", "--max-count", "60", "--imbalance", "20", "--test-per-class", "4",
           "--val-per-class", "2", "--shard-size", "25"]
EXTRACT = ["extract", "--ckpt", "none", "--model", "ballad-tiny", "--batch-size", "32", "--workers", "0", "--device", "cpu"]
PHASE_A = ["phase-a", "--model", "ballad-tiny", "--pretrained", "none", "--epochs", "3", "--batch-size", "32",
           "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0", "--device", "cpu", "--resume"]
ADAPTER = ["adapter", "--epochs", "20", "--batch-size", "64", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BALLAD_PROGRESS": "0"}


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def writing(out: Path) -> bool:
    """Whether the stage has started writing ``out``: it exists, or a temporary file of it does (the lock
    file beside it does not count)."""
    return out.exists() or any(p.name.startswith(f".{out.name}.") and p.suffix == ".tmp" for p in out.parent.iterdir())


def run_to_end(args: list[str], out: Path) -> tuple[float, float]:
    """Run a command uninterrupted: (seconds until it started writing ``out``, seconds in all)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cli(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        started, first = time.monotonic(), None
        while proc.poll() is None:
            if first is None and writing(out):
                first = time.monotonic() - started
            time.sleep(0.01)
        total = time.monotonic() - started
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(args)} failed:\n{err.read().decode(errors='replace')[-2000:]}")
    return (total if first is None else first), total


def run_killed(args: list[str], out: Path, delay: float, after_output: bool) -> str:
    """Start ``args`` and SIGKILL its process group ``delay`` s after the start, or after it started
    writing ``out`` when ``after_output``: 'finished' first, or killed 'before output' / 'while writing'."""
    proc = subprocess.Popen(cli(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = None if after_output else time.monotonic() + delay
    while proc.poll() is None:
        now = time.monotonic()
        if deadline is None and writing(out):
            deadline = now + delay
        if deadline is not None and now >= deadline:
            wrote = writing(out)
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and any loader workers, as `kill -9 -PGID` does
            proc.wait()
            return "while writing" if wrote else "before output"
        time.sleep(0.005)
    return "finished"


# ---------------------------------------------------------------- comparisons: None when equal, else what differs
def same_tree(a: Path, b: Path) -> str | None:
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    theirs = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    if files != theirs:
        return f"files differ: {sorted(map(str, files ^ theirs))[:5]}"
    diff = [str(f) for f in sorted(files) if (a / f).read_bytes() != (b / f).read_bytes()]
    return f"bytes differ: {diff[:5]}" if diff else None


def same_store(a: Path, b: Path) -> str | None:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    attrs = [k for k in set(ga.attrs) | set(gb.attrs) if k != "created" and ga.attrs.get(k) != gb.attrs.get(k)]
    if attrs:
        return f"attributes differ: {sorted(attrs)}"
    arrays = {n: x for n, x in ga.members(max_depth=None) if isinstance(x, zarr.Array)}
    theirs = {n: x for n, x in gb.members(max_depth=None) if isinstance(x, zarr.Array)}
    if arrays.keys() != theirs.keys():
        return f"arrays differ: {sorted(arrays.keys() ^ theirs.keys())}"
    for name in sorted(arrays):
        x, y = arrays[name][...], theirs[name][...]
        if dict(arrays[name].attrs) != dict(theirs[name].attrs):
            return f"{name}: attributes differ"
        if x.dtype != y.dtype or x.shape != y.shape or (x.tolist() if x.dtype.kind in "TUO" else x.tobytes()) != \
                (y.tolist() if y.dtype.kind in "TUO" else y.tobytes()):
            return f"{name}: values differ"
    for group in sorted({n.rpartition("/")[0] for n in arrays} - {""}):
        if dict(ga[group].attrs) != dict(gb[group].attrs):
            return f"{group}: attributes differ"
    return None


def same_tensors(sx: dict, sy: dict, what: str) -> str | None:
    import torch

    if sx.keys() != sy.keys():
        return f"{what} keys differ"
    for k in sx:
        if sx[k].dtype != sy[k].dtype or sx[k].shape != sy[k].shape or \
                not torch.equal(sx[k].flatten().view(torch.uint8), sy[k].flatten().view(torch.uint8)):
            return f"{what}[{k}] differs"
    return None


def same_adapter(a: Path, b: Path) -> str | None:
    import torch

    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return same_tensors(x["state_dict"], y["state_dict"], "state_dict") or \
        next((f"{k} differs" for k in ("losses", "config") if x[k] != y[k]), None)


def same_phase_a(a: Path, b: Path) -> str | None:
    import json

    import torch

    x, y = (torch.load(p / "final.pt", map_location="cpu", weights_only=True) for p in (a, b))
    ja, jb = (json.loads((p / "final.json").read_text()) for p in (a, b))
    return same_tensors(x, y, "final.pt") or \
        next((f"final.json {k} differs" for k in ("steps", "selected_epoch", "val_acc", "sha256")
              if ja.get(k) != jb.get(k)), None)


# ---------------------------------------------------------------- per stage: command, output, comparison
def stage_setup(stage: str, work: Path) -> tuple[list[str], Path, Callable[[Path, Path], str | None]]:
    """(command less --out, the output path trials write, comparison); inputs are the references of
    the stages before (the dataset of prepare's, the store of extract's)."""
    out = work / stage / {"prepare": "shapes", "phase-a": "checkpoint", "extract": "features.zarr",
                          "adapter": "adapter.pt"}[stage]
    if stage == "prepare":
        return PREPARE + ["--out", str(out)], out, same_tree
    if stage == "phase-a":
        return PHASE_A + ["--data", str(work / "prepare" / "reference"), "--out", str(out)], out, same_phase_a
    if stage == "extract":
        return EXTRACT + ["--data", str(work / "prepare" / "reference"), "--out", str(out)], out, same_store
    return ADAPTER + ["--features", str(work / "extract" / "reference"), "--out", str(out)], out, same_adapter


def remove(path: Path) -> None:
    """``path`` and the temporary files a killed run left beside it: each trial starts afresh."""
    for p in [path, *path.parent.glob(f".{path.name}.*.tmp")]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_stage(stage: str, work: Path, trials: int, rng: random.Random) -> dict:
    args, out, same = stage_setup(stage, work)
    reference = out.with_name("reference")
    out.parent.mkdir(parents=True, exist_ok=True)  # `writing` watches it from the start
    remove(out)
    remove(reference)
    first, total = run_to_end(args, out)
    out.rename(reference)  # trials write the same path, so path-bearing records (commands) compare equal
    outcomes, failures = {"before output": 0, "while writing": 0, "finished": 0}, []
    for trial in range(trials):
        remove(out)
        anywhere = rng.random() < 0.5
        delay = rng.uniform(0, total if anywhere else total - first)
        outcomes[run_killed(args, out, delay, after_output=not anywhere)] += 1
        try:
            run_to_end(args, out)
            problem = same(out, reference)
        except SystemExit as e:  # the rerun failed: a resume that does not work is a failure too
            problem = str(e).splitlines()[0]
        if problem:
            failures.append(f"trial {trial}: {problem}")
    return {"stage": stage, "trials": trials, "failures": len(failures), **outcomes,
            "reference_s": round(total, 1), "output_after_s": round(first, 1), "problems": failures}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[1])
    parser.add_argument("--trials", type=int, default=20, help="kills per stage (default 20)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--work", type=Path, help="keep outputs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.trials < 1 or not stages or any(s not in STAGES for s in stages):
        parser.error(f"--trials must be at least 1 and --stages a list of {', '.join(STAGES)}")
    needed = set(stages)  # and the stages whose references they read, built first
    for stage in stages:
        while NEEDS[stage]:
            stage = NEEDS[stage]
            needed.add(stage)
    needed = [s for s in STAGES if s in needed]
    work = args.work or Path(tempfile.mkdtemp(prefix="ballad-faults-"))
    print(f"{datetime.now(timezone.utc).date()}, {cpu_model()}, seed {args.seed}, work {work}", flush=True)
    failed = 0
    for stage in needed:
        rng = random.Random(f"{args.seed}/{stage}")
        result = run_stage(stage, work, args.trials if stage in stages else 0, rng)
        if stage not in stages:
            continue
        failed += result["failures"]
        print(f"{stage}: {result['trials']} trials, {result['failures']} failures (killed before output "
              f"{result['before output']}, while writing {result['while writing']}, finished first "
              f"{result['finished']}; uninterrupted run {result['reference_s']} s, writing from "
              f"{result['output_after_s']} s)", flush=True)
        for problem in result["problems"]:
            print(f"  {problem}")
    if args.work is None:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
