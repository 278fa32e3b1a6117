"""Read LoRA .safetensors files into normalized layers with lazily computed dense deltas.

Formats: LoRA / LoCon (``lora_down``/``lora_up``/``alpha``, CP ``lora_mid``), diffusers / PEFT (``lora_A``/``lora_B``,
``lora.down``/``lora.up``, ``lora_linear_layer``), LyCORIS LoHa (``hada_*``) and LoKr (``lokr_*``), full ``diff``,
DoRA (``dora_scale`` / PEFT ``lora_magnitude_vector`` on any of those), and the static kinds (never switched):
(IA)3 (``weight`` + ``on_input``), GLoRA (``a1/a2/b1/b2``), norm (``w_norm``/``b_norm``) and bias deltas (``diff_b``).
Scale semantics follow the hosts (A1111 builtin Lora, Forge): ``scale`` key if present, else ``alpha / dim`` where
dim is ``lora_down.shape[0]`` (LoRA), ``hada_w1_b.shape[0]`` (LoHa), the rank of the factored LoKr half (``w2_b``
before ``w1_b``; no alpha scaling when both halves are full), else 1.0. Alpha may be stored as an integer tensor
(hosts read it with ``.item()``); factors may be fp32/fp16/bf16/fp8 (``float8_e4m3fn``, ``float8_e5m2``).

Flux files get BFL ids with fused weights split into row slices (see ``keys``): a kohya/BFL ``qkv``/``linear1``
layer becomes ``[q]``/``[k]``/``[v]``(/``[mlp]``) layers whose deltas are the rows of the fused delta; a LoRA slice
keeps only the factor columns that are non-zero in its rows, so its rank is what a diffusers file of the same weights
has (r for a shared-down fused file, r per slice for a block-diagonal one) and K = r_c * r_s agrees.

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

KINDS = ("lora", "locon", "loha", "lokr", "full")  # switchable kinds
STATIC_KINDS = ("ia3", "glora", "norm", "bias")  # read and reported, never switched
# Bump when the layers/ranks/deltas read from the same file change (part of the score-cache key).
READER_VERSION = 2
# Numerical rank of full/diff layers: singular values above rtol * sigma_max count, rtol = the larger of RANK_RTOL and
# half the machine epsilon of the stored dtype (fp32/fp16 1e-3, bf16 3.9e-3, fp8 e4m3 0.0625, e5m2 0.125), so the
# rounding noise of the stored values stays below it. Capped at MAX_NUMERICAL_RANK so K stays far below numel.
RANK_RTOL = 1e-3
MAX_NUMERICAL_RANK = 256
_PICKLE_EXTS = (".pt", ".ckpt", ".bin", ".pth", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_LORA_PARTS = frozenset({"down", "up", "mid"})
_LOHA_PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
_LOKR_PARTS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
_FULL_PARTS = frozenset({"diff"})
_IA3_PARTS = frozenset({"ia3_w"})
_GLORA_PARTS = frozenset({"glora_a1", "glora_a2", "glora_b1", "glora_b2"})
_NORM_PARTS = frozenset({"w_norm", "b_norm"})
_SCALAR_PARTS = frozenset({"alpha", "scale", "ia3_on_input"})
_EXTRA_PARTS = frozenset({"diff_b", "dora_scale", "magnitude"})  # ride along with a weight family
_FAMILIES = (
    ("lora", _LORA_PARTS),
    ("loha", _LOHA_PARTS),
    ("lokr", _LOKR_PARTS),
    ("full", _FULL_PARTS),
    ("ia3", _IA3_PARTS),
    ("glora", _GLORA_PARTS),
    ("norm", _NORM_PARTS),
)
BIAS_SUFFIX = "#bias"  # static_layers key of a module's bias delta: "<layer id>#bias"


@dataclass
class LoraLayer:
    """One patched module (or slice of a fused Flux weight) of a LoRA file."""

    id: str  # normalized layer id (see keys.py)
    kind: str  # "lora" | "locon" | "loha" | "lokr" | "full"; static: "ia3" | "glora" | "norm" | "bias"
    rank: int  # LoRA: factor columns in use; LoHa: w1_b.shape[0]; LoKr: w2_b/w1_b dim; full: numerical rank
    shape: tuple[int, ...]  # delta shape, same as the target weight ((out, in) or (out, in, kh, kw)); ia3/bias: 1-D
    scale: float  # alpha / rank (1.0 when there is no alpha)
    source_keys: tuple[str, ...]
    # The file's factor tensors in their stored dtype, by canonical part name ("down", "up", "hada_w1_a", ...).
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # DoRA magnitude as stored (LyCORIS dora_scale (out, 1..) or (1, in, ..); PEFT magnitude (out,)); None: not DoRA.
    dora_scale: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def static(self) -> bool:
        """Never switched by K-LoRA: the host applies it as it is."""
        return self.kind in STATIC_KINDS

    @property
    def needs_base(self) -> bool:
        """The exact delta depends on the base weight (DoRA, IA3, GLoRA)."""
        return self.is_dora or self.kind in ("ia3", "glora")

    def delta(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        base_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dense delta per unit strength (scale applied), computed in fp32 from the stored factors.

        DoRA layers: with ``base_weight`` W, the delta the hosts apply, ``(W + dW) * m / ||W + dW|| - W`` (norm per
        output row when the magnitude has one entry per output row, else per input column, A1111's only form);
        without it the plain LoRA delta dW (what the CLI scores, with a note). IA3 and GLoRA need ``base_weight``.
        """
        f = {name: t.to(device=device, dtype=torch.float32) for name, t in self.factors.items()}
        w = None if base_weight is None else base_weight.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            if self.kind in ("lora", "locon"):
                d = _lora_delta(f, self.shape)
            elif self.kind == "loha":
                d = _half(f["hada_w1_a"], f["hada_w1_b"], f.get("hada_t1")).reshape(self.shape)
                d = d * _half(f["hada_w2_a"], f["hada_w2_b"], f.get("hada_t2")).reshape(self.shape)
            elif self.kind == "lokr":
                d = _lokr_delta(f, self.shape)
            elif self.kind in ("full", "norm", "bias"):
                d = f["diff"].reshape(self.shape)
            elif self.kind == "ia3":
                d = _ia3_delta(self, f, w)
            elif self.kind == "glora":
                d = _glora_delta(self, f, w)
            else:
                raise KLoraError(f"[K-LoRA] layer {self.id}: unknown kind {self.kind!r}")
            if self.scale != 1.0:
                d = d * self.scale
            if self.dora_scale is not None and w is not None:
                d = dora_delta(d, w.reshape(d.shape), self.dora_scale.to(device=d.device, dtype=torch.float32))
        return d.to(dtype)

    def low_rank(
        self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) with ``up @ down == delta.reshape(out, -1)`` (scale folded into ``up``), for plain LoRA/LoCon
        layers; None for forms without such a factorisation (CP ``mid``, LoHa, LoKr, full, DoRA, static kinds).
        Lets hosts apply a delta with one fused ``addmm`` instead of materialising it first."""
        if self.kind not in ("lora", "locon") or "mid" in self.factors or self.is_dora:
            return None
        up = _mat(self.factors["up"]).to(device=device, dtype=dtype) * self.scale
        down = _mat(self.factors["down"]).to(device=device, dtype=dtype)
        return up, down


def dora_delta(delta: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``(W + dW) * m / ||W + dW|| - W``: the weight-decomposed (DoRA) delta the hosts merge.

    The norm runs over each output row when ``magnitude`` has one entry per output row (LyCORIS ``wd_on_out``, PEFT)
    and over each input column otherwise (A1111's form; Forge decides the same way by ``magnitude.shape[0]``)."""
    merged = weight + delta
    out, rest = merged.shape[0], merged.dim() - 1
    if magnitude.shape[0] == out and magnitude.numel() == out:
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, *[1] * rest)
    else:
        cols = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(cols, -1).norm(dim=1).reshape(1, cols, *[1] * (rest - 1))
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


def _need_base(layer: LoraLayer, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        raise KLoraError(
            f"[K-LoRA] layer {layer.id}: a {layer.kind} delta depends on the base weight; pass base_weight= "
            "(K-LoRA keeps such layers static and lets the host apply them)"
        )
    return w


def _ia3_delta(layer: LoraLayer, f: Mapping[str, torch.Tensor], w: torch.Tensor | None) -> torch.Tensor:
    # A1111 network_ia3: W * w, w scaling the input columns (on_input) or the output rows.
    base = _need_base(layer, w)
    vec = f["ia3_w"].reshape(-1)
    mat = base.reshape(base.shape[0], base.shape[1], -1)
    if layer.factors.get("on_input_flag", torch.tensor(0)).item():
        return (mat * vec.reshape(1, -1, 1)).reshape(base.shape)
    return (mat * vec.reshape(-1, 1, 1)).reshape(base.shape)


def _glora_delta(layer: LoraLayer, f: Mapping[str, torch.Tensor], w: torch.Tensor | None) -> torch.Tensor:
    # A1111 network_glora: b2 @ b1 + (W @ a2) @ a1 (Forge detects old/new LyCORIS layouts and scales by alpha).
    base = _need_base(layer, w)
    mat = base.reshape(base.shape[0], -1)
    d = _mat(f["glora_b2"]) @ _mat(f["glora_b1"]) + (mat @ _mat(f["glora_a2"])) @ _mat(f["glora_a1"])
    return d.reshape(base.shape)


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


def numerical_rank(matrix: torch.Tensor, stored_dtype: torch.dtype | None = None) -> int:
    """Rank of a full delta: singular values (fp32) above ``rtol * sigma_max``, rtol = max(RANK_RTOL, eps/2) of the
    stored dtype; at least 1, at most MAX_NUMERICAL_RANK."""
    mat = _mat(matrix).to(torch.float32)
    if mat.numel() == 0:
        return 1
    dt = stored_dtype or matrix.dtype
    eps = torch.finfo(dt).eps if dt.is_floating_point else 0.0
    rtol = max(RANK_RTOL, eps / 2)
    rank = int(torch.linalg.matrix_rank(mat, rtol=rtol).item())
    return max(1, min(rank, MAX_NUMERICAL_RANK))


@dataclass
class LoraFile:
    """A parsed LoRA file: layers by normalized id, plus what was not understood."""

    path: str | None
    name: str
    sha256: str  # hex digest of the file bytes ("" for in-memory state dicts)
    arch: str  # "sd15" | "sdxl" | "flux" | "unknown"
    layers: dict[str, LoraLayer]  # switchable layers (scored; K-LoRA picks content or style per step)
    unknown_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # user-facing notes (also logged)
    # Static layers (IA3, GLoRA, norm, bias deltas "<id>#bias"): read, reported, applied by the host as they are.
    static_layers: dict[str, LoraLayer] = field(default_factory=dict)
    # Per host ("a1111", "forge"): what that host's own LoRA loader applies of this file (see host_support()).
    host_support: dict[str, HostSupport] = field(default_factory=dict)

    def describe_unknown(self, limit: int = 3) -> str:
        """``"N unknown keys, e.g. a, b, c"`` ("" when every key was understood)."""
        n = len(self.unknown_keys)
        if n == 0:
            return ""
        sample = ", ".join(self.unknown_keys[:limit])
        return f"{n} unknown key{'s' if n != 1 else ''}, e.g. {sample}"

    def kinds(self) -> dict[str, int]:
        """Layer count per kind, e.g. {"lora": 700, "locon": 22}; DoRA layers count as "<kind>+dora"."""
        out: dict[str, int] = {}
        for layer in (*self.layers.values(), *self.static_layers.values()):
            kind = f"{layer.kind}+dora" if layer.is_dora else layer.kind
            out[kind] = out.get(kind, 0) + 1
        return out

    @property
    def dora_layers(self) -> list[str]:
        return [i for i, layer in self.layers.items() if layer.is_dora]


@dataclass(frozen=True)
class HostSupport:
    """What one host's own LoRA loader does with a file, judged from its key names (no model needed).

    ``applied``: layer ids (and static-layer keys) the host patches; ``ignored``: the ones it leaves out; ``refused``:
    the host loads nothing of the file; ``note``: why, in words (empty when everything is applied)."""

    host: str
    applied: tuple[str, ...]
    ignored: tuple[str, ...]
    refused: bool
    note: str


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


@dataclass
class _Group:
    parts: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    swap: bool = False
    styles: set[str] = field(default_factory=set)


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

    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = {}
    for key, tensor in sd.items():
        split = keys.split_key(key)
        target = keys.resolve_key(split[0], found_arch) if split else None
        if split is None or target is None or not isinstance(tensor, torch.Tensor):
            unknown.append(key)
            continue
        part = split[1]
        if part in keys.UNSUPPORTED_PARTS:
            unknown.append(key)
            unsupported.setdefault(part, []).append(key)
            continue
        group = groups.setdefault(target.id, _Group())
        group.swap = group.swap or target.swap_halves
        group.styles.add(target.style)
        if part in group.parts:
            raise KLoraError(
                f"[K-LoRA] {where}: keys '{group.parts[part][0]}' and '{key}' both give the {part} factor of layer "
                f"{target.id}; the file mixes key styles for the same module"
            )
        group.parts[part] = (key, tensor)

    layers: dict[str, LoraLayer] = {}
    static: dict[str, LoraLayer] = {}
    for layer_id, group in groups.items():
        parts = group.parts
        if not (set(parts) - _SCALAR_PARTS - {"dora_scale", "magnitude"}):
            unknown.extend(k for k, _ in parts.values())  # an alpha (or a magnitude) with no factors
            continue
        _check_tensors(layer_id, parts, where)
        bias = parts.pop("diff_b", None)
        if bias is not None:
            static[layer_id + BIAS_SUFFIX] = _bias_layer(layer_id, bias, group.swap)
            if not (set(parts) - _SCALAR_PARTS - {"dora_scale", "magnitude"}):
                unknown.extend(k for k, _ in parts.values())
                continue
        layer = _build_layer(layer_id, parts, where, found_arch)
        if group.swap:
            layer = _swap_halves(layer)
        if layer.static:
            static[layer_id] = layer
            continue
        for piece in _split_fused(layer, where):
            if piece.id in layers:
                raise KLoraError(
                    f"[K-LoRA] {where}: layer {piece.id} is given twice (a fused key and a split key, e.g. "
                    f"{layers[piece.id].source_keys[0]} and {piece.source_keys[0]}); the file mixes key styles"
                )
            layers[piece.id] = piece

    if not layers and not static:
        raise KLoraError(_no_layers_message(where, sd, unsupported))

    warnings: list[str] = []
    dora = [i for i, layer in layers.items() if layer.is_dora]
    if dora:
        warnings.append(
            f"{where}: {len(dora)} DoRA layers; their exact delta depends on the base weight (the hosts apply "
            "(W+dW)*m/||W+dW|| - W); without a base weight K-LoRA scores the plain LoRA delta dW"
        )
    if static:
        kinds = sorted({layer.kind for layer in static.values()})
        warnings.append(
            f"{where}: {len(static)} static layers ({', '.join(kinds)}) are applied as they are and never switched"
        )
    for part, found in sorted(unsupported.items()):
        warnings.append(f"{where}: {len(found)} '{part}' keys are a format K-LoRA does not read (e.g. {found[0]})")
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
        static_layers=dict(sorted(static.items(), key=lambda kv: keys.forward_order_key(kv[0]))),
    )
    lora.host_support = host_support(sd.keys(), found_arch, lora)
    if unknown:
        warnings.append(f"{where}: {lora.describe_unknown()} (not used)")
    lora.warnings.extend(warnings)
    for w in warnings:
        logger.warning(w)
    return lora


def _no_layers_message(where: str, sd: Mapping[str, torch.Tensor], unsupported: Mapping[str, list[str]]) -> str:
    sample = ", ".join(list(sd.keys())[:3]) or "no keys"
    seen = ""
    if unsupported:
        seen = "; recognised but not read: " + ", ".join(f"'{p}' ({len(v)} keys)" for p, v in unsupported.items())
    else:
        suffixes: dict[str, int] = {}
        for key in sd:
            tail = key.rsplit(".", 2)[-2:] if "." in key else [key]
            suffixes[".".join(tail)] = suffixes.get(".".join(tail), 0) + 1
        common = sorted(suffixes.items(), key=lambda kv: -kv[1])[:3]
        seen = "; key endings seen: " + ", ".join(f"'{s}' ({n})" for s, n in common) if common else ""
    return (
        f"[K-LoRA] {where}: no LoRA layers recognised ({len(sd)} keys, e.g. {sample}{seen}); "
        "K-LoRA reads LoRA/LoCon, LoHa, LoKr, full/diff, DoRA, (IA)3, GLoRA files in kohya, LyCORIS, diffusers, "
        "PEFT, OneTrainer and BFL key styles"
    )


def _fail(where: str, layer_id: str, msg: str, parts: Mapping[str, tuple[str, torch.Tensor]]) -> KLoraError:
    key = next(iter(parts.values()))[0]
    return KLoraError(f"[K-LoRA] {where}: layer {layer_id} (key {key}): {msg}")


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # min and max propagate NaN and show +-Inf: one vectorised pass, ~10x faster than isfinite().all() on fp16
        low, high = torch.aminmax(tensor)
        return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    return bool(torch.isfinite(tensor.to(torch.float32)).all())  # fp8: isfinite has no kernel for e4m3fn


def _check_tensors(layer_id: str, parts: Mapping[str, tuple[str, torch.Tensor]], where: str) -> None:
    for part, (key, tensor) in parts.items():
        if part in _SCALAR_PARTS:
            if tensor.numel() != 1:
                raise KLoraError(
                    f"[K-LoRA] {where}: layer {layer_id}: key {key} should be a single number, has shape "
                    f"{tuple(tensor.shape)}"
                )
            if tensor.is_complex() or not math.isfinite(float(tensor.to(torch.float64).item())):
                raise KLoraError(f"[K-LoRA] {where}: layer {layer_id}: key {key} contains NaN/Inf values")
            continue
        if not tensor.is_floating_point():
            raise KLoraError(f"[K-LoRA] {where}: layer {layer_id}: key {key} is not a float tensor ({tensor.dtype})")
        if tensor.numel() and not _all_finite(tensor):
            raise KLoraError(f"[K-LoRA] {where}: layer {layer_id}: key {key} contains NaN/Inf values")


def _scalar(t: torch.Tensor) -> float:
    # Integer alpha tensors (diffusers' kohya converter writes them) read like the hosts' .item().
    return float(t.to(torch.float64).item())


def _bias_layer(layer_id: str, entry: tuple[str, torch.Tensor], swap: bool) -> LoraLayer:
    key, tensor = entry
    vec = tensor.reshape(-1)
    if swap:
        vec = _swap_rows(vec)
    return LoraLayer(
        id=layer_id + BIAS_SUFFIX,
        kind="bias",
        rank=1,
        shape=(vec.shape[0],),
        scale=1.0,
        source_keys=(key,),
        factors={"diff": vec},
    )


def _build_layer(layer_id: str, parts: Mapping[str, tuple[str, torch.Tensor]], where: str, arch: str) -> LoraLayer:
    names = set(parts) - _SCALAR_PARTS - {"dora_scale", "magnitude"}
    families = [fam for fam, members in _FAMILIES if names & members]
    if len(families) != 1 or names - set().union(*(m for _, m in _FAMILIES)):
        raise _fail(where, layer_id, f"mixes factor types ({', '.join(sorted(names))})", parts)
    family = families[0]
    t = {p: v for p, (_, v) in parts.items()}
    magnitude = t.get("dora_scale", t.get("magnitude"))

    if family == "lora":
        kind, rank, shape, dim = _check_lora(layer_id, t, parts, where)
    elif family == "loha":
        kind, rank, shape, dim = _check_loha(layer_id, t, parts, where)
    elif family == "lokr":
        kind, rank, shape, dim = _check_lokr(layer_id, t, parts, where)
    elif family == "full":
        diff = t["diff"]
        if diff.dim() not in (2, 4):
            raise _fail(where, layer_id, f"diff must be 2-D or 4-D, has shape {tuple(diff.shape)}", parts)
        kind, shape, dim = "full", tuple(diff.shape), None
        rank = numerical_rank(diff)
    elif family == "ia3":
        w = t["ia3_w"]
        kind, shape, dim, rank = "ia3", (w.numel(),), None, 1
    elif family == "glora":
        _require(where, layer_id, t, ("glora_a1", "glora_a2", "glora_b1", "glora_b2"), "GLoRA layer", parts)
        b1, b2 = t["glora_b1"], t["glora_b2"]
        kind, shape, dim, rank = "glora", (b2.shape[0], *b1.shape[1:]), None, int(b1.shape[0])
    else:
        if "w_norm" not in t:
            raise _fail(where, layer_id, "has b_norm but no w_norm", parts)
        kind, shape, dim, rank = "norm", tuple(t["w_norm"].shape), None, 1

    if family in ("lora", "loha", "lokr", "full"):
        shape = _canonical_shape(layer_id, arch, shape)
        if kind == "lora" and len(shape) == 4:
            kind = "locon"
        if kind == "locon" and len(shape) == 2:
            kind = "lora"

    if "scale" in t:
        scale = _scalar(t["scale"])
    elif "alpha" in t and dim is not None:
        alpha = _scalar(t["alpha"])
        scale = alpha / dim
        if alpha == 0.0:
            logger.debug("%s: layer %s has alpha 0; like the hosts, its delta is zero", where, layer_id)
    else:
        scale = 1.0

    if magnitude is not None and family not in ("lora", "loha", "lokr"):
        raise _fail(where, layer_id, f"a DoRA magnitude on a {family} layer", parts)
    if magnitude is not None:
        ok = magnitude.numel() == shape[0] or magnitude.numel() == shape[1]
        if not ok:
            raise _fail(
                where, layer_id, f"DoRA magnitude shape {tuple(magnitude.shape)} fits no axis of {shape}", parts
            )

    factors = {p: v for p, v in t.items() if p not in _SCALAR_PARTS and p not in ("dora_scale", "magnitude")}
    if family == "norm":
        factors = {"diff": t["w_norm"]}
    if family == "ia3":
        factors["on_input_flag"] = t.get("ia3_on_input", torch.tensor(0)).reshape(())
    return LoraLayer(
        id=layer_id,
        kind=kind,
        rank=int(rank),
        shape=tuple(int(s) for s in shape),
        scale=scale,
        source_keys=tuple(k for k, _ in parts.values()),
        factors=factors,
        dora_scale=magnitude,
    )


# ---- Flux: fused weights split into slices; diffusers' swapped norm_out halves -------------------------------------


def _swap_rows(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _swap_halves(layer: LoraLayer) -> LoraLayer:
    """The layer with its delta's two row halves swapped (diffusers norm_out.linear = BFL adaLN_modulation.1 with
    shift and scale in the other order; Forge applies swap_scale_shift to such patches)."""
    if layer.shape[0] % 2 or layer.is_dora:
        raise KLoraError(f"[K-LoRA] layer {layer.id}: cannot reorder the shift/scale halves of shape {layer.shape}")
    f = dict(layer.factors)
    if layer.kind in ("lora", "locon"):
        f["up"] = _swap_rows(f["up"])
    elif layer.kind == "loha" and "hada_t1" not in f:
        f["hada_w1_a"], f["hada_w2_a"] = _swap_rows(f["hada_w1_a"]), _swap_rows(f["hada_w2_a"])
    else:
        return _dense_copy(layer, _swap_rows(layer.delta()))
    return LoraLayer(layer.id, layer.kind, layer.rank, layer.shape, layer.scale, layer.source_keys, f)


def _dense_copy(
    layer: LoraLayer, delta: torch.Tensor, layer_id: str | None = None, rank: int | None = None
) -> LoraLayer:
    # Scale folded in; the fused layer's rank kept (K then matches the factored form of the same layer).
    return LoraLayer(
        id=layer_id or layer.id,
        kind="full",
        rank=layer.rank,
        shape=tuple(delta.shape),
        scale=1.0,
        source_keys=layer.source_keys,
        factors={"diff": delta.contiguous()},
    )


def _split_fused(layer: LoraLayer, where: str) -> list[LoraLayer]:
    """A fused Flux layer (qkv / linear1) -> its q/k/v(/mlp) slices; any other layer -> [layer]."""
    component, path = keys.layer_id_parts(layer.id)
    if component != "flux" or keys.split_slice(path)[1] is not None:
        return [layer]
    parts = keys.fused_parts(path)
    if parts is None or len(layer.shape) != 2:
        return [layer]
    rows, hidden = layer.shape
    if not keys.fused_split_ok(path, rows, hidden):
        logger.warning("%s: layer %s has %d rows for in_features %d; kept whole", where, layer.id, rows, hidden)
        return [layer]
    if layer.is_dora:
        # The magnitude's norm mixes all rows of the fused weight: its slices are not independent.
        logger.warning("%s: DoRA layer %s kept fused (its slices depend on each other)", where, layer.id)
        return [layer]
    out = []
    for part in parts:
        start, stop = keys.slice_rows(part, hidden, rows)
        piece = _slice_layer(layer, f"{layer.id}[{part}]", start, stop)
        if piece is not None:
            out.append(piece)
    return out


def _slice_layer(layer: LoraLayer, layer_id: str, start: int, stop: int) -> LoraLayer | None:
    """Rows [start, stop) of a layer's delta as a layer of its own; None when those rows are all zero."""
    f = layer.factors
    shape = (stop - start, layer.shape[1])
    if layer.kind == "lora" and "mid" not in f:
        up, down = _mat(f["up"])[start:stop], _mat(f["down"])
        used = (up != 0).any(dim=0).nonzero().reshape(-1)
        if used.numel() == 0:
            return None
        # Only the factor columns this slice uses: its rank is what a split (diffusers) file of it has.
        factors = {"up": up[:, used].contiguous(), "down": down[used].contiguous()}
        return LoraLayer(layer_id, "lora", int(used.numel()), shape, layer.scale, layer.source_keys, factors)
    if layer.kind == "loha" and "hada_t1" not in f and "hada_t2" not in f:
        factors = dict(f)
        factors["hada_w1_a"] = f["hada_w1_a"][start:stop].contiguous()
        factors["hada_w2_a"] = f["hada_w2_a"][start:stop].contiguous()
        return LoraLayer(layer_id, "loha", layer.rank, shape, layer.scale, layer.source_keys, factors)
    if layer.kind == "full":
        diff = _mat(f["diff"])[start:stop]
        if not bool((diff != 0).any()):
            return None
        return LoraLayer(
            layer_id, "full", numerical_rank(diff, f["diff"].dtype), shape, 1.0, layer.source_keys, {"diff": diff}
        )
    # LoKr (kron rows do not follow the slice boundaries) and CP: the slice's dense rows.
    delta = layer.delta()[start:stop]
    if not bool((delta != 0).any()):
        return None
    return _dense_copy(layer, delta, layer_id)


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


# ---------------------------------------------------------------------------------------------------------------
# What each host's own loader applies (A1111 v1.10 builtin Lora; Forge backend/patcher/lora.py key maps)
# ---------------------------------------------------------------------------------------------------------------

HOSTS = ("a1111", "forge")
FORGE_MAX_UNMATCHED = 12  # Forge loads nothing of a file with more unmatched keys ("LoRA version mismatch")
_A1111_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Suffixes Forge's load_lora reads (comfyui_lora_collection/lora.py:32-212); note: no scale, IA3, OFT, PEFT magnitude.
_FORGE_SUFFIXES = (
    "lora_up.weight",
    "lora_down.weight",
    "lora_mid.weight",
    "lora_B.weight",
    "lora_A.weight",
    "lora.up.weight",
    "lora.down.weight",
    "lora_linear_layer.up.weight",
    "lora_linear_layer.down.weight",
    "alpha",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w2",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "w_norm",
    "b_norm",
    "diff",
    "diff_b",
)
_CLIP_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def _a1111_applies(key: str, module: str, target: keys.Target, arch: str) -> bool:
    # networks.load_network splits the key at its FIRST dot, so only undotted kohya module names can match a module.
    component = keys.layer_id_parts(target.id)[0]
    if arch == "flux" or component in ("t5", "flux", "other") or "." in module:
        return False
    if not module.startswith(_A1111_PREFIXES):
        return False
    return not (component == "te2" and arch == "sd15")


def _forge_applies(key: str, module: str, target: keys.Target, arch: str) -> bool:
    component, path = keys.layer_id_parts(target.id)
    if component == "other":
        return False
    if key.endswith(("_lora.up.weight", "_lora.down.weight")) and ".processor." in key:
        return component == "unet"  # the old attention-processor form is in Forge's UNet key map
    if not key.endswith(tuple("." + s for s in _FORGE_SUFFIXES)):
        return False  # IA3 "weight"/"on_input", "scale", PEFT magnitude, named PEFT adapters: not read
    if component in ("te1", "te2"):
        base = path.split("text_model.encoder.layers.", 1)[-1].split(".", 1)[-1]
        if base not in _CLIP_TARGETS or not module.startswith(("lora_te", "text_encoder.", "text_encoder_2.")):
            return False
        return not (component == "te2" and arch == "sd15")
    if component == "t5":
        return arch == "flux" and module.startswith(("lora_te1_", "lora_te2_", "lora_te3_"))
    style = target.style
    if component == "flux":
        if arch not in ("flux", "unknown"):
            return False
        if style == "kohya":
            return module.startswith(("lora_unet_", "lora_transformer_"))
        if style == "lycoris":
            return True
        if style == "bfl":
            return module.startswith("diffusion_model.")
        return style == "diffusers" and module.startswith("transformer.")
    # UNet (SD1.x / SDXL)
    if style in ("kohya", "lycoris"):
        return module.startswith(("lora_unet_", "lycoris_"))
    if style == "compvis":
        return module.startswith("diffusion_model.")
    if style in ("diffusers", "bare"):
        # Forge keys diffusers attention projections only in the processor form (".to_" -> ".processor.to_").
        return ".to_" not in module
    return False  # PEFT base_model.model., the authors' unet.unet., ComfyUI names


def host_support(all_keys, arch: str, lora: LoraFile) -> dict[str, HostSupport]:
    """Per host, which of the file's layers that host's own loader applies, judged from key names alone."""
    applied_keys: dict[str, set[str]] = {h: set() for h in HOSTS}
    key_list = list(all_keys)
    for key in key_list:
        split = keys.split_key(key)
        target = keys.resolve_key(split[0], arch) if split else None
        if split is None or target is None:
            continue
        if _a1111_applies(key, split[0], target, arch):
            applied_keys["a1111"].add(key)
        if _forge_applies(key, split[0], target, arch):
            applied_keys["forge"].add(key)
    every = {**lora.layers, **lora.static_layers}
    out: dict[str, HostSupport] = {}
    for host in HOSTS:
        got = applied_keys[host]
        applied = tuple(i for i, layer in every.items() if all(k in got for k in layer.source_keys))
        ignored = tuple(i for i in every if i not in set(applied))
        refused, note = False, ""
        if host == "a1111" and arch == "flux":
            refused, note = True, "A1111 has no Flux models"
        elif host == "a1111" and any(
            layer.kind == "bias" and layer.id[: -len(BIAS_SUFFIX)] not in every
            for layer in lora.static_layers.values()
        ):
            refused, note = True, "A1111 refuses a file with bias-only (diff_b) modules (no module type accepts them)"
        elif host == "forge" and len(key_list) - len(got) > FORGE_MAX_UNMATCHED:
            n = len(key_list) - len(got)
            refused, note = (
                True,
                f"Forge loads nothing of a file with more than {FORGE_MAX_UNMATCHED} unmatched keys ({n})",
            )
        elif not applied:
            refused, note = True, f"{host} matches none of the file's keys"
        elif ignored:
            note = f"{host} leaves out {len(ignored)} of {len(every)} layers (e.g. {ignored[0]})"
        if refused:
            applied, ignored = (), tuple(every)
        out[host] = HostSupport(host, applied, ignored, refused, note)
    return out
