"""Stage `phase-a`: finetune both CLIP encoders on the long-tailed train split (BALLAD Phase A).

The package: ``config`` (``PhaseAConfig``, torch-free: each option's flag, default, choices, help and
check), ``data`` (the shards streamed as exact epochs), ``model`` (the towers, the training step, the
accuracy), ``state`` (the run and its training state: started, resumed, saved, logged) and ``run``
(``run_phase_a``: set up, ``train_one_epoch``, final.pt + final.json).
Their public names are read here lazily, so importing ``stages.phase_a.config`` does not import torch.

The method, with the authors' code's choices as the defaults (docs/fidelity.md lists every point):
- Every step encodes all K class prompts (one template, "a photo of a {}.") with gradients. The
  prompts are tokenized once per run and cut to the longest prompt (pipeline/text.py), which is exact.
- logits = s · norm(v) · norm(u_k)ᵀ with s the model's logit scale held fixed (100 for OpenAI CLIP,
  1/0.07 for a random init); plain cross-entropy over the K classes. The paper writes a temperature
  τ = 1.0 (Eq. 4); the code multiplies by CLIP's scale of 100. ``--logit-scale`` overrides s and
  stores it in the model, so later stages use the same value.
- Instance-balanced sampling (no re-balancing in Phase A, Table 7), batch 512; an epoch is
  ⌊N / 512⌋ optimizer steps, the last partial batch dropped as the code's loader does. The train
  transform is the authors' (crop, flip, ColorJitter 0.4; ``--color-jitter 0`` drops the jitter).
- SGD momentum 0.9, weight decay 5e-4, lr 1e-5 for both encoders, 50 epochs, cosine to 0 stepped
  once per epoch the authors' way (``--schedule``, pipeline/schedule.py): their scheduler steps at the
  start of each epoch, so the first epoch already runs below the base lr and the last one at 0.
  ``--optimizer adamw`` is not in the paper: a randomly initialised model (ballad-tiny in the demo)
  does not learn from scratch at SGD 1e-5.
- Model mode (``--batchnorm``): the authors' model stays in eval mode for the whole run (OpenAI's
  ``build_model`` returns it so and nothing calls ``.train()``), so a ResNet tower's BatchNorm keeps
  its running statistics while its affine parameters learn, and dropout is off. ``auto`` does that
  when Phase A starts from pretrained weights; from a random init, where frozen statistics mean
  nothing, it trains in train mode. The mode holds throughout: evaluations restore it.
- Selection (``--select``): the authors keep the epoch with the best top-1 on the full val split
  (ImageNet-LT: 20,000 images). ``auto`` does that when the dataset has a val split, else keeps the
  last epoch. A new best epoch goes to last.pt first and then to best.pt, so a kill between the two
  leaves last.pt holding the best weights, and resuming rewrites best.pt from it.
- Precision (``--precision``): the authors' weights are fp16 (OpenAI's ``convert_weights``) and SGD
  updates them directly, without a master copy or loss scaling; at lr 1e-5 many updates round to
  nothing. Our default keeps fp32 weights (the optimizer's master copy) with bf16 autocast on CUDA, a
  deliberate improvement; ``fp16-weights`` reproduces the authors' numerics on CUDA.

LIFT's recipe (Shi et al., ICML 2024; docs/lift.md), each part a flag beside BALLAD's default:
- ``--tune`` (pipeline/tuning.py, one registered entry per method): ``full`` (BALLAD) trains both
  towers; ``bias-norm``, ``bitfit``, ``layernorm``, ``lora``, ``adaptformer``, ``adapter``, ``ssf``,
  ``vpt-shallow`` and ``vpt-deep`` train only their image-tower parameters (``--tune-blocks K``: the
  last K blocks) and freeze the text tower, as LIFT. ``--lora-rank`` and ``--adapter-width`` default to
  LIFT's width rule; final.json records each method's trainable count (``module_params``).
- ``--classifier``: ``text`` (BALLAD) classifies with the text tower's embeddings of the K prompts,
  computed every step; ``head`` (LIFT) trains a cosine classifier, so the text tower does not run per
  step and is frozen even under ``--tune full``: logits = s · norm(h) · norm(W)ᵀ with the model's logit
  scale s (``--logit-scale 25`` is LIFT's). ``--head-input pre-projection`` (LIFT's, the default) reads a
  ViT's feature before the image projection, ``projection`` the projected embedding (a ResNet's head
  always reads it, as LIFT's code); ``--head-init`` starts W from the text features (mapped back through
  the projection's transpose on a ViT, W = normalize(normalize(t)·Pᵀ)), the class means or a balanced
  linear probe (pipeline/heads.py). ``extract`` stores the feature the head reads and W as the store's
  class embeddings. The head trains with the tower's lr and weight decay, as LIFT's single optimizer.
- ``--loss``: any loss of pipeline/losses.py (logit-adjusted: + τ · log(train class prior), LIFT's),
  in training only; validation and test accuracies use the plain logits.
- ``--train-transform`` / ``--eval-transform`` (pipeline/transforms.py): BALLAD's (the default), LIFT's,
  or LIFT+'s minimalist augmentation (``mda``, its crop rising with the epoch) and test transform.
Departures from LIFT's code: the authors' schedule stepped at epoch start by default (``--schedule
standard`` is LIFT's); test-time ensembling happens at extract (``--test-views``) and evaluate
(``--tta``), not here; the last partial batch of an epoch is dropped.

Gradient accumulation (``--micro-batch``) gives the full-batch gradient while running the text tower
forward with gradients once per step: the earlier micro-batches use detached text features and
collect the loss gradient with respect to them, and the last micro-batch adds ⟨u, g⟩ to its loss,
so a single backward through the text tower carries the gradient of the whole batch (with
``--classifier head`` the head's weights take the text features' part). Under DDP that
last backward is the one that synchronises, so gradients are all-reduced once per step. With frozen
BatchNorm statistics this is exact for ResNet towers too; in train mode each micro-batch is
normalised by its own statistics, as in any gradient accumulation. ``--text-chunk`` extends the same
trick to the prompts (model.train_step): the text tower's activations are then bounded by the chunk, not K.
"""

from __future__ import annotations

CONFIG = ("PhaseAConfig", "OPTIMIZERS", "BATCHNORM_MODES", "PRECISIONS", "CLASSIFIERS")
MODEL = ("Towers", "train_step", "cosine_logits", "text_head", "param_digest", "batchnorm_mode", "set_batchnorm",
         "split_accuracy", "make_optimizer", "build_model")
STATE = ("LIVE_DIR", "Run", "TrainState")
RUN = ("run_phase_a", "selection", "train_one_epoch")


def __getattr__(name: str):
    """``stages.phase_a.NAME``: the public name of the submodule that defines it, imported on first use (by
    import statements, which pipeline/provenance.py follows: the command's code files include them)."""
    if name in CONFIG:
        from stages.phase_a import config as module
    elif name in MODEL:
        from stages.phase_a import model as module
    elif name in STATE:
        from stages.phase_a import state as module
    elif name in RUN:
        from stages.phase_a import run as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
