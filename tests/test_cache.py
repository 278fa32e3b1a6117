from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from klora_ext.cache import ScoreCache, pair_key
from klora_ext.errors import KLoraError
from klora_ext.lora_file import LoraFile, parse_state_dict, sha256_file
from klora_ext.synthetic import make_lora_state_dict

SHAPES = [(f"unet:input_blocks.{i}.1.transformer_blocks.0.attn1.to_q", (6, 5)) for i in (1, 2, 4)]


class CountingLoader:
    """Stands in for read_lora so the test can see whether any file was parsed: a real LoraFile whose weights are
    seeded by the file's bytes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: str, sha256: str | None = None) -> LoraFile:
        assert sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()  # the cache passes the hash on
        self.calls.append(path)
        seed = int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8], 16)
        sd = make_lora_state_dict(SHAPES, 2, seed=seed)
        return parse_state_dict(sd, name=Path(path).stem, sha256=sha256)


@pytest.fixture
def pair_files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "content.safetensors", tmp_path / "style.safetensors"
    a.write_bytes(b"content bytes")
    b.write_bytes(b"style bytes")
    return a, b


def test_second_request_does_no_scoring_work(tmp_path: Path, pair_files) -> None:
    loader = CountingLoader()
    cache = ScoreCache(tmp_path / "cache" / "scores.json")
    first, cached1 = cache.get_or_compute(*pair_files, loader=loader)
    second, cached2 = cache.get_or_compute(*pair_files, loader=loader)
    assert (cached1, cached2) == (False, True)
    assert len(loader.calls) == 2  # both files parsed once, for the first request only
    assert second == first
    assert cache.stats.files_hashed == 2  # hashes reused by (path, size, mtime)


def test_disk_cache_survives_a_restart(tmp_path: Path, pair_files) -> None:
    path = tmp_path / "scores.json"
    first, _ = ScoreCache(path).get_or_compute(*pair_files, loader=CountingLoader())
    loader = CountingLoader()
    fresh = ScoreCache(path)
    again, cached = fresh.get_or_compute(*pair_files, loader=loader)
    assert cached and loader.calls == [] and again == first
    assert fresh.stats.files_hashed == 0  # the file hashes came from disk too


def test_key_covers_options_and_file_content(tmp_path: Path, pair_files) -> None:
    loader = CountingLoader()
    cache = ScoreCache(tmp_path / "scores.json")
    cache.get_or_compute(*pair_files, loader=loader)
    _, cached = cache.get_or_compute(*pair_files, k_multiplier=2.0, loader=loader)
    assert not cached
    # same path, new content (and mtime) -> new hash -> recomputed
    pair_files[0].write_bytes(b"retrained content")
    os.utime(pair_files[0], ns=(1, 1))
    _, cached = cache.get_or_compute(*pair_files, loader=loader)
    assert not cached
    assert pair_key("a", "b", 1.0) != pair_key("b", "a", 1.0)


def test_key_covers_the_layer_mapping_and_options() -> None:
    base = pair_key("a", "b", 1.0)
    assert "reader" in base  # the host-free reader's mapping, with its version
    forge = pair_key("a", "b", 1.0, mapping="forge:flux-dev")
    assert len({base, forge, pair_key("a", "b", 1.0, mapping="a1111:sdxl")}) == 3
    assert pair_key("a", "b", 1.0, options={"x": 1, "y": 2}) == pair_key("a", "b", 1.0, options={"y": 2, "x": 1})
    assert pair_key("a", "b", 1.0, options={"x": 1}) != pair_key("a", "b", 1.0, options={"x": 2})
    assert pair_key("a", "b", 1.0, reference=True) != base


def test_adapter_compute_and_mapping_share_one_cache(tmp_path: Path, pair_files) -> None:
    loader = CountingLoader()
    cache = ScoreCache(tmp_path / "scores.json")
    reader_scores, _ = cache.get_or_compute(*pair_files, loader=loader)
    calls: list[tuple[str, str]] = []

    def host_compute(c: str, s: str, sha_c: str, sha_s: str) -> object:
        calls.append((sha_c, sha_s))
        return reader_scores

    _, cached = cache.get_or_compute(*pair_files, mapping="forge:test", compute=host_compute)
    assert not cached and len(calls) == 1  # another mapping is another entry
    _, cached = cache.get_or_compute(*pair_files, mapping="forge:test", compute=host_compute)
    assert cached and len(calls) == 1
    assert calls[0] == (sha256_file(pair_files[0]), sha256_file(pair_files[1]))


def _restat_differs(path: Path, before: os.stat_result) -> None:
    # The callers sleep before rewriting: file timestamps come from a coarse (jiffy) clock.
    after = path.stat()
    assert (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns)


def test_same_size_replacement_with_preserved_mtime_is_not_stale(tmp_path: Path, pair_files) -> None:
    content, style = pair_files
    loader = CountingLoader()
    cache = ScoreCache(tmp_path / "scores.json")
    first, _ = cache.get_or_compute(content, style, loader=loader)
    st = content.stat()
    old_sha = sha256_file(content)

    # 1. replaced by another file (new inode) of the same size, mtime set back: what `cp -p` / a sync tool does
    time.sleep(0.05)
    tmp = tmp_path / "new.tmp"
    tmp.write_bytes(b"CONTENT BYTES")  # same length as b"content bytes"
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, content)
    now = content.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)  # the old key would call it unchanged
    _restat_differs(content, st)
    hashed = cache.stats.files_hashed
    assert cache.file_hash(content) == sha256_file(content) != old_sha
    assert cache.stats.files_hashed == hashed + 1
    second, cached = cache.get_or_compute(content, style, loader=loader)
    assert not cached and second != first

    # 2. rewritten in place (same inode), same size, mtime set back: only the ctime tells
    st2 = content.stat()
    time.sleep(0.05)
    with open(content, "r+b") as fh:
        fh.write(b"c0ntent bytes")
    os.utime(content, ns=(st2.st_atime_ns, st2.st_mtime_ns))
    now = content.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st2.st_size, st2.st_mtime_ns, st2.st_ino)
    _restat_differs(content, st2)
    _, cached = cache.get_or_compute(content, style, loader=loader)
    assert not cached
    assert cache.file_hash(content) == hashlib.sha256(b"c0ntent bytes").hexdigest()

    # a fresh process reading the disk cache sees the same identities
    fresh = ScoreCache(tmp_path / "scores.json")
    assert fresh.file_hash(content) == hashlib.sha256(b"c0ntent bytes").hexdigest()
    assert fresh.stats.files_hashed == 0


def test_entry_count_and_byte_bounds(tmp_path: Path) -> None:
    path = tmp_path / "scores.json"
    cache = ScoreCache(path, max_entries=3, max_bytes=4096)
    loader = CountingLoader()
    for i in range(6):
        a, b = tmp_path / f"c{i}.safetensors", tmp_path / f"s{i}.safetensors"
        a.write_bytes(f"c{i}".encode())
        b.write_bytes(f"s{i}".encode())
        cache.get_or_compute(a, b, loader=loader)
    assert len(cache) <= 3
    assert path.stat().st_size <= 4096
    data = json.loads(path.read_text())
    assert len(data["entries"]) == len(cache)
    tiny = ScoreCache(tmp_path / "tiny.json", max_bytes=1024)
    a, b = tmp_path / "c0.safetensors", tmp_path / "s0.safetensors"
    tiny.get_or_compute(a, b, loader=loader)
    tiny.get_or_compute(tmp_path / "c1.safetensors", tmp_path / "s1.safetensors", loader=loader)
    assert len(json.loads((tmp_path / "tiny.json").read_text())["entries"]) == 1  # newest kept


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path: Path, pair_files) -> None:
    path = tmp_path / "scores.json"
    path.write_text("{not json")
    cache = ScoreCache(path)
    _, cached = cache.get_or_compute(*pair_files, loader=CountingLoader())
    assert not cached
    assert json.loads(path.read_text())["format"] == 2


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(KLoraError, match=r"\[K-LoRA\] LoRA file not found: '.*nope.safetensors'"):
        ScoreCache().file_hash(tmp_path / "nope.safetensors")


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_memory_only_cache(pair_files) -> None:
    cache = ScoreCache(None)
    cache.get_or_compute(*pair_files, loader=CountingLoader())
    assert cache.get_or_compute(*pair_files, loader=CountingLoader())[1]
