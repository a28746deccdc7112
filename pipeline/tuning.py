"""Phase A's ``--tune`` choices: one registered ``Tuning`` per method, the one place that knows each.

A method says what it adds to the model (``add``), which image-tower parameters train (``chosen``),
whether it needs open_clip's transformer blocks (``needs_blocks``), whether the text tower trains with
it (``trains_text``), how final.pt holds it (``export``) and how the factory rebuilds it from a
checkpoint before loading (``rebuild``). Adding a method is one subclass here, decorated with
``@register``, and its test: the choices, the help of ``--tune``, the refusal of a tower without
blocks, Phase A's trainable set, final.pt and the factory's loader all read the registry.

Importing this module does not import torch (stages/phase_a/config.py and the command line read
``TUNES`` and ``TUNE_HELP`` here); the methods import the torch modules when they run: pipeline/peft.py
(LoRA's parametrization, AdaptFormer's and the adapter's branches, the blocks they use), pipeline/vpt.py
(prompts) and pipeline/ssf.py (scale and shift).

Every method that needs transformer blocks works on the last k of them with ``--tune-blocks k`` (LIFT+'s
``*_layers``; all by default), and its width rule then counts those k; final.json records ``blocks``, how
many it tuned. ``full`` and ``bias-norm`` train the whole tower and refuse it.

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

    def add(self, model, *, num_classes: int, lora_rank: int | None, adapter_width: int | None,
            indices: list[int] | None) -> dict:
        """Add the method's modules to the image-tower blocks ``indices`` (None for a method without blocks);
        returns what final.json records of them."""
        return {}

    def chosen(self, visual, indices: list[int] | None) -> list:
        """The image tower's parameters this method trains (in the blocks ``indices``, for a block method)."""
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

    def chosen(self, visual, indices) -> list:
        return list(visual.parameters())


@register
class BiasNorm(Tuning):
    name = "bias-norm"
    help = "every image-tower bias and norm weight, ln_pre/ln_post and BatchNorm included (any tower)"

    def chosen(self, visual, indices) -> list:
        from torch import nn

        norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
        return ([p for n, p in visual.named_parameters() if n.endswith("bias")]
                + [m.weight for m in visual.modules() if isinstance(m, norms) and m.weight is not None])


def _block_parameters(visual, tune: str, names: tuple[str, ...], indices: list[int]) -> list:
    """The parameters ``names`` (dotted, within a block) of the image-tower transformer blocks ``indices``."""
    from pipeline.peft import image_blocks

    blocks = image_blocks(visual, tune)
    return [blocks[i].get_parameter(n) for i in indices for n in names]


@register
class BitFit(Tuning):
    name = "bitfit"
    help = "each block's attention, MLP and ln_1/ln_2 biases (LIFT's bias_tuning)"
    needs_blocks = True

    def chosen(self, visual, indices) -> list:
        return _block_parameters(visual, self.name, ("attn.in_proj_bias", "attn.out_proj.bias", "mlp.c_fc.bias",
                                                     "mlp.c_proj.bias", "ln_1.bias", "ln_2.bias"), indices)


@register
class LayerNormTuning(Tuning):
    name = "layernorm"
    help = "each block's ln_1/ln_2 weight and bias (LIFT's ln_tuning)"
    needs_blocks = True

    def chosen(self, visual, indices) -> list:
        return _block_parameters(visual, self.name, ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"), indices)


@register
class LoRA(Tuning):
    name = "lora"
    help = "low-rank q/v updates in each block's attention, merged into final.pt (LIFT)"
    needs_blocks = True

    def add(self, model, *, num_classes, lora_rank, adapter_width, indices) -> dict:
        from pipeline.peft import add_lora, lift_width

        rank = lora_rank or lift_width(num_classes, len(indices))
        add_lora(model, rank, indices)
        return {"lora_rank": rank, "lora_rank_rule": lora_rank is None, "lora_scaling": 1 / rank,
                "lora_targets": "q, v", "merged": True}

    def chosen(self, visual, indices) -> list:
        from pipeline.peft import LowRankQV

        return [p for m in visual.modules() if isinstance(m, LowRankQV) for p in m.parameters()]

    def export(self, state: dict) -> dict:
        from pipeline.peft import merge_lora

        return merge_lora(state)


class Bottleneck(Tuning):
    """A bottleneck branch in each tuned block (``name`` is its kind in pipeline/peft.py's BOTTLENECKS), of
    ``--adapter-width``, by default LIFT's rule over the tuned blocks; rebuilt on load from its tensors."""

    needs_blocks = True

    def add(self, model, *, num_classes, lora_rank, adapter_width, indices) -> dict:
        from pipeline.peft import add_bottleneck, lift_width

        width = adapter_width or lift_width(num_classes, len(indices))
        add_bottleneck(model, self.name, width, indices)
        return {"adapter_width": width, "adapter_width_rule": adapter_width is None}

    def chosen(self, visual, indices) -> list:
        from pipeline.peft import BOTTLENECKS

        module = BOTTLENECKS[self.name][0]
        return [p for m in visual.modules() if type(m) is module for p in m.parameters()]

    def rebuild(self, model, state: dict) -> None:
        from pipeline.peft import add_bottleneck, bottleneck_width, has_image_blocks, indices_holding

        width = bottleneck_width(state, self.name)
        if width is not None and has_image_blocks(model):  # else the loader's check names the extra tensors
            add_bottleneck(model, self.name, width, indices_holding(state, f".{self.name}."))


@register
class AdaptFormerTuning(Bottleneck):
    name = "adaptformer"
    help = "a bottleneck branch beside each block's MLP (LIFT's default)"


@register
class AdapterTuning(Bottleneck):
    name = "adapter"
    help = "a sequential bottleneck adapter on each block's MLP output, up-projection zero (Houlsby; LIFT+)"


class Prompts(Tuning):
    """Visual prompt tuning (pipeline/vpt.py): ``deep`` prompts every tuned block, else only the first."""

    needs_blocks = True
    deep: bool

    def add(self, model, *, num_classes, lora_rank, adapter_width, indices) -> dict:
        from pipeline.vpt import add_prompts, prompt_count

        count = prompt_count(num_classes, len(indices))
        prompted = indices if self.deep else indices[:1]
        add_prompts(model, self.name, count, prompted)
        return {"prompt_tokens": count, "prompt_tokens_rule": True, "prompted_blocks": len(prompted)}

    def chosen(self, visual, indices) -> list:
        from pipeline.vpt import prompt_parameters

        return prompt_parameters(visual)

    def rebuild(self, model, state: dict) -> None:
        from pipeline.vpt import rebuild_prompts

        rebuild_prompts(model, self.name, state)  # the prompted blocks, whichever of the two trained them


@register
class VPTShallow(Prompts):
    name = "vpt-shallow"
    help = "learnable prompt tokens at the first block's input (VPT shallow; LIFT+'s prompt tuning)"
    deep = False


@register
class VPTDeep(Prompts):
    name = "vpt-deep"
    help = "fresh learnable prompt tokens at each block's input (VPT deep; LIFT+'s prompt tuning)"
    deep = True


@register
class ScaleShift(Tuning):
    name = "ssf"
    help = "a per-channel scale and shift after each block's four linear layers, merged into final.pt (SSF; LIFT+)"
    needs_blocks = True

    def add(self, model, *, num_classes, lora_rank, adapter_width, indices) -> dict:
        from pipeline.ssf import add_ssf

        add_ssf(model, indices)
        return {"merged": True}

    def chosen(self, visual, indices) -> list:
        from pipeline.ssf import ssf_parameters

        return ssf_parameters(visual)

    def export(self, state: dict) -> dict:
        from pipeline.ssf import merge_ssf

        return merge_ssf(state)


TUNES = tuple(REGISTRY)
ANY_TOWER = tuple(name for name, t in REGISTRY.items() if not t.needs_blocks)
TUNE_HELP = ("What trains. " + "; ".join(f"{name}: {t.help}" for name, t in REGISTRY.items())
             + ". All but full freeze the text tower; " + ", ".join(n for n in TUNES if n not in ANY_TOWER)
             + " need a ViT image tower.")


def _indices(visual, tune: str, tune_blocks: int | None) -> list[int] | None:
    """The blocks ``tune`` works on (None for a method without blocks); ``--tune-blocks`` refused where it
    means nothing."""
    from pipeline.errors import UserError

    method = tuning(tune)
    if not method.needs_blocks:
        if tune_blocks is not None:
            raise UserError(f"--tune-blocks {tune_blocks}: --tune {tune} trains the whole image tower; use it "
                            f"with --tune {', '.join(n for n in TUNES if n not in ANY_TOWER)}")
        return None
    from pipeline.peft import tuned_indices

    return tuned_indices(visual, tune, tune_blocks)


def add_tuning(model, tune: str, *, num_classes: int, lora_rank: int | None = None,
               adapter_width: int | None = None, tune_blocks: int | None = None) -> dict:
    """Add ``tune``'s modules to the image tower (its last ``tune_blocks`` blocks, or all); returns what
    final.json records: the method, what it added, ``blocks`` (how many it tunes, for a block method) and
    ``module_params``, the number of image-tower values it trains."""
    method = tuning(tune)
    indices = _indices(model.visual, tune, tune_blocks)
    added = method.add(model, num_classes=num_classes, lora_rank=lora_rank, adapter_width=adapter_width,
                       indices=indices)
    blocks = {} if indices is None else {"blocks": len(indices)}
    return {"tune": tune, **added, **blocks,
            "module_params": sum(p.numel() for p in method.chosen(model.visual, indices))}


def mark_trainable(model, tune: str, text: bool, tune_blocks: int | None = None) -> None:
    """Set requires_grad: ``tune``'s image-tower parameters (in its last ``tune_blocks`` blocks, or all), the
    text tower's too when ``text`` and the method trains it, never the logit scale (Phase A holds it fixed)."""
    method = tuning(tune)
    visual = model.visual
    ids = {id(p) for p in method.chosen(visual, _indices(visual, tune, tune_blocks))}
    if text and method.trains_text:
        image = {id(p) for p in visual.parameters()}
        ids |= {id(p) for n, p in model.named_parameters() if id(p) not in image and n != "logit_scale"}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
