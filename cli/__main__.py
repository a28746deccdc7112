"""``python -m cli`` (and ``torchrun -m cli``) run the same CLI as ``ballad-pipe``."""
from cli import run

run()
