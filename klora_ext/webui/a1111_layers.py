"""The layers A1111's builtin Lora extension patches for a file, as LoraFiles K-LoRA scores and switches (issue 7).

Source of truth: ``Network.modules`` of the builtin's ``networks.load_network`` (the very objects the adapter puts in
``loaded_networks``). A module's layer id is the canonical ``keys`` id of its target module's path in the model, so
two files share a layer exactly when the builtin patches the same target, and the CLI (host-free reader) gives the
same ids for the same keys:

* UNet ``sd_model.model.diffusion_model.<path>`` -> ``unet:<path>``;
* CLIP (``transformer.text_model...``) -> ``te1:/te2:text_model...``; OpenCLIP (SDXL's TE2, SD2's TE)
  ``model.transformer.resblocks.N.attn`` + the builtin's ``_q/_k/_v_proj`` suffix, ``...attn.out_proj``,
  ``mlp.c_fc``/``mlp.c_proj`` -> ``...layers.N.self_attn.{q,k,v,out}_proj``, ``mlp.fc1``/``fc2``. The builtin merges
  those four only through the parent ``nn.MultiheadAttention`` and only when one file has all four: a file with
  fewer has them left out (not applied by the host, so not scored).

Deltas, per unit strength (the module's ``calc_scale()``; a unit multiplier):

* plain LoRA / LoCon / CP, LoHa, LoKr and full/diff modules: the host module's own tensors (up/down(/mid) of its
  torch modules, the LyCORIS factors it keeps) and its ``calc_scale()``, so scoring streams them as products (no
  dense delta; the same numbers as the module's calc_updown, in fp32);
* DoRA (on any of them) and any other type the builtin applies: a dense delta from the module's own
  ``calc_updown`` on the original weight (the builtin's CPU backup when the layer was merged before), computed when
  the layer is scored;
* a module whose calc_updown fails (checked on meta tensors; the builtin skips such a module too) is left out;
* (IA)3, GLoRA, norm, OFT: applied by the builtin as they are, never switched (static layers, as in the CLI).

Ranks follow the reader's rules (LoRA down rank, LoHa w1_b, LoKr w2_b/w1_b, full: numerical rank) so K, and the
plan, match the CLI's for the same files.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from klora_ext.lora_file import LoraFile, LoraLayer, numerical_rank, read_header

# Bump when the layers or deltas built here from the same files and model change (part of the score-cache key).
MAPPING_VERSION = 1
_MHA_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")
_OPENCLIP = re.compile(r"^model\.transformer\.resblocks\.(\d+)\.(attn|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_OPENCLIP_TAIL = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Module classes whose forward the builtin patches (network_apply_weights runs there).
_PATCHED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
_STATIC_TYPES = {"NetworkModuleIa3": "ia3", "NetworkModuleGLora": "glora", "NetworkModuleNorm": "norm"}


@dataclass(frozen=True)
class HostTarget:
    """Where the builtin merges one ``net.modules`` entry."""

    name: str  # the builtin's layer name (net.modules key)
    layer_id: str  # canonical id
    module: Any  # the NetworkModule
    site: torch.nn.Module  # the module whose forward merges it (the MHA for its q/k/v/out)
    chunk: int | None  # MHA: 0/1/2 = q/k/v rows of in_proj_weight, 3 = out_proj.weight; None: site.weight


# ---- model paths -> canonical ids -------------------------------------------------------------------------------
def _roots(model: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """(component, root module) as the builtin names them: UNet under ``model``, text encoders as ``wrapped``."""
    if getattr(model, "is_sdxl", False) and hasattr(model, "conditioner"):
        for i, embedder in enumerate(model.conditioner.embedders):
            wrapped = getattr(embedder, "wrapped", None)
            if isinstance(wrapped, torch.nn.Module):
                yield ("te1" if i == 0 else "te2"), wrapped
    else:
        cond = getattr(model, "cond_stage_model", None)
        cond = getattr(cond, "wrapped", cond)
        if isinstance(cond, torch.nn.Module):
            yield "te1", cond
    unet_root = getattr(model, "model", None)
    if isinstance(unet_root, torch.nn.Module):
        yield "unet", unet_root


def module_paths(model: Any) -> dict[int, tuple[str, str]]:
    """id(module) -> (component, dotted path under its root); cached on the model object."""
    cached = getattr(model, "_klora_module_paths", None)
    if cached is not None:
        return cached
    out: dict[int, tuple[str, str]] = {}
    for component, root in _roots(model):
        for path, module in root.named_modules():
            if path:
                out.setdefault(id(module), (component, path))
    try:
        model._klora_module_paths = out
    except AttributeError:
        pass
    return out


def canonical_id(component: str, path: str, part: str | None = None) -> str:
    """The keys.py id of a model module (``part``: q_proj/k_proj/v_proj of an OpenCLIP attention module)."""
    if component == "unet":
        if path.startswith("diffusion_model."):
            return "unet:" + path[len("diffusion_model.") :]
        return "other:" + path
    if path.startswith("transformer.text_model."):
        return f"{component}:{path[len('transformer.') :]}"
    m = _OPENCLIP.match(path)
    if m:
        block, tail = m.groups()
        tail = f"self_attn.{part}" if tail == "attn" and part else _OPENCLIP_TAIL.get(tail, tail)
        return f"{component}:text_model.encoder.layers.{block}.{tail}"
    return f"{component}:{path}" + (f".{part}" if part else "")


def _mha_parent(name: str, module: Any, mapping: Mapping[str, Any]) -> tuple[torch.nn.MultiheadAttention, int] | None:
    for index, part in enumerate(_MHA_PARTS):
        if name.endswith("_" + part):
            parent = mapping.get(name[: -len(part) - 1])
            if isinstance(parent, torch.nn.MultiheadAttention):
                return parent, index
    return None


def host_targets(net: Any, model: Any, mapping: Mapping[str, Any]) -> tuple[list[HostTarget], list[str]]:
    """(targets the builtin merges, names of modules it leaves out) for a loaded ``Network``. Cheap: no tensors."""
    paths = module_paths(model)
    targets: list[HostTarget] = []
    left_out: list[str] = []
    attention: dict[int, dict[int, str]] = {}  # id(MHA) -> {part index: name}
    for name, module in net.modules.items():
        mha = _mha_parent(name, module, mapping)
        if mha is not None:
            attention.setdefault(id(mha[0]), {})[mha[1]] = name
            continue
        site = getattr(module, "sd_module", None)
        where = paths.get(id(site))
        if not isinstance(site, _PATCHED) or where is None or getattr(site, "weight", None) is None:
            left_out.append(name)
            continue
        targets.append(HostTarget(name, canonical_id(*where), module, site, None))
    for parts in attention.values():
        names = [parts.get(i) for i in range(4)]
        if None in names:  # the builtin merges the four together or not at all
            left_out.extend(n for n in names if n is not None)
            continue
        parent, _ = _mha_parent(names[0], None, mapping)  # type: ignore[misc]
        where = paths.get(id(parent))
        if where is None:
            left_out.extend(names)  # type: ignore[arg-type]
            continue
        for index, name in enumerate(names):
            part = _MHA_PARTS[index]
            layer_id = canonical_id(where[0], f"{where[1]}.out_proj") if index == 3 else canonical_id(*where, part)
            targets.append(HostTarget(name, layer_id, net.modules[name], parent, index))  # type: ignore[index]
    return targets, left_out


# ---- deltas ------------------------------------------------------------------------------------------------------
def original_weight(target: HostTarget) -> torch.Tensor:
    """The weight the builtin merges this module onto: its CPU backup of the original when it has one."""
    site = target.site
    backup = getattr(site, "network_weights_backup", None)
    if isinstance(site, torch.nn.MultiheadAttention):
        in_proj, out_proj = backup if backup is not None else (site.in_proj_weight, site.out_proj.weight)
        return out_proj if target.chunk == 3 else in_proj.chunk(3, 0)[target.chunk]
    if backup is not None:
        return backup
    fp16 = getattr(site, "fp16_weight", None)  # --cache-fp16-weight with fp8 storage: the builtin merges onto it
    return fp16 if fp16 is not None else site.weight


def _unit(module: Any) -> Any:
    """The module with a unit multiplier and full rank: calc_updown then gives the delta per unit strength."""
    twin = copy.copy(module)
    twin.network = types.SimpleNamespace(
        name=getattr(module.network, "name", "k-lora"), te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None
    )
    return twin


class _HostDelta(Mapping):
    """``{"diff": delta}`` computed by the host module's calc_updown each time it is read (never kept)."""

    def __init__(self, target: HostTarget) -> None:
        self._target = target

    def _compute(self) -> torch.Tensor:
        base = original_weight(self._target)
        with torch.no_grad():
            updown, _ = _unit(self._target.module).calc_updown(base)
        return updown.reshape(base.shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key != "diff":
            raise KeyError(key)
        return self._compute()

    def __iter__(self) -> Iterator[str]:
        return iter(("diff",))

    def __len__(self) -> int:
        return 1


def _lora_factors(module: Any, shape: tuple[int, ...]) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """A plain LoRA/LoCon/CP module: (kind, up/down(/mid) of its own torch modules, rank); None: not that form or
    the product does not fit the target."""
    up_model, down_model = getattr(module, "up_model", None), getattr(module, "down_model", None)
    if up_model is None or down_model is None:
        return None
    up, down = up_model.weight.detach(), down_model.weight.detach()
    factors = {"up": up, "down": down}
    inner, numel = down.shape[0], up.shape[0] * math.prod(down.shape[1:])
    mid_model = getattr(module, "mid_model", None)
    if mid_model is not None:
        mid = mid_model.weight.detach()
        factors["mid"] = mid
        inner, numel = mid.shape[0], up.shape[0] * down.shape[1] * math.prod(mid.shape[2:])
    if up.shape[1] != inner or up.shape[0] != shape[0] or numel != math.prod(shape):
        return None
    return ("locon" if len(shape) == 4 else "lora"), factors, int(down.shape[0])


def _lycoris_factors(module: Any, shape: tuple[int, ...]) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """LoHa / LoKr / full modules: (kind, the tensors the module keeps, under the reader's part names, rank);
    None: another type or a layout whose rows are not the target's."""
    cls = type(module).__name__
    got = {}
    if cls == "NetworkModuleHada":
        names = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"}
        names.update(t1="hada_t1", t2="hada_t2")
        kind, rows = "loha", None
    elif cls == "NetworkModuleLokr":
        names = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a"}
        names.update(w2b="lokr_w2_b", t2="lokr_t2")
        kind, rows = "lokr", None
    elif cls == "NetworkModuleFull":
        names, kind = {"weight": "diff"}, "full"
    else:
        return None
    for attr, part in names.items():
        value = getattr(module, attr, None)
        if isinstance(value, torch.Tensor):
            got[part] = value.detach()
    if kind == "loha":
        a = got.get("hada_w1_a")
        rows = None if a is None else (a.shape[1] if "hada_t1" in got else a.shape[0])
        rank = int(getattr(module, "dim", 0) or 0)
    elif kind == "lokr":
        w1 = got.get("lokr_w1", got.get("lokr_w1_a"))
        w2 = got.get("lokr_w2", got.get("lokr_w2_a"))
        rows = None if w1 is None or w2 is None else w1.shape[0] * w2.shape[0]
        rank = int(getattr(module, "dim", 0) or 0) or min(shape[0], math.prod(shape[1:]))
    else:
        diff = got.get("diff")
        rows = None if diff is None else diff.shape[0]
        rank = numerical_rank(diff) if diff is not None else 0
    if rows != shape[0] or rank <= 0:
        return None
    return kind, got, rank


def _dense_rank(module: Any, shape: tuple[int, ...]) -> int:
    """The reader's rank for a layer scored from its dense delta (DoRA: the rank of its factors)."""
    dim = getattr(module, "dim", None)
    if dim:
        return int(dim)
    down_model = getattr(module, "down_model", None)
    if down_model is not None:
        return int(down_model.weight.shape[0])
    diff = getattr(module, "weight", None)
    if isinstance(diff, torch.Tensor):
        return numerical_rank(diff)
    return max(1, min(shape[0], math.prod(shape[1:])))


def _host_layer(target: HostTarget, sources: tuple[str, ...]) -> tuple[LoraLayer | None, str]:
    """(layer, "") or (None, why it is left out)."""
    module = target.module
    base = original_weight(target)
    shape = tuple(int(s) for s in base.shape)
    # The forms that are products of factors are scored from the module's own tensors and calc_scale() (no dense
    # delta). DoRA, a LoRA "bias" offset, and any other type: the module's own calc_updown, lazily (see _HostDelta).
    plain = getattr(module, "dora_scale", None) is None and getattr(module, "bias", None) is None
    if plain:
        found = _lora_factors(module, shape)
        if found is not None:
            kind, factors, rank = found
            return LoraLayer(target.layer_id, kind, rank, shape, float(module.calc_scale()), sources, factors), ""
        if hasattr(module, "up_model"):
            return None, "its factors do not fit the layer"
    delta = _HostDelta(target)
    try:
        # the builtin skips a module whose calc_updown fails (shape mismatch): so do we. On meta tensors this costs
        # no arithmetic; an op without a meta kernel falls back to one real computation.
        try:
            with torch.no_grad():
                probe, _ = _unit(module).calc_updown(base.to("meta"))
        except NotImplementedError:
            probe = delta["diff"]
    except RuntimeError as exc:
        return None, f"the builtin's calc_updown fails ({exc})"
    if probe.numel() != math.prod(shape):
        return None, f"its delta has shape {tuple(probe.shape)}, the layer {shape}"
    found = _lycoris_factors(module, shape) if plain else None
    if found is not None:
        kind, factors, rank = found
        return LoraLayer(target.layer_id, kind, rank, shape, float(module.calc_scale()), sources, factors), ""
    rank = _dense_rank(module, shape)
    return LoraLayer(target.layer_id, "full", rank, shape, 1.0, sources, delta), ""  # type: ignore[arg-type]


# ---- files --------------------------------------------------------------------------------------------------------
def _file_keys(path: str) -> list[str]:
    try:
        header, _ = read_header(path)
    except Exception:  # noqa: BLE001 - .pt/.ckpt LoRAs: the builtin reads them; no key list to compare
        return []
    return list(header)


def _prefix(key: str) -> str:
    return key.partition(".")[0]


def host_lora(net: Any, *, name: str, path: str, sha256: str, model: Any, mapping: Mapping[str, Any]) -> LoraFile:
    """The file as the builtin patches it: layers to score/switch, static layers, and notes on what is left out."""
    targets, left_out_names = host_targets(net, model, mapping)
    # Several modules on one target (e.g. SD3's fused QkvLinear, whose q/k/v the builtin merges as row chunks): the
    # builtin applies them, but they are not one layer K-LoRA can switch; kept static, not scored.
    count: dict[str, int] = {}
    for t in targets:
        count[t.layer_id] = count.get(t.layer_id, 0) + 1
    shared_target = [t.name for t in targets if count[t.layer_id] > 1]
    targets = [t for t in targets if count[t.layer_id] == 1]
    layers: dict[str, LoraLayer] = {}
    static: dict[str, LoraLayer] = {}
    failed: list[str] = []
    for target in targets:
        sources = (target.module.network_key,)
        kind = _STATIC_TYPES.get(type(target.module).__name__)
        if kind is None and type(target.module).__name__ == "NetworkModuleOFT":
            kind = "oft"
        if kind is not None:
            shape = tuple(int(s) for s in original_weight(target).shape)
            static[target.layer_id] = LoraLayer(target.layer_id, kind, 1, shape, 1.0, sources)
            continue
        layer, why = _host_layer(target, sources)
        if layer is None:
            failed.append(f"{target.name} ({why})")
            continue
        layers[target.layer_id] = layer
    notes: list[str] = []
    applied = {_prefix(t.module.network_key) for t in targets}
    unmatched = [k for k in _file_keys(path) if _prefix(k) not in applied and _prefix(k) != "bundle_emb"]
    if unmatched:
        notes.append(
            f"A1111 leaves out {len(unmatched)} keys of '{name}' (its loader matches no layer of this model to "
            f"them, e.g. {unmatched[0]}): not applied, not scored"
        )
    if left_out_names:
        notes.append(
            f"A1111 does not merge {len(left_out_names)} modules of '{name}' (e.g. {left_out_names[0]}; a text "
            "encoder attention is merged only with q, k, v and out together): not scored"
        )
    if shared_target:
        notes.append(
            f"'{name}': {len(shared_target)} modules share one fused target (e.g. {shared_target[0]}): applied by "
            "A1111 as they are, never switched"
        )
    if failed:
        notes.append(f"A1111 skips {len(failed)} modules of '{name}' (e.g. {failed[0]}): not scored")
    if static:
        kinds = ", ".join(sorted({x.kind for x in static.values()}))
        notes.append(f"'{name}': {len(static)} layers ({kinds}) are applied by A1111 as they are, never switched")
    return LoraFile(
        path=path,
        name=name,
        sha256=sha256,
        arch="sdxl" if getattr(model, "is_sdxl", False) else "sd15",
        layers=layers,
        warnings=notes,
        static_layers=static,
    )


def names_by_id(net: Any, model: Any, mapping: Mapping[str, Any]) -> dict[str, str]:
    """Canonical layer id -> the builtin's layer name, for every module of ``net`` the builtin merges."""
    return {t.layer_id: t.name for t in host_targets(net, model, mapping)[0]}


def needs_base(net: Any) -> bool:
    """Whether a scored delta of ``net`` depends on the checkpoint's weights (DoRA)."""
    return any(getattr(m, "dora_scale", None) is not None for m in net.modules.values())


def mapping_fingerprint(model: Any, mapping: Mapping[str, Any]) -> str:
    """A short hash of the builtin's layer-name map of this model (names, module types, weight shapes)."""
    cached = getattr(model, "_klora_mapping_fingerprint", None)
    if cached is not None and cached[0] == len(mapping):
        return cached[1]
    digest = hashlib.sha256()
    for name in sorted(mapping):
        module = mapping[name]
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        digest.update(f"{name}|{type(module).__name__}|{shape}\n".encode())
    value = digest.hexdigest()[:16]
    try:
        model._klora_mapping_fingerprint = (len(mapping), value)
    except AttributeError:
        pass
    return value
