"""`ballad-pipe adapter`: Phase B from the feature store → models/adapter.pt."""
import click

features = click.option("--features", required=True, type=click.Path(), help="Feature store (`ballad-pipe extract`).")
device = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")


def train_options(f):
    """The Phase B options `adapter` and `sweep` share (defaults: the official code's)."""
    options = [
        click.option("--epochs", default=10, show_default=True),
        click.option("--lr", default=0.2, show_default=True, help="SGD learning rate (cosine to 0)."),
        click.option("--batch-size", default=512, show_default=True),
        click.option("--sampler", default="class-balanced", show_default=True,
                     type=click.Choice(["class-balanced", "class-aware", "sqrt", "instance", "progressive"]),
                     help="Phase B sampling (paper Table 8)."),
        click.option("--form", default="linear", show_default=True, type=click.Choice(["linear", "relu"]),
                     help="linear: W f (official code); relu: ReLU(Wᵀf + b) (paper Eq. 5)."),
        click.option("--position", default="visual", show_default=True, type=click.Choice(["visual", "text", "both"]),
                     help="Which embeddings the adapter refines (paper Table 6)."),
        click.option("--seed", default=0, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@features
@click.option("--lambda", "lam", default=0.2, show_default=True, help="Residual factor λ in [0, 1].")
@train_options
@device
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Adapter file, e.g. models/adapter.pt.")
def adapter(features, lam, epochs, lr, batch_size, sampler, form, position, seed, device, out):
    """Train the balanced linear adapter on the store's cached train features."""
    from stages.adapter import TrainConfig, train_adapter

    cfg = TrainConfig(lam=lam, epochs=epochs, lr=lr, batch_size=batch_size, sampler=sampler, form=form,
                      position=position, seed=seed)
    blob = train_adapter(features, out, cfg, device=device)
    click.echo(f"wrote {out} ({blob['num_train']} train features, final loss {blob['losses'][-1]:.4f})")
