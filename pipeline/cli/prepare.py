"""`ballad-pipe prepare {synthetic,list,cifar100-lt}`: datasets → webdataset shards."""
import click

shard_size = click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
overwrite = click.option("--overwrite", is_flag=True, help="Replace a different dataset already in --out.")
out = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")


@click.group()
def prepare():
    """Write a long-tailed dataset as webdataset shards plus dataset.json."""


@prepare.command()
@out
@click.option("--imbalance", default=100.0, show_default=True, help="Ratio of the largest to the smallest class.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-count", default=300, show_default=True, help="Train images of the largest class.")
@click.option("--test-per-class", default=20, show_default=True)
@click.option("--val-per-class", default=10, show_default=True)
@click.option("--image-size", default=32, show_default=True)
@shard_size
@overwrite
def synthetic(out, imbalance, seed, max_count, test_per_class, val_per_class, image_size, shard_size, overwrite):
    """The generated long-tailed shapes demo ("red triangle", …)."""
    from stages.prepare import prepare_synthetic

    path = prepare_synthetic(out, imbalance=imbalance, seed=seed, max_count=max_count, test_per_class=test_per_class,
                             val_per_class=val_per_class, image_size=image_size, shard_size=shard_size,
                             overwrite=overwrite)
    click.echo(f"wrote {path}")


@prepare.command(name="list")
@click.option("--root", required=True, type=click.Path(), help="Folder the list paths are relative to.")
@click.option("--train-list", required=True, type=click.Path(), help="`relative/path.jpg <label>` per line.")
@click.option("--test-list", required=True, type=click.Path())
@click.option("--val-list", type=click.Path())
@click.option("--classes", help="Class names file (one per line, index = line) or `imagenet`; "
                                "default: the train list's folder names.")
@click.option("--name", help="Dataset name (default: from the train list's file name).")
@click.option("--seed", default=0, show_default=True, help="Seed of the train split's shuffled order.")
@out
@shard_size
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (each key is reported) instead of failing.")
@overwrite
def list_(root, train_list, test_list, val_list, classes, name, seed, out, shard_size, skip_bad, overwrite):
    """ImageNet-LT / Places-LT style split lists."""
    from stages.prepare import prepare_lists

    path = prepare_lists(out, root, train_list, test_list, val_list=val_list, classes=classes, name=name, seed=seed,
                         shard_size=shard_size, skip_bad=skip_bad, overwrite=overwrite)
    click.echo(f"wrote {path}")


@prepare.command(name="cifar100-lt")
@click.option("--archive", required=True, type=click.Path(), help="The official cifar-100-python.tar.gz.")
@out
@click.option("--imbalance", default=100.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@shard_size
@overwrite
def cifar100_lt(archive, out, imbalance, seed, shard_size, overwrite):
    """CIFAR-100-LT from the official python archive."""
    from stages.prepare import prepare_cifar100_lt

    path = prepare_cifar100_lt(out, archive, imbalance=imbalance, seed=seed, shard_size=shard_size, overwrite=overwrite)
    click.echo(f"wrote {path}")
