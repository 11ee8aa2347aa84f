"""A minimal PNG encoder and header reader (stdlib only), for placeholders and the test server."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(
    width: int, height: int, rgb: bytes, *, text: Mapping[str, str] | None = None
) -> bytes:
    """Encode ``width*height*3`` bytes of 8-bit RGB as a PNG; ``text`` becomes tEXt chunks."""
    if width <= 0 or height <= 0:
        raise ValueError(f"PNG dimensions must be positive, got {width}x{height}")
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"expected {stride * height} RGB bytes, got {len(rgb)}")
    raw = b"".join(b"\x00" + rgb[row * stride : (row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))
    chunks.append(_chunk(b"IDAT", zlib.compress(raw, 6)))
    chunks.append(_chunk(b"IEND", b""))
    return _SIGNATURE + b"".join(chunks)


def solid_png(
    width: int,
    height: int,
    color: tuple[int, int, int] = (90, 120, 200),
    *,
    text: Mapping[str, str] | None = None,
) -> bytes:
    """A one-colour PNG of the given size (cheap even at 1024x1024: it compresses to nothing)."""
    return encode_png(width, height, bytes(color) * (width * height), text=text)


def read_png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR; raises ValueError for anything that is not a PNG."""
    if len(data) < 24 or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def read_png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (they tell an offline placeholder from a real image)."""
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG image")
    found: dict[str, str] = {}
    offset = len(_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        if kind == b"tEXt" and b"\x00" in payload:
            key, _, value = payload.partition(b"\x00")
            found[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IEND":
            break
        offset += 12 + length
    return found
