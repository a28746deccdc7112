"""ballad-pipe: BALLAD long-tailed recognition as a cached two-phase pipeline."""

__version__ = "0.1.0"
