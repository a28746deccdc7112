"""`ballad-pipe pretrain`: contrastive pretraining on the generated shapes corpus (stages/pretrain/run.py).

The options are built from ``PretrainConfig``'s fields (stages/pretrain/config.py, torch-free), which
hold their flags, defaults and help, and whose ``check`` refuses a bad value before work starts.
"""
import click

from cli.options import config_options
from stages.pretrain.config import PretrainConfig


@click.command()
@config_options(PretrainConfig)
def pretrain(**options):
    """Pretrain a CLIP on captioned shapes with open_clip's ClipLoss: OUT/final.pt, a checkpoint for --pretrained."""
    from stages.pretrain.run import run_pretrain

    final = run_pretrain(PretrainConfig(**options))
    click.echo(f"wrote {final}")
