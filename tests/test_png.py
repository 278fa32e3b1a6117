"""The built-in PNG encoder/decoder: round trips, chunk structure and CRCs checked independently of png.py."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klora_ext.errors import KLoraError
from klora_ext.png import PNG_SIGNATURE, decode_png, encode_png, read_png_text


def parse_chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """Own minimal chunk parser (type, data, stored crc) so the tests do not trust png.iter_chunks."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        out.append((kind, body, crc))
        pos += 12 + length
    assert pos == len(data)
    return out


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def blocky_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Flat-colour regions, like a selection map: exercises Sub/Up choices of the adaptive filter."""
    base = random_image(rng, -(-h // 4), -(-w // 4))
    img = np.ascontiguousarray(base.repeat(4, axis=0).repeat(4, axis=1)[:h, :w])
    assert img.shape == (h, w, 3)
    return img


@pytest.mark.parametrize("filter_type", ["adaptive", 0, 1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 17), (32, 5)])
def test_round_trip_every_filter(filter_type: int | str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng([*shape, 9 if filter_type == "adaptive" else int(filter_type)])
    for img in (random_image(rng, *shape), blocky_image(rng, *shape)):
        out = decode_png(encode_png(img, filter_type=filter_type))
        assert out.dtype == np.uint8
        assert out.shape == img.shape
        np.testing.assert_array_equal(out, img)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    flat=st.booleans(),
)
def test_round_trip_property(h: int, w: int, seed: int, flat: bool) -> None:
    rng = np.random.default_rng(seed)
    img = blocky_image(rng, h, w) if flat else random_image(rng, h, w)
    np.testing.assert_array_equal(decode_png(encode_png(img)), img)


def test_larger_flat_image_round_trip_and_compresses() -> None:
    img = np.zeros((300, 900, 3), dtype=np.uint8)
    img[:, :400] = (0xE8, 0x83, 0x3A)
    img[150:, 400:] = (0x3A, 0x7B, 0xD5)
    data = encode_png(img)
    np.testing.assert_array_equal(decode_png(data), img)
    assert len(data) < 5000  # flat colour must compress to almost nothing


def test_signature_ihdr_and_chunk_order() -> None:
    img = np.zeros((5, 11, 3), dtype=np.uint8)
    data = encode_png(img, text={"Software": "test"})
    assert data.startswith(PNG_SIGNATURE)
    assert PNG_SIGNATURE == b"\x89PNG\r\n\x1a\n"
    chunks = parse_chunks(data)
    kinds = [k for k, _, _ in chunks]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert chunks[-1][1] == b""
    assert b"IDAT" in kinds
    assert kinds.index(b"tEXt") < kinds.index(b"IDAT")
    w, h, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (w, h) == (11, 5)
    assert (depth, colour, compression, filt, interlace) == (8, 2, 0, 0, 0)


def test_crc_of_every_chunk_matches_zlib() -> None:
    rng = np.random.default_rng(3)
    data = encode_png(random_image(rng, 9, 9), text={"Title": "x", "Comment": "héllo", "Greek": "γ=1.2"})
    chunks = parse_chunks(data)
    assert len(chunks) >= 6
    for kind, body, crc in chunks:
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind


def test_idat_is_zlib_stream_of_filtered_rows() -> None:
    rng = np.random.default_rng(4)
    img = random_image(rng, 6, 4)
    chunks = parse_chunks(encode_png(img, filter_type=0))
    raw = zlib.decompress(b"".join(b for k, b, _ in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(6, 1 + 4 * 3)
    assert (rows[:, 0] == 0).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(6, 4, 3), img)


def test_text_chunks() -> None:
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    meta = {"parameters": "a photo, K-LoRA: on", "Description": "line 1\nline 2", "Greek": "γ ≥ 1"}
    data = encode_png(img, text=meta)
    assert read_png_text(data) == meta
    kinds = {k: b for k, b, _ in parse_chunks(data)}
    assert b"iTXt" in kinds  # the non-Latin-1 value
    text_bodies = [b for k, b, _ in parse_chunks(data) if k == b"tEXt"]
    assert b"parameters\0a photo, K-LoRA: on" in text_bodies


@pytest.mark.parametrize("key", ["", "x" * 80, "a\0b"])
def test_bad_text_key(key: str) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        encode_png(np.zeros((1, 1, 3), dtype=np.uint8), text={key: "v"})


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((4, 4), dtype=np.uint8),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((0, 4, 3), dtype=np.uint8),
    ],
)
def test_encode_rejects_bad_input(arr: np.ndarray) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        encode_png(arr)


def test_encode_rejects_bad_options() -> None:
    img = np.zeros((1, 1, 3), dtype=np.uint8)
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        encode_png(img, filter_type=5)
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        encode_png(img, compress_level=10)


def test_encode_accepts_non_contiguous_views() -> None:
    rng = np.random.default_rng(5)
    img = random_image(rng, 10, 12)
    view = img[::2, ::3]
    np.testing.assert_array_equal(decode_png(encode_png(view)), view)


def test_decode_rejects_corruption() -> None:
    data = bytearray(encode_png(np.full((3, 3, 3), 7, dtype=np.uint8)))
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\].*signature"):
        decode_png(b"GIF89a" + bytes(data[6:]))
    # flip one byte inside the IHDR data: its CRC no longer matches
    broken = bytearray(data)
    broken[16] ^= 0xFF
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\].*CRC"):
        decode_png(bytes(broken))
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        decode_png(bytes(data[:-12]))  # IEND cut off


def test_decode_rejects_other_formats() -> None:
    # A valid grayscale PNG (colour type 0) built by hand: not something encode_png writes.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    gray = (
        PNG_SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0\x80"))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\].*8-bit RGB"):
        decode_png(gray)


def test_cross_check_with_pillow() -> None:
    pil_image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(6)
    img = np.concatenate([random_image(rng, 20, 31), blocky_image(rng, 20, 31)])
    data = encode_png(img, text={"parameters": "hello"})
    with pil_image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.mode == "RGB"
        assert im.size == (31, 40)
        assert im.info.get("parameters") == "hello"
        np.testing.assert_array_equal(np.asarray(im), img)
    buf = io.BytesIO()
    pil_image.fromarray(img).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_png(buf.getvalue()), img)
