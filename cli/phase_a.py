"""`ballad-pipe phase-a`: finetune both CLIP encoders on the long-tailed train split (stages/phase_a/).

The options are built from ``PhaseAConfig``'s fields (stages/phase_a/config.py, torch-free), which hold
their flags, defaults, choices and help, and whose ``check`` refuses a bad value before work starts.
"""
import click

from cli.options import config_options
from stages.phase_a.config import PhaseAConfig


@click.command(name="phase-a")
@config_options(PhaseAConfig)
def phase_a(**options):
    """Phase A: train both CLIP encoders on all K class prompts with cross-entropy (BALLAD), or LIFT's
    lightweight variant (--tune, --classifier head, --loss logit-adjusted)."""
    from stages.phase_a import run_phase_a

    final = run_phase_a(PhaseAConfig(**options))
    click.echo(f"wrote {final}")
