"""`ballad-pipe verify PATH`: a dataset, feature store, Phase A checkpoint directory or bundle, end to end."""
import click

from cli.options import config_options
from stages.verify.config import VerifyConfig


@click.command()
@click.argument("path", type=click.Path())
@config_options(VerifyConfig, names=())
def verify(path):
    """Read every byte of PATH and check it against its own records (sha256, checksums, counts).

    PATH is a dataset directory (`prepare`), a feature store (`extract`), a Phase A output directory
    or a bundle (`export`). Prints one line per check, `ok …` or `FAIL …` with the command that
    rebuilds what is damaged; exits 0 only when every check passed.
    """
    from pipeline.errors import UserError
    from stages.verify.run import verify as run

    cfg = VerifyConfig(path)
    kind, findings = run(cfg.path)
    click.echo(f"{path}: {kind}")
    failed = 0
    for finding in findings:
        click.echo(str(finding))
        failed += not finding.ok
    if failed:
        raise UserError(f"{path}: {failed} check(s) failed")
