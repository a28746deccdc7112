"""Top-1 at the taxonomy's coarser levels (issue #26): a store that records its dataset's taxonomy (genus …
kingdom per class) gets those levels scored by `evaluate`, in metrics.json and in the report table; a
store without one gets exactly the metrics it got before; a damaged taxonomy attribute is one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from pipeline.errors import UserError
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.report import render_table
from stages.evaluate.run import evaluate as run_evaluate
from stages.evaluate.score import score, taxonomy_accuracy
from store.feature_writer import write_store
from store.features import FeatureStore
from store.shards import TAXONOMY_LEVELS

pytestmark = pytest.mark.usefixtures("single_thread")

# (species, kingdom, phylum, class, order, family, genus): a tree whose pairs part at genus (0, 1), family
# (0/1, 2), class (3, 4), kingdom (3/4, 5) and at the root (plants, animals).
SIX = [
    ("Quercus agrifolia", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus"),
    ("Quercus robur", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus"),
    ("Fagus sylvatica", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Fagus"),
    ("Danaus plexippus", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus"),
    ("Apis mellifera", "Animalia", "Arthropoda", "Insecta", "Hymenoptera", "Apidae", "Apis"),
    ("Ardea herodias", "Animalia", "Chordata", "Aves", "Pelecaniformes", "Ardeidae", "Ardea"),
]
TAXONOMY = {level: [s[1 + i] for s in SIX] for i, level in enumerate(TAXONOMY_LEVELS)}
# (true, predicted) and the finest level the two share
CASES = [(0, 0), (1, 1),  # the species
         (0, 1), (1, 0),  # genus Quercus
         (2, 0),  # family Fagaceae, not the genus
         (3, 4), (4, 3),  # class Insecta, not the order
         (5, 3),  # kingdom Animalia, not the phylum
         (2, 5), (5, 1)]  # nothing
# By hand, of the 10: species 2, genus 2 + 2, family 4 + 1, order 5, class 5 + 2, phylum 7, kingdom 7 + 1.
BY_HAND = {"genus": 40.0, "family": 50.0, "order": 50.0, "class": 70.0, "phylum": 70.0, "kingdom": 80.0}


def _logits(pred, k: int = len(SIX)) -> torch.Tensor:
    """Logits whose argmax is ``pred``, with a runner-up, so that top-5 and ECE have something to read."""
    logits = torch.zeros(len(pred), k)
    logits[torch.arange(len(pred)), torch.as_tensor(pred)] = 4.0
    logits[torch.arange(len(pred)), (torch.as_tensor(pred) + 1) % k] = 1.0
    return logits


def test_hand_made_taxonomy_gives_the_hand_computed_accuracy_at_each_level():
    labels, pred = (np.array(x) for x in zip(*CASES))
    m = score(_logits(pred), labels, np.array([50, 40, 30, 20, 10, 5]), taxonomy=TAXONOMY)["metrics"]
    assert m["top1"] == 20.0
    assert m["taxonomy"] == BY_HAND
    assert list(m["taxonomy"]) == ["genus", "family", "order", "class", "phylum", "kingdom"]  # finest first


@pytest.mark.parametrize("level", TAXONOMY_LEVELS)
def test_each_level_is_scored_from_its_own_names(level):
    """One level names every class apart, the others name all classes alike: that level scores as the
    species do, the others 100 % (a level read from another's names would not)."""
    labels, pred = (np.array(x) for x in zip(*CASES))
    taxonomy = {lv: [f"{lv} {c}" if lv == level else "one" for c in range(len(SIX))] for lv in TAXONOMY_LEVELS}
    found = taxonomy_accuracy(pred, labels, taxonomy)
    assert found == {lv: 20.0 if lv == level else 100.0 for lv in reversed(TAXONOMY_LEVELS)}


def test_only_the_levels_the_taxonomy_has_are_scored():
    labels, pred = (np.array(x) for x in zip(*CASES))
    partial = {level: TAXONOMY[level] for level in ("kingdom", "family")}
    assert taxonomy_accuracy(pred, labels, partial) == {"family": 50.0, "kingdom": 80.0}


def _store(path, taxonomy=None, test_per_class: int = 4, seed: int = 0) -> FeatureStore:
    """Six classes of noisy features near their text embeddings; ``taxonomy`` (None: no attribute)."""
    rng = np.random.default_rng(seed)
    k, d = len(SIX), 8
    text = rng.standard_normal((k, d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    counts = np.array([12, 10, 8, 6, 4, 2])

    def draw(per_class):
        y = np.repeat(np.arange(k), per_class)
        return (text[y] + 0.9 * rng.standard_normal((len(y), d))).astype(np.float32), y

    (train, ytrain), (test, ytest) = draw(counts), draw(np.full(k, test_per_class))
    meta = {} if taxonomy is None else {"taxonomy": taxonomy}
    return write_store(path, image={"train": train, "test": test}, labels={"train": ytrain, "test": ytest},
                       keys=None, text_embeddings=text, classnames=[s[0] for s in SIX], logit_scale=20.0,
                       train_class_counts=counts, meta=meta)


def _evaluate(store, out, **options) -> dict:
    return run_evaluate(EvaluateConfig(features=str(store), out=str(out), device="cpu", **options))


def test_evaluate_scores_a_taxonomy_store_at_each_level_from_its_predictions(tmp_path):
    _store(tmp_path / "s.zarr", TAXONOMY, test_per_class=10)
    m = _evaluate(tmp_path / "s.zarr", tmp_path / "r")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == m
    pred = np.load(tmp_path / "r" / "predictions.npz")
    top1, labels = pred["top5"][:, 0], pred["label"]
    for level, names in TAXONOMY.items():  # recomputed name by name from the predictions written
        same = [names[p] == names[t] for p, t in zip(top1, labels)]
        assert m["taxonomy"][level] == pytest.approx(100 * np.mean(same))
    assert 0 < m["top1"] < m["taxonomy"]["kingdom"] < 100  # the features leave mistakes at every level


@pytest.mark.parametrize("attribute", [None, "absent"])
def test_a_store_without_a_taxonomy_gets_the_metrics_without_the_key(tmp_path, attribute):
    """``taxonomy: null`` is what `extract` records for a dataset without one; older stores lack the key."""
    _store(tmp_path / "s.zarr")
    if attribute is None:
        _edit_root(tmp_path / "s.zarr", taxonomy=None)
    m = _evaluate(tmp_path / "s.zarr", tmp_path / "r")
    assert "taxonomy" not in m and "taxonomy" not in json.loads((tmp_path / "r" / "metrics.json").read_text())
    _store(tmp_path / "t.zarr", TAXONOMY)
    with_levels = _evaluate(tmp_path / "t.zarr", tmp_path / "t")
    assert {k: v for k, v in with_levels.items() if k != "taxonomy"} == m  # nothing else changes


def _edit_root(store, **attrs):
    """Edit the root attributes in zarr.json by hand, as a user or a script would (no checksum covers them)."""
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"].update(attrs)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("taxonomy, message", [
    ({**TAXONOMY, "genus": TAXONOMY["genus"][:5]},
     r"attribute 'taxonomy.genus' is \[.*\]; expected a list of 6 items \(as many as 'classnames'\)"),
    ({**TAXONOMY, "family": [*TAXONOMY["family"][:2], 3, *TAXONOMY["family"][3:]]},
     r"attribute 'taxonomy.family\[2\]' is 3; expected a non-empty one-line string"),
    ({**TAXONOMY, "kingdom": ["", *TAXONOMY["kingdom"][1:]]}, r"attribute 'taxonomy.kingdom\[0\]' is ''"),
    ({**TAXONOMY, "order": ["Fagales\nrm -rf ~", *TAXONOMY["order"][1:]]}, r"attribute 'taxonomy.order\[0\]' is "),
    (["Plantae"] * 6, r"attribute 'taxonomy' is \['Plantae', .*; expected null or an object"),
], ids=["short", "number", "empty", "line-break", "list"])
def test_a_damaged_taxonomy_attribute_is_a_one_line_error_naming_the_store_and_key(tmp_path, taxonomy, message):
    path = tmp_path / "s.zarr"
    _store(path, TAXONOMY)
    _edit_root(path, taxonomy=taxonomy)
    with pytest.raises(UserError, match=rf"^{path}: {message}") as e:
        FeatureStore.open(path)
    assert "\n" not in str(e.value) and str(e.value).endswith(f"--out {path}`")
    r = CliRunner().invoke(main, ["evaluate", "--features", str(path), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    assert r.output.startswith(f"Error: {path}: attribute 'taxonomy")


def test_cli_evaluate_prints_the_levels_only_for_a_taxonomy_store(tmp_path):
    lines = {}
    for name, taxonomy in (("with", TAXONOMY), ("without", None)):
        _store(tmp_path / f"{name}.zarr", taxonomy, test_per_class=10)
        r = CliRunner().invoke(main, ["evaluate", "--features", str(tmp_path / f"{name}.zarr"), "--out",
                                      str(tmp_path / name), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        lines[name] = (r.output.strip(), json.loads((tmp_path / name / "metrics.json").read_text()))
    (with_line, m), (without_line, plain) = lines["with"], lines["without"]
    shown = "".join(f"  {level} {m['taxonomy'][level]:.2f}" for level in reversed(TAXONOMY_LEVELS))
    assert f"ECE {m['ece']:.2f}{shown}  (60 test samples)" in with_line
    assert f"ECE {plain['ece']:.2f}  (60 test samples)" in without_line
    assert not any(level in without_line.split(" → ")[0] for level in TAXONOMY_LEVELS)


def test_report_table_has_a_column_per_level_any_row_holds(tmp_path):
    rows = [("Phase A", {"many": 80.0, "medium": 50.0, "few": 20.0, "top1": 61.0, "top5": 90.0}),
            ("BALLAD", {"many": 78.0, "medium": 60.0, "few": 40.0, "top1": 66.5, "top5": 93.0,
                        "taxonomy": {"genus": 74.25, "kingdom": 97.0}})]
    table = render_table(rows).splitlines()
    assert table[0] == "| model | many | medium | few | all | top-5 | genus | kingdom |"
    assert table[1] == "|" + "---|" * 8
    assert table[2] == "| Phase A | 80.0 | 50.0 | 20.0 | 61.0 | 90.0 | – | – |"
    assert table[3] == "| BALLAD | 78.0 | 60.0 | 40.0 | 66.5 | 93.0 | 74.2 | 97.0 |"
    assert render_table(rows[:1]).splitlines()[0] == "| model | many | medium | few | all | top-5 |"


def test_cli_report_shows_the_levels_evaluate_wrote(tmp_path):
    _store(tmp_path / "s.zarr", TAXONOMY)
    m = _evaluate(tmp_path / "s.zarr", tmp_path / "reports" / "ballad")
    shutil.copytree(tmp_path / "reports" / "ballad", tmp_path / "reports" / "phase_a")
    r = CliRunner().invoke(main, ["report", "--reports", str(tmp_path / "reports")])
    assert r.exit_code == 0, r.output
    header, _, *rows = r.output.strip().splitlines()
    assert header.endswith("| genus | family | order | class | phylum | kingdom |") and len(rows) == 2
    assert rows[1].endswith(" | ".join(f"{m['taxonomy'][lv]:.1f}" for lv in reversed(TAXONOMY_LEVELS)) + " |")
