"""Host-neutral preparation of a run: args -> resolved LoRAs -> cached scores -> Session. No modules.* imports."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from klora_ext.args import KLoraArgs
from klora_ext.cache import ScoreCache
from klora_ext.errors import KLoraError
from klora_ext.log import logger
from klora_ext.reference import REFERENCE_CLOCKS, reference_scores
from klora_ext.runtime import Session
from klora_ext.scoring import PairScores, compute_scores, pick_score_device
from klora_ext.webui.adapter_base import HostAdapter, KLoraRun

# The cache file lives next to the extension (never inside the WebUI's own folders).
EXTENSION_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_PATH = EXTENSION_ROOT / "cache" / "scores.json"

_cache: ScoreCache | None = None
HOST_NOTES = "host_notes"  # PairScores.meta key: the host's notes on the pair (what it leaves out)


def score_cache(max_entries: int | None = None) -> ScoreCache:
    """The process-wide score cache (memory + disk)."""
    global _cache
    if _cache is None:
        path = os.environ.get("KLORA_CACHE_PATH") or DEFAULT_CACHE_PATH
        _cache = ScoreCache(path)
    if max_entries:
        _cache.max_entries = max(1, int(max_entries))
    return _cache


XYZ_ATTR = "_klora_xyz"


def args_with_overrides(script_args: list[Any] | tuple[Any, ...], p: Any) -> KLoraArgs:
    """Parse the Script's args, then apply XYZ cell values stored on ``p`` (same validation for both)."""
    args = KLoraArgs.from_script_args(list(script_args))
    overrides: Mapping[str, Any] = getattr(p, XYZ_ATTR, None) or {}
    if overrides:
        args = args.replace(**overrides)
    return args


def prepare_run(
    args: KLoraArgs, adapter: HostAdapter, p: Any, *, steps: int = 20, seed: int = 0, progress=None
) -> KLoraRun:
    """Resolve, score (cached), and build the run. Raises KLoraError with the user's message on bad input."""
    args.check_runnable()
    content = adapter.resolve(args.content)
    style = adapter.resolve(args.style)
    if os.path.abspath(content.path) == os.path.abspath(style.path):
        msg = f"[K-LoRA] '{args.content}' and '{args.style}' are the same file; pick two different LoRAs"
        raise KLoraError(msg)
    reference = args.clock in REFERENCE_CLOCKS
    device = adapter.score_device()
    host = adapter.host_layers(p, content, style)  # the host's own layer set (None: the host-free reader's)
    compute = None
    if host is not None:

        def compute(*_: Any) -> PairScores:
            content_file, style_file = host.load()
            raw = reference and host.raw_files is not None
            scores = compute_scores(
                content_file,
                style_file,
                k_multiplier=args.k_multiplier,
                device=device,
                progress=progress,
                reference=reference and not raw,
            )
            if raw:
                scores = replace(scores, reference=reference_scores(*host.raw_files(), pick_score_device(device)))
            # what the host leaves out: a property of (files, mapping), so cached with the scores
            notes = list(dict.fromkeys([*content_file.warnings, *style_file.warnings]))
            return replace(scores, meta={**scores.meta, HOST_NOTES: notes})

    scores, cached = score_cache().get_or_compute(
        content.path,
        style.path,
        k_multiplier=args.k_multiplier,
        device=device,
        progress=progress,
        reference=reference,
        mapping=host.mapping if host is not None else "reader",
        compute=compute,
    )
    session = Session(args, scores, seed=seed)
    # Build the first pass's plan now: errors (e.g. nothing in scope) must surface here, not inside a callback.
    session.plan_for_pass(max(int(steps), 1))
    run = KLoraRun(args=args, session=session, content=content, style=style, owner=p, from_cache=cached)
    for note in scores.meta.get(HOST_NOTES, ()):
        logger.info(note)
        run.notes.append(str(note))
    return run
