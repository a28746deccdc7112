"""python -m bench.fuzz [--examples N] [--seed S] [--readers store,checkpoint,bundle,dataset] [--work DIR]

Property-based fuzzing of the files the pipeline writes and reads back, which anyone can edit and
which no checksum covers (issue 22): a feature store's attributes (the root's, every split's and
text's zarr.json), a Phase A checkpoint's final.json, a bundle's bundle.json and a dataset's
dataset.json. Each case takes the valid files of a tiny pipeline run (built once: a 30-class shapes
dataset of a few images per class, Phase A on the embedded ballad-tiny, extract with train and
test-time views, a Phase B adapter, a bundle), edits one to three fields of one of them (any value at
any depth: wrong types, NaN, ±inf, huge and negative numbers, lone surrogates and line breaks in text,
missing and extra keys, lists of the wrong length, nested garbage) and runs every command that reads
that file through click's runner. The property: each command works (exit 0, and what it writes
holds finite numbers and reads back), or exits non-zero with one `Error: …` line and no traceback.

tests/test_fuzz_readers.py runs the same properties with a few examples and fixed seeds in `make
test`; this runs as many as asked and reports every failing case instead of stopping at the first.
Figures: docs/reliability.md, *Fuzzed readers*.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

os.environ.setdefault("BALLAD_PROGRESS", "0")

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

READERS = ("store", "checkpoint", "bundle", "dataset")
STORE_NODES = ("", "train", "val", "test", "text")  # the groups whose zarr.json attributes are edited


@dataclass(frozen=True)
class Fixtures:
    """The valid files every case starts from (read-only: a case works on its own copy)."""

    root: Path
    data: Path  # prepared dataset: dataset.json + shards
    ckpt: Path  # Phase A --out: final.pt, final.json, last.pt, best.pt
    store: Path  # extract's store of data, with train views and flip test-time views
    adapter: Path
    bundle: Path
    image: Path  # one image for predict
    classes: Path  # a class name file for predict --add-classes (makes the bundle's templates matter)


def build(root: Path) -> Fixtures:
    """A tiny pipeline run (a few seconds on one CPU thread)."""
    from PIL import Image

    from stages.adapter import train_adapter
    from stages.adapter.config import TrainConfig
    from stages.bundle.run import export
    from stages.extract.run import extract
    from stages.phase_a import run_phase_a
    from stages.phase_a.config import PhaseAConfig
    from stages.prepare.synthetic import SyntheticConfig, prepare_synthetic

    data = prepare_synthetic(SyntheticConfig(out=str(root / "data"), max_count=4, imbalance=4, test_per_class=1,
                                            val_per_class=1, shard_size=40))
    ckpt = root / "phase_a"
    final = run_phase_a(PhaseAConfig(data=str(data), model="ballad-tiny", out=str(ckpt), epochs=1, batch_size=16,
                                     optimizer="adamw", lr=1e-3, schedule="standard", workers=0, eval_every=0,
                                     device="cpu"))
    store = root / "features.zarr"
    extract(str(final), data, store, batch_size=64, workers=0, train_views=2, test_views="flip", device="cpu")
    adapter = root / "adapter.pt"
    train_adapter(store, adapter, TrainConfig(epochs=1, batch_size=16, schedule="standard"), device="cpu")
    bundle = root / "shapes.bundle"
    export(final, str(adapter), store, bundle)
    image = root / "image.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(image)
    classes = root / "classes.txt"
    classes.write_text("violet blob\n")
    return Fixtures(root, Path(data), ckpt, store, adapter, bundle, image, classes)


# ---------------------------------------------------------------- the documents and how a case writes them
def _zarr_json(store: Path, node: str) -> Path:
    return store / node / "zarr.json" if node else store / "zarr.json"


def documents(reader: str, fx: Fixtures) -> dict[str, object]:
    """The JSON documents of ``reader`` that cases edit, by name (a store: each group's attributes)."""
    if reader == "store":
        return {node or "(root)": json.loads(_zarr_json(fx.store, node).read_text())["attributes"]
                for node in STORE_NODES}
    file = {"checkpoint": fx.ckpt / "final.json", "bundle": fx.bundle / "bundle.json",
            "dataset": fx.data / "dataset.json"}[reader]
    return {file.name: json.loads(file.read_text())}


def materialize(reader: str, fx: Fixtures, docs: dict[str, object], work: Path) -> Path:
    """A copy of ``reader``'s fixture in ``work`` holding the edited ``docs``; large files are hard links."""
    source = {"store": fx.store, "checkpoint": fx.ckpt, "bundle": fx.bundle, "dataset": fx.data}[reader]
    target = work / source.name
    shutil.copytree(source, target, copy_function=os.link)
    for name, doc in docs.items():
        if reader == "store":
            path = _zarr_json(target, "" if name == "(root)" else name)
            whole = json.loads(path.read_text())
            whole["attributes"] = doc
        else:
            path, whole = target / name, doc
        path.unlink()  # a hard link: writing through it would edit the fixture
        path.write_text(json.dumps(whole, indent=2))
    return target


# ---------------------------------------------------------------- edits
NUMBERS = [0, 1, -1, 2, 3, 30, 64, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30, math.nan, math.inf, -math.inf,
           1e308, -1e308, 0.5, -0.0, 1e-310, 1e4, 1e4 + 1]
TEXTS = ["", " ", "\n", "a\nb", "\t", "\ud800", "é", "\u200b", "🦄", "{}", "{0}", "{x.y}", "{}{}", "{", "nan", "none",
         "None", "../x", "/etc/passwd", "pipe:echo hi", "float16", "float32", "cpu", "gpu", "flip", "ten-crop",
         "text", "head", "ballad-tiny", "RN50", "a" * 300]
KEYS = st.one_of(st.sampled_from(TEXTS), st.text(max_size=6))
LEAVES = st.one_of(st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(), st.floats(),
                   st.sampled_from(TEXTS), st.text(max_size=8))
GARBAGE = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                       max_leaves=6)


@st.composite
def tweaked(draw, value):
    """A value near ``value``: of its kind but wrong (a neighbouring number, a list one item short, …)."""
    if isinstance(value, bool):
        return draw(st.sampled_from([not value, int(value), str(value).lower()]))
    if isinstance(value, (int, float)):
        return draw(st.sampled_from([value + 1, value - 1, -value, 0, value * 10**30, float(value), str(value),
                                     math.nan, math.inf, -math.inf]) | st.sampled_from(NUMBERS))
    if isinstance(value, str):
        return draw(st.sampled_from(["", value + "\n", value * 40, value[:-1], value.upper(), value + "\ud800",
                                     value + "é🦄", "{" + value, value + "{}"]) | st.sampled_from(TEXTS))
    if isinstance(value, list):
        extra = draw(GARBAGE)
        return draw(st.sampled_from([[], value[:-1], value + value[-1:], value + [extra], value[::-1],
                                     [value], [extra] * len(value)]))
    if isinstance(value, dict):
        return draw(st.sampled_from([{}, list(value.values()), {**value, draw(KEYS): draw(GARBAGE)}]))
    return draw(st.sampled_from(["none", 0, "", {}, []]))


@dataclass
class Case:
    """One edited document (by name) and the edits made to it, as a failure names them."""

    docs: dict[str, object]
    edits: list[str]

    def __str__(self) -> str:
        return "; ".join(self.edits)


OPS = ("replace", "tweak", "tweak", "delete", "add")


@st.composite
def cases(draw, originals: dict[str, object], objects: bool) -> Case:
    """One to three edits of one document. The first picks a field uniformly among every document's
    top-level keys (so every field is as likely) or a document itself; an edit may go deeper, then
    replaces the value with garbage, tweaks it (``tweaked``), deletes it or adds a key beside it.
    ``objects``: the documents stay JSON objects (zarr refuses attributes that are not)."""
    fields = [(name, key) for name, doc in originals.items() for key in (None, *doc)]
    name, key = draw(st.sampled_from(fields))
    box = {name: copy.deepcopy(originals[name])}
    edits = []
    for i in range(draw(st.integers(1, 3))):
        doc = box[name]
        if i:
            key = draw(st.sampled_from([None, *doc])) if isinstance(doc, dict) else None
        parent, at, path = box, name, name
        if key is not None and key in doc:
            parent, at, path = doc, key, f"{name}:{key}"
            while isinstance(parent[at], (dict, list)) and parent[at] and draw(st.booleans()):
                child = draw(st.sampled_from(list(parent[at]) if isinstance(parent[at], dict) else range(len(parent[at]))))
                parent, at, path = parent[at], child, f"{path}/{child!r}"
        op, node = draw(st.sampled_from(OPS)), parent[at]
        if op == "delete" and parent is not box:
            del parent[at]
            edits.append(f"delete {path}")
            continue
        if op == "add" and isinstance(node, dict):
            extra = draw(KEYS)
            node[extra] = draw(GARBAGE)
            edits.append(f"add {path}/{extra!r} = {_short(node[extra])}")
            continue
        whole = objects and parent is box  # the attributes themselves: another object
        parent[at] = draw(st.dictionaries(KEYS, GARBAGE, max_size=3) if whole else
                          tweaked(node) if op == "tweak" else GARBAGE)
        edits.append(f"{'tweak' if op == 'tweak' and not whole else 'replace'} {path} = {_short(parent[at])}")
    return Case(box, edits)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


# ---------------------------------------------------------------- commands and what a good outcome is
@dataclass(frozen=True)
class Command:
    """A command line run on every case of a reader, and what its result must satisfy besides ``outcome``'s rule."""

    args: list[str]
    sane: Callable[[object, Path], str | None] = lambda result, out: None  # after exit 0: what is wrong, or None
    out: Path | None = None  # what the command writes, for ``sane``
    lines: tuple[str, ...] | None = None  # what every line of stdout after the first starts with, whatever the exit
    expect: str | None = None  # on the unedited fixture: exit 0 (None), or the error that shows the reader was passed


VERIFY_LINES = ("ok ", "FAIL ")  # one finding a line, after the line naming what PATH is


def commands(reader: str, fx: Fixtures, target: Path, work: Path) -> list[Command]:
    """Every command that reads ``reader``'s files, on the copy ``target``, each in its cheapest form that
    reaches the reader (for a dataset: options that fail only after dataset.json was read and its shards
    listed)."""
    cpu = ["--device", "cpu"]
    phase_b = ["--epochs", "1", "--schedule", "standard", "--batch-size", "16"]
    if reader == "store":
        s = str(target)
        return [Command(["evaluate", "--features", s, "--out", str(work / "r1"), *cpu], _finite_json, work / "r1"),
                Command(["evaluate", "--features", s, "--adapter", str(fx.adapter), "--out", str(work / "r2"),
                         "--tta", "mean", "--knn-k", "2", "--logit-adjust", "1", *cpu], _finite_json, work / "r2"),
                Command(["adapter", "--features", s, "--out", str(work / "a.pt"), *phase_b, *cpu]),
                Command(["sweep", "--features", s, "--out", str(work / "sweep"), "--lambdas", "0,0.5", *phase_b, *cpu],
                        _finite_json, work / "sweep"),
                Command(["neighbors", "--features", s, "--key", "test_000000", *cpu], _finite_neighbors),
                Command(["export", "--ckpt", str(fx.ckpt / "final.pt"), "--adapter", str(fx.adapter), "--features", s,
                         "--out", str(work / "b.bundle")], _bundle_reads_back, work / "b.bundle"),
                Command(["verify", s], lines=VERIFY_LINES)]
    if reader == "checkpoint":
        return [Command(["extract", "--ckpt", str(target / "final.pt"), "--data", str(fx.data), "--out",
                         str(work / "e.zarr"), "--splits", "val", "--workers", "0", *cpu], _store_reads_back,
                        work / "e.zarr"),
                Command(["verify", str(target)], lines=VERIFY_LINES)]
    if reader == "bundle":
        predict = ["predict", "--bundle", str(target), str(fx.image), "--json", *cpu]
        return [Command(predict, _finite_predictions),
                Command([*predict, "--add-classes", str(fx.classes)], _finite_predictions),
                Command(["verify", str(target)], lines=VERIFY_LINES)]
    d = str(target)
    return [Command(["verify", d], lines=VERIFY_LINES),
            Command(["extract", "--ckpt", "none", "--model", "ballad-tiny", "--data", d, "--out", str(work / "x.zarr"),
                     "--templates", str(work / "no-such-templates.txt"), *cpu], expect="--templates"),
            Command(["phase-a", "--data", d, "--model", "ballad-tiny", "--out", str(work / "pa"), "--batch-size",
                     "1000000", "--workers", "0", *cpu], expect="--batch-size 1000000")]


def _numbers(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float):
        yield value


def _finite_json(result, out: Path) -> str | None:
    for file in sorted(out.rglob("*.json")):
        if not all(math.isfinite(x) for x in _numbers(json.loads(file.read_text()))):
            return f"{file.name} holds non-finite numbers"
    return None


def _finite_neighbors(result, out: Path) -> str | None:
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    return None if all(math.isfinite(float(r[1])) for r in rows) else "non-finite cosines"


def _finite_predictions(result, out: Path) -> str | None:
    probs = [p["prob"] for line in result.stdout.splitlines() for p in json.loads(line)["predictions"]]
    return None if probs and all(math.isfinite(p) for p in probs) else f"predictions {probs}"


def _store_reads_back(result, out: Path) -> str | None:
    from store.features import FeatureStore

    FeatureStore.open(out).features("val")  # a UserError here: extract wrote what readers refuse
    return None


def _bundle_reads_back(result, out: Path) -> str | None:
    from stages.bundle.run import read_meta

    read_meta(out)
    return None


def outcome(result, command: Command) -> str | None:
    """What is wrong with one command's result: a traceback, a failure that is not one `Error:` line, or
    (exit 0) what ``command.sane`` finds; None when all is well."""
    e = result.exception
    if e is not None and not isinstance(e, SystemExit):
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    odd = [line for line in result.stdout.splitlines()[1:] if command.lines and not line.startswith(command.lines)]
    if odd:
        return f"printed {odd[0][:200]!r}"
    if result.exit_code == 0:
        try:
            return command.sane(result, command.out)
        except Exception as e:  # whatever the check trips on is the failure
            return f"after exit 0, {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    err = result.stderr.strip().splitlines()
    if not err or not err[-1].startswith("Error: ") or sum(line.startswith("Error: ") for line in err) != 1:
        return f"exit {result.exit_code} without one 'Error: …' line: {result.stderr[-300:]!r}"
    if "Traceback" in result.output:
        return "a traceback in the output"
    return None


def unedited(reader: str, fx: Fixtures) -> list[str]:
    """What differs from ``Command.expect`` on the unedited fixture: that every command works, or fails
    only after its reader (so that the cases test the reader, not an option check before it)."""
    def expected(result, command: Command) -> str | None:
        if command.expect is None:
            return outcome(result, command) or (f"exit {result.exit_code}: {result.output[-300:]!r}"
                                                       if result.exit_code else None)
        return None if command.expect in result.stderr else f"no {command.expect!r} in {result.stderr[-300:]!r}"

    return run_case(reader, fx, Case(documents(reader, fx), ["none"]), expected)


def run_case(reader: str, fx: Fixtures, case: Case, judge=None) -> list[str]:
    """Problems of every command of ``reader`` on a copy of its fixture edited as ``case`` says, as
    ``judge`` (default ``outcome``) finds them."""
    from click.testing import CliRunner

    from cli import main

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp)
        target = materialize(reader, fx, case.docs, work)
        problems = []
        for command in commands(reader, fx, target, work):
            result = CliRunner().invoke(main, command.args)
            problem = (judge or outcome)(result, command)
            if problem:
                problems.append(f"`{' '.join(command.args[:1])}`: {problem}")
        return problems


# ---------------------------------------------------------------- the property, for the tests and for main
@dataclass
class Tally:
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def fuzz(reader: str, fx: Fixtures, examples: int, seed: int | None = None, stop: bool = True) -> Tally:
    """Run ``examples`` cases of ``reader``: deterministic (hypothesis' derandomize) when ``seed`` is None.
    ``stop``: raise AssertionError at the first failing case (the tests), else tally them all (the bench).
    No shrinking: each step would rerun every command, and a case lists its edits."""
    tally = Tally()
    started = time.perf_counter()

    @settings(max_examples=examples, derandomize=seed is None, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases(documents(reader, fx), objects=reader == "store"))
    def prop(case: Case):
        tally.cases += 1
        problems = run_case(reader, fx, case)
        if problems:
            failure = f"{reader} case {tally.cases} ({case}): {' | '.join(problems)}"
            failure = failure.encode("utf-8", "backslashreplace").decode()  # a lone surrogate of an edit, printable
            if stop:
                raise AssertionError(failure)
            tally.failures.append(failure)

    (prop if seed is None else hypothesis_seed(seed)(prop))()
    tally.seconds = time.perf_counter() - started
    return tally


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[1])
    parser.add_argument("--examples", type=int, default=200, help="cases per reader (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--readers", default=",".join(READERS), help=f"comma-separated, of {', '.join(READERS)}")
    parser.add_argument("--work", type=Path, help="build the fixtures here (default: a temporary directory)")
    args = parser.parse_args(argv)
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    if args.examples < 1 or not readers or any(r not in READERS for r in readers):
        parser.error(f"--examples must be at least 1 and --readers a list of {', '.join(READERS)}")
    os.environ["OMP_NUM_THREADS"] = "1"
    import logging

    import torch

    from bench.faults import cpu_model

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the stages' warnings about tiny runs, once per case
    work = args.work or Path(tempfile.mkdtemp(prefix="ballad-fuzz-"))
    print(f"{datetime.now(timezone.utc).date()}, {cpu_model()}, seed {args.seed}, {args.examples} cases per reader",
          flush=True)
    t0 = time.perf_counter()
    fx = build(work)
    print(f"fixtures: {time.perf_counter() - t0:.1f} s", flush=True)
    failed = 0
    for reader in readers:
        tally = fuzz(reader, fx, args.examples, args.seed, stop=False)
        failed += len(tally.failures)
        print(f"{reader}: {tally.cases} cases, {len(tally.failures)} failures, {tally.seconds:.0f} s", flush=True)
        for failure in tally.failures:
            print(f"  {failure}")
    if args.work is None:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
