"""``python -m pipeline.cli`` (and ``torchrun -m pipeline.cli``) run the same CLI as ``ballad-pipe``."""
from pipeline.cli import run

run()
