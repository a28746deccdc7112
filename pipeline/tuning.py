"""The names and defaults of Phase A's ``--tune`` variants, without torch.

pipeline/peft.py implements the variants (and re-exports these names); stages/phase_a_config.py and
the command line read them here, so ``ballad-pipe phase-a --help`` does not import torch.
"""
TUNES = ("full", "bias", "lora", "adaptformer")
TRANSFORMER_TUNES = ("lora", "adaptformer")  # need open_clip's transformer blocks in the image tower
LORA_RANK = 8
