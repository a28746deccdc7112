"""pipeline/validate.py: one line naming the file, the key (at any depth) and what it should hold."""
from __future__ import annotations

import math

import pytest

from pipeline.errors import UserError
from pipeline.validate import COUNT, SHA256, Field, check, fits, length_of, value_of

SPEC = {
    "scale": Field("number", low=0, above=True, high=100),
    "names": Field("list", low=1, unique=True, items=Field("text", low=1)),
    "counts": Field("list", items=COUNT, length=length_of("names")),
    "dim": Field("int", low=1),
    "inner": Field("dict", optional=True, keys={"dim": Field("int", equals=value_of("dim")), "sha": SHA256}),
    "mode": Field("text", optional=True, null=True, choices=("a", "b")),
    "note": Field("text", optional=True, line=False),
}
GOOD = {"scale": 14.3, "names": ["x", "y"], "counts": [3, 0], "dim": 8, "inner": {"dim": 8, "sha": "ab" * 32},
        "mode": None, "note": "two\nlines", "extra": [math.nan]}


@pytest.mark.parametrize("edit, message", [
    ({"scale": math.nan}, "attribute 'scale' is nan; expected a finite number > 0 and ≤ 100"),
    ({"scale": 0}, "attribute 'scale' is 0; expected a finite number > 0 and ≤ 100"),
    ({"scale": True}, "attribute 'scale' is True; expected a finite number > 0 and ≤ 100"),
    ({"scale": 10**400}, f"attribute 'scale' is 1{'0' * 58}…; expected a finite number > 0 and ≤ 100"),
    ({"names": []}, "attribute 'names' is []; expected a non-empty list, each a non-empty one-line string, "
                    "none twice"),
    ({"names": ["x", "x"]}, "attribute 'names' is ['x', 'x']; expected a non-empty list, each a non-empty one-line "
                            "string, none twice"),
    ({"names": ["x", "a\nb"]}, r"attribute 'names[1]' is 'a\nb'; expected a non-empty one-line string"),
    ({"names": ["x", "\ud800"]}, r"attribute 'names[1]' is '\ud800'; expected a non-empty one-line string"),
    ({"counts": [3]}, "attribute 'counts' is [3]; expected a list of 2 items (as many as 'names')"),
    ({"counts": [3, -1]}, "attribute 'counts[1]' is -1; expected a whole number ≥ 0"),
    ({"counts": [3, 2**63]}, "attribute 'counts[1]' is 9223372036854775808; expected a whole number ≥ 0"),
    ({"inner": {"dim": 9, "sha": "ab" * 32}}, "attribute 'inner.dim' is 9; expected 8 (equal to 'dim')"),
    ({"inner": {"dim": 8}}, "attribute 'inner.sha' is missing; expected a sha256 (64 lowercase hex digits)"),
    ({"mode": "c"}, "attribute 'mode' is 'c'; expected null or one of a, b"),
    ({"dim": None}, "attribute 'dim' is None; expected a whole number ≥ 1"),
], ids=["nan", "zero", "bool", "huge-int", "empty", "twice", "line-break", "surrogate", "short", "negative",
        "int64-overflow", "tie", "nested-missing", "choice", "null"])
def test_a_wrong_value_is_one_line_naming_the_file_and_the_key(edit, message):
    assert check(GOOD, SPEC, "x.zarr", "attribute") == GOOD  # keys the spec does not name are allowed
    with pytest.raises(UserError) as e:
        check({**GOOD, **edit}, SPEC, "x.zarr", "attribute", "rebuild it")
    assert str(e.value) == f"x.zarr: {message}; rebuild it" and "\n" not in str(e.value)


def test_missing_keys_and_documents_that_are_not_objects():
    with pytest.raises(UserError, match=r"^f.json: key 'dim' is missing; expected a whole number ≥ 1$"):
        check({k: v for k, v in GOOD.items() if k != "dim"}, SPEC, "f.json")
    with pytest.raises(UserError, match=r"^f.json: holds \[1, 2\]; expected a JSON object$"):
        check([1, 2], SPEC, "f.json")
    assert fits("a", SPEC["mode"]) and not fits(math.inf, SPEC["scale"])
