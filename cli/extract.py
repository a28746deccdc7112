"""`ballad-pipe extract`: a frozen CLIP → the zarr feature store (see docs/feature-store.md).

The options are built from ``ExtractConfig``'s fields (stages/extract/config.py, torch-free), which hold
their flags, defaults, choices and help, and whose ``check`` refuses a bad value before work starts.
"""
import click

from cli.options import config_options
from stages.extract.config import ExtractConfig


@click.command()
@config_options(ExtractConfig)
def extract(**options):
    """Image features of every split and class text embeddings, into a resumable zarr store.

    Re-running the same command finishes an interrupted run; under torchrun each rank extracts its
    own range of shards into the same store.
    """
    from stages.extract.run import extract as run

    out = options["out"]
    done = run(options.pop("ckpt"), options.pop("data"), options.pop("out"), **options)
    computed = ", ".join(f"{s}: {n} shard(s)" for s, n in done.items())
    click.echo(f"wrote {out} ({computed} computed)")
