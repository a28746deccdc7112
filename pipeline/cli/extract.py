"""`ballad-pipe extract`: a frozen CLIP → the zarr feature store (see docs/feature-store.md)."""
import click

from pipeline.cli.options import INT_OR_NONE, TEXT_OR_NONE, device


@click.command()
@click.option("--ckpt", required=True, type=TEXT_OR_NONE,
              help="Phase A checkpoint (final.pt), or `none` for the model as the factory builds it.")
@click.option("--data", required=True, type=click.Path(), help="Shard directory written by `prepare`.")
@click.option("--out", required=True, type=click.Path(), help="The store, e.g. features/NAME.zarr.")
@click.option("--model", type=TEXT_OR_NONE,
              help="open_clip architecture; default: the one in the checkpoint's final.json.")
@click.option("--pretrained", type=TEXT_OR_NONE,
              help="open_clip weight tag (with --ckpt none), recorded as provenance otherwise.")
@click.option("--splits", help="Comma-separated splits; default: all of the dataset's.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", type=INT_OR_NONE,
              help="DataLoader processes decoding shards, per rank (default: the free cores, at most 8; 0 decodes "
                   "in the main process).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of image features.")
@click.option("--templates", default="single", show_default=True,
              help="`single` (the dataset's template), `ensemble` (CLIP's 7) or a file with one per line.")
@device
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with another model, checkpoint or dataset.")
@click.option("--train-views", default=0, show_default=True,
              help="Random train-transform views stored per train image, for Phase B (0 to 1024).")
@click.option("--view-seed", default=0, show_default=True,
              help="Seed of the train views (each view's randomness: this seed, the sample key, the view index).")
@click.option("--test-views", default="none", show_default=True,
              help="Test-time views stored per val/test image: none, flip, five-crop or ten-crop (LIFT).")
def extract(ckpt, data, out, model, pretrained, splits, batch_size, workers, dtype, templates, device, strict,
            overwrite, train_views, view_seed, test_views):
    """Image features of every split and class text embeddings, into a resumable zarr store.

    Re-running the same command finishes an interrupted run; under torchrun each rank extracts its
    own range of shards into the same store.
    """
    from stages.extract import extract as run

    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    done = run(ckpt, data, out, model=model, pretrained=pretrained, splits=split_list, batch_size=batch_size,
               workers=workers, dtype=dtype, templates=templates, strict=strict, overwrite=overwrite, device=device,
               train_views=train_views, view_seed=view_seed, test_views=test_views)
    computed = ", ".join(f"{s}: {n} shard(s)" for s, n in done.items())
    click.echo(f"wrote {out} ({computed} computed)")
