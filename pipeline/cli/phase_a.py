"""`ballad-pipe phase-a`: finetune both CLIP encoders on the long-tailed train split (stages/phase_a.py).

Defaults are the authors' code; stages/phase_a.py checks every value before work starts.
"""
import click

from pipeline.models import COLOR_JITTER
from pipeline.schedule import SCHEDULES
from stages.adapter_config import LOSSES
from stages.phase_a_data import default_workers


@click.command(name="phase-a")
@click.option("--data", required=True, type=click.Path(), help="Prepared dataset directory (holds dataset.json).")
@click.option("--model", required=True, help="open_clip architecture (RN50-quickgelu, ViT-B-16, …) or ballad-tiny.")
@click.option("--pretrained", help="open_clip weight tag (openai, …) or a local checkpoint; default: random init.")
@click.option("--out", default="checkpoints/phase_a", show_default=True, type=click.Path(file_okay=False),
              help="Output directory: last.pt, best.pt, final.pt, final.json, train_log.jsonl.")
@click.option("--epochs", default=50, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="sgd as in the paper; adamw to train a random init (ballad-tiny) from scratch.")
@click.option("--lr", default=1e-5, show_default=True, help="Learning rate of both encoders (cosine to 0).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="authors", show_default=True,
              help="authors: cosine stepped at each epoch's start (epoch 1 below --lr, the last at 0); "
                   "standard: epoch 1 at --lr, never 0.")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--momentum", default=0.9, show_default=True, help="SGD momentum.")
@click.option("--batch-size", default=512, show_default=True, help="Images per optimizer step, over all processes.")
@click.option("--micro-batch", type=int, help="Images per forward pass and process (gradient accumulation).")
@click.option("--logit-scale", type=float, help="Fixed logit scale s (default: the model's own, 100 for OpenAI CLIP).")
@click.option("--batchnorm", type=click.Choice(["auto", "frozen", "train"]), default="auto", show_default=True,
              help="frozen: the model stays in eval mode, BatchNorm keeps its running statistics (the authors'); "
                   "train: train mode; auto: frozen from pretrained weights, train from a random init.")
@click.option("--color-jitter", default=COLOR_JITTER, show_default=True,
              help="ColorJitter brightness/contrast/saturation of the train transform (the authors' 0.4); 0 = off.")
@click.option("--select", type=click.Choice(["auto", "best-val", "last"]), default="auto", show_default=True,
              help="Weights in final.pt: the epoch with the best val top-1 (the authors') or the last; "
                   "auto: best-val when the dataset has a val split.")
@click.option("--precision", type=click.Choice(["fp32", "fp16-weights"]), default="fp32", show_default=True,
              help="fp32: fp32 weights, bf16 autocast on CUDA; fp16-weights: the authors' fp16 weights updated "
                   "directly (CUDA only).")
@click.option("--tune", type=click.Choice(["full", "bias", "lora", "adaptformer"]), default="full", show_default=True,
              help="What trains. full: both towers (BALLAD); bias: image-tower biases and norm weights; lora: "
                   "low-rank q/v updates in the image tower's attention; adaptformer: a bottleneck branch beside "
                   "each image-tower MLP (LIFT). bias/lora/adaptformer freeze the text tower; lora and adaptformer "
                   "need a ViT image tower.")
@click.option("--lora-rank", default=8, show_default=True, help="Rank r of --tune lora (scaling 1/r, as LIFT).")
@click.option("--adapter-width", type=int,
              help="Bottleneck width of --tune adaptformer (default: LIFT's 2^max(0, ⌊log2(K / 2L)⌋), "
                   "K classes, L blocks).")
@click.option("--classifier", type=click.Choice(["text", "head"]), default="text", show_default=True,
              help="text: the text tower's embeddings of the class prompts, every step (BALLAD); head: a cosine "
                   "classifier initialised from them and trained, the text tower frozen and not run (LIFT).")
@click.option("--loss", type=click.Choice(LOSSES), default="ce", show_default=True,
              help="ce: cross-entropy (BALLAD); logit-adjusted: cross-entropy of the logits + τ·log(train class "
                   "prior), in training only (LIFT).")
@click.option("--la-tau", default=1.0, show_default=True, help="τ of --loss logit-adjusted, ≥ 0.")
@click.option("--workers", type=int, default=default_workers, show_default="4, at most the usable cores",
              help="DataLoader workers per process.")
@click.option("--shuffle-buffer", default=2000, show_default=True, help="Samples in the shuffle buffer per worker.")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-every", default=200, show_default=True, help="Write last.pt every N steps (and at the end).")
@click.option("--eval-every", default=0, show_default=True,
              help="Test accuracy (not used for selection) before training and every N epochs; 0 = never.")
@click.option("--eval-samples", default=2000, show_default=True, help="Test images used by --eval-every.")
@click.option("--grad-checkpointing", is_flag=True, help="Trade compute for memory (transformer towers).")
@click.option("--strict", is_flag=True, help="Fail on an undecodable sample instead of skipping it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt (or start one).")
@click.option("--device", help="cpu, cuda, cuda:1 (default: CUDA when present); torchrun picks the GPU per rank.")
def phase_a(**options):
    """Phase A: train both CLIP encoders on all K class prompts with cross-entropy (BALLAD), or LIFT's
    lightweight variant (--tune, --classifier head, --loss logit-adjusted)."""
    from stages.phase_a import PhaseAConfig, run_phase_a

    final = run_phase_a(PhaseAConfig(**options))
    click.echo(f"wrote {final}")
