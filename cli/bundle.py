"""`ballad-pipe export` and `predict`: a self-contained bundle, and top-k classes of image files with it.

The options are built from the config dataclasses of stages/bundle/config.py (torch-free)."""
import click

from cli.options import config_options
from stages.bundle.config import ExportConfig, PredictConfig


@click.command()
@config_options(ExportConfig)
def export(**options):
    """One directory with the model, adapter, class names and text embeddings; refuses mismatched parts."""
    from stages.bundle.run import export as run

    cfg = ExportConfig(**options)
    meta = run(cfg.ckpt, cfg.adapter, cfg.features, cfg.out)
    a = meta["adapter"]
    desc = "no adapter" if a is None else f"{a['config']['position']} adapter λ={a['config']['lam']:g} ({a['config']['form']})"
    click.echo(f"wrote {cfg.out} ({meta['model']['name']}, {len(meta['classnames'])} classes, {desc})")


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@config_options(PredictConfig)
def predict(inputs, **options):
    """Top-k classes with probabilities of each image in INPUTS (files, or directories walked for images).

    Unreadable files are reported on stderr, one line each, and the others predicted; the exit status is
    then non-zero unless --skip-bad.
    """
    import json

    from pipeline.errors import UserError
    from pipeline.images import SKIP_BAD_HINT
    from stages.bundle.run import Bundle, image_files, predict_files, read_classes

    cfg = PredictConfig(**options)
    cfg.check()
    paths = image_files(inputs)
    if not paths:
        raise UserError(f"no image files in {', '.join(inputs)}")
    bundle = Bundle.load(cfg.bundle, device=cfg.device)
    if cfg.classes:
        bundle.set_classes(read_classes(cfg.classes))
    if cfg.add_classes:
        bundle.set_classes(bundle.classnames + read_classes(cfg.add_classes))
    skipped = 0
    for path, preds, error in predict_files(bundle, paths, cfg.top_k, cfg.batch_size, cfg.tta, cfg.max_pixels):
        if error:
            skipped += 1
            click.echo(f"{path}: skipped, not a readable image ({error})", err=True)
        elif cfg.as_json:
            click.echo(json.dumps({"image": str(path), "predictions": [{"class": c, "prob": p} for c, p in preds]}))
        else:
            click.echo(str(path))
            for rank, (c, p) in enumerate(preds, 1):
                click.echo(f"  {rank:>2}  {p:7.2%}  {c}")
    if skipped and not cfg.skip_bad:
        raise UserError(f"{skipped} of {len(paths)} file(s) could not be read (listed above); {SKIP_BAD_HINT}")
