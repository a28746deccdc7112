"""Image bytes → pixels: the one place every stage decodes an image, and its one error.

Images come from folders and shards nobody here wrote, so any of them may be damaged, cut short, of a
format PIL does not know, empty, or a decompression bomb (a small file whose header declares a huge
canvas: a 1.2 MB PNG of 20,000 × 20,000 decodes to 1.2 GB). To a stage every decoder failure means the
same thing, this image cannot be used, so it is one exception, ``BadImage``, whose message is one line
naming the image and a specific reason. The stages skip it (``--skip-bad``) or stop with
``BadImage.refusal()``. ``open_image`` decodes; ``read_header`` reads only the header (format, mode,
size), for the callers that decide from it what to decode and where (``--decode gpu``, ``--max-side``).

The pixel limit, ``--max-pixels`` (default: PIL's own, ``MAX_PIXELS``), is checked here from the header,
before any pixel is decoded. PIL has a limit of its own, the process-wide ``PIL.Image.MAX_IMAGE_PIXELS``:
it warns above it and raises ``DecompressionBombError`` above twice it, inside ``Image.open`` and before
the size can be read, so it would name no size and cap any larger limit a user asks for. While one of
our calls runs, that global is therefore set to None (no PIL check, no warning) and then restored to
whatever it was, also when decoding fails; a lock keeps two of our calls in different threads from
restoring each other's value. PIL code running in another thread at that moment would run without
PIL's own check; the stages decode in one thread per process (their loader workers are processes).
"""
from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path
from typing import NamedTuple

from pipeline.errors import UserError

MAX_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS, int(1024 * 1024 * 1024 // 4 // 3): about 9,459²
MAX_PIXELS_HELP = ("Refuse an image whose header declares more pixels (width × height) than this, before decoding "
                   "it: a decompression bomb is a small file that declares a huge image. Default: PIL's limit.")
SKIP_BAD_HELP = "Skip unreadable images (each key is reported) instead of failing on the first."
SKIP_BAD_HINT = "pass --skip-bad to skip unreadable images"

_PIL_LIMIT = threading.Lock()


class BadImage(ValueError):
    """An image that cannot be used: ``where`` names it (a file, or a sample and its shard), ``reason``
    says why in a few words. Its arguments are the two, so it pickles across loader workers."""

    def __init__(self, where: str, reason: str):
        super().__init__(where, reason)
        self.where, self.reason = where, reason

    def __str__(self) -> str:
        return f"{self.where}: unreadable image ({self.reason})"

    def refusal(self) -> UserError:
        """The one-line error of a command that was not told to skip unreadable images."""
        return UserError(f"{self}; {SKIP_BAD_HINT}")


class Header(NamedTuple):
    format: str | None  # PIL's name of the file format: JPEG, PNG, …
    mode: str  # PIL's colour mode as stored: RGB, L, CMYK, P, …
    size: tuple[int, int]  # (width, height)


def read_file(path: Path) -> bytes:
    """An image file's bytes; a missing or unreadable file is a ``BadImage`` naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImage(str(path), "no such file") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise BadImage(str(path), f"cannot read the file: {e.__class__.__name__}") from None


def read_header(data: bytes, where: str, max_pixels: int = MAX_PIXELS) -> Header:
    """The image's format, mode and size from its header alone (no pixel is decoded), within ``max_pixels``."""
    with _opened(data, where, max_pixels) as im:
        return Header(im.format, im.mode, im.size)


def open_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS, mode: str | None = "RGB"):
    """The image in ``data`` decoded whole (a ``PIL.Image.Image``), converted to ``mode``; ``mode`` None
    keeps the stored mode, format and metadata (``prepare --max-side`` resizes what is stored)."""
    with _opened(data, where, max_pixels) as im:
        im.load()
        return im if mode is None else im.convert(mode)


@contextlib.contextmanager
def _opened(data: bytes, where: str, max_pixels: int):
    """PIL's image of ``data``, opened with PIL's own limit lifted (see the module's docstring) and
    checked against ``max_pixels``; any failure inside the block is a ``BadImage``."""
    from PIL import Image

    if not data:
        raise BadImage(where, "empty file (0 bytes)")
    with _PIL_LIMIT:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise BadImage(where, f"decompression bomb: {width}×{height} = {width * height:,} pixels, "
                                          f"above --max-pixels {max_pixels:,}")
                yield im
        except BadImage:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, …: any means the same
            raise BadImage(where, _reason(e)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _reason(e: Exception) -> str:
    """A decoder failure in a few words: the common ones by name, any other as its class and message."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "unknown image format"
    message = " ".join(str(e).split())
    if isinstance(e, (OSError, EOFError)) and "truncated" in message.lower():
        return "truncated file"
    return f"{e.__class__.__name__}: {message[:200]}" if message else e.__class__.__name__
