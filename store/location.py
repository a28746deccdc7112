"""Where an output lives: a local path, or a URL that fsspec opens (``s3://``, ``gs://``, ``memory://``, …).

The feature store may sit on object storage (docs/feature-store.md), so the code that writes and reads
it goes through a ``Location`` rather than ``pathlib``. The one guarantee every writer needs, "a file is
there whole or not at all", is kept on both kinds:

- a local path (or a ``file://`` URL, which is one) writes under a temporary name, flushes it to disk and
  renames it into place (``pipeline.runtime.atomic_path``);
- on object storage there is no rename, but an object written in one request (S3's PutObject or its
  multipart upload, GCS's upload; ``memory://`` within its process) becomes visible whole when the
  request completes, and never in part. So one ``write`` is the same record.

One writer at a time (``write_lock``): a local output gets pipeline/locks.py's ``flock`` beside it.
Object storage has no ``flock``, and nothing there notices that a process died, so an output at a URL
gets a lock object beside it, ``.<name>.lock``, created only if it does not exist: one atomic request
where the service checks the condition (``ATOMIC_CREATE``). Its holder deletes it when it ends, also
on an error. A killed holder leaves it behind, and the next writer is refused with a message naming
the object, its holder and what to do: a stale lock costs a command, two writers could cost the store.
Backends without an atomic create-if-absent are refused rather than locked unreliably; http(s) is
read-only.

Credentials and endpoints come from each backend's own configuration (``AWS_*`` variables, ``~/.aws``,
``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's config), as for any fsspec user.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from pipeline.errors import UserError
from pipeline.locks import exclusive_lock
from pipeline.runtime import atomic_path
from store.shards import local_path

log = logging.getLogger("ballad.location")

# URL schemes whose create-if-absent write is one atomic request: S3's PutObject with If-None-Match
# (AWS since 2024; an S3-compatible server must honour it too), GCS's ifGenerationMatch=0, and the
# in-process memory:// filesystem.
ATOMIC_CREATE = ("s3", "s3a", "gs", "gcs", "memory")
READ_ONLY = ("http", "https")


class Location:
    """A directory-like place named by a local path or a URL; ``rel`` arguments are '/'-separated paths
    inside it ('' is the place itself). ``option`` names the command-line option in error messages."""

    def __init__(self, where: str | os.PathLike, option: str):
        self.url = os.fspath(where)
        self.option = option
        self.local = local_path(self.url)
        self.fs = self.key = None
        if self.local is None:
            import fsspec

            try:
                self.fs, self.key = fsspec.url_to_fs(self.url)
            except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
                raise UserError(f"{option} {self.url}: {e}") from None
            except ValueError as e:  # "Protocol not known: …"
                raise UserError(f"{option} {self.url}: not a path or a URL fsspec can open ({e})") from None

    @classmethod
    def of_zarr(cls, store, option: str = "--out") -> "Location":
        """The location of an open zarr store (a LocalStore, or an FsspecStore over any filesystem)."""
        root = getattr(store, "root", None)
        return cls(root if root is not None else store.fs.unstrip_protocol(store.path), option)

    def __str__(self) -> str:
        return self.url

    def _key(self, rel: str) -> str:
        return f"{self.key.rstrip('/')}/{rel}" if rel else self.key

    def _path(self, rel: str) -> Path:
        return self.local / rel if rel else self.local

    def exists(self, rel: str = "") -> bool:
        if self.local is not None:
            return self._path(rel).exists()
        self.fs.invalidate_cache()  # listings cached by this process may predate another process's write
        try:
            return self.fs.exists(self._key(rel))
        except Exception as e:  # backends differ: no credentials, an unreachable endpoint, a refused request
            why = " ".join(str(e).split())[:200]
            raise UserError(f"{self.option} {self.url}: cannot be reached ({e.__class__.__name__}: {why})") from None

    def is_file(self, rel: str = "") -> bool:
        return self._path(rel).is_file() if self.local is not None else self.fs.isfile(self._key(rel))

    def is_empty(self, rel: str = "") -> bool:
        """True for a directory (or prefix) with nothing inside, or none at all."""
        if self.local is not None:
            path = self._path(rel)
            return not path.is_dir() or not any(path.iterdir())
        return not self.fs.find(self._key(rel))

    def remove(self, rel: str = "") -> None:
        """Delete ``rel`` and everything inside it; nothing to delete is fine."""
        if self.local is not None:
            path = self._path(rel)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            return
        try:
            self.fs.rm(self._key(rel), recursive=True)
        except FileNotFoundError:
            pass

    def write(self, rel: str, data: bytes) -> None:
        """``rel`` with ``data``, visible whole or not at all (see the module docstring)."""
        if self.local is None:
            self.fs.pipe_file(self._key(rel), data)
            return
        with atomic_path(self._path(rel)) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the rename is the "done" record: the bytes must be on disk first

    def create(self, rel: str, data: bytes) -> None:
        """Write ``rel`` only if it does not exist (FileExistsError otherwise), at a URL: the lock object.
        (A local output is locked with ``flock``, which needs no such write.)"""
        self.fs.pipe_file(self._key(rel), data, mode="create")

    def read(self, rel: str) -> bytes:
        return self._path(rel).read_bytes() if self.local is not None else self.fs.cat_file(self._key(rel))

    def open(self, rel: str):
        """``rel`` opened for reading, seekable (remote: fetched in ranges as it is read)."""
        return open(self._path(rel), "rb") if self.local is not None else self.fs.open(self._key(rel), "rb")

    def remove_temporaries(self, rel: str) -> None:
        """Drop ``.*.tmp`` files that a killed local writer left in ``rel`` (object stores have none)."""
        if self.local is not None and self._path(rel).is_dir():
            for stale in self._path(rel).glob(".*.tmp"):
                stale.unlink()

    def zarr_store(self, read_only: bool):
        """The zarr store over this location."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local is not None:
            return LocalStore(self.local, read_only=read_only)
        return FsspecStore.from_url(self.url, read_only=read_only)


def write_lock(output: str | os.PathLike, what: str = "--out"):
    """The write lock of ``output`` for a ``with`` block: ``flock`` beside a local path (``file://`` URLs
    included), a lock object beside one at a URL; a second writer gets a one-line UserError."""
    local = local_path(os.fspath(output))
    return exclusive_lock(local, what) if local is not None else _object_lock(os.fspath(output), what)


def object_lock_url(url: str) -> str:
    """The lock object of the output at ``url``: ``.<name>.lock`` beside it."""
    head, _, name = url.rstrip("/").rpartition("/")
    return f"{head}/.{name}.lock"


@contextlib.contextmanager
def _object_lock(url: str, what: str) -> Iterator[str]:
    scheme = urlparse(url).scheme
    if scheme in READ_ONLY:
        raise UserError(f"{what} {url}: http(s) is read-only; write to a local path or to s3://, gs:// or "
                        "memory:// (a local store can then be served over http for reading)")
    if scheme not in ATOMIC_CREATE:
        raise UserError(f"{what} {url}: {scheme}:// storage cannot create an object only if it is absent, so "
                        f"a second writer could not be kept out; write to a local path or to "
                        f"{', '.join(s + '://' for s in ATOMIC_CREATE)}")
    lock = Location(object_lock_url(url), what)
    token = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex,
                        "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
    try:
        lock.create("", token)
    except FileExistsError:
        raise UserError(f"{what} {url}: {_holder(lock)} is writing it (lock {lock}); wait for it to finish, or, "
                        f"if that process is gone (a killed run leaves its lock), delete {lock} and re-run") from None
    except Exception as e:  # no bucket, no credentials, an unreachable endpoint: the backends' errors differ
        why = " ".join(str(e).split())[:200]
        raise UserError(f"{what} {url}: cannot create the lock {lock} ({e.__class__.__name__}: {why})") from None
    try:
        yield str(lock)
    finally:
        try:
            if lock.read("") == token:  # never delete a lock that another writer took after a manual delete
                lock.remove()
        except Exception as e:  # keep the block's own error; the next writer is told about the stale lock
            log.warning("could not remove the lock %s (%s: %s); delete it before the next run", lock,
                        e.__class__.__name__, e)


def _holder(lock: Location) -> str:
    """Who holds a lock object, as its holder wrote it."""
    try:
        info = json.loads(lock.read(""))
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except Exception:  # unreadable or foreign: still a lock
        return "another process"
