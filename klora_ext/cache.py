"""Score cache: a pair's scores are computed once, kept in memory and in a small bounded JSON file on disk.

Key: sha256 of both files' bytes + the layer mapping that produced the layers (``mapping``: "reader" for the host-free
reader, or a host adapter's own mapping id) + the options that change the numbers (K multiplier, reference numbers,
score and reader versions, any adapter options). File hashes are themselves cached by the file's identity (path, size,
mtime, inode, ctime): a file replaced by one of the same size with its mtime preserved (a copy with ``cp -p``, an
``os.utime``) still gets a new inode or ctime and is hashed again. A cached pair costs no file read at all.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klora_ext.errors import KLoraError
from klora_ext.log import logger
from klora_ext.lora_file import READER_VERSION, read_lora, sha256_file
from klora_ext.reference import ReferenceScores
from klora_ext.scoring import SCORE_VERSION, LayerScore, PairScores, ProgressFn, compute_scores

CACHE_FORMAT = 2  # 2: file-hash rows carry inode and ctime
DEFAULT_MAX_ENTRIES = 32
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MAX_HASHES = 512


def pair_key(
    sha_content: str,
    sha_style: str,
    k_multiplier: float,
    reference: bool = False,
    *,
    mapping: str = "reader",
    options: dict[str, Any] | None = None,
) -> str:
    """Cache key of a pair's scores. ``mapping``: which layer mapping produced the layers ("reader" = this package's
    reader, versioned by READER_VERSION; a host adapter passes its own id, e.g. the host and model). ``options``:
    anything else that changes the numbers (JSON-serialisable)."""
    ref = ":ref" if reference else ""  # entries with the authors' numbers (reference clocks) are kept apart
    m = f"reader{READER_VERSION}" if mapping == "reader" else mapping
    opts = f":o{json.dumps(options, sort_keys=True, separators=(',', ':'))}" if options else ""
    return f"{sha_content}:{sha_style}:k{float(k_multiplier)!r}:v{SCORE_VERSION}{ref}:m{m}{opts}"


# Rows are stored as lists (not dicts) to keep the file small: SDXL pairs have ~1700 shared layers.
_ROW_FIELDS = (
    "id",
    "score_content",
    "score_style",
    "sum_abs_content",
    "sum_abs_style",
    "rank_content",
    "rank_style",
    "k",
)


def _pack(scores: PairScores) -> dict[str, Any]:
    return {
        "rows": [[getattr(s, f) for f in _ROW_FIELDS] for s in scores.layers],
        "content_only": list(scores.content_only),
        "style_only": list(scores.style_only),
        "k_multiplier": scores.k_multiplier,
        "meta": scores.meta,
        "reference": scores.reference.to_json() if scores.reference is not None else None,
    }


def _unpack(data: dict[str, Any]) -> PairScores:
    return PairScores(
        layers=tuple(LayerScore(**dict(zip(_ROW_FIELDS, row))) for row in data["rows"]),
        content_only=tuple(data["content_only"]),
        style_only=tuple(data["style_only"]),
        k_multiplier=float(data["k_multiplier"]),
        meta=dict(data.get("meta", {})),
        reference=ReferenceScores.from_json(data["reference"]) if data.get("reference") else None,
    )


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime cannot be set from user space: any rewrite, chmod or rename-over changes it (or the inode).
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    files_hashed: int = 0


class ScoreCache:
    """LRU in memory; mirrored to ``path`` (if given) bounded by entry count and bytes. Thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.path = Path(path) if path else None
        self.max_entries = max(1, int(max_entries))
        self.max_bytes = max(1024, int(max_bytes))
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()  # key -> packed scores
        # abspath -> (size, mtime_ns, inode, ctime_ns, sha)
        self._hashes: OrderedDict[str, tuple[int, int, int, int, str]] = OrderedDict()
        self._loaded = False

    # ---- file hashes --------------------------------------------------------------------------------------------
    def file_hash(self, path: str | os.PathLike[str]) -> str:
        """sha256 of a file's bytes, reused while its identity (size, mtime, inode, ctime) is unchanged."""
        real = os.path.abspath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            msg = f"[K-LoRA] LoRA file not found: '{path}'"
            raise KLoraError(msg) from exc
        identity = _identity(st)
        with self._lock:
            self._load()
            known = self._hashes.get(real)
            if known and known[:4] == identity:
                self._hashes.move_to_end(real)
                return known[4]
        try:
            sha = sha256_file(real)
        except OSError as exc:
            msg = f"[K-LoRA] cannot read '{path}': {exc.strerror or exc}"
            raise KLoraError(msg) from exc
        with self._lock:
            self.stats.files_hashed += 1
            self._hashes[real] = (*identity, sha)
            while len(self._hashes) > MAX_HASHES:
                self._hashes.popitem(last=False)
        return sha

    # ---- scores -------------------------------------------------------------------------------------------------
    def get(self, key: str) -> PairScores | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.memory_hits += 1
                return _unpack(self._entries[key])
            # another process (or WebUI restart) may have written it
            if self._load_from_disk_entry(key):
                self.stats.disk_hits += 1
                return _unpack(self._entries[key])
        return None

    def put(self, key: str, scores: PairScores) -> None:
        with self._lock:
            self._entries[key] = _pack(scores)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self._save()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._hashes.clear()
            self._loaded = True
            if self.path and self.path.exists():
                self.path.unlink()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(
        self,
        content_path: str | os.PathLike[str],
        style_path: str | os.PathLike[str],
        *,
        k_multiplier: float = 1.0,
        device: str = "cpu",
        loader: Callable[..., Any] | None = None,
        progress: ProgressFn | None = None,
        reference: bool = False,
        mapping: str = "reader",
        options: dict[str, Any] | None = None,
        compute: Callable[[str, str, str, str], PairScores] | None = None,
    ) -> tuple[PairScores, bool]:
        """(scores, from_cache). On a hit no LoRA file is parsed and no delta is computed. ``reference``: also the
        authors' numbers for the reference clocks (compute_scores(..., reference=True)).

        ``mapping``/``options``: see :func:`pair_key`. ``compute(content_path, style_path, sha_content, sha_style)``:
        how a host adapter scores the pair with its own layer mapping (default: this package's reader + scoring)."""
        with ThreadPoolExecutor(max_workers=1) as pool:  # a new file is hashed on both cores (hashlib drops the GIL)
            style_sha = pool.submit(self.file_hash, style_path)
            sha_content = self.file_hash(content_path)
            sha_style = style_sha.result()
        key = pair_key(sha_content, sha_style, k_multiplier, reference, mapping=mapping, options=options)
        cached = self.get(key)
        if cached is not None:
            return cached, True
        self.stats.misses += 1
        started = time.perf_counter()
        if compute is not None:
            scores = compute(str(content_path), str(style_path), sha_content, sha_style)
        else:
            loader = loader or read_lora
            scores = compute_scores(
                loader(str(content_path), sha256=sha_content),
                loader(str(style_path), sha256=sha_style),
                k_multiplier=k_multiplier,
                device=device,
                progress=progress,
                reference=reference,
            )
        logger.info("scored %d shared layers in %.2f s", len(scores.layers), time.perf_counter() - started)
        self.put(key, scores)
        return scores, False

    # ---- disk ---------------------------------------------------------------------------------------------------
    def _read_file(self) -> dict[str, Any] | None:
        if not self.path or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable score cache %s (%s); it will be rewritten", self.path, exc)
            return None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return None
        return data

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        data = self._read_file()
        if not data:
            return
        for key, packed in data.get("entries", {}).items():
            self._entries[key] = packed
        for real, row in data.get("hashes", {}).items():
            if isinstance(row, list) and len(row) == 5:
                self._hashes[real] = (int(row[0]), int(row[1]), int(row[2]), int(row[3]), str(row[4]))

    def _load_from_disk_entry(self, key: str) -> bool:
        if not self._loaded:
            self._load()
            return key in self._entries
        data = self._read_file()
        if data and key in data.get("entries", {}):
            self._entries[key] = data["entries"][key]
            return True
        return False

    def _save(self) -> None:
        if not self.path:
            return
        # Drop the oldest entries until the file fits the byte budget (always keep the newest).
        while True:
            payload = {
                "format": CACHE_FORMAT,
                "entries": dict(self._entries),
                "hashes": {k: list(v) for k, v in self._hashes.items()},
            }
            text = json.dumps(payload, separators=(",", ":"))
            if len(text) <= self.max_bytes or len(self._entries) <= 1:
                break
            self._entries.popitem(last=False)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".klora-cache-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not write the score cache %s (%s); scores stay in memory only", self.path, exc)
