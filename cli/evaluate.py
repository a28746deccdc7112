"""`ballad-pipe evaluate`, `sweep` and `neighbors`: scoring from the feature store.

Each command's options are built from its config dataclass (stages/evaluate/config.py, torch-free),
which holds their flags, defaults, choices and help: nothing is repeated here.
"""
import click

from cli.options import config_options
from stages.evaluate.config import EvaluateConfig, NeighborsConfig, SweepConfig


def _fmt(value):
    return "–" if value is None else f"{value:.2f}"


@click.command()
@config_options(EvaluateConfig)
def evaluate(**options):
    """Top-1/5, many/medium/few and ECE → metrics.json, per_class.csv, predictions.npz, per_class.png."""
    from stages.evaluate.run import evaluate as run

    cfg = EvaluateConfig(**options)
    m = run(cfg)
    views = f", logits averaged over the {m['tta_views']} views" if cfg.tta == "mean" else ""
    levels = "".join(f"  {level} {_fmt(value)}" for level, value in m.get("taxonomy", {}).items())
    click.echo(f"top-1 {_fmt(m['top1'])}  top-5 {_fmt(m['top5'])}  many {_fmt(m['many'])}  medium {_fmt(m['medium'])}"
               f"  few {_fmt(m['few'])}  ECE {_fmt(m['ece'])}{levels}  ({m['num_test']} {cfg.split} samples{views}) "
               f"→ {cfg.out}")


@click.command()
@config_options(SweepConfig)
def sweep(**options):
    """Train and score one adapter per grid point from the cache (paper Fig. 5, Tables 6 and 8); each keeps
    its epoch by --select."""
    from stages.evaluate.sweep import METRICS, RECORD, sweep as run

    cfg = SweepConfig(**options)
    rows = run(cfg)
    keys = [k for k in rows[0] if k not in (*METRICS, *RECORD)]
    width = max(7, *(len(str(r[k])) for r in rows for k in keys))
    click.echo("".join(f"{k:>{width}} " for k in keys)
               + f"{'top-1':>7} {'many':>7} {'medium':>7} {'few':>7} {'epoch':>5} {'val':>7}")
    for r in rows:
        click.echo("".join(f"{r[k]:>{width}g} " if isinstance(r[k], float) else f"{r[k]:>{width}} " for k in keys)
                   + " ".join(f"{_fmt(r[k]):>7}" for k in ("top1", "many", "medium", "few"))
                   + f" {r['selected_epoch']:>5} {_fmt(r['val_acc']):>7}")
    click.echo(f"→ {cfg.out}")


@click.command()
@config_options(NeighborsConfig)
def neighbors(**options):
    """The nearest training samples of one sample, with their classes (error analysis)."""
    from stages.evaluate.knn import neighbors as run

    cfg = NeighborsConfig(**options)
    r = run(cfg)
    click.echo(f"{r['key']} ({cfg.split}): class {r['class']!r}, predicted {r['predicted_class']!r}")
    click.echo(f"{'rank':>4} {'cosine':>7}  key  class")
    for n in r["neighbors"]:
        mark = "*" if n["label"] == r["label"] else " "
        click.echo(f"{n['rank']:>4} {n['cosine']:>7.4f} {mark}{n['key']}  {n['class']}")
