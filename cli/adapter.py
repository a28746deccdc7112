"""`ballad-pipe adapter`: Phase B from the feature store → models/adapter.pt.

The options are built from ``AdapterConfig``'s fields (stages/adapter/config.py, torch-free): the
Phase B settings (``TrainConfig``), the store and the output file, each with its flag, default, choices
and help; nothing is repeated here.
"""
import click

from cli.options import config_options
from stages.adapter.config import AdapterConfig


@click.command()
@config_options(AdapterConfig)
def adapter(**options):
    """Train the balanced linear adapter on the store's cached train features."""
    from stages.adapter import train_adapter

    cfg = AdapterConfig(**options)
    blob = train_adapter(cfg.features, cfg.out, cfg.train_part(), device=cfg.device)
    val = "" if blob["val_acc"] is None else f", val top-1 {blob['val_acc']:.2f}"
    epoch = blob["selected_epoch"]
    click.echo(f"wrote {cfg.out} ({blob['num_train']} train features; kept epoch {epoch} of {len(blob['losses'])} "
               f"by {blob['select']}{val}; its loss {blob['losses'][epoch - 1]:.4f})")
