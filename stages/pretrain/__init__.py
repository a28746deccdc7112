"""Stage `pretrain`: the demo's CLIP, trained with CLIP's contrastive loss on a generated captioned
corpus (run.py; docs/pretraining.md). Options: config.py (torch-free)."""
