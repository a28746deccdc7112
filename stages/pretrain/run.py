"""Stage `pretrain`: CLIP's contrastive image–caption pretraining on the generated shapes corpus.

BALLAD starts from a pretrained CLIP: zero-shot is already decent, Phase A adapts the model to the
domain, Phase B rebalances. The embedded demo model has no pretrained weights to download, so this
stage makes them: ``--model`` (ballad-tiny by default, any factory name works) learns from captioned
images of coloured shapes (stages/shapes.py, ``corpus_sample``) with open_clip's own ``ClipLoss``
(symmetric cross-entropy over the batch's image–caption similarities), the learnable logit scale
clamped at 100 as open_clip's trainer does. The checkpoint, ``OUT/final.pt``, is a plain state dict
that ``pipeline.models.create_model(NAME, pretrained=PATH)`` loads like any other local checkpoint;
``OUT/final.json`` records the run (corpus, zero-shot accuracy, sha256).

Choices, measured on CPU (docs/pretraining.md):
- The corpus is rendered once, ``--corpus-size`` images deterministically from (seed, index), into
  memory, and the run loops over it in epochs (a fresh permutation per epoch). An image costs 0.49 ms
  of CPU to render and a training sample of ballad-tiny 0.78 ms, so rendering a fresh image for every
  draw would add about 60 % to the demo's run (700 × 128 draws) on cores the training already fills;
  rendering 10,000 once adds 7 %. Images are rendered at the model's input size and only normalised:
  that is the model's eval transform (resize and centre crop are no-ops at that size). No crop, flip
  or colour jitter: they would falsify captions that name position and colour; the generator varies
  size, position, background and clutter itself.
- Only the token embeddings of words the corpus uses (and the class prompts' words) are trained:
  the 49,408-row table is swapped for those rows during the run and written back at every save.
  Updating the whole table made every step 29 % slower for no effect beyond weight-decaying rows no
  caption reaches; those rows keep their random initialisation.
- AdamW (weight decay 0.1, not on gains, biases, norms and the logit scale, as open_clip excludes
  them) with linear warm-up then cosine to 0 per step, CLIP's recipe at toy scale; the model trains in
  train mode, so BatchNorm statistics are the corpus's (Phase A then freezes them, as the authors do).

Deterministic: the initialisation is seeded, batch ``t`` is a pure function of (seed, t) and nothing
else draws random numbers, so a run is bit-identical on CPU with one thread, and a run resumed from
``last.pt`` (written atomically every ``--save-every`` steps, ``--resume``) equals one never
interrupted. At the end the model classifies held-out images (the corpus's ``heldout`` stream, never
trained on) among the corpus's colour–shape prompts in the demo's template, zero-shot. Resuming, the
random state, stale files and the replayed curve are pipeline/checkpointing.py's, shared with Phase A.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from stages.pretrain.config import PretrainConfig

log = logging.getLogger("ballad.pretrain")

COMMAND = "pretrain"  # the command whose code files last.pt's source digest covers
MAX_LOGIT_SCALE = 100.0  # open_clip's trainer clamps exp(logit_scale) to 100 after every step


# ---------------------------------------------------------------- the corpus
@dataclass
class Corpus:
    images: np.ndarray  # [N, size, size, 3] uint8
    captions: list[str]
    labels: np.ndarray  # [N] int64, index into shapes.corpus_classnames()


def render_corpus(seed: int, stream: str, n: int, size: int, workers: int = 0) -> Corpus:
    """Samples 0 … n−1 of ``stream``, rendered by ``workers`` processes (the result does not depend on it)."""
    from pipeline.runtime import progress

    chunk = 500
    jobs = [(seed, stream, i, min(i + chunk, n), size) for i in range(0, n, chunk)]
    images, captions, labels = np.empty((n, size, size, 3), np.uint8), [], np.empty(n, np.int64)
    with progress(total=n, desc=f"render {stream}", unit="img") as bar:
        if workers and len(jobs) > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                parts = pool.imap(_render_range, jobs)
                _collect(parts, jobs, images, captions, labels, bar)
        else:
            _collect(map(_render_range, jobs), jobs, images, captions, labels, bar)
    return Corpus(images, captions, labels)


def _collect(parts, jobs, images, captions, labels, bar) -> None:
    for (_, _, start, stop, _), (imgs, caps, labs) in zip(jobs, parts):
        images[start:stop], labels[start:stop] = imgs, labs
        captions += caps
        bar.update(stop - start)


def _render_range(job):
    from stages.shapes import corpus_sample

    seed, stream, start, stop, size = job
    samples = [corpus_sample(seed, stream, i, size) for i in range(start, stop)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples], np.array([s.label for s in samples])


# ---------------------------------------------------------------- the sparse vocabulary
class CompactVocabulary:
    """Trains only the token-embedding rows of ``ids`` (sorted): the model's embedding is swapped for a
    table of those rows, token ids are mapped into it, and ``full_state_dict`` writes them back."""

    def __init__(self, model, ids):
        import torch

        self.model, self.ids = model, ids
        self.name = next((n for n, m in model.named_modules()
                          if n.split(".")[-1] == "token_embedding" and isinstance(m, torch.nn.Embedding)), None)
        if self.name is None:
            return
        parent, _, attr = self.name.rpartition(".")
        self._parent, self._attr = (model.get_submodule(parent) if parent else model), attr
        self.full = getattr(self._parent, attr)
        self.small = torch.nn.Embedding(len(ids), self.full.embedding_dim)
        self.small.weight.data.copy_(self.full.weight.data[ids])
        self.lookup = torch.full((self.full.num_embeddings,), -1, dtype=torch.long)
        self.lookup[ids] = torch.arange(len(ids))
        setattr(self._parent, attr, self.small.to(self.full.weight.device))

    def tokens(self, tokens):
        """Token ids of the full vocabulary → rows of the compact table."""
        return tokens if self.name is None else self.lookup.to(tokens.device)[tokens]

    def full_state_dict(self) -> dict:
        """The model's state dict with the whole token-embedding table, as the architecture defines it."""
        sd = self.model.state_dict()
        if self.name is not None:
            key = f"{self.name}.weight"
            table = self.full.weight.detach().clone()
            table[self.ids.to(table.device)] = sd[key]
            sd[key] = table
        return sd

    def load_full_state_dict(self, sd: dict) -> None:
        """Load a state dict of the architecture (``full_state_dict``'s, from last.pt) into the compacted model."""
        if self.name is None:
            self.model.load_state_dict(sd)
            return
        key = f"{self.name}.weight"
        self.full.weight.data.copy_(sd[key])
        self.model.load_state_dict({**sd, key: sd[key][self.ids]})

    def restore(self) -> None:
        """Put the full table back into the model, holding the trained rows."""
        if self.name is not None:
            self.full.weight.data[self.ids.to(self.full.weight.device)] = self.small.weight.data
            setattr(self._parent, self._attr, self.full)


# ---------------------------------------------------------------- schedule, batches, loss
def lr_at(cfg: PretrainConfig, step: int) -> float:
    """open_clip's ``cosine_lr``: linear warm-up to --lr over --warmup steps, then cosine to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    done, span = step - cfg.warmup, cfg.steps - cfg.warmup
    return 0.5 * (1 + math.cos(math.pi * done / span)) * cfg.lr


def batch_indices(seed: int, step: int, corpus_size: int, batch_size: int) -> np.ndarray:
    """The corpus rows of batch ``step``: epoch e = step // ⌊N / B⌋ walks permutation (seed, e), the
    last partial batch dropped. A pure function of its arguments, so a resumed run draws the same batches."""
    per_epoch = corpus_size // batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 20, epoch]).permutation(corpus_size)
    return order[k * batch_size:(k + 1) * batch_size]


def make_optimizer(cfg: PretrainConfig, model):
    """AdamW; weight decay on weight matrices only, as open_clip's trainer (not gains, biases, norms, logit scale)."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if plain else decay).append(p)
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": cfg.weight_decay}], lr=cfg.lr, betas=(0.9, 0.98),
                             eps=1e-6)


def _normaliser(backbone):
    """The Normalize of the model's eval transform, on a [B, 3, H, W] tensor in [0, 1]."""
    from torchvision import transforms as T

    return next(t for t in backbone.eval_transform.transforms if isinstance(t, T.Normalize))


def _images(corpus_images: np.ndarray, rows, norm, device):
    import torch

    x = torch.from_numpy(corpus_images[rows]).to(device).permute(0, 3, 1, 2).float().div_(255)
    return norm(x)


# ---------------------------------------------------------------- zero-shot check
def zero_shot_accuracy(model, tokenizer, corpus: Corpus, normaliser, device, batch: int = 256) -> dict:
    """Top-1 of held-out images among every corpus class prompt and among the demo's 30 classes only,
    prompts in the demo's template ("a photo of a red triangle."); the model in eval mode, restored after."""
    import torch
    import torch.nn.functional as F

    from pipeline.text import DEFAULT_TEMPLATE, class_prompts, encode_text, tokenize_trimmed
    from stages.shapes import classnames as demo_classnames
    from stages.shapes import corpus_classnames

    names = corpus_classnames()
    demo = torch.tensor([names.index(c) for c in demo_classnames()])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            text = F.normalize(encode_text(model, tokenize_trimmed(tokenizer, class_prompts(names, DEFAULT_TEMPLATE))
                                           .to(device)).float(), dim=-1)
            sims = torch.cat([F.normalize(model.encode_image(_images(corpus.images, slice(i, i + batch), normaliser,
                                                                     device)).float(), dim=-1) @ text.T
                              for i in range(0, len(corpus.labels), batch)]).cpu()
    finally:
        model.train(training)
    labels = torch.from_numpy(corpus.labels)
    in_demo = torch.isin(labels, demo)
    demo_pred = demo[sims[in_demo][:, demo].argmax(1)]
    top1 = float((sims.argmax(1) == labels).float().mean())
    return {"images": len(labels), "classes": len(names), "top1": round(top1, 4),
            "demo_classes": len(demo), "demo_images": int(in_demo.sum()),
            "demo_top1": round(float((demo_pred == labels[in_demo]).float().mean()), 4)}


# ---------------------------------------------------------------- the run
def run_pretrain(cfg: PretrainConfig) -> Path:
    """Pretrain, checkpoint, write OUT/final.pt + OUT/final.json; returns the path of final.pt."""
    cfg.check()
    from pipeline.locks import exclusive_lock
    from pipeline.models import check_model_name
    from pipeline.runtime import pick_device

    check_model_name(cfg.model)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out}: exists and is not a directory")
    with exclusive_lock(out):
        return _train(cfg, out, device)


@dataclass
class Training:
    """What the steps change and last.pt holds: the compacted model, its optimizer, the step and the
    per-step history [loss, lr, logit scale]."""

    model: object  # torch.nn.Module
    vocab: CompactVocabulary
    opt: object  # torch.optim.Optimizer
    live: object  # pipeline.live.LiveLog
    step: int = 0
    history: list = field(default_factory=list)


def _train(cfg: PretrainConfig, out: Path, device) -> Path:
    from pipeline.checkpointing import clear_stale_writes, resume_state
    from pipeline.models import create_model
    from pipeline.runtime import seed_everything

    out.mkdir(parents=True, exist_ok=True)
    clear_stale_writes(out)
    state = resume_state(cfg, COMMAND, out / "last.pt", cfg.steps, logger=log)
    seed_everything(cfg.seed)
    bb = create_model(cfg.model, device=device)
    norm = _normaliser(bb)
    started = time.perf_counter()
    corpus = render_corpus(cfg.seed, "pretrain", cfg.corpus_size, bb.image_size, cfg.workers)
    training, tokens = _start(cfg, bb, corpus, state, out, device)
    _steps(cfg, training, corpus, tokens, norm, device, out / "last.pt")
    training.vocab.restore()
    seconds = time.perf_counter() - started
    heldout = render_corpus(cfg.seed, "heldout", cfg.eval_size, bb.image_size, cfg.workers)
    zero_shot = zero_shot_accuracy(bb.model, bb.tokenizer, heldout, norm, device)
    log.info("pretrain: held-out zero-shot top-1 %.3f over %d classes (%.3f over the demo's %d)", zero_shot["top1"],
             zero_shot["classes"], zero_shot["demo_top1"], zero_shot["demo_classes"])
    return _write_final(cfg, out, training, zero_shot, seconds)


def _start(cfg: PretrainConfig, bb, corpus: Corpus, state: dict | None, out: Path, device):
    """The training (fresh, or last.pt's ``state`` when the run continues it, its curve replayed) and the
    captions' token ids in the compact vocabulary."""
    import torch

    from pipeline.checkpointing import replay, restore_rng
    from pipeline.live import LiveLog
    from pipeline.text import DEFAULT_TEMPLATE, class_prompts, tokenize_trimmed
    from stages import shapes

    tokens = tokenize_trimmed(bb.tokenizer, corpus.captions)
    prompts = tokenize_trimmed(bb.tokenizer, class_prompts(shapes.corpus_classnames(), DEFAULT_TEMPLATE))
    vocab = CompactVocabulary(bb.model, torch.unique(torch.cat([tokens.flatten(), prompts.flatten()])))
    if state is not None:
        vocab.load_full_state_dict(state["model"])
    training = Training(bb.model, vocab, make_optimizer(cfg, bb.model), LiveLog(out / "dvclive"))  # `dvc plots`
    if state is not None:
        training.opt.load_state_dict(state["optimizer"])
        training.step, training.history = state["step"], state["history"]
        restore_rng(state, device)
    replay(training.live, [(i, _live_values(row)) for i, row in enumerate(training.history, 1)], training.step)
    return training, vocab.tokens(tokens)


def _steps(cfg: PretrainConfig, t: Training, corpus: Corpus, tokens, norm, device, last_path: Path) -> None:
    """The steps from ``t.step`` to --steps, in train mode; last.pt every --save-every steps and at the end."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from pipeline.checkpointing import checkpoint
    from pipeline.runtime import progress, save_torch
    from pipeline.text import encode_text

    loss_fn, model = ClipLoss(), t.model
    model.train()
    with progress(total=cfg.steps, initial=t.step, desc="pretrain", unit="step") as bar:
        while t.step < cfg.steps:
            lr = lr_at(cfg, t.step)
            for group in t.opt.param_groups:
                group["lr"] = lr
            rows = batch_indices(cfg.seed, t.step, cfg.corpus_size, cfg.batch_size)
            image = F.normalize(model.encode_image(_images(corpus.images, rows, norm, device)), dim=-1)
            text = F.normalize(encode_text(model, tokens[rows].to(device)), dim=-1)
            loss = loss_fn(image, text, model.logit_scale.exp())
            value = loss.item()
            if not math.isfinite(value):
                raise UserError(f"step {t.step + 1}: loss is {value}; stopped without updating the weights; "
                                "lower --lr")
            t.opt.zero_grad(set_to_none=True)
            loss.backward()
            t.opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            t.step += 1
            t.history.append([round(value, 5), lr, round(model.logit_scale.detach().exp().item(), 4)])
            t.live.log(t.step, _live_values(t.history[-1]))
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.update()
            if t.step % cfg.save_every == 0 or t.step == cfg.steps:
                save_torch(checkpoint(cfg, COMMAND, t.step, cfg.steps, device, model=t.vocab.full_state_dict(),
                                      optimizer=t.opt.state_dict(), history=t.history), last_path)


def _write_final(cfg: PretrainConfig, out: Path, t: Training, zero_shot: dict, seconds: float) -> Path:
    """OUT/final.pt (a plain state dict) and then OUT/final.json, the record of the run."""
    from pipeline.runtime import save_torch, sha256_file, write_json
    from stages import shapes

    final = out / "final.pt"
    save_torch(t.model.state_dict(), final)
    write_json(out / "final.json", {
        "model": cfg.model, "checkpoint": final.name, "sha256": sha256_file(final), "steps": cfg.steps,
        "epochs": round(cfg.steps * cfg.batch_size / cfg.corpus_size, 2), "final_loss": t.history[-1][0],
        "logit_scale": t.history[-1][2], "zero_shot_heldout": zero_shot,
        "corpus": {"generator": "stages/shapes.py corpus_sample", "seed": cfg.seed, "size": cfg.corpus_size,
                   "colours": list(shapes.CORPUS_COLOURS), "shapes": list(shapes.CORPUS_SHAPES),
                   "sizes": list(shapes.SIZES), "backgrounds": list(shapes.BACKGROUNDS),
                   "trained_tokens": len(t.vocab.ids)},
        "seconds_this_attempt": round(seconds, 1), "config": asdict(cfg)})
    return final


def _live_values(row: list) -> dict:
    """One step's loss, learning rate and logit scale (a row of the history) as dvclive metrics."""
    loss, lr, scale = row
    return {"loss": loss, "lr": lr, "logit_scale": scale}
