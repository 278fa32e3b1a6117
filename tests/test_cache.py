from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from klora_ext.cache import ScoreCache, pair_key
from klora_ext.errors import KLoraError
from klora_ext.lora_file import sha256_file

IDS = [f"unet:input_blocks.{i}.1.transformer_blocks.0.attn1.to_q" for i in (1, 2, 4)]


@dataclass
class FakeLayer:
    weight: torch.Tensor
    rank: int = 2

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def delta(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(device=device, dtype=dtype)


@dataclass
class FakeLora:
    name: str
    layers: dict = field(default_factory=dict)
    arch: str = "sd15"


class CountingLoader:
    """Stands in for read_lora so the test can see whether any file was parsed."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: str, sha256: str | None = None) -> FakeLora:
        assert sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()  # the cache passes the hash on
        self.calls.append(path)
        seed = int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        return FakeLora(Path(path).stem, {i: FakeLayer(torch.randn(6, 5, generator=gen)) for i in IDS})


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
    assert json.loads(path.read_text())["format"] == 1


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
