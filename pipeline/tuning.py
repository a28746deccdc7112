"""Phase A's ``--tune`` choices: one registered ``Tuning`` per method, the one place that knows each.

A method says what it adds to the model (``add``), which image-tower parameters train (``chosen``),
whether it needs open_clip's transformer blocks (``needs_blocks``), whether the text tower trains with
it (``trains_text``), how final.pt holds it (``export``) and how the factory rebuilds it from a
checkpoint before loading (``rebuild``). Adding a method is one subclass here, decorated with
``@register``, and its test: the choices, the help of ``--tune``, the refusal of a tower without
blocks, Phase A's trainable set, final.pt and the factory's loader all read the registry.

Importing this module does not import torch (stages/phase_a/config.py and the command line read
``TUNES`` and ``TUNE_HELP`` here); the methods import pipeline/peft.py, which holds the torch
modules (LoRA's parametrization, AdaptFormer's branch), when they run.

The bias sets, written for open_clip's towers (facts in the LIFT notes; our own implementation):
- ``bitfit``: LIFT's ``bias_tuning``, each transformer block's attention in/out projection biases,
  MLP biases and ln_1/ln_2 biases (ViT-B/16: 101,376 values); not ``ln_pre``/``ln_post``.
- ``layernorm``: LIFT's ``ln_tuning``, each block's ln_1 and ln_2 weight and bias (ViT-B/16: 36,864).
  Both are defined on transformer blocks only, so a ResNet tower refuses them (LIFT has no ResNet
  variant to follow; BatchNorm is ``bias-norm``'s).
- ``bias-norm``: ours, not LIFT's: every image-tower bias and every normalisation layer's weight,
  ``ln_pre`` and ``ln_post`` included (ResNet: BatchNorm γ and β and the attention pool's biases), the
  union of the two over the whole tower, so it works on any tower.
"""
from __future__ import annotations

REGISTRY: dict[str, "Tuning"] = {}


def register(cls):
    """Class decorator: one instance of ``cls`` under ``cls.name``, in the order the classes are written."""
    REGISTRY[cls.name] = cls()
    return cls


def tuning(name: str) -> "Tuning":
    """The registered method ``name``; a one-line UserError naming ``--tune`` otherwise."""
    from pipeline.errors import UserError

    if name not in REGISTRY:
        raise UserError(f"--tune {name}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


class Tuning:
    """What a ``--tune`` method does; the defaults are a method that adds nothing and exports as is."""

    name: str
    help: str
    needs_blocks = False  # needs open_clip's transformer blocks (ResidualAttentionBlock) in the image tower
    trains_text = False  # the text tower trains too (with --classifier text)

    def add(self, model, *, num_classes: int, lora_rank: int | None, adapter_width: int | None) -> dict:
        """Add the method's modules to ``model``; returns what final.json records of them."""
        return {}

    def chosen(self, visual) -> list:
        """The image tower's parameters this method trains."""
        raise NotImplementedError

    def export(self, state: dict) -> dict:
        """A training state dict as final.pt holds it."""
        return state

    def rebuild(self, model, state: dict) -> None:
        """Before the factory loads ``state``: give ``model`` the modules whose tensors ``state`` holds."""


@register
class Full(Tuning):
    name = "full"
    help = "both towers (BALLAD)"
    trains_text = True

    def chosen(self, visual) -> list:
        return list(visual.parameters())


@register
class BiasNorm(Tuning):
    name = "bias-norm"
    help = "every image-tower bias and norm weight, ln_pre/ln_post and BatchNorm included (any tower)"

    def chosen(self, visual) -> list:
        from torch import nn

        norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
        return ([p for n, p in visual.named_parameters() if n.endswith("bias")]
                + [m.weight for m in visual.modules() if isinstance(m, norms) and m.weight is not None])


def _block_parameters(visual, tune: str, names: tuple[str, ...]) -> list:
    """The parameters ``names`` (dotted, within a block) of every image-tower transformer block."""
    from pipeline.peft import image_blocks

    return [block.get_parameter(n) for block in image_blocks(visual, tune) for n in names]


@register
class BitFit(Tuning):
    name = "bitfit"
    help = "each block's attention, MLP and ln_1/ln_2 biases (LIFT's bias_tuning)"
    needs_blocks = True

    def chosen(self, visual) -> list:
        return _block_parameters(visual, self.name, ("attn.in_proj_bias", "attn.out_proj.bias", "mlp.c_fc.bias",
                                                     "mlp.c_proj.bias", "ln_1.bias", "ln_2.bias"))


@register
class LayerNormTuning(Tuning):
    name = "layernorm"
    help = "each block's ln_1/ln_2 weight and bias (LIFT's ln_tuning)"
    needs_blocks = True

    def chosen(self, visual) -> list:
        return _block_parameters(visual, self.name, ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"))


@register
class LoRA(Tuning):
    name = "lora"
    help = "low-rank q/v updates in each block's attention, merged into final.pt (LIFT)"
    needs_blocks = True

    def add(self, model, *, num_classes: int, lora_rank: int | None, adapter_width: int | None) -> dict:
        from pipeline.peft import add_lora, image_blocks, lift_width

        rank = lora_rank or lift_width(num_classes, len(image_blocks(model.visual, self.name)))
        add_lora(model, rank)
        return {"lora_rank": rank, "lora_rank_rule": lora_rank is None, "lora_scaling": 1 / rank,
                "lora_targets": "q, v", "merged": True}

    def chosen(self, visual) -> list:
        from pipeline.peft import LowRankQV

        return [p for m in visual.modules() if isinstance(m, LowRankQV) for p in m.parameters()]

    def export(self, state: dict) -> dict:
        from pipeline.peft import merge_lora

        return merge_lora(state)


@register
class AdaptFormerTuning(Tuning):
    name = "adaptformer"
    help = "a bottleneck branch beside each block's MLP (LIFT's default)"
    needs_blocks = True

    def add(self, model, *, num_classes: int, lora_rank: int | None, adapter_width: int | None) -> dict:
        from pipeline.peft import add_adaptformer, image_blocks, lift_width

        blocks = len(image_blocks(model.visual, self.name))
        width = adapter_width or lift_width(num_classes, blocks)
        add_adaptformer(model, width)
        return {"adapter_width": width, "adapter_width_rule": adapter_width is None, "blocks": blocks}

    def chosen(self, visual) -> list:
        from pipeline.peft import AdaptFormer

        return [p for m in visual.modules() if isinstance(m, AdaptFormer) for p in m.parameters()]

    def rebuild(self, model, state: dict) -> None:
        from pipeline.peft import add_adaptformer, adaptformer_width, has_image_blocks

        width = adaptformer_width(state)
        if width is not None and has_image_blocks(model):  # else the loader's check names the extra tensors
            add_adaptformer(model, width)


TUNES = tuple(REGISTRY)
ANY_TOWER = tuple(name for name, t in REGISTRY.items() if not t.needs_blocks)
TUNE_HELP = ("What trains. " + "; ".join(f"{name}: {t.help}" for name, t in REGISTRY.items())
             + ". All but full freeze the text tower; " + ", ".join(n for n in TUNES if n not in ANY_TOWER)
             + " need a ViT image tower.")


def add_tuning(model, tune: str, *, num_classes: int, lora_rank: int | None = None,
               adapter_width: int | None = None) -> dict:
    """Add ``tune``'s modules to the image tower; returns what final.json records: the method, what it
    added, and ``module_params``, the number of image-tower values it trains."""
    method = tuning(tune)
    added = method.add(model, num_classes=num_classes, lora_rank=lora_rank, adapter_width=adapter_width)
    return {"tune": tune, **added, "module_params": sum(p.numel() for p in method.chosen(model.visual))}


def mark_trainable(model, tune: str, text: bool) -> None:
    """Set requires_grad: ``tune``'s image-tower parameters, the text tower's too when ``text`` and the
    method trains it, never the logit scale (Phase A holds it fixed)."""
    method = tuning(tune)
    visual = model.visual
    ids = {id(p) for p in method.chosen(visual)}
    if text and method.trains_text:
        image = {id(p) for p in visual.parameters()}
        ids |= {id(p) for n, p in model.named_parameters() if id(p) not in image and n != "logit_scale"}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
