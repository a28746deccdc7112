"""Checkpoints that a training run resumes from, the same way for every stage that trains (pretrain,
Phase A): what must match to resume, what a checkpoint records, the random state, stale files, and
the metrics replayed into dvclive's files.

- ``resumable(field)`` / ``resume_keys(Config)``: the options a resumed run must share with the run that wrote last.pt,
  marked on the config's fields (``resumable(option(...))``); the others may change between
  attempts (a worker count, a micro-batch size: they change how the run computes, not what).
- ``resume_state``: last.pt's contents when this run continues it, else None. ``--resume`` continues
  only an unfinished run of the same code (``source_digest`` of the command's files) and the same resume keys; otherwise it
  says why and starts over. Without ``--resume`` an existing run is never overwritten.
- ``checkpoint``: what every last.pt records besides the stage's own state: the step, the run's total
  steps, the config, the code's digest and the random state (``restore_rng`` puts it back).
- ``clear_stale_writes``: the temporary files of atomic writes a kill cut short.
- ``replay``: a resumed run's rows, up to its checkpoint, into a fresh dvclive log, each once.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, fields
from pathlib import Path
from types import MappingProxyType

from pipeline.errors import UserError

log = logging.getLogger("ballad.checkpointing")


def resume_keys(config) -> tuple[str, ...]:
    """The names of ``config``'s fields marked ``resumable``, in field order."""
    return tuple(f.name for f in fields(config) if f.metadata.get("resume"))


def resume_state(cfg, command: str, path: Path, total_steps: int, *, expect: dict | None = None, logger=log):
    """The contents of last.pt (``path``) when this run of ``command`` (``phase-a``, ``pretrain``: whose
    code the digest covers) continues it, else None; weights_only=True (a checkpoint is untrusted input). ``expect`` {key: (value, why)}: further entries of last.pt that
    must hold ``value`` to resume (Phase A's dataset fingerprint), ``why`` naming the change."""
    import torch

    from pipeline.provenance import source_digest

    if not path.exists():
        if cfg.resume:
            logger.info("--resume: no %s yet, starting from step 0", path)
        return None
    if not cfg.resume:
        raise UserError(f"{path}: --out {cfg.out} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:  # any failure means the same thing: the file is not a checkpoint we can use
        raise UserError(f"{path}: unreadable checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                        "delete it to start over") from None
    flags = {f.name: f.metadata["flag"] for f in fields(cfg)}
    changed = [f"{flags[k]} {saved.get(k)} → {getattr(cfg, k)}" for k in resume_keys(cfg)
               if saved.get(k) != getattr(cfg, k)]
    changed += [why for key, (value, why) in (expect or {}).items() if state.get(key) != value]
    if state.get("source_digest") != source_digest(command):
        changed.append("it was written by another version of the code")
    if changed:
        logger.warning("%s is a run with other settings (%s): starting a new run from step 0", path,
                       "; ".join(changed))
        return None
    if state["step"] >= total_steps:
        logger.warning("%s is a finished run (step %d of %d): starting a new run from step 0", path, state["step"],
                       total_steps)
        return None
    logger.info("resuming %s at step %d of %d", path.parent, state["step"], total_steps)
    return state


def checkpoint(cfg, command: str, step: int, total_steps: int, device, **state) -> dict:
    """last.pt's contents: the stage's ``state`` and what ``resume_state`` and ``restore_rng`` read."""
    from pipeline.provenance import source_digest

    return {**state, "step": step, "total_steps": total_steps, "config": asdict(cfg),
            "source_digest": source_digest(command), "rng": rng_state(device)}


def rng_state(device) -> dict:
    """Python's and torch's random state (and the CUDA device's)."""
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device) -> None:
    """Put back the random state ``checkpoint`` recorded in ``state``."""
    import torch

    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def clear_stale_writes(out: Path) -> None:
    """Delete the temporary files of atomic writes (pipeline/runtime.py) that a kill cut short; the
    files they were replacing are intact."""
    for stale in out.glob(".*.tmp"):
        stale.unlink()


def replay(live, rows, step: int) -> None:
    """Start ``live`` (pipeline/live.py, which empties its files then) with ``rows`` [(step, {metric:
    value})], the summary written once, at ``step``: a resumed run's files hold every step up to its
    checkpoint once, as an uninterrupted run's do, and a new run's hold no other run's."""
    for at, values in rows:
        live.log(at, values, sync=False)
    live.log(step, {})


def resumable(f):
    """``f``, a config field (pipeline/options.py's ``option`` or one of pipeline/shared_options.py),
    marked as an option a resumed run must share with the run that wrote last.pt (``resume_keys``)."""
    f.metadata = MappingProxyType({**f.metadata, "resume": True})
    return f
