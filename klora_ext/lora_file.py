"""Read LoRA .safetensors files into normalized layers with lazily computed dense deltas.

Formats: LoRA / LoCon (``lora_down``/``lora_up``/``alpha``, CP ``lora_mid``), diffusers / PEFT (``lora_A``/``lora_B``,
``lora.down``/``lora.up``, ``lora_linear_layer``), LyCORIS LoHa (``hada_*``) and LoKr (``lokr_*``), full ``diff``.
Scale semantics follow the hosts (A1111 builtin Lora, Forge): ``scale`` key if present, else ``alpha / dim`` where
dim is ``lora_down.shape[0]`` (LoRA), ``hada_w1_b.shape[0]`` (LoHa), the rank of the factored LoKr half (``w2_b``
before ``w1_b``; no alpha scaling when both halves are full), else 1.0.

Only the factors stay in memory; a layer's dense delta is built in fp32 on demand (``LoraLayer.delta``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from klora_ext import keys
from klora_ext.errors import KLoraError
from klora_ext.log import logger

KINDS = ("lora", "locon", "loha", "lokr", "full")
_PICKLE_EXTS = (".pt", ".ckpt", ".bin", ".pth", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_LORA_PARTS = frozenset({"down", "up", "mid"})
_LOHA_PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
_LOKR_PARTS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
_FULL_PARTS = frozenset({"diff"})
_SCALAR_PARTS = frozenset({"alpha", "scale"})
_FAMILIES = (("lora", _LORA_PARTS), ("loha", _LOHA_PARTS), ("lokr", _LOKR_PARTS), ("full", _FULL_PARTS))


@dataclass
class LoraLayer:
    """One patched module of a LoRA file."""

    id: str  # normalized layer id (see keys.py)
    kind: str  # "lora" | "locon" | "loha" | "lokr" | "full"
    rank: int  # the factor dimension (LoRA: down.shape[0]; LoHa: w1_b.shape[0]; LoKr: w2_b/w1_b dim or min(shape))
    shape: tuple[int, ...]  # delta shape, same as the target weight ((out, in) or (out, in, kh, kw))
    scale: float  # alpha / rank (1.0 when there is no alpha)
    source_keys: tuple[str, ...]
    # The file's factor tensors in their stored dtype, by canonical part name ("down", "up", "hada_w1_a", ...).
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def delta(self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense delta per unit strength (scale applied), computed in fp32 from the stored factors."""
        f = {name: t.to(device=device, dtype=torch.float32) for name, t in self.factors.items()}
        with torch.no_grad():
            if self.kind in ("lora", "locon"):
                d = _lora_delta(f, self.shape)
            elif self.kind == "loha":
                d = _half(f["hada_w1_a"], f["hada_w1_b"], f.get("hada_t1")).reshape(self.shape)
                d = d * _half(f["hada_w2_a"], f["hada_w2_b"], f.get("hada_t2")).reshape(self.shape)
            elif self.kind == "lokr":
                d = _lokr_delta(f, self.shape)
            else:
                d = f["diff"].reshape(self.shape)
            if self.scale != 1.0:
                d = d * self.scale
        return d.to(dtype)

    def low_rank(
        self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) with ``up @ down == delta.reshape(out, -1)`` (scale folded into ``up``), for plain LoRA/LoCon
        layers; None for forms without such a factorisation (CP ``mid``, LoHa, LoKr, full). Lets hosts apply a
        delta with one fused ``addmm`` instead of materialising it first."""
        if self.kind not in ("lora", "locon") or "mid" in self.factors:
            return None
        up = _mat(self.factors["up"]).to(device=device, dtype=dtype) * self.scale
        down = _mat(self.factors["down"]).to(device=device, dtype=dtype)
        return up, down


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS Tucker/CP form: t (R, R', kh, kw), wa (R, out), wb (R', in) -> (out, in, kh, kw).
    return torch.einsum("ijkl,io,jn->onkl", t, _mat(wa), _mat(wb))


def _half(wa: torch.Tensor, wb: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    return _cp(t, wa, wb) if t is not None else _mat(wa) @ _mat(wb)


def _lora_delta(f: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    up, down = _mat(f["up"]), _mat(f["down"])
    mid = f.get("mid")
    if mid is not None:
        # up (out, r), mid (r, r', kh, kw), down (r', in) -> (out, in, kh, kw)
        return torch.einsum("nmkl,in,mj->ijkl", mid, up, down).reshape(shape)
    return (up @ down).reshape(shape)


def _lokr_w1(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return f["lokr_w1"] if "lokr_w1" in f else _mat(f["lokr_w1_a"]) @ _mat(f["lokr_w1_b"])


def _lokr_w2(f: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_w2" in f:
        return f["lokr_w2"]
    return _half(f["lokr_w2_a"], f["lokr_w2_b"], f.get("lokr_t2"))


def _lokr_delta(f: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    w1, w2 = _lokr_w1(f), _lokr_w2(f)
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape[:2], 1, 1)
    else:
        w2 = _mat(w2)
    # kron of (a, c) with (b, d*kh*kw) lays columns out exactly like the 4-D kron, so a reshape suffices.
    return torch.kron(w1, w2.contiguous()).reshape(shape)


@dataclass
class LoraFile:
    """A parsed LoRA file: layers by normalized id, plus what was not understood."""

    path: str | None
    name: str
    sha256: str  # hex digest of the file bytes ("" for in-memory state dicts)
    arch: str  # "sd15" | "sdxl" | "flux" | "unknown"
    layers: dict[str, LoraLayer]
    unknown_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # user-facing notes (also logged)

    def describe_unknown(self, limit: int = 3) -> str:
        """``"N unknown keys, e.g. a, b, c"`` ("" when every key was understood)."""
        n = len(self.unknown_keys)
        if n == 0:
            return ""
        sample = ", ".join(self.unknown_keys[:limit])
        return f"{n} unknown key{'s' if n != 1 else ''}, e.g. {sample}"

    def kinds(self) -> dict[str, int]:
        """Layer count per kind, e.g. {"lora": 700, "locon": 22}."""
        out: dict[str, int] = {}
        for layer in self.layers.values():
            out[layer.kind] = out.get(layer.kind, 0) + 1
        return out


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, object], dict[str, str]]:
    """(tensor table, metadata) from a safetensors header; KLoraError if the file is not a valid safetensors file."""
    p = os.fspath(path)
    size = os.path.getsize(p)
    bad = f"[K-LoRA] {p}: not a safetensors file (corrupt or truncated header)"
    try:
        with open(p, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise KLoraError(bad)
            (n,) = struct.unpack("<Q", raw_len)
            if n < 2 or n > _MAX_HEADER or n > size - 8:
                raise KLoraError(bad)
            header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KLoraError(bad) from exc
    except OSError as exc:
        raise KLoraError(f"[K-LoRA] {p}: cannot read the file ({exc})") from exc
    if not isinstance(header, dict):
        raise KLoraError(bad)
    raw_meta = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or "shape" not in entry or "data_offsets" not in entry:
            raise KLoraError(f"[K-LoRA] {p}: not a safetensors file (bad header entry for key '{key}')")
    return header, metadata


def read_lora(path: str | os.PathLike[str], *, name: str | None = None, sha256: str | None = None) -> LoraFile:
    """Read a LoRA .safetensors file. ``sha256``: a known digest of the file (skips hashing it again)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise KLoraError(f"[K-LoRA] LoRA file not found: {p}")
    if os.path.isdir(p):
        raise KLoraError(f"[K-LoRA] {p} is a folder, not a LoRA file")
    ext = os.path.splitext(p)[1].lower()
    if ext in _PICKLE_EXTS:
        raise KLoraError(
            f"[K-LoRA] {p}: '{ext}' files are not supported; K-LoRA reads .safetensors LoRA files only "
            "(convert the file to .safetensors)"
        )
    _, metadata = read_header(p)
    digest = sha256 if sha256 is not None else sha256_file(p)
    try:
        from safetensors.torch import load_file

        sd = load_file(p, device="cpu")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise KLoraError(f"[K-LoRA] {p}: could not read the tensors ({exc})") from exc
    stem = os.path.splitext(os.path.basename(p))[0]
    return parse_state_dict(sd, name=name or stem, path=p, sha256=digest, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# Parsing state dicts
# ---------------------------------------------------------------------------------------------------------------


def parse_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    name: str = "<memory>",
    path: str | None = None,
    sha256: str = "",
    metadata: Mapping[str, str] | None = None,
    arch: str | None = None,
) -> LoraFile:
    """Group a LoRA state dict by layer and validate it. ``arch``: force the architecture instead of detecting it."""
    where = path or name
    shapes = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    found_arch = arch or keys.detect_arch(sd.keys(), shapes)

    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = {}
    for key, tensor in sd.items():
        split = keys.split_key(key)
        layer_id = keys.normalize_key(split[0], found_arch) if split else None
        if split is None or layer_id is None or not isinstance(tensor, torch.Tensor):
            unknown.append(key)
            continue
        part = split[1]
        if part in keys.UNSUPPORTED_PARTS:
            unknown.append(key)
            unsupported.setdefault(part, []).append(key)
            continue
        slot = groups.setdefault(layer_id, {})
        if part in slot:
            raise KLoraError(
                f"[K-LoRA] {where}: keys '{slot[part][0]}' and '{key}' both give the {part} factor of layer "
                f"{layer_id}; the file mixes key styles for the same module"
            )
        slot[part] = (key, tensor)

    layers: dict[str, LoraLayer] = {}
    for layer_id, parts in groups.items():
        if not (set(parts) - _SCALAR_PARTS):
            unknown.extend(k for k, _ in parts.values())  # an alpha with no factors
            continue
        layers[layer_id] = _build_layer(layer_id, parts, where, found_arch)

    if not layers:
        sample = ", ".join(list(sd.keys())[:3]) or "no keys"
        raise KLoraError(
            f"[K-LoRA] {where}: no LoRA layers recognised ({len(sd)} keys, e.g. {sample}); "
            "is this a LoRA/LyCORIS file?"
        )

    warnings: list[str] = []
    if "dora_scale" in unsupported or "lora_magnitude_vector" in unsupported:
        n = len(unsupported.get("dora_scale", [])) + len(unsupported.get("lora_magnitude_vector", []))
        warnings.append(f"{where}: DoRA magnitudes on {n} layers are not modelled; scores use the plain LoRA delta")
    others = [i for i in layers if i.startswith("other:")]
    if others:
        warnings.append(
            f"{where}: {len(others)} layers have module paths K-LoRA does not know (e.g. {others[0]}); "
            "hosts may not map them"
        )
    lora = LoraFile(
        path=path,
        name=name,
        sha256=sha256,
        arch=found_arch,
        layers=dict(sorted(layers.items(), key=lambda kv: keys.forward_order_key(kv[0]))),
        unknown_keys=unknown,
        metadata=dict(metadata or {}),
    )
    if unknown:
        warnings.append(f"{where}: {lora.describe_unknown()} (not used)")
    lora.warnings.extend(warnings)
    for w in warnings:
        logger.warning(w)
    return lora


def _fail(where: str, layer_id: str, msg: str, parts: Mapping[str, tuple[str, torch.Tensor]]) -> KLoraError:
    key = next(iter(parts.values()))[0]
    return KLoraError(f"[K-LoRA] {where}: layer {layer_id} (key {key}): {msg}")


def _build_layer(layer_id: str, parts: Mapping[str, tuple[str, torch.Tensor]], where: str, arch: str) -> LoraLayer:
    names = set(parts) - _SCALAR_PARTS
    families = [fam for fam, members in _FAMILIES if names & members]
    if len(families) != 1:
        raise _fail(where, layer_id, f"mixes factor types ({', '.join(sorted(names))})", parts)
    family = families[0]
    t = {p: v for p, (_, v) in parts.items()}

    for part, (key, tensor) in parts.items():
        if not tensor.is_floating_point():
            raise KLoraError(f"[K-LoRA] {where}: layer {layer_id}: key {key} is not a float tensor ({tensor.dtype})")
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise KLoraError(f"[K-LoRA] {where}: layer {layer_id}: key {key} contains NaN/Inf values")
        if part in _SCALAR_PARTS and tensor.numel() != 1:
            raise KLoraError(
                f"[K-LoRA] {where}: layer {layer_id}: key {key} should be a single number, has shape "
                f"{tuple(tensor.shape)}"
            )

    if family == "lora":
        kind, rank, shape, dim = _check_lora(layer_id, t, parts, where)
    elif family == "loha":
        kind, rank, shape, dim = _check_loha(layer_id, t, parts, where)
    elif family == "lokr":
        kind, rank, shape, dim = _check_lokr(layer_id, t, parts, where)
    else:
        diff = t["diff"]
        if diff.dim() not in (2, 4):
            raise _fail(where, layer_id, f"diff must be 2-D or 4-D, has shape {tuple(diff.shape)}", parts)
        kind, shape, dim = "full", tuple(diff.shape), None
        rank = min(shape[0], math.prod(shape[1:]))

    shape = _canonical_shape(layer_id, arch, shape)
    if kind == "lora" and len(shape) == 4:
        kind = "locon"
    if kind == "locon" and len(shape) == 2:
        kind = "lora"

    if "scale" in t:
        scale = float(t["scale"].float().item())
    elif "alpha" in t and dim is not None:
        alpha = float(t["alpha"].float().item())
        scale = alpha / dim
        if alpha == 0.0:
            logger.debug("%s: layer %s has alpha 0; like the hosts, its delta is zero", where, layer_id)
    else:
        scale = 1.0

    factors = {p: v for p, v in t.items() if p not in _SCALAR_PARTS}
    return LoraLayer(
        id=layer_id,
        kind=kind,
        rank=int(rank),
        shape=tuple(int(s) for s in shape),
        scale=scale,
        source_keys=tuple(k for k, _ in parts.values()),
        factors=factors,
    )


def _canonical_shape(layer_id: str, arch: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # Give flattened/1x1 factor shapes the target's own shape, so files of any format agree on a layer's shape.
    k = keys.conv_kernel(layer_id, arch)
    if k == 0 and len(shape) == 4 and shape[2:] == (1, 1):
        return shape[:2]
    if k in (1, 3) and len(shape) == 2 and shape[1] % (k * k) == 0:
        return (shape[0], shape[1] // (k * k), k, k)
    return shape


def _check_rank(where: str, layer_id: str, rank: int, parts: Mapping[str, tuple[str, torch.Tensor]]) -> None:
    if rank <= 0:
        raise _fail(where, layer_id, "rank 0 (empty factors)", parts)


def _require(
    where: str,
    layer_id: str,
    t: Mapping[str, torch.Tensor],
    need: tuple[str, ...],
    label: str,
    parts: Mapping[str, tuple[str, torch.Tensor]],
) -> None:
    missing = [n for n in need if n not in t]
    if missing:
        have = ", ".join(sorted(set(t) - _SCALAR_PARTS))
        raise _fail(where, layer_id, f"{label} is incomplete: has {have} but no {', '.join(missing)}", parts)


def _ndim(
    where: str,
    layer_id: str,
    name: str,
    tensor: torch.Tensor,
    allowed: tuple[int, ...],
    parts: Mapping[str, tuple[str, torch.Tensor]],
) -> None:
    if tensor.dim() not in allowed:
        dims = " or ".join(f"{d}-D" for d in allowed)
        raise _fail(where, layer_id, f"{name} must be {dims}, has shape {tuple(tensor.shape)}", parts)


def _check_lora(
    layer_id: str, t: Mapping[str, torch.Tensor], parts: Mapping[str, tuple[str, torch.Tensor]], where: str
) -> tuple[str, int, tuple[int, ...], int | None]:
    if "down" in t and "up" not in t:
        raise _fail(where, layer_id, "has a down (lora_down / lora_A) factor but no up (lora_up / lora_B)", parts)
    if "up" in t and "down" not in t:
        raise _fail(where, layer_id, "has an up (lora_up / lora_B) factor but no down (lora_down / lora_A)", parts)
    _require(where, layer_id, t, ("down", "up"), "LoRA layer", parts)
    down, up, mid = t["down"], t["up"], t.get("mid")
    _ndim(where, layer_id, "down", down, (2, 4), parts)
    _ndim(where, layer_id, "up", up, (2, 4), parts)
    rank = down.shape[0]
    _check_rank(where, layer_id, min(rank, up.shape[1]), parts)
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise _fail(where, layer_id, f"conv up factor must be 1x1, has shape {tuple(up.shape)}", parts)
    if mid is None:
        if up.shape[1] != rank:
            raise _fail(where, layer_id, f"rank mismatch: down has rank {rank} but up has rank {up.shape[1]}", parts)
        shape = (up.shape[0], *down.shape[1:])
    else:
        _ndim(where, layer_id, "mid", mid, (4,), parts)
        if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
            raise _fail(where, layer_id, f"CP down factor must be 1x1, has shape {tuple(down.shape)}", parts)
        if mid.shape[0] != up.shape[1] or mid.shape[1] != rank:
            raise _fail(
                where,
                layer_id,
                f"rank mismatch: up {tuple(up.shape)}, mid {tuple(mid.shape)}, down {tuple(down.shape)}",
                parts,
            )
        shape = (up.shape[0], down.shape[1], *mid.shape[2:])
    return ("locon" if len(shape) == 4 else "lora"), rank, tuple(shape), rank


def _half_shape(
    layer_id: str,
    a: torch.Tensor,
    b: torch.Tensor,
    tt: torch.Tensor | None,
    names: tuple[str, str, str],
    parts: Mapping[str, tuple[str, torch.Tensor]],
    where: str,
) -> tuple[tuple[int, ...], int]:
    """Shape and rank of one product half (a @ b, or the CP form with tt)."""
    na, nb, nt = names
    _ndim(where, layer_id, na, a, (2,), parts)
    _ndim(where, layer_id, nb, b, (2, 4), parts)
    if tt is None:
        if a.shape[1] != b.shape[0]:
            raise _fail(
                where, layer_id, f"rank mismatch: {na} has rank {a.shape[1]} but {nb} has rank {b.shape[0]}", parts
            )
        _check_rank(where, layer_id, b.shape[0], parts)
        return (a.shape[0], *b.shape[1:]), b.shape[0]
    _ndim(where, layer_id, nt, tt, (4,), parts)
    _ndim(where, layer_id, nb, b, (2,), parts)
    if tt.shape[0] != a.shape[0] or tt.shape[1] != b.shape[0]:
        raise _fail(
            where,
            layer_id,
            f"rank mismatch: {nt} {tuple(tt.shape)}, {na} {tuple(a.shape)}, {nb} {tuple(b.shape)}",
            parts,
        )
    _check_rank(where, layer_id, b.shape[0], parts)
    return (a.shape[1], b.shape[1], *tt.shape[2:]), b.shape[0]


def _check_loha(
    layer_id: str, t: Mapping[str, torch.Tensor], parts: Mapping[str, tuple[str, torch.Tensor]], where: str
) -> tuple[str, int, tuple[int, ...], int | None]:
    _require(where, layer_id, t, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa layer", parts)
    s1, r1 = _half_shape(
        layer_id,
        t["hada_w1_a"],
        t["hada_w1_b"],
        t.get("hada_t1"),
        ("hada_w1_a", "hada_w1_b", "hada_t1"),
        parts,
        where,
    )
    s2, _ = _half_shape(
        layer_id,
        t["hada_w2_a"],
        t["hada_w2_b"],
        t.get("hada_t2"),
        ("hada_w2_a", "hada_w2_b", "hada_t2"),
        parts,
        where,
    )
    if s1[0] != s2[0] or math.prod(s1[1:]) != math.prod(s2[1:]):
        raise _fail(where, layer_id, f"LoHa halves disagree on the shape: {s1} vs {s2}", parts)
    shape = s1 if len(s1) >= len(s2) else s2
    return "loha", r1, tuple(shape), r1


def _check_lokr(
    layer_id: str, t: Mapping[str, torch.Tensor], parts: Mapping[str, tuple[str, torch.Tensor]], where: str
) -> tuple[str, int, tuple[int, ...], int | None]:
    dim: int | None = None
    if "lokr_w1" in t:
        _ndim(where, layer_id, "lokr_w1", t["lokr_w1"], (2,), parts)
        w1_shape = tuple(t["lokr_w1"].shape)
    else:
        _require(where, layer_id, t, ("lokr_w1_a", "lokr_w1_b"), "LoKr layer (w1)", parts)
        w1_shape, dim = _half_shape(
            layer_id, t["lokr_w1_a"], t["lokr_w1_b"], None, ("lokr_w1_a", "lokr_w1_b", ""), parts, where
        )
    if "lokr_w2" in t:
        _ndim(where, layer_id, "lokr_w2", t["lokr_w2"], (2, 4), parts)
        w2_shape = tuple(t["lokr_w2"].shape)
    else:
        _require(where, layer_id, t, ("lokr_w2_a", "lokr_w2_b"), "LoKr layer (w2)", parts)
        # The w2 rank wins over the w1 rank (what both hosts use as the alpha divisor).
        w2_shape, dim = _half_shape(
            layer_id,
            t["lokr_w2_a"],
            t["lokr_w2_b"],
            t.get("lokr_t2"),
            ("lokr_w2_a", "lokr_w2_b", "lokr_t2"),
            parts,
            where,
        )
    if len(w1_shape) != 2:
        raise _fail(where, layer_id, f"w1 must be 2-D, has shape {w1_shape}", parts)
    if len(w2_shape) == 4:
        shape: tuple[int, ...] = (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1], *w2_shape[2:])
    else:
        shape = (w1_shape[0] * w2_shape[0], w1_shape[1] * math.prod(w2_shape[1:]))
    rank = dim if dim is not None else min(shape[0], math.prod(shape[1:]))
    _check_rank(where, layer_id, rank, parts)
    return "lokr", rank, shape, dim
