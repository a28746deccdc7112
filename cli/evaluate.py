"""`ballad-pipe evaluate`, `sweep` and `neighbors`: scoring from the feature store."""
import click

from cli.adapter import features, train_options
from cli.options import TEXT_OR_NONE, device
from pipeline.shots import FEW, MANY

adapter_opt = click.option("--adapter", default="none", show_default=True, type=TEXT_OR_NONE,
                           help="Adapter file, or `none` to score the store itself (zero-shot / Phase A).")
split_opt = click.option("--split", default="test", show_default=True)


def thresholds(f):
    f = click.option("--few-threshold", default=FEW, show_default=True, help="Few: fewer train images than this.")(f)
    return click.option("--many-threshold", default=MANY, show_default=True,
                        help="Many: more train images than this.")(f)


def _fmt(value):
    return "–" if value is None else f"{value:.2f}"


@click.command()
@features
@adapter_opt
@split_opt
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder, e.g. reports/ballad.")
@thresholds
@click.option("--logit-adjust", default=0.0, show_default=True, help="τ: subtract τ·log(train class prior).")
@click.option("--knn-k", default=0, show_default=True, help="Neighbours in the kNN cache (0: off).")
@click.option("--knn-alpha", default=1.0, show_default=True, help="Weight of the cache votes.")
@click.option("--knn-beta", default=5.0, show_default=True, help="Vote weight exp(−β(1 − cos)).")
@click.option("--knn-gamma", default=0.0, show_default=True, help="Divide votes by class train count^γ.")
@click.option("--tta", default="none", show_default=True,
              help="`mean`: average the logits over the store's test-time views (extract --test-views); "
                   "`none`: the eval-transform feature alone.")
@device
def evaluate(features, adapter, split, out, many_threshold, few_threshold, logit_adjust, knn_k, knn_alpha,
             knn_beta, knn_gamma, tta, device):
    """Top-1/5, many/medium/few and ECE → metrics.json, per_class.csv, predictions.npz, per_class.png."""
    from stages.evaluate import evaluate as run
    from stages.knn import KnnConfig

    m = run(features, out, adapter=adapter, split=split, many=many_threshold, few=few_threshold,
            logit_adjust=logit_adjust, knn=KnnConfig(knn_k, knn_alpha, knn_beta, knn_gamma), tta=tta, device=device)
    views = f", logits averaged over the {m['tta_views']} views" if tta == "mean" else ""
    click.echo(f"top-1 {_fmt(m['top1'])}  top-5 {_fmt(m['top5'])}  many {_fmt(m['many'])}  medium {_fmt(m['medium'])}"
               f"  few {_fmt(m['few'])}  ECE {_fmt(m['ece'])}  ({m['num_test']} {split} samples{views}) → {out}")


@click.command()
@features
@click.option("--lambdas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", show_default=True,
              help="Comma-separated residual factors.")
@train_options
@split_opt
@thresholds
@device
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder, e.g. reports/sweep.")
def sweep(features, lambdas, split, many_threshold, few_threshold, device, out, **train):
    """Train and score one adapter per λ from the cache (paper Fig. 5); each keeps its epoch by --select."""
    import math

    from pipeline.errors import UserError
    from stages.adapter_config import TrainConfig
    from stages.sweep import sweep as run

    try:  # float() also reads nan and inf: refused here, by this option's name
        values = [float(v) for v in lambdas.split(",") if v.strip()]
        finite = all(map(math.isfinite, values))
    except ValueError:
        finite = False
    if not finite:
        raise UserError(f"--lambdas {lambdas}: expected comma-separated finite numbers")
    rows = run(features, out, values, TrainConfig(**train), split=split, many=many_threshold, few=few_threshold,
               device=device)
    click.echo(f"{'λ':>5} {'top-1':>7} {'many':>7} {'medium':>7} {'few':>7} {'epoch':>5} {'val':>7}")
    for r in rows:
        click.echo(f"{r['lambda']:>5g}" + "".join(f" {_fmt(r[k]):>7}" for k in ("top1", "many", "medium", "few"))
                   + f" {r['selected_epoch']:>5} {_fmt(r['val_acc']):>7}")
    click.echo(f"→ {out}")


@click.command()
@features
@click.option("--key", required=True, help="Sample key in --split.")
@click.option("--k", default=5, show_default=True, help="Neighbours to list.")
@adapter_opt
@split_opt
@device
def neighbors(features, key, k, adapter, split, device):
    """The nearest training samples of one sample, with their classes (error analysis)."""
    from stages.knn import neighbors as run

    r = run(features, key, k=k, adapter=adapter, split=split, device=device)
    click.echo(f"{r['key']} ({split}): class {r['class']!r}, predicted {r['predicted_class']!r}")
    click.echo(f"{'rank':>4} {'cosine':>7}  key  class")
    for n in r["neighbors"]:
        mark = "*" if n["label"] == r["label"] else " "
        click.echo(f"{n['rank']:>4} {n['cosine']:>7.4f} {mark}{n['key']}  {n['class']}")
