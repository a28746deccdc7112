"""One writer at a time: an exclusive OS advisory lock per output (dataset dir, store, Phase A dir).

The lock is ``flock`` on a small file *beside* the output, ``.<name>.lock`` in its parent folder, not
inside it: DVC caches output directories whole (a lock file inside would become part of the data), and
``extract --overwrite`` replaces the store directory while it holds the lock. The holder writes its PID
into the file so that a second writer can name it. Readers never take the lock and never wait. A
feature store at a URL, where there is no ``flock``, is locked by a lock object instead
(``store.location.write_lock``).

An ``flock`` belongs to the open file description, and the kernel releases it when the last
descriptor of that description closes. A process that dies closes its own, so a SIGKILL never leaves
a stale lock behind (the file itself may stay and means nothing without a holder) — unless a child
still holds a copy: a process forked while the lock is held (DataLoader workers, a fork Pool)
inherits the descriptor, and a killed holder's lock then lasted until its children noticed and
exited (5.7 s for extract's loader workers, issue 22). So every forked child closes its copies at
once (``os.register_at_fork``): the lock lives exactly as long as its holder, whatever children it
has. Closing a child's copy never unlocks the holder's, which still refers to the description.
Processes started otherwise inherit nothing: ``os.open`` makes the descriptor non-inheritable
(PEP 446), so ``subprocess`` and the spawn and forkserver start methods, which exec, never see it.
``_registry`` makes opening (or closing) a lock and registering (or unregistering) it one step that a
fork in another thread cannot split: a fork between the two would leave a child holding a copy it does
not know to close.
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

_held: set[int] = set()  # descriptors of the locks this process holds
_registry = threading.Lock()


def _close_held() -> None:
    """In a forked child: drop its copies of the parent's locks (the parent keeps them)."""
    for fd in _held:
        os.close(fd)
    _held.clear()
    _registry.release()


os.register_at_fork(before=_registry.acquire, after_in_parent=_registry.release, after_in_child=_close_held)


def lock_path(output: str | os.PathLike) -> Path:
    path = Path(output).absolute()
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive_lock(output: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """Hold the write lock of ``output`` for the block; a second holder gets a one-line UserError."""
    import fcntl

    path = lock_path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _registry:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            _held.add(fd)
    except OSError as e:
        raise UserError(f"{what} {output}: cannot create the lock file {path} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{what} {output}: cannot lock {path} ({e.strerror})") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UserError(f"{what} {output}: {who} is writing it (lock {path}); wait for it to finish "
                            "or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        with _registry:
            _held.discard(fd)
            os.close(fd)  # closing the last descriptor of the description releases the lock
