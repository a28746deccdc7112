"""Phase A's options: ``PhaseAConfig``, the one source of their defaults, choices, help and checks.

Kept free of torch so that the command line builds ``ballad-pipe phase-a``'s options from it without
importing torch (``--help`` stays fast). Each field's metadata names its command-line flag
(pipeline/options.py), so the CLI and the checks' error messages use the same names; the options
other commands share (seed, schedule, select, transforms, workers) come from pipeline/shared_options.py,
the loss and its parameters from pipeline/losses.py (``loss_options``).
The fields marked ``resumable`` are what a resumed run must share with the run that wrote last.pt
(pipeline/checkpointing.py); the rest may change between attempts, as ``--micro-batch`` and
``--text-chunk`` may: they change how each step's gradient is computed, not what it is. The defaults
are the authors' code; stages/phase_a/__init__.py says where and why each choice departs from it.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from pipeline import shared_options as shared
from pipeline.checkpointing import resumable
from pipeline.images import MAX_PIXELS, MAX_PIXELS_HELP, SKIP_BAD_HELP
from pipeline.losses import check_loss, loss_options, loss_params
from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_choices, check_finite, check_ints, option, refuse
from pipeline.schedule import check_epochs
from pipeline.transforms import COLOR_JITTER, MDA_SCHEDULES
from pipeline.heads import HEAD_INIT_HELP, HEAD_INITS, HEAD_INPUT_HELP, HEAD_INPUTS
from pipeline.tuning import TUNE_HELP, TUNES
from store.features import MAX_LOGIT_SCALE
from store.stream import DECODE_HELP, DECODES
from store.trust import ALLOW_COMMANDS, ALLOW_COMMANDS_HELP

OPTIMIZERS = ("sgd", "adamw")
BATCHNORM_MODES = ("auto", "frozen", "train")
PRECISIONS = ("fp32", "fp16-weights")
CLASSIFIERS = ("text", "head")
WIDTH_RULE = "LIFT's 2^max(0, ⌊log2(K / 2L)⌋), K classes, L blocks"


def default_workers() -> int:
    """DataLoader workers per process by default: 4, at most the usable cores."""
    return shared.default_workers(4)


def resumable_loss(cls):
    """Class decorator, under ``@dataclass`` and over ``loss_options``: the loss and its parameters are
    resumable too (a resumed run trains with the loss it started with)."""
    for name in ("loss", *(p.name for p in loss_params())):
        resumable(cls.__dict__[name])
    return cls


@dataclass
@resumable_loss
@loss_options
class PhaseAConfig:
    data: str = option(MISSING, "--data", "Prepared dataset directory (holds dataset.json).", path="any")
    model: str = resumable(option(MISSING, "--model", "open_clip architecture (RN50-quickgelu, ViT-B-16, …) or "
                                                      "ballad-tiny."))
    out: str = option("checkpoints/phase_a", "--out",
                      "Output directory: last.pt, best.pt, final.pt, final.json, train_log.jsonl.", path="dir")
    pretrained: str | None = resumable(option(None, "--pretrained", "open_clip weight tag (openai, …) or a local "
                                                                    "checkpoint; default (or none): random init.",
                                              kind=str))
    epochs: int = resumable(option(50, "--epochs", "Training epochs; an epoch is ⌊N / --batch-size⌋ optimizer "
                                                   "steps."))
    optimizer: str = resumable(option("sgd", "--optimizer", "sgd as in the paper; adamw to train a random init "
                                                            "(ballad-tiny) from scratch.", OPTIMIZERS))
    lr: float = resumable(option(1e-5, "--lr", "Learning rate of both encoders (cosine to 0)."))
    weight_decay: float = resumable(option(5e-4, "--weight-decay", "Weight decay of the optimizer."))
    momentum: float = resumable(option(0.9, "--momentum", "SGD momentum."))
    batch_size: int = resumable(option(512, "--batch-size", "Images per optimizer step, over all processes."))
    micro_batch: int | None = option(None, "--micro-batch", "Images per forward pass and process (gradient "
                                                            "accumulation); default (or none): the whole batch.",
                                     kind=int)
    text_chunk: int | None = option(None, "--text-chunk", "Prompts per text-tower pass (memory bounded by the chunk, "
                                                          "not K; the same gradients); default (or none): all K at "
                                                          "once.", kind=int)
    logit_scale: float | None = resumable(option(None, "--logit-scale", "Fixed logit scale s (default, or none: the "
                                                                        "model's own, 100 for OpenAI CLIP).",
                                                 kind=float))
    schedule: str = resumable(shared.schedule())
    batchnorm: str = resumable(option("auto", "--batchnorm",
                                      "frozen: the model stays in eval mode, BatchNorm keeps its running statistics "
                                      "(the authors'); train: train mode; auto: frozen from pretrained weights, train "
                                      "from a random init.", BATCHNORM_MODES))
    color_jitter: float = resumable(option(COLOR_JITTER, "--color-jitter", "ColorJitter brightness/contrast/"
                                                                           "saturation of the train transform (the "
                                                                           "authors' 0.4); 0 = off. "
                                                                           "--train-transform ballad only."))
    train_transform: str = resumable(shared.train_transform("The train transform, rebuilt every epoch."))
    mda_schedule: str = resumable(option("convex", "--mda-schedule", "How --train-transform mda's least crop area "
                                                                     "rises over the epochs (LIFT+'s convex, linear, "
                                                                     "concave; min, max: fixed at 0.08, 1).",
                                         tuple(MDA_SCHEDULES)))
    eval_transform: str = resumable(shared.eval_transform("The transform of the val and test accuracies."))
    select: str = resumable(shared.select("the dataset"))
    precision: str = resumable(option("fp32", "--precision", "fp32: fp32 weights, bf16 autocast on CUDA; "
                                                             "fp16-weights: the authors' fp16 weights updated "
                                                             "directly (CUDA only).", PRECISIONS))
    tune: str = resumable(option("full", "--tune", TUNE_HELP, TUNES))
    lora_rank: int | None = resumable(option(None, "--lora-rank", "Rank r of --tune lora, scaling 1/r (default, or "
                                                                  f"none: {WIDTH_RULE}, as LIFT).", kind=int))
    adapter_width: int | None = resumable(option(None, "--adapter-width", "Bottleneck width of --tune adaptformer or adapter "
                                                                          f"(default, or none: {WIDTH_RULE}).",
                                                 kind=int))
    tune_blocks: int | None = resumable(option(None, "--tune-blocks", "Limit a --tune block method to the image "
                                                                      "tower's last K transformer blocks (LIFT+'s "
                                                                      "*_layers); default (or none): all.", kind=int))
    classifier: str = resumable(option("text", "--classifier",
                                       "text: the text tower's embeddings of the class prompts, every step (BALLAD); "
                                       "head: a cosine classifier initialised from them and trained, the text tower "
                                       "frozen and not run (LIFT).", CLASSIFIERS))
    head_input: str = resumable(option("pre-projection", "--head-input", HEAD_INPUT_HELP, HEAD_INPUTS))
    head_init: str = resumable(option("text", "--head-init", HEAD_INIT_HELP, HEAD_INITS))
    head_init_shots: int | None = resumable(option(100, "--head-init-shots", "Train images per class read by --head-init "
                                                                             "class-mean/linear-probe (LIFT+'s 100; "
                                                                             "none: all, LIFT's).", kind=int,
                                                   none=True))
    seed: int = resumable(shared.seed("Seed of the model's initialisation, the data order and the augmentation."))
    workers: int = shared.workers("DataLoader workers per process.", default_workers, "4, at most the usable cores")
    shuffle_buffer: int = option(2000, "--shuffle-buffer", "Samples in the shuffle buffer per worker.")
    save_every: int = option(200, "--save-every", "Write last.pt every N steps (and at the end).")
    eval_every: int = option(0, "--eval-every",
                             "Test accuracy (not used for selection) before training and every N epochs; 0 = never.")
    eval_samples: int = option(2000, "--eval-samples", "Test images used by --eval-every.")
    grad_checkpointing: bool = option(False, "--grad-checkpointing", "Trade compute for memory (transformer towers).")
    skip_bad: bool = option(False, "--skip-bad", SKIP_BAD_HELP)
    max_pixels: int = option(MAX_PIXELS, "--max-pixels", MAX_PIXELS_HELP)
    resume: bool = option(False, "--resume", "Continue the run in --out from last.pt (or start one).")
    device: str = option(DEVICE, "--device", DEVICE_HELP)
    decode: str = option("auto", "--decode", DECODE_HELP, DECODES)
    allow_commands: bool = option(False, ALLOW_COMMANDS, ALLOW_COMMANDS_HELP)

    def check(self) -> None:
        """Every option in range before any work starts: a one-line UserError naming the first one that is not."""
        at_least_1 = ("epochs", "batch_size", "save_every", "eval_samples", "lora_rank", "max_pixels", "micro_batch",
                      "text_chunk", "adapter_width", "tune_blocks", "head_init_shots")
        at_least_0 = ("workers", "shuffle_buffer", "eval_every")
        check_ints(self, (*((name, 1, INT_MAX, "must be at least 1") for name in at_least_1),
                          *((name, 0, INT_MAX, "must be 0 or more") for name in at_least_0),
                          shared.SEED_RULE))
        check_finite(self, (("lr", self.lr > 0, "must be above 0 and finite"),
                            ("weight_decay", self.weight_decay >= 0, "must be 0 or more and finite"),
                            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1) and finite"),
                            ("color_jitter", self.color_jitter >= 0, "must be 0 (off) or more and finite"),
                            ("logit_scale", self.logit_scale is None or 0 < self.logit_scale <= MAX_LOGIT_SCALE,
                             f"must be above 0 and at most {MAX_LOGIT_SCALE:g} (what a feature store accepts)")))
        check_choices(self, ("optimizer", "schedule", "batchnorm", "select", "precision", "tune", "classifier",
                             "train_transform", "mda_schedule", "eval_transform", "decode", "head_input", "head_init"))
        for name in ("head_input", "head_init", "head_init_shots"):  # unused with the text tower's classifier
            if self.classifier != "head" and getattr(self, name) != self.__dataclass_fields__[name].default:
                refuse(self, name, "applies to --classifier head only")
        check_loss(self)
        self.check_recipe()
        check_epochs(self)

    def check_recipe(self) -> None:
        """--color-jitter belongs to the ballad train transform and --mda-schedule to mda: another value
        with another train transform would be silently unused, so it is refused."""
        for name, owner in (("color_jitter", "ballad"), ("mda_schedule", "mda")):
            if self.train_transform != owner and getattr(self, name) != self.__dataclass_fields__[name].default:
                refuse(self, name, f"applies to --train-transform {owner} only, not {self.train_transform}")
