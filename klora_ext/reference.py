"""The authors' own selection (HVision-NKU/K-LoRA ``klora.py``, ``utils.py``), reproduced call for call.

What their code does, as read from it (docs/REFERENCE.md has the full list and what the default mode does instead):

* gamma ("average_ratio") is computed once from the two *files*: every key without "alpha" in its name, in sorted
  key order, taken two at a time as (down, up); per pair ``sum|up @ down|`` in float32; the ratio content / style per
  pair position (a zero content pair gives 0, a zero style pair divides by zero); the mean, then the mean again over
  the ratios below 3x that mean. FF and text-encoder pairs count as much as the attention pairs.
* Scores are the sums of the K = r_c * r_s largest ``|up @ down|`` in the file's dtype, no alpha/rank, recomputed on
  every call (here once: they do not change). The comparison is ``(S_c / gamma) / (S_s * scale) > 1`` -> content,
  in the dtype of the tensors.
* A global counter is bumped before every K-LoRA layer call and never reset: ``scale = alpha * (c % N) / N + beta``
  (``s*``: modulo alpha) with a constant N: 28000 in the SDXL script (560 layers x 50 steps), 11704 for Flux
  (28 steps x 418 layers that actually run).
* SD: only the UNet attention projections (to_q, to_k, to_v, to_out.0) are switched. Flux (494-layer files): the
  layers wrapped and executed; ``to_out.0``, ``ff.net.2`` and ``ff_context.net.2`` of the double blocks are attached
  where they never run and ``norm1_context.linear`` is not wrapped.

This module never imports host code. :class:`ReferenceScores` is what a :class:`~klora_ext.scoring.PairScores`
carries for the reference clocks; :func:`decide` is the per-cell comparison.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from klora_ext import keys
from klora_ext.errors import KLoraError

if TYPE_CHECKING:
    from klora_ext.lora_file import LoraFile, LoraLayer

# "reference": N = steps x switched layers (one image is one full sweep of the counter, whatever T is).
# "reference-literal": the scripts' constant N, and the counter continues from ``counter_start``.
REFERENCE_CLOCKS = ("reference", "reference-literal")
LITERAL_N = {"flux": 11704}  # inference_flux.py: 28 steps x 418 executed layers
LITERAL_N_SD = 28000  # inference_sd.py: 50 steps x 560 SDXL attention projections

# Flux modules the authors wrap AND that execute, in their call order inside a block (diffusers forward):
# double: norm1, [norm1_context], attn q/k/v, add q/k/v, [to_out.0], to_add_out, ff, [ff.net.2], ff_context,
# [ff_context.net.2]; single: norm, proj_mlp, attn q/k/v, proj_out. Double blocks run before single blocks.
# Ids are BFL paths with the fused weights split into [q]/[k]/[v]/[mlp] slices (keys.py); diffusers names map 1:1.
_FLUX_DOUBLE_CALLS = (
    ("img_mod.lin", "norm1.linear"),
    ("img_attn.qkv[q]", "attn.to_q"),
    ("img_attn.qkv[k]", "attn.to_k"),
    ("img_attn.qkv[v]", "attn.to_v"),
    ("txt_attn.qkv[q]", "attn.add_q_proj"),
    ("txt_attn.qkv[k]", "attn.add_k_proj"),
    ("txt_attn.qkv[v]", "attn.add_v_proj"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
)
_FLUX_SINGLE_CALLS = (
    ("modulation.lin", "norm.linear"),
    ("linear1[mlp]", "proj_mlp"),
    ("linear1[q]", "attn.to_q"),
    ("linear1[k]", "attn.to_k"),
    ("linear1[v]", "attn.to_v"),
    ("linear2", "proj_out"),
)
# Wrapped by their loader but never executed (or not wrapped at all): attn.to_out.0, ff.net.2, ff_context.net.2,
# norm1_context.linear of every double block.
FLUX_NOT_RUN = (
    ("img_attn.proj", "attn.to_out.0"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("txt_mod.lin", "norm1_context.linear"),
)
_FLUX_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_DOUBLE_INDEX = {name: i for i, pair in enumerate(_FLUX_DOUBLE_CALLS) for name in pair}
_SINGLE_INDEX = {name: i for i, pair in enumerate(_FLUX_SINGLE_CALLS) for name in pair}


def literal_n(arch: str) -> int:
    return LITERAL_N.get(arch, LITERAL_N_SD)


def _flux_call(layer_id: str) -> tuple[int, int, int] | None:
    """(0 double / 1 single, block, position in the block's calls) for a Flux layer the authors run; else None."""
    component, path = keys.layer_id_parts(layer_id)
    if component != "flux":
        return None
    m = _FLUX_BLOCK.match(path)
    if not m:
        return None
    single = m.group(1) in ("single_blocks", "single_transformer_blocks")
    pos = (_SINGLE_INDEX if single else _DOUBLE_INDEX).get(m.group(3))
    return None if pos is None else (int(single), int(m.group(2)), pos)


def in_authors_scope(layer_id: str) -> bool:
    """True for the layers the authors' code switches: UNet attention projections; Flux layers that execute."""
    if keys.layer_id_parts(layer_id)[0] == "flux":
        return _flux_call(layer_id) is not None
    return keys.is_attention(layer_id)


def call_order_key(layer_id: str) -> tuple:
    """The order of the authors' layer calls within one model evaluation."""
    call = _flux_call(layer_id)
    if call is not None:
        return (1, *call)
    return (0, keys.forward_order_key(layer_id))


@dataclass(frozen=True)
class ReferenceScores:
    """The numbers the authors' code compares, for one (content, style) pair of files."""

    arch: str
    layer_ids: tuple[str, ...]  # switched layers, in the authors' call order
    top_content: tuple[float, ...]  # sum of the K largest |up @ down|, exactly the value in the file's dtype
    top_style: tuple[float, ...]
    dtype_content: tuple[str, ...]  # torch dtype names ("float32", "float16", "bfloat16") per layer
    dtype_style: tuple[str, ...]
    k: tuple[int, ...]
    gamma: float | None  # their average_ratio; None when it cannot be computed (gamma_error says why)
    gamma_error: str = ""
    pairs: int = 0  # (down, up) pairs that entered gamma
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "layer_ids": list(self.layer_ids),
            "top_content": list(self.top_content),
            "top_style": list(self.top_style),
            "dtype_content": list(self.dtype_content),
            "dtype_style": list(self.dtype_style),
            "k": list(self.k),
            "gamma": self.gamma if self.gamma is None or math.isfinite(self.gamma) else repr(self.gamma),
            "gamma_error": self.gamma_error,
            "pairs": self.pairs,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceScores:
        g = data.get("gamma")
        return cls(
            arch=str(data["arch"]),
            layer_ids=tuple(data["layer_ids"]),
            top_content=tuple(float(x) for x in data["top_content"]),
            top_style=tuple(float(x) for x in data["top_style"]),
            dtype_content=tuple(data["dtype_content"]),
            dtype_style=tuple(data["dtype_style"]),
            k=tuple(int(x) for x in data["k"]),
            gamma=None if g is None else float(g),
            gamma_error=str(data.get("gamma_error", "")),
            pairs=int(data.get("pairs", 0)),
            notes=tuple(data.get("notes", ())),
        )

    def require_gamma(self) -> float:
        if self.gamma is None:
            raise KLoraError(self.gamma_error or "[K-LoRA] the authors' gamma could not be computed")
        return self.gamma


# ---------------------------------------------------------------------------------------------------------------
# gamma: the authors' average ratio over every (down, up) pair of the two files
# ---------------------------------------------------------------------------------------------------------------


def _file_tensors(lora: LoraFile) -> dict[str, torch.Tensor | None]:
    """Every key of the file -> its tensor as stored (None: a key K-LoRA did not keep).

    The file itself when it is on disk (their ``safe_open`` path); else the factors the reader kept, which is exact
    unless a key feeds several layers (a fused Flux weight split into slices): that is refused."""
    if lora.path and os.path.isfile(lora.path):
        from safetensors import safe_open

        with safe_open(lora.path, framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    out: dict[str, torch.Tensor | None] = {}
    for layer in lora.layers.values():
        for key in layer.source_keys:
            if key in out:
                msg = (
                    f"[K-LoRA] reference gamma: '{lora.name}' key {key} feeds several layers (a fused weight); "
                    "the authors' code cannot read this file (use the step clock)"
                )
                raise KLoraError(msg)
            split = keys.split_key(key)
            out[key] = layer.factors.get(split[1]) if split else None
    for key in lora.unknown_keys:
        out[key] = None
    return out


def _pair_sums(
    lora: LoraFile, tensors: dict[str, torch.Tensor | None], notes: list[str], device: str | torch.device = "cpu"
) -> list[tuple[str, float]]:
    names = sorted(k for k in tensors if "alpha" not in k)
    if len(names) % 2:
        msg = (
            f"[K-LoRA] reference gamma: '{lora.name}' has {len(names)} non-alpha keys, an odd number; the authors' "
            "code reads the keys two at a time as (down, up) and cannot pair them (use the step clock)"
        )
        raise KLoraError(msg)
    out = []
    conv: list[str] = []
    for i in range(0, len(names), 2):
        down_key, up_key = names[i], names[i + 1]
        down, up = tensors[down_key], tensors[up_key]
        if down is None or up is None:
            bad = down_key if down is None else up_key
            msg = (
                f"[K-LoRA] reference gamma: '{lora.name}' key {bad} is not a LoRA factor; the authors' code pairs "
                "every non-alpha key in sorted order and would pair this file wrongly (use the step clock)"
            )
            raise KLoraError(msg)
        up32, down32 = up.to(device=device, dtype=torch.float32), down.to(device=device, dtype=torch.float32)
        if up32.dim() != 2 or down32.dim() != 2:
            # Their `@` cannot multiply conv factors; the flattened product is the layer's delta, which is what
            # their rule means. Said in the plan notes.
            up32, down32 = up32.reshape(up32.shape[0], -1), down32.reshape(down32.shape[0], -1)
            conv.append(up_key)
        try:
            with torch.no_grad():
                product = up32 @ down32
        except RuntimeError as exc:
            msg = (
                f"[K-LoRA] reference gamma: '{lora.name}' keys {down_key} and {up_key} are paired by the authors' "
                f"sorted-key rule but do not multiply ({exc}); their code cannot read this file (use the step clock)"
            )
            raise KLoraError(msg) from exc
        out.append((up_key, torch.abs(product, out=product).sum().item()))  # in place: same values, no copy
    if conv:
        notes.append(
            f"'{lora.name}': {len(conv)} conv (4-D) pairs, e.g. {conv[0]}, enter gamma as flattened products; the "
            "authors' code stops at them (its `@` does not multiply conv factors)"
        )
    return out


def authors_gamma(
    content: LoraFile, style: LoraFile, device: str | torch.device = "cpu"
) -> tuple[float, int, list[str]]:
    """(gamma, pairs, notes): ``get_ratio_between_content_and_style`` of the reference code, on CPU.

    Raises KLoraError where their code stops (different key counts, unpairable keys, a zero style pair)."""
    tc, ts = _file_tensors(content), _file_tensors(style)
    if len(tc) != len(ts):
        msg = (
            f"[K-LoRA] reference gamma: '{content.name}' has {len(tc)} keys and '{style.name}' has {len(ts)}; the "
            "authors' code refuses files with different key counts (use the step clock, or a manual gamma)"
        )
        raise KLoraError(msg)
    notes: list[str] = []
    sums_c, sums_s = _pair_sums(content, tc, notes, device), _pair_sums(style, ts, notes, device)
    if not sums_c or len(sums_c) != len(sums_s):
        msg = (
            f"[K-LoRA] reference gamma: '{content.name}' has {len(sums_c)} (down, up) pairs and '{style.name}' "
            f"{len(sums_s)}; the authors' code needs the same non-zero number (use the step clock)"
        )
        raise KLoraError(msg)
    mismatched = [i for i, ((kc, _), (ks, _)) in enumerate(zip(sums_c, sums_s)) if kc != ks]
    if mismatched:
        i = mismatched[0]
        notes.append(
            f"gamma pairs the two files by position: {len(mismatched)} positions hold different keys "
            f"(first: {sums_c[i][0]} vs {sums_s[i][0]}), as in the authors' code"
        )
    ratios = []
    for (key_c, sc), (key_s, ss) in zip(sums_c, sums_s):
        if ss == 0.0:  # their Python division raises ZeroDivisionError here
            msg = (
                f"[K-LoRA] reference gamma: style LoRA '{style.name}' is all zeros at {key_s} (paired with "
                f"{key_c} of '{content.name}'); the authors' code divides by zero there. Use a manual gamma or the "
                "step clock"
            )
            raise KLoraError(msg)
        ratios.append(sc / ss)
    # Python's left-to-right sum, like theirs (not fsum): the last bits of gamma depend on it.
    average = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * average]
    g = sum(kept) / len(kept) if kept else float("inf")
    return g, len(ratios), notes


# ---------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------


def _key_count(lora: LoraFile) -> int:
    return len({k for layer in lora.layers.values() for k in layer.source_keys} | set(lora.unknown_keys))


def _factors(lora: LoraFile, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.kind not in ("lora", "locon") or "mid" in layer.factors:
        msg = (
            f"[K-LoRA] reference mode: '{lora.name}' layer {layer.id} is a {layer.kind} layer; the authors' code "
            "reads plain (down, up) LoRA factors only (use the step clock)"
        )
        raise KLoraError(msg)
    up, down = layer.factors["up"], layer.factors["down"]
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def _top_k_sorted(values: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.topk(values, k).values`` (sorted, largest first), taken from the entries at or above the k-th largest
    of a strided sample when that subset holds k of them: the same k values, so the same vector."""
    n = values.numel()
    stride = min(64, n // (8 * k))
    if stride > 1:
        threshold = torch.topk(values[::stride], k, sorted=False).values.min()
        subset = values[values >= threshold]
        if subset.numel() >= k:
            values = subset
    return torch.topk(values, k).values


def raw_top_sum(lora: LoraFile, layer: LoraLayer, k: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Sum of the k largest ``|up @ down|`` in the file's dtype (a 0-dim tensor of that dtype), as their
    ``get_klora_weight`` computes it."""
    up, down = (t.to(device=device) for t in _factors(lora, layer))
    if up.dtype != down.dtype:
        msg = f"[K-LoRA] reference mode: '{lora.name}' layer {layer.id} stores up and down in different dtypes"
        raise KLoraError(msg)
    with torch.no_grad():
        product = up @ down
        if k > product.numel():
            msg = f"[K-LoRA] reference mode: layer {layer.id}: K = {k} exceeds its {product.numel()} entries"
            raise KLoraError(msg)
        return _top_k_sorted(torch.abs(product, out=product).flatten(), k).sum()


def reference_scores(content: LoraFile, style: LoraFile, device: str | torch.device = "cpu") -> ReferenceScores:
    """Everything the reference clocks need for one pair. Cost: one float32 product per key pair of each file (for
    gamma) plus one file-dtype product per switched layer."""
    shared = set(content.layers) & set(style.layers)
    flux = any(keys.layer_id_parts(i)[0] == "flux" for i in shared)
    arch = "flux" if flux else (content.arch if content.arch != "unknown" else style.arch)
    scope_c = {i for i in content.layers if in_authors_scope(i)}
    scope_s = {i for i in style.layers if in_authors_scope(i)}
    ids = sorted(scope_c & scope_s, key=call_order_key)
    if not ids:
        what = "executed Flux layers" if flux else "UNet attention projections (to_q/to_k/to_v/to_out.0)"
        msg = f"[K-LoRA] reference mode: '{content.name}' and '{style.name}' share none of the {what} it switches"
        raise KLoraError(msg)
    notes = []
    missing = len(scope_c ^ scope_s)
    if missing:
        notes.append(
            f"{missing} layers of the authors' set are in one file only: their code stops there (KeyError); "
            "here they are not switched"
        )
    if flux:
        for lora in (content, style):
            n = _key_count(lora) // 2
            if n != 494:
                notes.append(
                    f"'{lora.name}': the authors' Flux loader takes only 494-layer files (this one: {n} key pairs); "
                    "their rule is applied to the layers present"
                )
    tops_c, tops_s, dc, ds, ks = [], [], [], [], []
    for layer_id in ids:
        lc, ls = content.layers[layer_id], style.layers[layer_id]
        uc, _ = _factors(content, lc)
        us, _ = _factors(style, ls)
        k = int(uc.shape[1]) * int(us.shape[1])  # weight_1_a.shape[1] * weight_2_a.shape[1]
        tc, ts = raw_top_sum(content, lc, k, device), raw_top_sum(style, ls, k, device)
        tops_c.append(float(tc))
        tops_s.append(float(ts))
        dc.append(str(tc.dtype).removeprefix("torch."))
        ds.append(str(ts.dtype).removeprefix("torch."))
        ks.append(k)
    gamma_value: float | None
    error = ""
    pairs = 0
    try:
        gamma_value, pairs, gamma_notes = authors_gamma(content, style, device)
        notes += gamma_notes
    except KLoraError as exc:  # only fatal when the plan asks for the authors' gamma (not with a manual one)
        gamma_value, error = None, str(exc)
    return ReferenceScores(
        arch=arch,
        layer_ids=tuple(ids),
        top_content=tuple(tops_c),
        top_style=tuple(tops_s),
        dtype_content=tuple(dc),
        dtype_style=tuple(ds),
        k=tuple(ks),
        gamma=gamma_value,
        gamma_error=error,
        pairs=pairs,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# the clock and the per-cell decision
# ---------------------------------------------------------------------------------------------------------------


def counter_scales(
    steps: int, n_layers: int, alpha: float, beta: float, schedule: str, n_total: int, start: int = 0
) -> list[list[float]]:
    """scale per (step, layer) call: the counter is bumped before each call (first call: start + 1), then
    ``alpha * (counter % N) / N + beta`` with Python float arithmetic in their operation order."""
    rows = []
    counter = start
    for _ in range(steps):
        row = []
        for _ in range(n_layers):
            counter += 1
            value = alpha * (counter % n_total) / n_total + beta
            row.append(value % alpha if schedule == "s*" else value)
        rows.append(row)
    return rows


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise KLoraError(f"[K-LoRA] reference mode: unsupported dtype {name!r}")
    return _DTYPES[name]


def decide(
    top_content: Sequence[float],
    top_style: Sequence[float],
    dtype_content: Sequence[str],
    dtype_style: Sequence[str],
    gamma: float,
    scales: Sequence[Sequence[float]],
) -> np.ndarray:
    """(T, L) bool, True = content: ``(S_c / gamma) / (S_s * scale) > 1`` in the tensors' dtypes, as torch computes
    it with 0-dim tensors and Python scalars. float32 pairs take an exact numpy float32 path (IEEE single ops in the
    same order); other dtypes run the torch operations cell by cell."""
    scales_arr = np.asarray(scales, dtype=np.float64)
    n = len(top_content)
    if all(d == "float32" for d in (*dtype_content, *dtype_style)):
        sc = np.asarray(top_content, dtype=np.float32)
        ss = np.asarray(top_style, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            c = sc / np.float32(gamma)  # tensor / Python float: the scalar is cast to float32 first
            s = ss[None, :] * scales_arr.astype(np.float32)
            return (c[None, :] / s) > np.float32(1)
    out = np.zeros(scales_arr.shape, dtype=bool)
    for i in range(n):
        c = torch.tensor(top_content[i], dtype=_dtype(dtype_content[i])) / gamma
        s0 = torch.tensor(top_style[i], dtype=_dtype(dtype_style[i]))
        for t in range(scales_arr.shape[0]):
            out[t, i] = bool(c / (s0 * float(scales_arr[t, i])) > 1)
    return out
