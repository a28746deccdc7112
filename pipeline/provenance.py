"""Which code produced an output: a digest of the package's own source.

Phase A's ``--resume`` continues a checkpoint only when the code that wrote it is the code running now;
otherwise a ``dvc repro`` after a code change would finish the old code's run and record it as the
new code's result. The digest covers every ``.py`` file of the three packages, so any edit to them
counts, including ones that cannot change the result (a comment): a needless restart is cheap, an
undetected change is not.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "store")


@functools.lru_cache(maxsize=None)
def source_digest(root: Path = ROOT) -> str:
    """sha256 over the sorted .py files of pipeline/, stages/ and store/ under ``root``: paths and bytes."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name, data = path.relative_to(root).as_posix().encode(), path.read_bytes()
            for part in (name, data):  # length-prefixed, so no two file sets hash alike
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
    return h.hexdigest()
