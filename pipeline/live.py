"""Training metrics as they happen, in dvclive's format, for `dvc exp show`, `dvc plots` and any dvclive reader.

Phase A logs per step and per evaluation, Phase B per epoch, into a directory:

    DIR/metrics.json                 the latest value of every metric, and the step (`dvc metrics`)
    DIR/plots/metrics/<name>.tsv     one row per logged step: step, value (`dvc plots`, x: step)

A row reaches its file when it is logged and the summary is rewritten with it, so a run can be watched
(`dvc plots show`, DVC's VS Code extension, `tail`) while it trains, not only after it ends.

dvclive serves as the writer of that format and nothing more:
- dvc.yaml declares these files, so dvclive writes no dvc.yaml (``dvcyaml=False``) and makes no
  experiment of its own (``save_dvc_exp=False``): DVC runs the stages.
- It never opens the DVC repository around the working directory. dvclive would, and in a git
  repository without DVC it would run `dvc init` there (``dvclive.dvc.get_dvc_repo``); nothing here
  needs the repository.
- Nothing leaves the machine: dvclive's Studio updates stay off (``DVC_STUDIO_OFFLINE``) unless the
  environment sets ``DVC_STUDIO_OFFLINE=false`` itself, with a Studio token.

Only the main process of a torchrun job logs; the others get a log that does nothing.
"""
from __future__ import annotations

import os
from pathlib import Path


class LiveLog:
    """dvclive's files in ``directory``, emptied at the first ``log`` (a resumed run replays the rows it
    keeps, so the files hold exactly the rows of the run they describe; a run stopped before its first
    row leaves nothing); ``enabled`` False: a no-op."""

    def __init__(self, directory: str | os.PathLike, enabled: bool = True):
        self.directory, self.enabled = Path(directory), enabled
        self._live = None

    def log(self, step: int, values: dict, plot: bool = True, sync: bool = True) -> None:
        """Log ``values`` {name: number or None (skipped)} at ``step``; ``plot`` False: the summary only.
        ``sync`` False defers the summary to a later call (a replay of many rows). Nothing needs closing:
        every synced call leaves the files complete (dvclive's ``end`` would only add Studio's thread)."""
        if not self.enabled:
            return
        if self._live is None:
            self._live = _open(self.directory)
        self._live.step = step
        for name, value in values.items():
            if value is not None:
                self._live.log_metric(name, value, plot=plot)
        if sync:
            self._live.make_summary()


def _open(directory: Path):
    os.environ.setdefault("DVC_STUDIO_OFFLINE", "true")
    from dvclive import Live

    class FilesOnly(Live):
        def _init_dvc(self) -> None:  # see the module docstring: no repository is opened, none created
            return

    return FilesOnly(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)
