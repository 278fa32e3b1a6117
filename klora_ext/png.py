"""A small, dependency-free PNG writer (and a reader for what it writes).

The selection map must be renderable without Pillow (the CLI runs outside the WebUI), so this module encodes 8-bit
RGB images with zlib + struct only. The decoder exists for tests and tools; it accepts 8-bit RGB, non-interlaced
PNGs with any of the five standard row filters, which covers everything `encode_png` produces.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from .errors import KLoraError

__all__ = ["PNG_SIGNATURE", "decode_png", "encode_png", "iter_chunks", "read_png_text"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Row filter types of the PNG spec (section 9.2).
FILTER_NONE, FILTER_SUB, FILTER_UP, FILTER_AVERAGE, FILTER_PAETH = 0, 1, 2, 3, 4
_BPP = 3  # bytes per pixel: 8-bit RGB only


def _chunk(kind: bytes, data: bytes) -> bytes:
    # CRC covers the chunk type and data, not the length (PNG spec 5.3).
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _filter_rows(rgb: np.ndarray) -> list[np.ndarray]:
    """All five filtered versions of every row, as int16 arrays of shape (H, W*3) (values mod 256 later)."""
    h, w, _ = rgb.shape
    x = rgb.reshape(h, w * _BPP).astype(np.int16)
    # a = byte one pixel to the left, b = byte above, c = byte above-left; zero outside the image.
    a = np.zeros_like(x)
    a[:, _BPP:] = x[:, :-_BPP]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, _BPP:] = x[:-1, :-_BPP]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return [x, x - a, x - b, x - ((a + b) >> 1), x - paeth]


def _filtered_scanlines(rgb: np.ndarray, filter_type: int | str) -> bytes:
    candidates = _filter_rows(rgb)
    h = rgb.shape[0]
    if filter_type == "adaptive":
        # libpng's heuristic: per row, the filter whose output (as signed bytes) has the smallest absolute sum.
        costs = np.stack([np.abs(((f + 128) % 256) - 128).sum(axis=1) for f in candidates])  # (5, H)
        choice = np.argmin(costs, axis=0)
    else:
        choice = np.full(h, int(filter_type))
    stacked = np.stack(candidates)  # (5, H, W*3)
    rows = stacked[choice, np.arange(h)] % 256
    out = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = choice
    out[:, 1:] = rows
    return out.tobytes()


def _text_chunk(key: str, value: str) -> bytes:
    if not 1 <= len(key) <= 79 or "\0" in key:
        raise KLoraError(f"[K-LoRA] PNG text key must be 1-79 characters without NUL, got {key!r}")
    try:
        kb = key.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise KLoraError(f"[K-LoRA] PNG text key must be Latin-1, got {key!r}") from exc
    try:
        return _chunk(b"tEXt", kb + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # tEXt is Latin-1 only; iTXt (uncompressed, no language tag) carries UTF-8.
        return _chunk(b"iTXt", kb + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(
    rgb: np.ndarray,
    *,
    text: Mapping[str, str] | None = None,
    compress_level: int = 6,
    filter_type: int | str = "adaptive",
) -> bytes:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG.

    `text` entries become tEXt chunks (iTXt when a value is not Latin-1), written before the image data.
    `filter_type` is "adaptive" (per-row choice, best compression) or a fixed PNG filter type 0-4.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise KLoraError(f"[K-LoRA] encode_png needs an (H, W, 3) array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise KLoraError(f"[K-LoRA] encode_png needs uint8 pixels, got {arr.dtype}")
    h, w, _ = arr.shape
    if h < 1 or w < 1 or h >= 2**31 or w >= 2**31:
        raise KLoraError(f"[K-LoRA] encode_png: image size {w}x{h} is not valid for PNG")
    if filter_type != "adaptive" and filter_type not in (0, 1, 2, 3, 4):
        raise KLoraError(f"[K-LoRA] encode_png: filter_type must be 'adaptive' or 0-4, got {filter_type!r}")
    if not 0 <= compress_level <= 9:
        raise KLoraError(f"[K-LoRA] encode_png: compress_level must be 0-9, got {compress_level}")

    # IHDR: width, height, bit depth 8, colour type 2 (RGB), compression 0, filter method 0, no interlace.
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    parts = [PNG_SIGNATURE, _chunk(b"IHDR", ihdr)]
    for key, value in (text or {}).items():
        parts.append(_text_chunk(str(key), str(value)))
    raw = _filtered_scanlines(np.ascontiguousarray(arr), filter_type)
    parts.append(_chunk(b"IDAT", zlib.compress(raw, compress_level)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def iter_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (type, data) of every chunk, checking the signature, lengths and CRCs."""
    if not data.startswith(PNG_SIGNATURE):
        raise KLoraError("[K-LoRA] not a PNG file (bad signature)")
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise KLoraError("[K-LoRA] truncated PNG chunk header")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise KLoraError(f"[K-LoRA] truncated PNG chunk {kind!r}")
        body = data[pos + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise KLoraError(f"[K-LoRA] PNG chunk {kind!r} has a bad CRC")
        yield kind, body
        if kind == b"IEND":
            return
        pos = end + 4
    raise KLoraError("[K-LoRA] PNG has no IEND chunk")


def _unfilter(raw: bytes, w: int, h: int) -> np.ndarray:
    stride = w * _BPP
    if len(raw) != h * (stride + 1):
        raise KLoraError(f"[K-LoRA] PNG image data has {len(raw)} bytes, expected {h * (stride + 1)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        ft = int(rows[y, 0])
        line = rows[y, 1:]
        if ft == FILTER_NONE:
            cur = line.copy()
        elif ft == FILTER_SUB:
            # Recon(x) = Filt(x) + Recon(a) is a running sum per channel; uint8 accumulation wraps mod 256.
            cur = np.cumsum(line.reshape(w, _BPP), axis=0, dtype=np.uint8).reshape(stride)
        elif ft == FILTER_UP:
            cur = line + prev  # uint8 addition wraps mod 256
        elif ft in (FILTER_AVERAGE, FILTER_PAETH):
            # Sequential by nature (each byte depends on the reconstructed byte to its left): plain Python.
            f, b = line.tolist(), prev.tolist()
            r = [0] * stride
            for i in range(stride):
                a = r[i - _BPP] if i >= _BPP else 0
                if ft == FILTER_AVERAGE:
                    pred = (a + b[i]) >> 1
                else:
                    c = b[i - _BPP] if i >= _BPP else 0
                    p = a + b[i] - c
                    pa, pb, pc = abs(p - a), abs(p - b[i]), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b[i] if pb <= pc else c)
                r[i] = (f[i] + pred) & 0xFF
            cur = np.array(r, dtype=np.uint8)
        else:
            raise KLoraError(f"[K-LoRA] PNG row {y} has unknown filter type {ft}")
        out[y] = cur
        prev = cur
    return out.reshape(h, w, _BPP)


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB, non-interlaced PNG to an (H, W, 3) uint8 array."""
    header: tuple[int, ...] | None = None
    idat: list[bytes] = []
    for kind, body in iter_chunks(data):
        if kind == b"IHDR":
            if len(body) != 13:
                raise KLoraError("[K-LoRA] PNG IHDR has the wrong length")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind[0] & 0x20 == 0:  # critical chunk (upper-case first letter) we don't understand
            raise KLoraError(f"[K-LoRA] unsupported critical PNG chunk {kind!r}")
    if header is None:
        raise KLoraError("[K-LoRA] PNG has no IHDR chunk")
    w, h, depth, colour, compression, filt, interlace = header
    if (depth, colour, compression, filt, interlace) != (8, 2, 0, 0, 0):
        raise KLoraError(
            f"[K-LoRA] decode_png reads 8-bit RGB non-interlaced PNGs only "
            f"(got depth={depth}, colour type={colour}, interlace={interlace})"
        )
    if not idat:
        raise KLoraError("[K-LoRA] PNG has no image data")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise KLoraError(f"[K-LoRA] PNG image data is corrupt: {exc}") from exc
    return _unfilter(raw, w, h)


def read_png_text(data: bytes) -> dict[str, str]:
    """The tEXt / zTXt / iTXt entries of a PNG as {key: value} (later duplicates win)."""
    out: dict[str, str] = {}
    for kind, body in iter_chunks(data):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        key, _, rest = body.partition(b"\0")
        name = key.decode("latin-1")
        if kind == b"tEXt":
            out[name] = rest.decode("latin-1")
        elif kind == b"zTXt":
            out[name] = zlib.decompress(rest[1:]).decode("latin-1")  # rest[0] is the compression method
        else:
            flag, _method = rest[0], rest[1]
            _lang, _, rest = rest[2:].partition(b"\0")
            _translated, _, value = rest.partition(b"\0")
            out[name] = (zlib.decompress(value) if flag else value).decode("utf-8")
    return out
