"""What a shard entry may open, and with whose consent.

A shard list comes from a file — dataset.json — that may have been written by someone else: a dataset
folder downloaded from anywhere, or a description published at a URL. Its entries must therefore never
run a program, nor reach files outside what they describe, unless the user said so on the command line
of the reading command itself. Every entry is one of three kinds (``kind``):

- ``file``: a path on this machine (or ``file:``), opened with ``open``;
- ``url``: ``http(s)://``, ``s3://``, ``gs://``, ``az://``, ``hf://`` (``NETWORK``), read through fsspec
  in this process. webdataset would start ``curl`` or ``gsutil`` for some of these, with the URL on the
  program's command line; reading them ourselves starts no process at all;
- ``command``: ``pipe:COMMAND``, a shell command whose standard output is the shard. Run only when the
  user passes ``--allow-commands`` to the command that reads the shards (``ALLOW_COMMANDS``) — and
  never for a description read from a URL, whatever the user passes, because nobody on this machine
  wrote it.

Anything else (webdataset's ``ais:``, chained fsspec URLs such as ``zip::…``, local-ish fsspec
protocols that a remote description could point at this machine with) is refused in one line. The
consent travels with each URL (``store.shards.ShardURL.commands``) into the loader workers, so the
opener itself, not only the check before work starts, refuses a command nobody allowed.
docs/reliability.md, *Inputs nobody here wrote*, lists what each input may cause.
"""
from __future__ import annotations

import contextlib
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

from pipeline.errors import UserError

ALLOW_COMMANDS = "--allow-commands"
ALLOW_COMMANDS_HELP = ("Run the `pipe:COMMAND` shard entries of the dataset's description (each command's output "
                       "is a shard). Without it such an entry is refused: a dataset.json made elsewhere could name "
                       "any command. Never honoured for a description read from a URL.")
COMMAND_SCHEMES = ("pipe",)
# fsspec protocols that reach another machine and nothing on this one.
NETWORK = ("http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "hf")
KINDS = ("file", "url", "command")


def kind(url: str) -> str:
    """``file``, ``url`` or ``command`` (see the module's docstring); a one-line UserError for any other form."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if not scheme or scheme == "file":
        return "file"
    if scheme in COMMAND_SCHEMES:
        return "command"
    if scheme in NETWORK and "::" not in url:
        return "url"
    raise UserError(f"{url}: unsupported shard URL (shards are local paths, {', '.join(s + '://' for s in NETWORK)} "
                    f"URLs, or pipe:COMMAND with {ALLOW_COMMANDS})")


def refuse_command(url: str, where: str, from_url: bool) -> None:
    """The one-line refusal of a ``pipe:`` entry of ``where`` (a dataset.json) that nobody allowed to run."""
    if from_url:
        raise UserError(f"{url}: a shard command in {where}, a description read from a URL; commands from a URL "
                        "are never run (copy the description, check it, and read the local copy with "
                        f"{ALLOW_COMMANDS})")
    raise UserError(f"{url}: a shard command in {where}; run it only if you trust that file: pass {ALLOW_COMMANDS}")


@contextlib.contextmanager
def open_shard(url: str, commands: bool | None = None) -> Iterator[BinaryIO]:
    """A shard's bytes as a stream read front to back, without starting a process unless ``url`` is a
    command that may run: ``commands``, or when None the consent the URL carries (``ShardURL.commands``).
    Errors reading the stream are the caller's to name (they are a damaged or missing shard)."""
    what = kind(url)
    if what == "file":
        from store.shards import local_path

        with open(local_path(url), "rb") as f:
            yield f
    elif what == "url":
        import fsspec

        # block_size 0 streams http(s) front to back without range requests, as a tar reader reads it
        options = {"block_size": 0} if urlparse(url).scheme.lower() in ("http", "https") else {}
        with fsspec.open(url, "rb", **options) as f:
            yield f
    else:
        if not (getattr(url, "commands", False) if commands is None else commands):
            raise UserError(f"{url}: a shard command nobody allowed to run; pass {ALLOW_COMMANDS}")
        from webdataset.gopen import gopen

        stream = gopen(str(url), "rb")
        try:
            yield stream
        finally:
            stream.close()  # waits for the command; its exit status, when not 0, raises here
