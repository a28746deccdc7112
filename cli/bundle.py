"""`ballad-pipe export` and `predict`: a self-contained bundle, and top-k classes of image files with it."""
import click

from cli.options import TEXT_OR_NONE, device
from pipeline.images import MAX_PIXELS, MAX_PIXELS_HELP, SKIP_BAD_HINT


@click.command()
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="Checkpoint the store was extracted from (final.pt).")
@click.option("--adapter", required=True, type=TEXT_OR_NONE,
              help="Adapter file (`ballad-pipe adapter`), or `none` for the store as it is.")
@click.option("--features", required=True, type=click.Path(), help="The feature store the adapter was trained on.")
@click.option("--out", required=True, type=click.Path(), help="Bundle directory, e.g. models/NAME.bundle (replaced if it is one).")
def export(ckpt, adapter, features, out):
    """One directory with the model, adapter, class names and text embeddings; refuses mismatched parts."""
    from stages.bundle import export as run

    meta = run(ckpt, adapter, features, out)
    a = meta["adapter"]
    desc = "no adapter" if a is None else f"{a['config']['position']} adapter λ={a['config']['lam']:g} ({a['config']['form']})"
    click.echo(f"wrote {out} ({meta['model']['name']}, {len(meta['classnames'])} classes, {desc})")


@click.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(), help="Bundle directory (`ballad-pipe export`).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", default=5, show_default=True, help="Classes listed per image.")
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass.")
@device
@click.option("--classes", type=click.Path(dir_okay=False),
              help="File of class names, one per line, to predict among instead of the bundle's.")
@click.option("--add-classes", type=click.Path(dir_okay=False),
              help="File of class names, one per line, to predict among as well as the bundle's.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@click.option("--tta", default="none", show_default=True,
              help="Test-time ensembling: average the logits over the views of flip, five-crop or ten-crop "
                   "(as `extract --test-views` + `evaluate --tta mean`); none: the centre crop alone.")
@click.option("--skip-bad", is_flag=True, help="Exit 0 when some files are unreadable (each is still reported).")
@click.option("--max-pixels", default=MAX_PIXELS, show_default=True, help=MAX_PIXELS_HELP)
def predict(bundle_path, inputs, top_k, batch_size, device, classes, add_classes, as_json, tta, skip_bad, max_pixels):
    """Top-k classes with probabilities of each image in INPUTS (files, or directories walked for images).

    Unreadable files are reported on stderr, one line each, and the others predicted; the exit status is
    then non-zero unless --skip-bad.
    """
    import json

    from pipeline.errors import UserError
    from pipeline.options import check_int
    from stages.bundle import Bundle, check_predict_options, image_files, predict_files, read_classes

    check_predict_options(top_k, batch_size, tta)
    check_int("--max-pixels", max_pixels, 1, why="must be at least 1")
    paths = image_files(inputs)
    if not paths:
        raise UserError(f"no image files in {', '.join(inputs)}")
    bundle = Bundle.load(bundle_path, device=device)
    if classes:
        bundle.set_classes(read_classes(classes))
    if add_classes:
        bundle.set_classes(bundle.classnames + read_classes(add_classes))
    skipped = 0
    for path, preds, error in predict_files(bundle, paths, top_k, batch_size, tta, max_pixels):
        if error:
            skipped += 1
            click.echo(f"{path}: skipped, not a readable image ({error})", err=True)
        elif as_json:
            click.echo(json.dumps({"image": str(path), "predictions": [{"class": c, "prob": p} for c, p in preds]}))
        else:
            click.echo(str(path))
            for rank, (c, p) in enumerate(preds, 1):
                click.echo(f"  {rank:>2}  {p:7.2%}  {c}")
    if skipped and not skip_bad:
        raise UserError(f"{skipped} of {len(paths)} file(s) could not be read (listed above); {SKIP_BAD_HINT}")
