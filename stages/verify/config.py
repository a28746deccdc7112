"""The options of `verify`: ``VerifyConfig``, torch-free (stages/verify/run.py does the work)."""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from pipeline.options import option


@dataclass(frozen=True)
class VerifyConfig:
    path: str = option(MISSING, "PATH", "A dataset directory, feature store, Phase A output directory or bundle.",
                       path="any")

    def check(self) -> None:
        """Nothing to check before ``path`` is read (stages/verify/run.py says what it is)."""
