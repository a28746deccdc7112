"""`ballad-pipe adapter`: Phase B from the feature store → models/adapter.pt.

The training options are built from ``TrainConfig``'s fields (stages/adapter_config.py, torch-free),
which hold their flags, defaults, choices and help: nothing is repeated here.
"""
from dataclasses import fields

import click

from cli.options import config_options, device
from stages.adapter_config import TrainConfig

features = click.option("--features", required=True, type=click.Path(), help="Feature store (`ballad-pipe extract`).")

FIELDS = {f.name: f for f in fields(TrainConfig)}


def config_option(name: str):
    """The click option of the ``TrainConfig`` field ``name``, passed to the command under that name."""
    return config_options(TrainConfig, [name])


# The Phase B options `adapter` and `sweep` share: every ``TrainConfig`` field but λ.
train_options = config_options(TrainConfig, [n for n in FIELDS if n != "lam"])


@click.command()
@features
@config_option("lam")
@train_options
@device
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Adapter file, e.g. models/adapter.pt.")
def adapter(features, device, out, **train):
    """Train the balanced linear adapter on the store's cached train features."""
    from stages.adapter import train_adapter

    blob = train_adapter(features, out, TrainConfig(**train), device=device)
    val = "" if blob["val_acc"] is None else f", val top-1 {blob['val_acc']:.2f}"
    epoch = blob["selected_epoch"]
    click.echo(f"wrote {out} ({blob['num_train']} train features; kept epoch {epoch} of {len(blob['losses'])} by "
               f"{blob['select']}{val}; its loss {blob['losses'][epoch - 1]:.4f})")
