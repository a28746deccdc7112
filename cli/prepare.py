"""`ballad-pipe prepare {synthetic,list,folder,cifar100-lt,index}`: datasets → webdataset shards + dataset.json."""
import click

from cli.options import FLOAT_OR_NONE
from pipeline.images import MAX_PIXELS, MAX_PIXELS_HELP, SKIP_BAD_HELP

shard_size = click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
overwrite = click.option("--overwrite", is_flag=True, help="Replace a different dataset already in --out.")
out = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
skip_bad = click.option("--skip-bad", is_flag=True, help=SKIP_BAD_HELP)
max_pixels = click.option("--max-pixels", default=MAX_PIXELS, show_default=True, help=MAX_PIXELS_HELP)
name = click.option("--name", help="Dataset name (default: from the input's name).")
max_side = click.option("--max-side", type=int, help="Store images whose longer side exceeds this many pixels at that "
                        "size (aspect kept) as JPEG, for faster decoding; smaller ones keep their bytes [default: "
                        "every image keeps its bytes].")
jpeg_quality = click.option("--jpeg-quality", type=int, help="JPEG quality, 1-100, of the images --max-side shrinks "
                            "[default: 90].")


@click.group()
def prepare():
    """Write a long-tailed dataset as webdataset shards plus dataset.json (or describe existing shards)."""


@prepare.command()
@out
@click.option("--imbalance", default=100.0, show_default=True, help="Ratio of the largest to the smallest class.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-count", default=300, show_default=True, help="Train images of the largest class.")
@click.option("--test-per-class", default=20, show_default=True)
@click.option("--val-per-class", default=10, show_default=True)
@click.option("--image-size", default=32, show_default=True)
@shard_size
@max_side
@jpeg_quality
@overwrite
def synthetic(out, imbalance, seed, max_count, test_per_class, val_per_class, image_size, shard_size, max_side,
              jpeg_quality, overwrite):
    """The generated long-tailed shapes demo ("red triangle", …)."""
    from stages.prepare import prepare_synthetic

    path = prepare_synthetic(out, imbalance=imbalance, seed=seed, max_count=max_count, test_per_class=test_per_class,
                             val_per_class=val_per_class, image_size=image_size, shard_size=shard_size,
                             overwrite=overwrite, max_side=max_side, jpeg_quality=jpeg_quality)
    click.echo(f"wrote {path}")


@prepare.command(name="list")
@click.option("--root", required=True, type=click.Path(), help="Folder the list paths are relative to.")
@click.option("--train-list", required=True, type=click.Path(), help="`relative/path.jpg <label>` per line.")
@click.option("--test-list", required=True, type=click.Path())
@click.option("--val-list", type=click.Path())
@click.option("--classes", help="Class names file (one per line, index = line; or .json: a list of names, or of "
                                "objects with id and name, as iNaturalist's categories.json) or `imagenet`; "
                                "default: the train list's folder names.")
@name
@click.option("--seed", default=0, show_default=True, help="Seed of the train split's shuffled order.")
@out
@shard_size
@skip_bad
@max_pixels
@max_side
@jpeg_quality
@overwrite
def list_(root, train_list, test_list, val_list, classes, name, seed, out, shard_size, skip_bad, max_pixels, max_side,
          jpeg_quality, overwrite):
    """ImageNet-LT / Places-LT / iNaturalist 2018 style split lists."""
    from stages.prepare import prepare_lists

    path = prepare_lists(out, root, train_list, test_list, val_list=val_list, classes=classes, name=name, seed=seed,
                         shard_size=shard_size, skip_bad=skip_bad, overwrite=overwrite, max_side=max_side,
                         jpeg_quality=jpeg_quality, max_pixels=max_pixels)
    click.echo(f"wrote {path}")


@prepare.command()
@click.option("--root", required=True, type=click.Path(),
              help="ROOT/<class>/*.jpg, or ROOT/train/<class>/… + ROOT/test/<class>/… (+ ROOT/val/<class>/…).")
@click.option("--val-fraction", type=FLOAT_OR_NONE, help="Share of each class drawn for val when ROOT has no val/ folder "
                                                 "[default: 0].")
@click.option("--test-fraction", type=FLOAT_OR_NONE, help="Share of each class drawn for test when ROOT has no test/ folder "
                                                  "[default: 0.2].")
@click.option("--seed", default=0, show_default=True, help="Seed of the per-class split and the train order.")
@click.option("--classes", help="Class names file (one per line, in sorted-folder order; or .json, as for "
                                "`prepare list`) or `imagenet`; default: the folder names, underscores → spaces.")
@name
@out
@shard_size
@skip_bad
@max_pixels
@max_side
@jpeg_quality
@overwrite
def folder(root, val_fraction, test_fraction, seed, classes, name, out, shard_size, skip_bad, max_pixels, max_side,
           jpeg_quality, overwrite):
    """Image folders in torchvision's ImageFolder layout."""
    from stages.prepare import prepare_folder

    path = prepare_folder(out, root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, classes=classes,
                          name=name, shard_size=shard_size, skip_bad=skip_bad, overwrite=overwrite, max_side=max_side,
                          jpeg_quality=jpeg_quality, max_pixels=max_pixels)
    click.echo(f"wrote {path}")


@prepare.command(name="cifar100-lt")
@click.option("--archive", required=True, type=click.Path(), help="The official cifar-100-python.tar.gz.")
@out
@click.option("--imbalance", default=100.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@shard_size
@max_side
@jpeg_quality
@overwrite
def cifar100_lt(archive, out, imbalance, seed, shard_size, max_side, jpeg_quality, overwrite):
    """CIFAR-100-LT from the official python archive."""
    from stages.prepare import prepare_cifar100_lt

    path = prepare_cifar100_lt(out, archive, imbalance=imbalance, seed=seed, shard_size=shard_size, overwrite=overwrite,
                               max_side=max_side, jpeg_quality=jpeg_quality)
    click.echo(f"wrote {path}")


@prepare.command()
@click.option("--shards", "shards", multiple=True, required=True, metavar="SPLIT=PATTERN",
              help="A split's shards, once per split: local paths or any URL webdataset opens (http(s)://, "
                   "pipe:CMD, …), with braces ({000000..000146}) and, for local paths, globs.")
@click.option("--classes", required=True, help="Class names file (one per line, index = line; or .json, as for "
                                               "`prepare list`) or `imagenet`.")
@click.option("--label-key", default="cls", show_default=True,
              help="Member holding each sample's integer label: EXT (e.g. cls) or EXT:FIELD for a JSON member's "
                   "field (e.g. json:label).")
@name
@click.option("--workers", default=4, show_default=True, help="Shards read at once.")
@out
@overwrite
def index(shards, classes, label_key, name, workers, out, overwrite):
    """Existing webdataset shards, described in place (nothing is copied)."""
    from stages.prepare import prepare_index

    path = prepare_index(out, shards, classes, label_key=label_key, name=name, workers=workers, overwrite=overwrite)
    click.echo(f"wrote {path / 'dataset.json'}")
