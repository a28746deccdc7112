"""`ballad-pipe report`: print the zero-shot / Phase A / BALLAD table from the reports folder."""
import click

from cli.options import config_options
from stages.evaluate.config import ReportConfig


@click.command()
@config_options(ReportConfig)
def report(**options):
    """Top-1 accuracy (%) by shot group for each evaluated model."""
    from stages.evaluate.report import report as run

    click.echo(run(ReportConfig(**options)))
