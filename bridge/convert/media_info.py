"""What a Matrix client needs to lay out an image before loading it: its size in pixels, read
from the file's first bytes (PNG, JPEG, GIF and WebP headers: no decoding, no dependency), and
a thumbnail of images larger than Element's thumbnail box, made with Pillow when it is
installed (optional: without it images go without a thumbnail, which clients replace with the
image itself).

Used by portal/media.py for native media toward Matrix, where the native sender may not have said
the size (``kalandra send-file`` does not).
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("kalandra.bridge.media")

HEAD: Final = 256 * 1024  # bytes of a file kept to find its size (a JPEG's EXIF comes first)
THUMBNAIL_MAX_FILE: Final = 20 * 1024 * 1024  # larger images are not decoded for a thumbnail
THUMBNAIL_BOX: Final = (800, 600)  # Element's: smaller images are their own thumbnail
_MAX_PIXELS: Final = 50_000_000  # a decompression bomb is not a picture to shrink

# JPEG start-of-frame markers (their segment holds the size); C4, C8 and CC are not frames.
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True, slots=True)
class Thumbnail:
    data: bytes
    mimetype: str
    width: int
    height: int


def dimensions(head: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF or WebP image from its first bytes; None: another
    format, or not enough of the file."""
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
        elif head[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", head[6:10])
        elif head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp(head)
        elif head.startswith(b"\xff\xd8"):
            return _jpeg(head)
        else:
            return None
    except struct.error:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _webp(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 ":  # lossy: the key frame's header, after its start code
        if head[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14 bits each, minus one, after the signature byte
        if head[20] != 0x2F:
            return None
        (bits,) = struct.unpack("<I", head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each, minus one
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None


def _jpeg(head: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):  # no segment
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", head[i + 5 : i + 9])
            return (width, height) if width > 0 and height > 0 else None
        i += 2 + length
    return None


def thumbnail(data: bytes) -> Thumbnail | None:
    """A JPEG (PNG where the image has transparency) of at most ``THUMBNAIL_BOX``, turned as
    its EXIF orientation says; None: Pillow is not installed, the image is small enough to be
    its own thumbnail, or it cannot be decoded. CPU-bound: run it in a thread."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > _MAX_PIXELS:
                return None
            if width <= THUMBNAIL_BOX[0] and height <= THUMBNAIL_BOX[1]:
                return None
            image.draft("RGB", THUMBNAIL_BOX)  # (JPEG: decode at a reduced scale)
            turned = ImageOps.exif_transpose(image)
            alpha = turned.mode in ("RGBA", "LA", "PA") or "transparency" in turned.info
            small = turned.convert("RGBA" if alpha else "RGB")
            small.thumbnail(THUMBNAIL_BOX)
            out = io.BytesIO()
            if alpha:
                small.save(out, format="PNG", optimize=True)
            else:
                small.save(out, format="JPEG", quality=80)
            mimetype = "image/png" if alpha else "image/jpeg"
            return Thumbnail(out.getvalue(), mimetype, small.width, small.height)
    except Exception as exc:  # not an image Pillow reads: no thumbnail, the image still goes
        log.debug("no thumbnail (%s)", type(exc).__name__)
        return None
