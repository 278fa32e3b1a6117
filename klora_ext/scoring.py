"""Top-K scores per shared layer and the balance factor gamma (paper Eq. 5, 9; reference code's average ratio)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from klora_ext import keys
from klora_ext.errors import KLoraError

if TYPE_CHECKING:
    from klora_ext.lora_file import LoraFile
    from klora_ext.reference import ReferenceScores

# Bump when the numbers a cache entry holds would change for the same files.
SCORE_VERSION = 1

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LayerScore:
    id: str
    score_content: float  # S_c: sum of the K largest |dW_c| (per unit strength, alpha/rank applied)
    score_style: float
    sum_abs_content: float  # sum |dW_c| over the whole layer (for gamma)
    sum_abs_style: float
    rank_content: int
    rank_style: int
    k: int


@dataclass(frozen=True)
class PairScores:
    layers: tuple[LayerScore, ...]  # shared layers, in forward order
    content_only: tuple[str, ...] = ()
    style_only: tuple[str, ...] = ()
    k_multiplier: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    # The authors' numbers for the reference clocks (compute_scores(..., reference=True)); None otherwise.
    reference: ReferenceScores | None = None

    def by_id(self) -> dict[str, LayerScore]:
        return {s.id: s for s in self.layers}

    def in_scope(self, scope: str) -> tuple[LayerScore, ...]:
        """Layers K-LoRA switches: UNet/Flux layers both LoRAs patch; `attention` keeps only to_q/k/v/out.0."""
        switchable = [s for s in self.layers if not s.id.startswith(("te1:", "te2:"))]
        if scope == "attention":
            switchable = [s for s in switchable if keys.is_attention(s.id)]
        return tuple(switchable)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCORE_VERSION,
            "k_multiplier": self.k_multiplier,
            "layers": [asdict(s) for s in self.layers],
            "content_only": list(self.content_only),
            "style_only": list(self.style_only),
            "meta": self.meta,
            "reference": self.reference.to_json() if self.reference is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairScores:
        return cls(
            layers=tuple(LayerScore(**d) for d in data["layers"]),
            content_only=tuple(data.get("content_only", ())),
            style_only=tuple(data.get("style_only", ())),
            k_multiplier=float(data.get("k_multiplier", 1.0)),
            meta=dict(data.get("meta", {})),
            reference=_reference_from_json(data.get("reference")),
        )


def _reference_from_json(data: dict[str, Any] | None) -> ReferenceScores | None:
    if not data:
        return None
    from klora_ext.reference import ReferenceScores

    return ReferenceScores.from_json(data)


def top_k(rank_content: int, rank_style: int, numel: int, k_multiplier: float = 1.0) -> int:
    """K = r_c * r_s (paper Sec. 3.2) times the user's multiplier, clamped to [1, numel]."""
    k = round(rank_content * rank_style * k_multiplier)
    return max(1, min(int(k), numel))


def top_k_sum(values: torch.Tensor, k: int) -> float:
    """Exact sum of the k largest entries of a 1-D tensor.

    A strided sample's k-th largest value t has at least k entries >= t in the full tensor, so the k largest all
    lie in {x >= t}: top-k then runs on that small subset (about 8x faster than a full top-k on 10M entries).
    """
    n = values.numel()
    stride = min(64, n // (8 * k))
    if stride > 1:
        threshold = torch.topk(values[::stride], k, sorted=False).values.min()
        subset = values[values >= threshold]
        if subset.numel() >= k:  # fewer only with NaNs; the caller reports those
            values = subset
    return float(torch.topk(values, k, sorted=False).values.double().sum())


def layer_score(delta: torch.Tensor, k: int) -> tuple[float, float]:
    """(sum of the k largest |delta|, sum |delta|)."""
    flat = delta.detach().reshape(-1).abs()
    return top_k_sum(flat, k), float(flat.sum())


def compute_scores(
    content: LoraFile,
    style: LoraFile,
    *,
    k_multiplier: float = 1.0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    reference: bool = False,
) -> PairScores:
    """Score every layer both files patch. One layer's dense deltas exist at a time (bounded memory); fp32 math.
    ``reference``: also compute the authors' numbers for the reference clocks (PairScores.reference)."""
    shared = sorted(set(content.layers) & set(style.layers), key=keys.forward_order_key)
    if not shared:
        msg = (
            f"[K-LoRA] '{content.name}' and '{style.name}' patch no common layer (detected: {content.arch}, "
            f"{style.arch}): K-LoRA needs two LoRAs that train the same layers of the same base model"
        )
        raise KLoraError(msg)
    scores = []
    with torch.no_grad():
        for index, layer_id in enumerate(shared):
            if progress is not None:
                progress(index, len(shared), layer_id)
            lc, ls = content.layers[layer_id], style.layers[layer_id]
            if tuple(lc.shape) != tuple(ls.shape):
                msg = (
                    f"[K-LoRA] layer {layer_id}: '{content.name}' has shape {tuple(lc.shape)} but '{style.name}' "
                    f"has {tuple(ls.shape)}; the two LoRAs were trained for different models"
                )
                raise KLoraError(msg)
            numel = math.prod(lc.shape)
            k = top_k(lc.rank, ls.rank, numel, k_multiplier)
            sc, ac = _checked_score(content, layer_id, k, device)
            ss, as_ = _checked_score(style, layer_id, k, device)
            scores.append(LayerScore(layer_id, sc, ss, ac, as_, lc.rank, ls.rank, k))
    if progress is not None:
        progress(len(shared), len(shared), "")
    _check_not_all_zero(content, [s.sum_abs_content for s in scores])
    _check_not_all_zero(style, [s.sum_abs_style for s in scores])
    pair = PairScores(
        layers=tuple(scores),
        content_only=tuple(sorted(set(content.layers) - set(style.layers), key=keys.forward_order_key)),
        style_only=tuple(sorted(set(style.layers) - set(content.layers), key=keys.forward_order_key)),
        k_multiplier=k_multiplier,
        meta={"content": content.name, "style": style.name},
    )
    if reference:
        from klora_ext.reference import reference_scores

        pair = replace(pair, reference=reference_scores(content, style, device))
    return pair


def _checked_score(lora: LoraFile, layer_id: str, k: int, device: str | torch.device) -> tuple[float, float]:
    top, total = layer_score(lora.layers[layer_id].delta(device=device, dtype=torch.float32), k)
    # a non-finite sum means a NaN/Inf element (or an overflowing product): cheaper than a separate isfinite pass
    if not (math.isfinite(total) and math.isfinite(top)):
        msg = f"[K-LoRA] '{lora.name}' has NaN/Inf weights at layer {layer_id}; the file is damaged"
        raise KLoraError(msg)
    return top, total


def _check_not_all_zero(lora: LoraFile, sums: Iterable[float]) -> None:
    if not any(s > 0 for s in sums):
        msg = f"[K-LoRA] '{lora.name}' is all zeros on the layers it shares with the other LoRA; nothing to fuse"
        raise KLoraError(msg)


def gamma(
    layers: Iterable[LayerScore], mode: str, manual: float | None = None, reference: ReferenceScores | None = None
) -> float:
    """Balance between LoRAs of different origin.

    * ``auto-sum`` (paper Eq. 9): sum over layers of sum|dW_c| divided by the same for style.
    * ``auto-mean`` (the code's rule): mean of the per-layer ratios, then the mean again without the ratios that are
      at least 3x the first mean (outliers). Default mode: over ``layers`` (the layers in scope), leaving out layers
      where either delta is all zero. With ``reference`` (the reference clocks): the authors' own number, over every
      (down, up) key pair of both files (FF and text encoder included, a zero content pair counting as 0).
    * ``manual``: the user's number.
    """
    layers = list(layers)
    if mode == "auto-mean" and reference is not None:
        return reference.require_gamma()
    if mode == "manual":
        if manual is None or not manual > 0:
            msg = f"[K-LoRA] manual gamma must be > 0, got {manual!r}"
            raise KLoraError(msg)
        return float(manual)
    usable = [s for s in layers if s.sum_abs_content > 0 and s.sum_abs_style > 0]
    if not usable:
        msg = "[K-LoRA] no layer in scope where both LoRAs are non-zero; cannot compute gamma (use a manual gamma)"
        raise KLoraError(msg)
    if mode == "auto-sum":
        return math.fsum(s.sum_abs_content for s in usable) / math.fsum(s.sum_abs_style for s in usable)
    if mode == "auto-mean":
        ratios = [s.sum_abs_content / s.sum_abs_style for s in usable]
        first = math.fsum(ratios) / len(ratios)
        kept = [r for r in ratios if r < 3 * first]
        return math.fsum(kept) / len(kept)
    msg = f"[K-LoRA] unknown gamma mode {mode!r}"
    raise KLoraError(msg)
