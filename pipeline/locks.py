"""One writer at a time: an exclusive OS advisory lock per output (dataset dir, store, Phase A dir).

The lock is ``flock`` on a small file *beside* the output, ``.<name>.lock`` in its parent folder, not
inside it: DVC caches output directories whole (a lock file inside would become part of the data), and
``extract --overwrite`` replaces the store directory while it holds the lock. The kernel releases an
``flock`` when its process dies, so a SIGKILL never leaves a stale lock behind; the file itself may
stay and means nothing without a holder. The holder writes its PID into the file so that a second
writer can name it. Readers never take the lock and never wait. A feature store at a URL, where there
is no ``flock``, is locked by a lock object instead (``store.location.write_lock``).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
        os.close(fd)  # closing the descriptor releases the lock
