"""The options of `export` and `predict`: one config dataclass per command, torch-free, the one source of
each option's flag, default, help and check (stages/bundle/run.py does the work)."""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from pipeline.images import MAX_PIXELS, MAX_PIXELS_HELP
from pipeline.options import DEVICE, DEVICE_HELP, INT_MAX, check_ints, option
from pipeline.views import check_test_views


@dataclass(frozen=True)
class ExportConfig:
    ckpt: str = option(MISSING, "--ckpt", "Checkpoint the store was extracted from (final.pt).", path="file")
    adapter: str | None = option(MISSING, "--adapter", "Adapter file (`ballad-pipe adapter`), or `none` for the "
                                                       "store as it is.", kind=str, none=True)
    features: str = option(MISSING, "--features", "The feature store the adapter was trained on.", path="any")
    out: str = option(MISSING, "--out", "Bundle directory, e.g. models/NAME.bundle (replaced if it is one).",
                      path="any")

    def check(self) -> None:
        """Nothing to check before the files are read (stages/bundle/run.py's export checks them)."""


@dataclass(frozen=True)
class PredictConfig:
    bundle: str = option(MISSING, "--bundle", "Bundle directory (`ballad-pipe export`).", path="any")
    top_k: int = option(5, "--top-k", "Classes listed per image.")
    batch_size: int = option(64, "--batch-size", "Images per forward pass.")
    device: str = option(DEVICE, "--device", DEVICE_HELP)
    classes: str | None = option(None, "--classes", "File of class names, one per line, to predict among instead "
                                                    "of the bundle's.", path="file")
    add_classes: str | None = option(None, "--add-classes", "File of class names, one per line, to predict among "
                                                            "as well as the bundle's.", path="file")
    as_json: bool = option(False, "--json", "One JSON object per image on stdout.")
    tta: str = option("none", "--tta", "Test-time ensembling: average the logits over the views of flip, five-crop "
                                       "or ten-crop (as `extract --test-views` + `evaluate --tta mean`); none: the "
                                       "centre crop alone.")
    skip_bad: bool = option(False, "--skip-bad", "Exit 0 when some files are unreadable (each is still reported).")
    max_pixels: int = option(MAX_PIXELS, "--max-pixels", MAX_PIXELS_HELP)

    def check(self) -> None:
        """Every option in range before any file is read: a one-line UserError naming the first that is not."""
        check_ints(self, (("top_k", 1, INT_MAX, None), ("batch_size", 1, INT_MAX, None),
                          ("max_pixels", 1, INT_MAX, "must be at least 1")))
        check_test_views(self.tta, "--tta")
