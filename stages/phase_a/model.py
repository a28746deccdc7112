"""Phase A's model side: both towers behind one forward, the training step (gradient accumulation and
text chunks, stages/phase_a/__init__.py says why), the accuracy of the model's own classifier, and
the model, head and optimizer a run starts from."""
from __future__ import annotations

import contextlib
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.heads import PRE_PROJECTION, PROJECTION, encode_image, text_to_head
from pipeline.images import MAX_PIXELS
from pipeline.models import create_model
from pipeline.runtime import autocast, progress, seed_everything
from pipeline.shots import group_means
from pipeline.text import encode_text, in_chunks
from stages.phase_a.config import PhaseAConfig
from stages.phase_a.data import eval_batches, one_line


class Towers(torch.nn.Module):
    """Both encoders (and the classifier head, if any) behind one forward(), so DistributedDataParallel
    sees every trainable parameter. forward(images, tokens) returns the image features and the class
    weights: the text tower's embeddings of the prompts, or the head [K, F] with ``--classifier head``
    (which needs no text tower; ``tokens`` then only asks for the class weights). ``head_input``
    (pipeline/heads.py, resolved): the feature a head reads, F its dimensions; before the projection,
    the projection takes no part in the forward and is frozen (DDP would wait for its gradient).

    It also owns the numerics. ``fp32``: fp32 weights and bf16 autocast on CUDA (fp32 on CPU).
    ``fp16-weights``: the factory built the model with fp16 weights, as the authors' is; images are
    cast to fp16 and nothing is autocast. Either way the logits are computed in fp32 (cosine_logits).

    ``text_chunk`` (``--text-chunk``): prompts per text-tower pass, or None for all K at once (train_step).
    """

    def __init__(self, clip, precision: str = "fp32", head: torch.Tensor | None = None,
                 text_chunk: int | None = None, head_input: str = PROJECTION):
        super().__init__()
        self.clip, self.precision, self.text_chunk = clip, precision, text_chunk
        self.head_input = PROJECTION if head is None else head_input
        self.register_parameter("head", None if head is None else torch.nn.Parameter(head))
        if self.head_input == PRE_PROJECTION:
            clip.visual.proj.requires_grad_(False)

    def _numerics(self, device):
        return autocast(device, enabled=self.precision == "fp32")

    def text(self, tokens):
        with self._numerics(tokens.device):
            return encode_text(self.clip, tokens)

    def image(self, images):
        return image_features(self.clip, images, self.precision, self.head_input)

    def classes(self, tokens):
        """The class weights [K, D]: the text tower on the prompt tokens, or the head."""
        return self.text(tokens) if self.head is None else self.head

    @torch.no_grad()
    def class_weights(self, tokens) -> torch.Tensor:
        """The class weights in fp32 without gradients, ``text_chunk`` prompts at a time; detached, so that
        a head's own tensor does not collect the gradients of what uses them."""
        return self.head.detach().float() if self.head is not None else in_chunks(self.text, tokens,
                                                                                  self.text_chunk).float()

    def forward(self, images, tokens=None):
        classes = None if tokens is None else self.classes(tokens)
        return self.image(images), classes


def image_features(clip, images, precision: str, head_input: str = PROJECTION):
    """The image features at ``head_input`` with Towers' numerics (``precision``: fp16 inputs for
    fp16-weights, else bf16 autocast on CUDA)."""
    if precision == "fp16-weights":
        images = images.half()
    with autocast(images.device, enabled=precision == "fp32"):
        return encode_image(clip, images, head_input)


def batchnorm_mode(batchnorm: str, pretrained: str | None) -> str:
    """'frozen' or 'train': ``--batchnorm``, with ``auto`` frozen when training starts from pretrained
    weights (an open_clip tag or a file, the authors' case) and train from a random init."""
    if batchnorm != "auto":
        return batchnorm
    return "train" if pretrained is None else "frozen"


def set_batchnorm(towers: torch.nn.Module, mode: str) -> None:
    """Put the model in the mode ``mode`` ('frozen' or 'train') trains it in.

    frozen is the authors' state, eval mode for the whole model: BatchNorm normalises with its running
    statistics and never updates them, dropout is off, and every parameter still learns.
    """
    towers.train(mode == "train")


def cosine_logits(image_features, text_features, scale: float):
    """s · norm(v) · norm(u)ᵀ: the logits Phase A trains and scores."""
    return scale * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


def train_step(net, tokens, micro_batches, scale: float, loss_fn=None) -> float:
    """Forward and backward of one optimizer step over ``micro_batches`` [(images, labels)]; returns the
    mean loss. ``loss_fn`` (logits, labels) -> mean loss is the training loss (pipeline/losses.py
    ``make_loss``; None: cross-entropy), each micro-batch's weighted by its share of the batch.

    The earlier micro-batches score against detached class weights and collect the loss gradient g
    w.r.t. them; the last one runs the text tower with gradients and adds ⟨u, g⟩ to its loss, so one
    backward through the text tower (the one DDP synchronises) carries the whole batch's gradient.
    With ``--text-chunk`` (``Towers.text_chunk``, fewer than K) only the last prompt joins that
    backward: the last micro-batch's share of g is taken from its logits alone (no tower backward), and
    the other K - 1 prompts, chunk by chunk, run the text tower again with gradients and are
    backpropagated with their rows of g (_text_backward). One prompt, not a chunk, waits in the
    synchronising backward, so the text tower's activations held at once are one chunk's, not K's."""
    def loss_of(image, classes, y):
        logits = cosine_logits(image, classes, scale)
        return (F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)) * (len(y) / n)

    towers = getattr(net, "module", net)
    n = sum(len(y) for _, y in micro_batches)
    *first, (x_last, y_last) = micro_batches
    chunk = towers.text_chunk
    if towers.head is not None or chunk is None or chunk >= len(tokens):
        chunk = None  # all prompts at once: a head runs no text tower, and a chunk of K or more is all of them
    chunks = [] if chunk is None else list(tokens[:-1].split(chunk))
    late = tokens if chunk is None else tokens[-1:]  # the prompts that go through the synchronising backward
    cut = len(tokens) - len(late)
    total, grad_text = 0.0, None
    if first or chunks:
        text = towers.class_weights(tokens).requires_grad_(True)
        with getattr(net, "no_sync", contextlib.nullcontext)():
            for x, y in first:
                loss = loss_of(net(x)[0], text, y)
                loss.backward()
                total += loss.item()
        grad_text = text.grad
    image, late_text = net(x_last, late)
    if chunks:
        early = text[:cut].detach().requires_grad_(True)
        loss = loss_of(image, torch.cat([early, late_text.float()]), y_last)
        if late_text.requires_grad:  # the text tower trains
            grad_early = torch.autograd.grad(loss, early, retain_graph=True)[0]
            _text_backward(towers, chunks, (grad_early if grad_text is None else grad_early + grad_text[:cut])
                           .split(chunk))
    else:
        loss = loss_of(image, late_text, y_last)
    total += loss.item()
    if grad_text is not None:
        loss = loss + (late_text.float() * grad_text[cut:]).sum()
    loss.backward()
    return total


def _text_backward(towers: Towers, chunks, grads) -> None:
    """Add to the parameters' .grad each chunk's ⟨u, g⟩ gradient, its text-tower pass rerun with
    gradients. Through torch.autograd.grad, not backward: the step's synchronising forward has run, and
    a backward now would fire DDP's gradient hooks before the one backward that must fire them."""
    params = [p for p in towers.parameters() if p.requires_grad]
    for chunk, grad in zip(chunks, grads):
        u = towers.text(chunk)
        for p, d in zip(params, torch.autograd.grad(u, params, grad.to(u.dtype), allow_unused=True)):
            if d is not None:
                p.grad = d if p.grad is None else p.grad.add_(d)


@torch.no_grad()
def split_accuracy(towers: Towers, tokens, urls, transform, *, samples: int, batch: int, workers: int, train_counts,
                   channels_last: bool = False, desc: str = "accuracy", decode_on=None, skip_bad: bool = False,
                   max_pixels: int = MAX_PIXELS) -> dict:
    """Top-1 accuracy of the model's own classifier (prompts or head; plain logits) on the first
    ``samples`` images of a split, overall (``top1``) and per shot group; evaluated in eval mode, the
    model's mode restored after. ``decode_on``: the device that decodes (``--decode gpu``), or None;
    ``skip_bad``, ``max_pixels``: what an unreadable image does (data.train_batches)."""
    device, k = tokens.device, len(train_counts)
    training = towers.training
    towers.eval()
    try:
        text = F.normalize(towers.class_weights(tokens), dim=-1)
        correct, seen = torch.zeros(k), torch.zeros(k)
        with progress(desc=desc, total=samples, unit="img") as bar:
            for images, labels in one_line(eval_batches(urls, transform, batch=batch, workers=workers, limit=samples,
                                                         decode_on=decode_on, skip_bad=skip_bad,
                                                         max_pixels=max_pixels)):
                image = towers.image(to_device(images, device, channels_last))
                pred = (F.normalize(image.float(), dim=-1) @ text.T).argmax(1).cpu()
                seen += torch.bincount(labels, minlength=k)
                correct += torch.bincount(labels[pred == labels], minlength=k)
                bar.update(len(labels))
    finally:
        towers.train(training)
    with np.errstate(invalid="ignore"):
        per_class = (correct / seen).numpy()
    groups = group_means(per_class, seen.numpy() > 0, train_counts)
    return {"top1": round(float(correct.sum() / seen.sum().clamp(min=1)), 4),
            **{name: None if acc is None else round(acc, 4) for name, acc in groups.items()}}


def to_device(images, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _is_resnet(model) -> bool:
    from open_clip.modified_resnet import ModifiedResNet

    return isinstance(model.visual, ModifiedResNet)


def param_digest(state_dict) -> str:
    """sha256 over a state dict's names and bytes: equal digests mean identical weights."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_model(cfg: PhaseAConfig, device):
    """The backbone set up for training (fixed logit scale); also says whether images go channels_last."""
    seed_everything(cfg.seed)
    bb = create_model(cfg.model, cfg.pretrained, device=device, color_jitter=cfg.color_jitter,
                      fp16_weights=cfg.precision == "fp16-weights")
    model = bb.model
    if cfg.logit_scale is not None:
        model.logit_scale.data.fill_(math.log(cfg.logit_scale))
    model.logit_scale.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # transformer towers only; open_clip's ResNet ignores it
    channels_last = device.type == "cuda" and _is_resnet(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return bb, channels_last


def text_head(model, tokens, chunk: int | None = None, head_input: str = PROJECTION) -> torch.Tensor:
    """LIFT's classifier initialisation (``init_head: text_feat``): the frozen text tower's embeddings of
    the class prompts, in fp32, ``chunk`` prompts at a time (``--text-chunk``: the one text-tower pass of
    a head run), as weights at ``head_input`` (pipeline/heads.py ``text_to_head``). On the projected
    embedding the head's initial logits are the zero-shot ones; before the projection, LIFT's rescaled ones."""
    with torch.no_grad():
        return text_to_head(model, in_chunks(lambda t: encode_text(model, t), tokens, chunk), head_input)


def make_optimizer(cfg: PhaseAConfig, model) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters as they are: fp16 ones with ``--precision
    fp16-weights`` are updated in place in fp16, the authors' way (no fp32 master copy, no loss scaling)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
