"""Declarative checks of what a file records about itself: a feature store's attributes, a checkpoint's
final.json, a bundle's bundle.json.

Those are JSON that anyone can edit, and neither the store's chunk checksums nor the sha256 records
cover them, yet their values flow into arithmetic and messages: a NaN logit scale gave NaN metrics and
exit status 0. So each reader describes its keys once, a ``Field`` per key (kind, null, range, choices,
the items of a list, the keys of an object, a length or value tied to another key), and ``check``
refuses the first wrong one with one line naming the file and the key, before any work starts:

    features/x.zarr: attribute 'logit_scale' is nan; expected a finite number > 0 and ≤ 10000; rebuild …

Keys a spec does not name are allowed (files written by a later version). Text must be one printable
line (it ends up in one-line messages and commands) unless its field says otherwise, and every
number must be finite: JSON parsers accept NaN and Infinity. Torch- and numpy-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from pipeline.errors import UserError

WHOLE_MAX = 2**63 - 1  # what numpy's int64 and torch hold: larger whole numbers overflow where they are used


@dataclass(frozen=True)
class Tie:
    """A value a field must match, computed from the document's top-level mapping (keys checked earlier
    in the spec), and what to call it in a message. ``value`` raising KeyError: nothing to match."""

    value: Callable[[Mapping], object]
    what: str


def length_of(key: str) -> Tie:
    """As many items as the list ``key``."""
    return Tie(lambda doc: len(doc[key]), f"as many as '{key}'")


def value_of(key: str) -> Tie:
    """Equal to the value of ``key``."""
    return Tie(lambda doc: doc[key], f"equal to '{key}'")


@dataclass(frozen=True)
class Field:
    """What one key may hold.

    ``kind``: bool, int (whole numbers, not true/false), number (int or float), text, list or dict.
    ``null``: None is allowed; ``optional``: the key may be absent. ``low``/``high``: inclusive bounds of a
    number, of a text's or list's length (``above``: ``low`` excluded). ``items``: every item of a list,
    or every value of a dict; ``keys``: a dict's own fields; ``length``/``equals``: an int, or a ``Tie``.
    ``test``: a predicate on the value and what it expects (a template, a sha256). ``line``: text is one
    printable line (False: multi-line text, as a transform's repr).
    """

    kind: str
    null: bool = False
    optional: bool = False
    low: float | None = None
    high: float | None = None
    above: bool = False
    choices: tuple | None = None
    items: "Field | None" = None
    keys: "Mapping[str, Field] | None" = None
    length: "int | Tie | None" = None
    equals: "object | Tie" = None
    unique: bool = False
    test: "tuple[Callable[[object], bool], str] | None" = None
    line: bool = True


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# Fields many specs share.
TEXT = Field("text")
SHA256 = Field("text", test=(_is_sha256, "a sha256 (64 lowercase hex digits)"))
COUNT = Field("int", low=0)

KIND_NAMES = {"bool": "true or false", "int": "a whole number", "number": "a finite number", "dict": "an object"}


def describe(field: Field) -> str:
    """What ``field`` expects, in words: "a finite number > 0 and ≤ 10000", "null or a non-empty list, each
    a string"."""
    if field.choices is not None:
        words = f"one of {', '.join(map(str, field.choices))}"
    elif field.test is not None:
        words = field.test[1]
    elif field.kind in ("text", "list"):
        unit = "characters" if field.kind == "text" else "items"
        noun = "list" if field.kind == "list" else "one-line string" if field.line else "string"
        words = ("a non-empty " if field.low == 1 and not field.above else "a ") + noun
        if field.low is not None and not (field.low == 1 and not field.above):
            words += f" of {'more than' if field.above else 'at least'} {field.low} {unit}"
        if field.high is not None:
            words += f"{' and' if field.low is not None else ' of'} at most {field.high} {unit}"
        words += "" if field.line or field.kind == "list" else " (line breaks allowed)"
    else:
        bounds = [f"{'>' if field.above else '≥'} {_num(field.low)}" if field.low is not None else "",
                  f"≤ {_num(field.high)}" if field.high is not None else ""]
        words = " ".join([KIND_NAMES[field.kind], " and ".join(b for b in bounds if b)]).strip()
    if field.items is not None:
        words += f", each {describe(field.items)}" if field.kind == "list" else f" whose values are {describe(field.items)}"
    if field.keys is not None:
        required = [f"'{k}'" for k, f in field.keys.items() if not f.optional]
        words += f" with {', '.join(required)}" if required else ""
    if field.unique:
        words += ", none twice"
    return f"null or {words}" if field.null else words


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def show(value) -> str:
    """A value as a message shows it: repr (escapes line breaks), cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def check(doc, spec: Mapping[str, Field], where: str, noun: str = "key", remedy: str = "") -> dict:
    """``doc`` if it is a mapping whose keys fit ``spec`` (checked in the spec's order, so a ``Tie`` may
    name any key before its own); else a UserError naming ``where`` and the first wrong key (``noun``:
    "key" for JSON files, "attribute" for zarr attributes), then ``remedy``."""
    if not isinstance(doc, Mapping):
        _refuse(where, f"holds {show(doc)}", "a JSON object", remedy)
    doc = dict(doc)
    found = _problem(doc, Field("dict", keys=spec), doc)
    if found is not None:
        path, what, expected = found
        _refuse(where, f"{noun} '{path}' {what}", expected, remedy)
    return doc


def fits(value, field: Field) -> bool:
    """Whether ``value`` alone fits ``field`` (ties to other keys are not checked)."""
    return _problem(value, field, {}) is None


def _problem(value, field: Field, doc: Mapping, path: str = "") -> tuple[str, str, str] | None:
    """(path, "is <value>" or "is missing", what was expected) of the first part of ``value`` that does
    not fit ``field``, or None."""
    wrong = (path, f"is {show(value)}", describe(field))
    if value is None:
        return None if field.null else wrong
    if not (_kind_ok(value, field) and _range_ok(value, field)):
        return wrong
    if (field.choices is not None and value not in field.choices) or (field.test and not field.test[0](value)):
        return wrong
    for tied, got in ((field.length, len(value) if field.length is not None else None), (field.equals, value)):
        wanted, what = tied, ""
        if isinstance(tied, Tie):
            try:
                wanted, what = tied.value(doc), f" ({tied.what})"
            except (KeyError, TypeError):
                continue  # the key it ties to is absent: nothing to match
        if wanted is not None and got != wanted:
            expected = f"a {field.kind} of {wanted} items" if tied is field.length else show(wanted)
            return path, f"is {show(value)}", expected + what
    if field.kind == "list" and field.items is not None:
        for i, item in enumerate(value):
            found = _problem(item, field.items, doc, f"{path}[{i}]")
            if found is not None:
                return found
    if field.kind == "dict":
        own = field.keys or {}
        for key, sub in [*own.items(), *((k, field.items) for k in value if k not in own)]:
            at = f"{path}.{show(key)[1:-1]}" if path else key  # escaped: a key of the file may hold a line break
            if key in value:
                found = _problem(value[key], sub, doc, at) if sub is not None else None
            else:
                found = None if sub.optional else (at, "is missing", describe(sub))
            if found is not None:
                return found
    if field.unique and len(set(value)) != len(value):  # after the items: they are known to be hashable
        return wrong
    return None


def _kind_ok(value, field: Field) -> bool:
    if field.kind == "bool":
        return isinstance(value, bool)
    if field.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= WHOLE_MAX
    if field.kind == "number":
        if isinstance(value, int) and not isinstance(value, bool):
            return abs(value) <= WHOLE_MAX  # math.isfinite cannot take an int beyond a float's range
        return isinstance(value, float) and math.isfinite(value)
    if field.kind == "text":
        return isinstance(value, str) and _encodable(value) and (value.isprintable() or not field.line)
    if field.kind == "list":
        return isinstance(value, list)
    return isinstance(value, dict)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON allows "\ud800", no output stream prints it
        return False
    return True


def _range_ok(value, field: Field) -> bool:
    if field.kind not in ("int", "number", "text", "list"):
        return True
    size = len(value) if field.kind in ("text", "list") else value
    if field.low is not None and (size <= field.low if field.above else size < field.low):
        return False
    return field.high is None or size <= field.high


def _refuse(where: str, what: str, expected: str, remedy: str):
    raise UserError(f"{where}: {what}; expected {expected}" + (f"; {remedy}" if remedy else ""))
