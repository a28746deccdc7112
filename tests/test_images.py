"""pipeline/images.py: one decode function and one error for every image a stage reads, hostile ones included.

The hostile images here are small: the decompression bomb is a PNG header declaring 20,000 × 20,000
(69 bytes, never decoded), so no test allocates its 400 MB. ``HOSTILE`` is shared with the stages' tests.
"""
from __future__ import annotations

import io
import pickle
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS, BadImage, Header, open_image, read_file, read_header


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose valid IHDR (1-bit greyscale) declares ``width`` × ``height``, with a tiny IDAT of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(bytes(64)))
            + _chunk(b"IEND", b""))


def encoded(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A real image of ``width`` × ``height`` (noise, so a JPEG of it has data worth cutting short)."""
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16 × 16 JPEG whose frame header (SOF0) is rewritten to declare ``width`` × ``height``."""
    data = bytearray(encoded(16, 16))
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height and width
    data[at:at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


BOMB = png_declaring(20_000, 20_000)
TRUNCATED_JPEG = encoded(64, 48)[:600]  # its header reads, its data is cut short
HOSTILE = {  # name: (file suffix, bytes, the reason BadImage gives)
    "bomb": ("png", BOMB, "decompression bomb: 20000×20000 = 400,000,000 pixels, above --max-pixels 89,478,485"),
    "truncated": ("jpg", TRUNCATED_JPEG, "truncated file"),
    "unknown": ("jpg", b"not an image, whatever its name says", "unknown image format"),
    "empty": ("png", b"", "empty file (0 bytes)"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_every_decoder_failure_is_one_line_with_a_specific_reason(kind):
    _, data, reason = HOSTILE[kind]
    with pytest.raises(BadImage) as e:
        open_image(data, "pets/dog/x.png")
    assert str(e.value) == f"pets/dog/x.png: unreadable image ({reason})" and e.value.reason == reason
    refusal = e.value.refusal()
    assert isinstance(refusal, UserError) and "\n" not in str(refusal)
    assert str(refusal) == f"pets/dog/x.png: unreadable image ({reason}); pass --skip-bad to skip unreadable images"
    if kind != "truncated":  # a cut-short JPEG has a whole header: only decoding finds out
        with pytest.raises(BadImage, match=re.escape(reason)):
            read_header(data, "pets/dog/x.png")


def test_any_other_failure_names_its_class_and_message_in_one_line(monkeypatch):
    broken = png_declaring(4, 4, idat=b"not zlib data")
    with pytest.raises(BadImage, match=r"^x: unreadable image \(OSError: broken data stream when reading image file\)$"):
        open_image(broken, "x")

    def raises(*args, **kwargs):
        raise struct.error("unpack requires\n  a buffer of 4 bytes")

    monkeypatch.setattr(Image, "open", raises)  # whatever a decoder raises is the same BadImage
    with pytest.raises(BadImage, match=r"^x: unreadable image \(error: unpack requires a buffer of 4 bytes\)$"):
        read_header(encoded(8, 8), "x")


def test_the_pixel_limit_is_ours_checked_from_the_header_and_pil_neither_raises_nor_warns():
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's default, as the help says
    small = encoded(32, 32, "PNG")
    with pytest.raises(BadImage, match=r"decompression bomb: 32×32 = 1,024 pixels, above --max-pixels 100\)$"):
        open_image(small, "x", max_pixels=100)
    assert open_image(small, "x", max_pixels=1024).size == (32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns above its limit and raises above twice it: neither may happen
        # 1.1× and 4.5× PIL's limit, accepted from the header alone under a larger --max-pixels
        assert read_header(png_declaring(10_000, 10_000), "x", max_pixels=10**9) == Header("PNG", "1", (10_000, 10_000))
        assert read_header(BOMB, "x", max_pixels=400_000_000).size == (20_000, 20_000)
        assert read_header(jpeg_declaring(20_000, 20_000), "x", max_pixels=10**9) == Header("JPEG", "RGB",
                                                                                            (20_000, 20_000))
        with pytest.raises(BadImage, match="above --max-pixels 399,999,999"):
            read_header(BOMB, "x", max_pixels=400_000_000 - 1)


def test_pils_own_limit_is_restored_whatever_it_was(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1234)
    assert open_image(encoded(8, 8), "x").size == (8, 8)
    for data in (BOMB, b"", TRUNCATED_JPEG):
        with pytest.raises(BadImage):
            open_image(data, "x")
        assert Image.MAX_IMAGE_PIXELS == 1234
    with pytest.raises(BadImage):  # at 2 × 1234 PIL itself would refuse this 60 × 44 image
        open_image(encoded(60, 44), "x", max_pixels=100)
    assert open_image(encoded(60, 44), "x").size == (60, 44) and Image.MAX_IMAGE_PIXELS == 1234


def test_open_image_is_rgb_or_the_stored_mode():
    grey = io.BytesIO()
    Image.new("L", (5, 3), 7).save(grey, "PNG")
    rgb = open_image(grey.getvalue(), "x")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (7, 7, 7)
    stored = open_image(grey.getvalue(), "x", mode=None)
    assert stored.mode == "L" and stored.format == "PNG" and stored.getpixel((0, 0)) == 7


def test_a_file_that_cannot_be_read_is_a_bad_image_and_bad_images_cross_processes(tmp_path):
    with pytest.raises(BadImage, match=r"gone.jpg: unreadable image \(no such file\)$"):
        read_file(tmp_path / "gone.jpg")
    with pytest.raises(BadImage, match=r": unreadable image \(cannot read the file: IsADirectoryError\)$"):
        read_file(tmp_path)
    copy = pickle.loads(pickle.dumps(BadImage("sample 'k' in a.tar", "truncated file")))
    assert str(copy) == "sample 'k' in a.tar: unreadable image (truncated file)" and copy.where == "sample 'k' in a.tar"
