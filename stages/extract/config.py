"""extract's options: ``ExtractConfig``, the one source of their defaults, choices, help and checks.

Kept free of torch so that the command line builds ``ballad-pipe extract``'s options from it without
importing torch (``--help`` stays fast). Each field's metadata names its command-line flag
(pipeline/options.py), so the CLI and the checks' error messages use the same names.

``--eval-transform`` (the plain features and the test-time views) and ``--train-transform`` (the train
views) default to ballad, whatever the checkpoint was trained with: a Phase A run records its own in
final.json, and the recipes (configs/*.yaml) pass the same to both commands. MDA is refused here: its
crop depends on the training epoch, which an extraction has not.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from pipeline import shared_options as shared
from pipeline.images import MAX_PIXELS, MAX_PIXELS_HELP, SKIP_BAD_HELP
from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_choices, check_ints, option, refuse
from pipeline.views import TEST_VIEWS, check_test_views
from store.stream import DECODE_HELP, DECODES
from store.trust import ALLOW_COMMANDS, ALLOW_COMMANDS_HELP

DTYPES = ("float16", "float32")
MAX_TRAIN_VIEWS = 1024


@dataclass
class ExtractConfig:
    ckpt: str | None = option(MISSING, "--ckpt", "Phase A checkpoint (final.pt), or `none` for the model as the "
                                                 "factory builds it.", kind=str, none=True)
    data: str = option(MISSING, "--data", "Shard directory written by `prepare`.", path="any")
    out: str = option(MISSING, "--out", "The store, e.g. features/NAME.zarr.", path="any")
    model: str | None = option(None, "--model", "open_clip architecture; default: the one in the checkpoint's "
                                                "final.json.", kind=str)
    pretrained: str | None = option(None, "--pretrained", "open_clip weight tag (with --ckpt none), recorded as "
                                                          "provenance otherwise.", kind=str)
    splits: str | list | None = option(None, "--splits", "Comma-separated splits; default: all of the dataset's.",
                                       kind=str)
    batch_size: int = option(256, "--batch-size", "Images per forward pass.")
    workers: int | None = option(None, "--workers", "DataLoader processes reading shards, per rank (default: the "
                                                    "free cores, at most 8; 0 reads in the main process).", kind=int)
    dtype: str = option("float16", "--dtype", "Storage type of image features.", DTYPES)
    templates: str = option("single", "--templates", "`single` (the dataset's template), `ensemble` (CLIP's 7) or "
                                                     "a file with one per line.")
    device: str = option(DEVICE, "--device", DEVICE_HELP)
    decode: str = option("auto", "--decode", DECODE_HELP, DECODES)
    allow_commands: bool = option(False, ALLOW_COMMANDS, ALLOW_COMMANDS_HELP)
    skip_bad: bool = option(False, "--skip-bad", SKIP_BAD_HELP)
    max_pixels: int = option(MAX_PIXELS, "--max-pixels", MAX_PIXELS_HELP)
    overwrite: bool = option(False, "--overwrite", "Replace a store made with another model, checkpoint or dataset.")
    train_views: int = option(0, "--train-views", f"Random train-transform views stored per train image, for "
                                                  f"Phase B (0 to {MAX_TRAIN_VIEWS}).")
    view_seed: int = option(0, "--view-seed", "Seed of the train views (each view's randomness: this seed, the "
                                              "sample key, the view index).")
    test_views: str = option("none", "--test-views", "Test-time views stored per val/test image (LIFT's five-crop "
                                                     "and ten-crop; flip: the centre crop and its mirror image).",
                             tuple(TEST_VIEWS))
    eval_transform: str = shared.eval_transform("The transform of every stored feature and of the test-time views.")
    train_transform: str = shared.train_transform("The transform of the train views (mda: refused, it needs an "
                                                  "epoch).")

    def check(self) -> None:
        """Every option in range before any work starts: a one-line UserError naming the first one that is not."""
        check_ints(self, (("batch_size", 1, INT_MAX, "must be at least 1"),
                          ("workers", 0, INT_MAX, "must be 0 (read in the main process) or more"),
                          ("train_views", 0, MAX_TRAIN_VIEWS, f"must be between 0 (none) and {MAX_TRAIN_VIEWS}"),
                          ("view_seed", 0, INT_MAX, "must be 0 or more"),
                          ("max_pixels", 1, INT_MAX, "must be at least 1")))
        check_test_views(self.test_views, "--test-views")
        check_choices(self, ("dtype", "decode", "eval_transform", "train_transform"))
        if self.train_transform == "mda":
            refuse(self, "train_transform", "LIFT+'s crop depends on the training epoch, which extract has not; "
                                            "pass ballad or lift")
        if self.train_transform != "ballad" and not self.train_views:
            refuse(self, "train_transform", "applies to --train-views only, and none are asked for")

    def split_list(self) -> list[str] | None:
        """``--splits`` as a list (None: all of the dataset's); Python callers may pass a list."""
        if isinstance(self.splits, str):
            return [s.strip() for s in self.splits.split(",") if s.strip()] or None
        return list(self.splits) if self.splits else None
