"""iNaturalist 2018 as LIFT and LIFT+ ship it, on a generated miniature with the same file formats: the
split lists `train_val2018/<kingdom>/<id>/<hash>.jpg <id>`, the official categories.json (a list of
objects with id, name and the taxonomy), read through `--classes FILE.json`; end to end through the CLI
(prepare list → extract → adapter → evaluate), the taxonomy kept in dataset.json and checked when read,
carried into the feature store and scored by `evaluate` at every level, and a malformed categories.json
refused in one line."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.errors import UserError
from store.features import FeatureStore
from store.shards import TAXONOMY_LEVELS, load_dataset

# (id, species, kingdom, phylum, class, order, family, genus): the official keys, ids 0..K-1 as in iNat 2018.
SPECIES = [
    (0, "Quercus agrifolia", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus"),
    (1, "Danaus plexippus", "Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus"),
    (2, "Amanita muscaria", "Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita"),
    (3, "Ardea herodias", "Animalia", "Chordata", "Aves", "Pelecaniformes", "Ardeidae", "Ardea"),
]
TRAIN_COUNTS = [8, 5, 3, 2]  # long-tailed, as iNat's 1,000 down to 2
TEST_PER_CLASS = 3  # iNat 2018's val list, used as the test set: 3 per class
KEYS = ("id", "name", "kingdom", "phylum", "class", "order", "family", "genus")


def _categories() -> list[dict]:
    """categories.json as iNat ships it: the entries in no particular order, with supercategory too."""
    entries = [dict(zip(KEYS, s), supercategory=s[2]) for s in SPECIES]
    return entries[::-1]


def _inat(root):
    """A miniature iNat 2018 download: images under train_val2018/, LIFT's two lists, categories.json."""
    rows = {"train": [], "val": []}
    for (cid, _, kingdom, *_), n_train in zip(SPECIES, TRAIN_COUNTS):
        for split, n in (("train", n_train), ("val", TEST_PER_CLASS)):
            for i in range(n):
                digest = hashlib.md5(f"{split}{cid}{i}".encode()).hexdigest()
                rel = f"train_val2018/{kingdom}/{cid}/{digest}.jpg"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng([cid, i, split == "val"]).integers(0, 256, (12, 12, 3), np.uint8)
                pixels[..., cid % 3] = 200  # a colour per class, so that the classes differ
                Image.fromarray(pixels).save(path, format="JPEG")
                rows[split].append(f"{rel} {cid}\n")
    for split, lines in rows.items():
        (root / f"iNaturalist18_{split}.txt").write_text("".join(lines))
    (root / "categories.json").write_text(json.dumps(_categories()))
    return root


def _cli(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines()


def _prepare(root, out, classes):
    return _cli("prepare", "list", "--root", root, "--train-list", root / "iNaturalist18_train.txt",
                "--test-list", root / "iNaturalist18_val.txt", "--classes", classes, "--out", out)


def test_inat_lists_and_categories_run_end_to_end(tmp_path, single_thread):
    root = _inat(tmp_path / "inat")
    data = tmp_path / "data"
    code, lines = _prepare(root, data, root / "categories.json")
    assert code == 0, lines
    info = load_dataset(data)
    # names by id, not by the file's order, nor the folders' numbers
    assert info.classnames == [s[1] for s in SPECIES] and info.name == "iNaturalist18"
    assert info.split("train").class_counts == TRAIN_COUNTS
    assert info.split("test").class_counts == [TEST_PER_CLASS] * len(SPECIES) and "val" not in info.splits
    assert "--classes " in info.command and info.command.split("--classes ")[1].split()[0].endswith("categories.json")
    # the taxonomy per class, kingdom … genus, for coarser-level scoring
    assert info.taxonomy == {level: [s[2 + i] for s in SPECIES] for i, level in enumerate(TAXONOMY_LEVELS)}
    store, model, reports = tmp_path / "f.zarr", tmp_path / "adapter.pt", tmp_path / "reports"
    for args in (("extract", "--ckpt", "none", "--model", "ballad-tiny", "--data", data, "--batch-size", "16",
                  "--workers", "0", "--device", "cpu", "--out", store),
                 ("adapter", "--features", store, "--epochs", "2", "--batch-size", "8", "--device", "cpu",
                  "--out", model),
                 ("evaluate", "--features", store, "--adapter", model, "--out", reports)):
        code, lines = _cli(*args)
        assert code == 0, (args[0], lines)
    metrics = json.loads((reports / "metrics.json").read_text())
    # evaluate's printed line shows the levels after ECE, finest first, as metrics.json holds them
    shown = "".join(f"  {level} {value:.2f}" for level, value in metrics["taxonomy"].items())
    assert f"ECE {metrics['ece']:.2f}{shown}  ({metrics['num_test']} test samples)" in lines[-1], lines
    assert metrics["num_classes"] == len(SPECIES) and metrics["num_test"] == TEST_PER_CLASS * len(SPECIES)
    assert 0 <= metrics["top1"] <= 100
    # every species of the test set is scored under its species name
    per_class = (reports / "per_class.csv").read_text()
    assert all(s[1] in per_class for s in SPECIES), per_class
    # the store keeps the taxonomy, and evaluate scores the species predictions at each level, finest first
    assert FeatureStore.open(store).meta["taxonomy"] == info.taxonomy
    assert list(metrics["taxonomy"]) == list(reversed(TAXONOMY_LEVELS))
    pred = np.load(reports / "predictions.npz")
    for level, names in info.taxonomy.items():
        same = [names[p] == names[t] for p, t in zip(pred["top5"][:, 0], pred["label"])]
        assert metrics["taxonomy"][level] == pytest.approx(100 * np.mean(same)), level
    levels = [metrics["top1"], *metrics["taxonomy"].values()]
    assert levels == sorted(levels)  # a tree: a right species is right at every level above it
    (reports / "ballad").mkdir()  # the report table's BALLAD row
    (reports / "ballad" / "metrics.json").write_text((reports / "metrics.json").read_text())
    code, lines = _cli("report", "--reports", reports)
    assert code == 0 and lines[0].endswith("| genus | family | order | class | phylum | kingdom |"), lines
    assert lines[2].endswith(" | ".join(f"{v:.1f}" for v in metrics["taxonomy"].values()) + " |"), lines


def test_index_keeps_the_taxonomy_too(tmp_path):
    root = _inat(tmp_path / "inat")
    assert _prepare(root, tmp_path / "d", root / "categories.json")[0] == 0
    code, lines = _cli("prepare", "index", "--shards", f"train={tmp_path}/d/train/shard-*.tar", "--classes",
                       root / "categories.json", "--out", tmp_path / "idx")
    assert code == 0, lines
    indexed = load_dataset(tmp_path / "idx")
    assert indexed.taxonomy == load_dataset(tmp_path / "d").taxonomy and indexed.taxonomy["genus"][0] == "Quercus"


def test_a_plain_json_list_of_names_is_read_in_its_order(tmp_path):
    root = _inat(tmp_path / "inat")
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["oak", "monarch", "fly agaric", "heron"]))
    code, lines = _prepare(root, tmp_path / "d", names)
    assert code == 0, lines
    info = load_dataset(tmp_path / "d")
    assert info.classnames == ["oak", "monarch", "fly agaric", "heron"] and info.taxonomy is None
    assert "taxonomy" not in json.loads((tmp_path / "d" / "dataset.json").read_text())


def test_only_the_levels_every_category_carries_are_kept(tmp_path):
    root = _inat(tmp_path / "inat")
    entries = _categories()
    del entries[2]["genus"]
    (root / "categories.json").write_text(json.dumps(entries))
    code, lines = _prepare(root, tmp_path / "d", root / "categories.json")
    assert code == 0, lines
    assert list(load_dataset(tmp_path / "d").taxonomy) == ["kingdom", "phylum", "class", "order", "family"]


@pytest.mark.parametrize("taxonomy, message", [
    ({"genus": ["Quercus"]},
     r"key 'taxonomy.genus' is \['Quercus'\]; expected a list of 4 items \(as many as 'classnames'\)"),
    ({"family": ["a", "b", 3, "d"]}, r"key 'taxonomy.family\[2\]' is 3; expected a non-empty one-line string"),
    ({"kingdom": ["a", "b", "", "d"]}, r"key 'taxonomy.kingdom\[2\]' is ''"),
    (["Plantae"], r"key 'taxonomy' is \['Plantae'\]; expected an object"),
])
def test_a_damaged_taxonomy_in_dataset_json_is_one_line(tmp_path, taxonomy, message):
    root = _inat(tmp_path / "inat")
    assert _prepare(root, tmp_path / "d", root / "categories.json")[0] == 0
    path = tmp_path / "d" / "dataset.json"
    meta = json.loads(path.read_text())
    meta["taxonomy"] = taxonomy
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"^{path}: {message}"):
        load_dataset(tmp_path / "d")


def _shifted(entries):
    entries[0]["id"] = 7
    return entries


def _set(index, key, value):
    def edit(entries):
        entries[index][key] = value
        return entries
    return edit


@pytest.mark.parametrize("edit, message", [
    (_shifted, r"categories.json: no entry has id 3, but 4 entries need the ids 0..3$"),  # a gap
    (_set(0, "id", 1), r"categories.json: entry 2 has id 1, as entry 0 has$"),  # 0: id 3 → 1; entry 2 is id 1
    (_set(1, "name", 7), r"categories.json: entry 1: key 'name' is 7; expected a non-empty one-line name"),
    (_set(1, "name", " Ardea"), r"categories.json: entry 1: key 'name' is ' Ardea'; expected a non-empty one-line"),
    (_set(2, "name", "Danaus\nplexippus"), r"categories.json: entry 2: key 'name' is 'Danaus\\nplexippus'"),
    (_set(3, "id", "0"), r"categories.json: entry 3: key 'id' is '0'; expected a whole number ≥ 0$"),
    (_set(0, "genus", None), r"categories.json: entry 0: key 'genus' is None; expected a non-empty one-line name"),
    (lambda e: [{k: v for k, v in e[0].items() if k != "name"}, *e[1:]],
     r"categories.json: entry 0: key 'name' is missing"),
    (lambda e: e + ["Homo sapiens"], r"categories.json: entry 4: holds 'Homo sapiens'; expected a JSON object$"),
    (lambda e: ["Homo sapiens", *e], r"categories.json: entry 1 is \{'id': 3, .*; expected a non-empty one-line name"),
    (lambda e: {"categories": e}, r"categories.json: holds \{'categories': .*; expected a JSON list of class names"),
    (lambda e: [], r"categories.json: class file is empty$"),
    (lambda e: json.dumps(e)[:-5], r"categories.json: not JSON \("),
])
def test_a_malformed_categories_json_is_one_line(tmp_path, edit, message):
    root = _inat(tmp_path / "inat")
    edited = edit(_categories())
    (root / "categories.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    code, lines = _prepare(root, tmp_path / "d", root / "categories.json")
    assert code != 0 and len(lines) == 1 and re.search(r"^Error: .*" + message, lines[0]), lines
    assert not (tmp_path / "d" / "dataset.json").exists()


def test_fewer_categories_than_the_lists_use_are_refused(tmp_path):
    root = _inat(tmp_path / "inat")
    (root / "categories.json").write_text(json.dumps([e for e in _categories() if e["id"] < 3]))
    code, lines = _prepare(root, tmp_path / "d", root / "categories.json")
    assert code != 0 and len(lines) == 1, lines
    assert re.search(r"^Error: --classes .*categories.json: 3 names but .*iNaturalist18_train.txt uses label 3$",
                     lines[0]), lines


@pytest.mark.parametrize("name", ["inat2018_rn50", "inat2018_vit_b16", "lift_inat2018_vit_b16"])
def test_the_inat_recipes_prepare_command_reads_the_miniature(tmp_path, name):
    """The recipe's own `prepare` arguments, with its paths pointed at the miniature: `list` with the
    lists and `--classes categories.json`, giving the species names."""
    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{name}.yaml").read_text())["data"]
    root = _inat(tmp_path / "inat")
    args = shlex.split(data["args"].replace("/datasets/inat2018", str(root)).replace("data/lists", str(root)))
    assert data["source"] == "list" and args[args.index("--classes") + 1] == str(root / "categories.json")
    code, lines = _cli("prepare", data["source"], *args, "--out", tmp_path / "d")
    assert code == 0, lines
    info = load_dataset(tmp_path / "d")
    assert info.classnames == [s[1] for s in SPECIES] and info.name == "inat2018"
