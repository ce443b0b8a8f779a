"""The image sizes the bridge reads from a file's first bytes (bridge/convert/media_info.py),
checked
against images Pillow writes in each format, and its thumbnails."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bridge.convert import media_info


def encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", **options: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (30, 60, 90, 200)[: len(mode)]).save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("GIF", "RGB", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("WEBP", "RGB", {}),  # lossy: VP8
        ("WEBP", "RGB", {"lossless": True}),  # VP8L
        ("WEBP", "RGBA", {"exif": b"Exif\x00\x00" + bytes(64)}),  # extended: VP8X
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (33, 17), (1000, 700), (4000, 3000)])
def test_dimensions_of_each_format(
    fmt: str, mode: str, options: dict[str, object], size: tuple[int, int]
) -> None:
    data = encoded(size, fmt, mode, **options)
    assert media_info.dimensions(data[: media_info.HEAD]) == size


def test_jpeg_size_after_a_large_exif_segment() -> None:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: the SOF segment comes after it
    data = encoded((321, 123), "JPEG", exif=exif.tobytes())
    assert data.index(b"\xff\xc0") > 60_000
    assert media_info.dimensions(data[: media_info.HEAD]) == (321, 123)


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"text"])
def test_unknown_or_cut_files_have_no_size(data: bytes) -> None:
    assert media_info.dimensions(data) is None


def test_thumbnails() -> None:
    photo = media_info.thumbnail(encoded((1600, 1200), "JPEG"))
    assert photo is not None
    assert (photo.mimetype, photo.width, photo.height) == ("image/jpeg", 800, 600)
    with Image.open(io.BytesIO(photo.data)) as image:
        assert image.size == (800, 600)
    clear = media_info.thumbnail(encoded((700, 1400), "PNG", "RGBA"))
    assert clear is not None
    assert (clear.mimetype, clear.width, clear.height) == ("image/png", 300, 600)
    assert media_info.thumbnail(encoded((800, 600), "PNG")) is None  # its own thumbnail
    assert media_info.thumbnail(b"not an image") is None
