"""Class names from a ``--classes`` value (`prepare list`, `folder` and `index`): label k = names[k]."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from pipeline.errors import UserError
from pipeline.validate import Field, check, describe, fits, show
from store.shards import TAXONOMY_LEVELS, Taxonomy

# A name as the text form gives it: one line, no surrounding spaces (they would end up in every prompt).
CLASS_NAME = Field("text", test=(lambda name: bool(name) and name == name.strip(),
                                 "a non-empty one-line name without leading or trailing spaces"))
CATEGORY = {"id": Field("int", low=0), "name": CLASS_NAME,
            **{level: replace(CLASS_NAME, optional=True) for level in TAXONOMY_LEVELS}}


def load_classnames(classes: str) -> tuple[list[str], Taxonomy | None]:
    """The class names of a ``--classes`` value, label k = names[k], and their taxonomy where the file
    gives one: ``imagenet`` (CLIP's curated names), a text file (one name per line) or a ``.json`` file.
    JSON is there for iNaturalist, whose list folders are numbers (``train_val2018/Plantae/7477/…``) and
    whose species names ship as ``categories.json``: a list of objects with ``id`` and ``name``, ordered
    by id, and the levels of TAXONOMY_LEVELS that every object carries (``kingdom`` … ``genus``, kept for
    coarser-level scoring; other keys are ignored); a plain list of names is read too. Every problem is
    one line naming the file and the entry."""
    if classes == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES), None
    path = Path(classes)
    if not path.is_file():
        raise UserError(f"--classes {classes}: file not found (or use --classes imagenet)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--classes {classes}: not a UTF-8 text file of class names, one per line") from None
    if path.suffix.lower() == ".json":
        names, taxonomy = _json_classnames(text, path)
    else:
        names, taxonomy = [line.strip() for line in text.splitlines() if line.strip()], None
    if not names:
        raise UserError(f"{path}: class file is empty")
    return names, taxonomy


def _json_classnames(text: str, path: Path) -> tuple[list[str], Taxonomy | None]:
    """``load_classnames``'s JSON form. Objects must carry the ids 0..K-1, each once: an id is a label of
    the split lists, so a gap or a repeat would shift every name after it onto the wrong images."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    expected = "a JSON list of class names, or of objects with 'id' and 'name' (as iNaturalist's categories.json)"
    if not isinstance(doc, list):
        raise UserError(f"{path}: holds {show(doc)}; expected {expected}")
    if doc and isinstance(doc[0], str):
        for i, name in enumerate(doc):
            if not fits(name, CLASS_NAME):
                raise UserError(f"{path}: entry {i} is {show(name)}; expected {describe(CLASS_NAME)}")
        return doc, None
    by_id: dict[int, tuple[int, dict]] = {}
    for i, entry in enumerate(doc):
        entry = check(entry, CATEGORY, f"{path}: entry {i}")
        if entry["id"] in by_id:
            raise UserError(f"{path}: entry {i} has id {entry['id']}, as entry {by_id[entry['id']][0]} has")
        by_id[entry["id"]] = (i, entry)
    missing = next((k for k in range(len(doc)) if k not in by_id), None)
    if missing is not None:
        raise UserError(f"{path}: no entry has id {missing}, but {len(doc)} entries need the ids 0..{len(doc) - 1}")
    entries = [by_id[k][1] for k in range(len(doc))]
    taxonomy = {level: [e[level] for e in entries] for level in TAXONOMY_LEVELS if all(level in e for e in entries)}
    return [e["name"] for e in entries], taxonomy or None
