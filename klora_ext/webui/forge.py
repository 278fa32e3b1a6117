"""Forge host adapter (the current ``backend/`` Forge, "f2.x"; also reForge's ``newmain_newforge`` branch).

Mechanism (``shared/docs/research/forge-internals.md`` §6):

* The **content** LoRA goes through Forge's own patcher: ``process_before_every_sampling`` clones the UNet patcher and
  ``add_patches`` the content LoRA at strength w_c (a prompt copy of it is taken over, the style LoRA is removed from
  the clone's patches). Forge merges it once at ``sampling_prepare`` and caches the merged weights across generations
  (``LoraLoader`` keyed by the patch identifiers); we never call ``refresh`` ourselves.
* At the first denoiser call of a pass (Forge's refresh has run by then) each layer is brought to the role the plan
  wants now; per step only the layers whose role changes are touched:

  - (A) float weights (fp32/fp16/bf16) resident on the compute device: edited in place with **Forge's own merge**.
    A layer's weight is ``merge_lora_to_weight`` of Forge's patch list for that key with the content LoRA's entries
    kept or dropped and the style LoRA's entries (built by Forge's ``add_patches`` on a scratch clone) appended, from
    the original Forge keeps in ``LoraLoader.backup``: a style layer is bit-identical to Forge with ``<lora:style:w>``
    in the prompt (a correction added on top of the content merge would round differently), DoRA included. Restoring
    = Forge's own list merged again (same inputs, same function: bit-exact). K-LoRA keeps no copy of what Forge
    backs up; only a weight Forge merged nothing into (a layer only the style LoRA patches) is kept while edited, on
    the offload device, which is the backup Forge itself would hold with the style LoRA in the prompt. Should the
    recomputation fail, Forge's merge hash is marked stale so Forge itself restores from its backup at the next
    refresh;
  - (B) anything else (fp8, nf4/fp4, GGUF, modules Forge streams from CPU, weights not on the compute device,
    online LoRAs): a forward hook that adds the low-rank correction to the module's output; the weight is never
    touched.

* In-place edits never outlive a sampling pass: they are undone in ``before_sampling`` (before Forge may refresh and
  back up weights) and re-applied at the next pass's first denoiser call; ``restore`` undoes everything, idempotently,
  including the patcher/CLIP objects swapped into ``forge_objects``. The live edits are module-level, so any adapter
  instance (txt2img or img2img Script) cleans up after an aborted run.
* Text-encoder parts follow the static policy, through a cloned CLIP patcher put into
  ``forge_objects_after_applying_lora`` right after the LoRA activation (before conds are computed); the cond caches
  are invalidated when it is swapped in and out.

The ``ldm_patched`` backends (reForge ``main``, Forge Classic) are served by ``ldm_patched.py``; an ``ldm_patched``
build that adapter does not recognise (e.g. Forge before August 2024) gets a message naming what is supported
(``unsupported_reason``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from klora_ext import keys
from klora_ext.errors import KLoraError
from klora_ext.log import logger
from klora_ext.lora_file import LoraFile, LoraLayer, numerical_rank
from klora_ext.plan import BOTH, CONTENT, STYLE
from klora_ext.runtime import Change
from klora_ext.webui.adapter_base import HostAdapter, KLoraRun, LoraRef, StepInfo

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LEGACY_MESSAGE = (
    "[K-LoRA] this WebUI has the 'ldm_patched' backend, but not the patcher K-LoRA's support for it needs (Forge "
    "Classic / reForge style ModelPatcher with per-key patches and backups); K-LoRA is disabled here. Supported: "
    "AUTOMATIC1111 WebUI 1.6-1.10, Forge f2.x and Forge Neo ('backend/' folder), Forge Classic and reForge."
)
_HASH_SUFFIX = re.compile(r"^(.*?)\s*\([0-9a-fA-F]{6,}\)$")
STALE_HASH = "k-lora: stale"  # a LoraLoader.loaded_hash no patch set equals: Forge re-merges from its backup
_MAX_FILES = 4
FIXED_SUFFIX = "#k-lora-fixed"  # the patch identifier of the style LoRA's never-switched patches


def host_kind() -> str | None:
    """Which Forge this is: "forge2" (``backend/`` patcher with LoRA identifiers), "forge-legacy" (``ldm_patched``:
    Forge before August 2024, reForge main, Forge Classic) or None (not Forge)."""
    try:
        from backend.patcher import base  # type: ignore[import-not-found]

        patcher = getattr(base, "ModelPatcher", None)
        if patcher is not None and hasattr(patcher, "add_patches") and hasattr(patcher, "refresh_loras"):
            return "forge2"
    except Exception:  # noqa: BLE001 - a foreign "backend" package, or a half-installed host: not ours
        pass
    try:
        import importlib.util

        if importlib.util.find_spec("ldm_patched") is not None:
            return "forge-legacy"
    except (ImportError, ValueError):
        pass
    return None


def _same_file(a: Any, b: str) -> bool:
    if not isinstance(a, str) or not a:
        return False
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _region(tensor: torch.Tensor, offset: tuple[int, int, int] | None) -> torch.Tensor:
    return tensor if offset is None else tensor.narrow(offset[0], offset[1], offset[2])


def _is_quantized(param: torch.Tensor) -> bool:
    return bool(getattr(param, "bnb_quantized", False)) or getattr(param, "gguf_cls", None) is not None


# ---------------------------------------------------------------------------------------------------------------
# Live edits (module-level: whichever adapter instance restores, everything is undone)
# ---------------------------------------------------------------------------------------------------------------


class _HostWeight:
    """What Forge put into one parameter, recomputed on demand with Forge's own merge from Forge's own backup."""

    def __init__(
        self, loader: Any, key: str, patches: list, like: torch.Tensor, content: Iterable = (), offload: Any = "cpu"
    ) -> None:
        self.loader = loader
        self.key = key
        self.patches = patches  # Forge's merged patch list for this key (its own tensors, not copies)
        self.content = {id(e) for e in content}  # which entries of it are the content LoRA's
        self.device = like.device
        self.dtype = like.dtype
        self.original: torch.Tensor | None = None  # only without a loader: the weight as loaded, kept while edited
        self.offload = torch.device(offload)  # where that copy is kept

    def compute(self, patches: list | None = None) -> torch.Tensor:
        """Forge's merge of its own list (default) or of another list of Forge patch entries, from Forge's backup."""
        from backend.patcher.lora import merge_lora_to_weight  # type: ignore[import-not-found]

        if self.loader is None:  # a weight Forge leaves as loaded (no LoRA of the pass patches it)
            original = self.original.to(device=self.device)
        else:
            original = self.loader.backup[self.key].to(device=self.device)
        patches = self.patches if patches is None else patches
        weight = merge_lora_to_weight(patches, original, self.key, computation_dtype=torch.float32)
        return weight.to(dtype=self.dtype)

    def wanted(self, with_content: bool, style: list) -> list | None:
        """Forge's list with the content LoRA's entries kept or dropped and the style LoRA's appended: what Forge
        itself would merge with the style LoRA in the prompt in place of the content one. None: Forge's own list."""
        if with_content and not style:
            return None
        kept = self.patches if with_content else [e for e in self.patches if id(e) not in self.content]
        return kept + style

    def restore(self, tensor: torch.Tensor) -> None:
        """Put back what Forge holds: its merge recomputed, or the loaded weight K-LoRA kept (then freed)."""
        if self.loader is None:
            tensor.copy_(self.original)  # no merge, no allocation: cannot run out of memory here
            self.original = None
        else:
            tensor.copy_(self.compute())

    def mark_stale(self) -> None:
        if self.loader is not None:
            self.loader.loaded_hash = STALE_HASH


@dataclass
class _Edit:
    """(A): one parameter edited in place, and how to get back exactly what the host had put there."""

    tensor: torch.Tensor
    host: _HostWeight


class _Term:
    """One low-rank (or dense) branch added to a module's output: coef * delta(x)."""

    def __init__(self, conv: dict[str, Any] | None, down: torch.Tensor, up: torch.Tensor | None) -> None:
        self.conv = conv  # None for Linear; stride/padding/dilation/groups for Conv2d
        self.down = down  # low rank: (r, in) / (r, in, kh, kw); dense: the whole delta (up is None)
        self.up = up  # (out, r) / (out, r, 1, 1), coefficient folded in
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._cast:
            up = self.up.to(device=x.device, dtype=x.dtype) if self.up is not None else None
            self._cast[key] = (self.down.to(device=x.device, dtype=x.dtype), up)
        down, up = self._cast[key]
        if self.conv is None:
            y = F.linear(x, down)
            return F.linear(y, up) if up is not None else y
        c = self.conv
        if up is None:
            return F.conv2d(x, down, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        return F.conv2d(F.conv2d(x, down, None, c["stride"], c["padding"], c["dilation"]), up)


class _Hook:
    """(B): the forward hook of one module; per layer (an output slice or the whole output) a list of terms."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.terms: dict[str, tuple[tuple[int, int, int] | None, list[_Term]]] = {}
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.terms or not args:
            return output
        x = args[0]
        out = output
        for offset, terms in self.terms.values():
            extra = terms[0](x)
            for term in terms[1:]:
                extra = extra + term(x)
            extra = extra.to(out.dtype)
            if offset is None:
                out = out + extra
            else:
                if out is output:
                    out = output.clone()
                dim = -1 if extra.dim() != 4 else 1  # Linear: features last; Conv2d: channels
                out.narrow(dim, offset[1], offset[2]).add_(extra)
        return out


@dataclass
class _Swap:
    container: Any
    attr: str
    original: Any
    mine: Any


@dataclass
class _Live:
    edits: dict[str, _Edit] = field(default_factory=dict)  # param key -> edit
    hooks: dict[str, _Hook] = field(default_factory=dict)  # module path -> hook
    swaps: list[_Swap] = field(default_factory=list)
    cond_caches: list[list] = field(default_factory=list)  # cond caches computed with our text-encoder patches

    def restore_weights(self) -> int:
        touched = len(self.edits) + len(self.hooks)
        try:
            with torch.inference_mode():
                for key, edit in self.edits.items():
                    try:
                        edit.host.restore(edit.tensor)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: Forge restores from its backup
                        edit.host.mark_stale()
                        logger.warning("could not recompute %s (%s); Forge re-merges it from its backup", key, exc)
        finally:
            self.edits.clear()
            for hook in self.hooks.values():
                hook.handle.remove()
            self.hooks.clear()
        return touched

    def restore_all(self) -> int:
        touched = self.restore_weights()
        for swap in reversed(self.swaps):
            if getattr(swap.container, swap.attr, None) is swap.mine:
                setattr(swap.container, swap.attr, swap.original)
        touched += len(self.swaps)
        self.swaps.clear()
        _invalidate(self.cond_caches)
        self.cond_caches.clear()
        return touched


_LIVE = _Live()


def _invalidate(caches: list[list]) -> None:
    for cache in caches:
        if cache:
            cache[0] = None


def _cond_caches(p: Any) -> list[list]:
    """The WebUI's cond caches (instance and class level): cleared so conds are recomputed with/without our TE."""
    found: list[list] = []
    owners: list[Any] = [p]
    try:
        from modules import processing  # type: ignore[import-not-found]

        owners += [getattr(processing, "StableDiffusionProcessing", None)]
        owners += [getattr(processing, "StableDiffusionProcessingTxt2Img", None)]
    except ImportError:
        pass
    for owner in owners:
        for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            cache = getattr(owner, name, None) if owner is not None else None
            if isinstance(cache, list) and not any(cache is c for c in found):
                found.append(cache)
    return found


# ---------------------------------------------------------------------------------------------------------------
# Host-native layers: what Forge's own loader patches for a file (issue 7, goal 1)
# ---------------------------------------------------------------------------------------------------------------

HOST_MAPPING_VERSION = 1  # bump when the host-native layer building changes (part of the score cache key)
_FORGE_REFUSES = 12  # Forge's load_lora_for_models: more unmatched/skipped keys than this and it applies nothing
_TE_ROOTS = (("clip_l.transformer.", "te1"), ("clip_h.transformer.", "te1"), ("clip_g.transformer.", "te2"))


@dataclass(frozen=True)
class _Where:
    """The host target of one layer: parameter key and row slice, as Forge's patch entries name it."""

    key: str
    offset: tuple[int, int, int] | None


@dataclass
class HostLora:
    """One file as Forge patches it into the loaded model: a LoraFile keyed by canonical ids built from Forge's own
    targets, plus where each layer lands and what Forge leaves out."""

    lora: LoraFile
    where: dict[str, _Where]
    notes: list[str]
    base_dependent: bool = False  # some delta was computed on the checkpoint's weights (DoRA, GLoRA)
    # UNet patches Forge applies that K-LoRA never switches (bias diffs, set, norm scales, unknown patch types), by
    # Forge's own patch key: added as they are for the style LoRA, whose other patches K-LoRA applies itself
    fixed: dict = field(default_factory=dict)


def _canonical_id(key: str, flux: bool) -> tuple[str, bool] | None:
    """(layer id, is a bias) of a Forge parameter key; None for keys with no layer id form."""
    bias = key.endswith(".bias")
    if not (bias or key.endswith(".weight")):
        return None
    stem = key.rsplit(".", 1)[0]
    if stem.startswith("diffusion_model."):
        path = stem[len("diffusion_model.") :]
        return (f"flux:{path}" if flux else f"unet:{path}"), bias
    for prefix, component in _TE_ROOTS:
        if stem.startswith(prefix):
            return f"{component}:{stem[len(prefix) :]}", bias
    if stem.startswith("t5xxl.transformer."):
        return f"t5:{stem[len('t5xxl.transformer.') :]}", bias
    return f"other:{stem}", bias


def _slice_part(layer_id: str, shape: tuple[int, ...], offset: tuple[int, int, int]) -> str | None:
    """The [q]/[k]/[v]/[mlp] name of a row slice of a fused Flux weight (the reader's ids), None if it is none."""
    parts = keys.fused_parts(keys.layer_id_parts(layer_id)[1]) if layer_id.startswith("flux:") else None
    if parts is None or offset[0] != 0 or len(shape) != 2:
        return None
    for part in parts:
        start, stop = keys.slice_rows(part, int(shape[1]), int(shape[0]))
        if (start, stop - start) == (offset[1], offset[2]):
            return part
    return None


def _param_shape(param: torch.Tensor) -> tuple[int, ...]:
    real = getattr(param, "gguf_real_shape", None)  # GGUF parameters store packed bytes
    return tuple(int(s) for s in (real if real is not None else param.shape))


def _dequantized(param: torch.Tensor) -> torch.Tensor:
    """A float copy of a parameter Forge stores quantized (GGUF, bitsandbytes), as its own loader makes one."""
    if getattr(param, "gguf_cls", None) is not None:
        try:
            from backend.operations_gguf import dequantize_tensor  # type: ignore[import-not-found]

            return dequantize_tensor(param)
        except ImportError:
            return param.gguf_cls.dequantize(param)
    if getattr(param, "bnb_quantized", False):
        from backend.operations_bnb import functional_dequantize_4bit  # type: ignore[import-not-found]

        return functional_dequantize_4bit(param)
    return param


def _plain_layer(layer_id: str, value: Any, shape: tuple[int, ...], source: tuple[str, ...]) -> LoraLayer | None:
    """Forge's patch value as a factored layer when its delta needs no base weight and no function; else None."""
    kind, v = (value[0], value[1]) if len(value) == 2 and isinstance(value[0], str) else ("diff", value)
    if kind == "lora":
        up, down, alpha, mid, dora = v
        if dora is not None:
            return None
        rank = int(down.shape[0])
        factors = {"up": up, "down": down}
        if mid is not None:
            factors["mid"] = mid
        return LoraLayer(
            layer_id,
            "locon" if len(shape) == 4 else "lora",
            rank,
            shape,
            (float(alpha) / rank) if alpha is not None else 1.0,
            source,
            factors,
        )
    if kind == "loha":
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora = v
        if dora is not None:
            return None
        factors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
        if t1 is not None:
            factors.update(hada_t1=t1, hada_t2=t2)
        rank = int(w1b.shape[0])
        return LoraLayer(
            layer_id, "loha", rank, shape, (float(alpha) / rank) if alpha is not None else 1.0, source, factors
        )
    if kind == "lokr":
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora = v
        if dora is not None:
            return None
        factors = {}
        dim = None
        if w1 is not None:
            factors["lokr_w1"] = w1
        else:
            factors.update(lokr_w1_a=w1a, lokr_w1_b=w1b)
            dim = int(w1b.shape[0])
        if w2 is not None:
            factors["lokr_w2"] = w2
        else:
            factors.update(lokr_w2_a=w2a, lokr_w2_b=w2b)
            if t2 is not None:
                factors["lokr_t2"] = t2
            dim = int(w2b.shape[0])  # Forge: the w2 rank wins
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        rank = dim if dim is not None else min(shape[0], math.prod(shape[1:]))
        return LoraLayer(layer_id, "lokr", rank, shape, scale, source, factors)
    if kind == "diff" and len(shape) >= 2:
        diff = v[0]
        if tuple(diff.shape) != shape:
            return None
        return LoraLayer(layer_id, "full", numerical_rank(diff), shape, 1.0, source, {"diff": diff})
    return None


def _factor_numel(layer: LoraLayer) -> int | None:
    """Elements of the delta the factors give (None when only the target shape says): a file for another model
    has factors that do not fit the weight (Forge's merge would fail on it)."""
    f = layer.factors
    if layer.kind in ("lora", "locon") and "mid" not in f:
        return int(f["up"].shape[0]) * int(f["down"].flatten(1).shape[1])
    if layer.kind == "loha" and "hada_t1" not in f:
        return int(f["hada_w1_a"].shape[0]) * int(f["hada_w1_b"].flatten(1).shape[1])
    return None


def _value_rank(value: Any) -> int:
    kind, v = value
    if kind == "lora":
        return int(v[1].shape[0])
    if kind == "loha":
        return int(v[1].shape[0])
    if kind == "lokr":
        return int(v[6].shape[0]) if v[6] is not None else int(v[4].shape[0]) if v[4] is not None else 1
    if kind == "glora":
        return int(v[2].shape[0])
    return 1


def _host_delta(value: Any, function: Any, base: torch.Tensor, key: str) -> torch.Tensor:
    """Forge's own delta of one patch at unit strength on ``base`` (DoRA, GLoRA, a patch function): its merge of
    the patch onto the fp32 base weight, minus that base. Linear in the strength as Forge applies it."""
    from backend.patcher.lora import merge_lora_to_weight  # type: ignore[import-not-found]

    base = base.to(torch.float32)
    merged = merge_lora_to_weight([[1.0, value, 1.0, None, function]], base, key, computation_dtype=torch.float32)
    return merged - base  # out of place: Forge merges under inference_mode


class _LazyHostDelta(Mapping):
    """The factors ({"diff": delta}) of a layer whose delta Forge computes from the patch and the original weight
    (DoRA, GLoRA, patch functions): computed on every access, never kept, so K-LoRA holds no weight-sized copy.
    The original is Forge's backup of the weight when Forge has merged into it, else the weight itself."""

    def __init__(
        self,
        value: Any,
        function: Any,
        key: str,
        model: Any,
        offset: tuple[int, int, int] | None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        self.value, self.function, self.key, self.model, self.offset, self.rows = (
            value,
            function,
            key,
            model,
            offset,
            rows,
        )

    def _base(self) -> torch.Tensor:
        backup = getattr(getattr(self.model, "lora_loader", None), "backup", None) or {}
        weight = backup.get(self.key)
        if weight is None:
            weight = self.model.get_parameter(self.key)
        if _is_quantized(weight) or weight.dtype not in FLOAT_DTYPES:
            weight = _dequantized(weight)
        return _region(weight.detach(), self.offset)

    def check(self) -> None:
        self["diff"]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != "diff":
            raise KeyError(name)
        delta = _host_delta(self.value, self.function, self._base(), self.key)
        return delta if self.rows is None else delta[self.rows[0] : self.rows[1]]

    def __iter__(self) -> Iterator[str]:
        return iter(("diff",))

    def __len__(self) -> int:
        return 1


def build_host_lora(path: str, name: str, sha256: str, unet_model: Any, clip_model: Any) -> HostLora:
    """The layers Forge's own loader patches for ``path`` into the loaded model (``load_lora`` with the model's
    ``model_lora_keys_unet``/``_clip`` maps, then ``add_patches``' check against the model's parameters).

    Ids: the canonical keys.py form of each target (``unet:``/``flux:``/``te1:``/``te2:``/``t5:``); a row slice of a
    fused weight (Flux diffusers q/k/v/proj_mlp onto qkv/linear1) is its own layer, and a patch of the whole fused
    weight (kohya/BFL) is split into the same slices, so mixed-format pairs share their layers. Deltas: the file's
    factors for LoRA/LoCon/LoHa/LoKr/full; Forge's own merge on the original weight for DoRA, GLoRA and patches with
    a function (norm_out's shift/scale swap). Keys Forge does not apply are left out and named in ``notes``.
    Raises KLoraError when Forge would apply nothing of the file (its own "version mismatch" rule)."""
    from backend.patcher import lora as host_lora  # type: ignore[import-not-found]

    from klora_ext.lora_file import BIAS_SUFFIX, _split_fused

    sd = _networks().load_lora_state_dict(path)
    unet_map = host_lora.model_lora_keys_unet(unet_model, {})  # fresh dicts: Forge's functions mutate a default
    clip_map = host_lora.model_lora_keys_clip(clip_model, {}) if clip_model is not None else {}
    unet_patches, rest = host_lora.load_lora(sd, unet_map)
    clip_patches, rest = host_lora.load_lora(rest, clip_map) if clip_map else ({}, rest)
    if len(rest) > _FORGE_REFUSES:
        msg = (
            f"[K-LoRA] Forge does not load '{name}' for this model: {len(rest)} of its keys match nothing in the "
            f"loaded checkpoint (e.g. {sorted(rest)[0]}); is it made for this model?"
        )
        raise KLoraError(msg)
    flux = any(k.startswith("diffusion_model.double_blocks.") for k, _ in unet_model.named_parameters())
    notes: list[str] = []
    if rest:
        notes.append(f"'{name}': {len(rest)} keys Forge does not apply are left out (e.g. {sorted(rest)[0]})")
    layers: dict[str, LoraLayer] = {}
    static: dict[str, LoraLayer] = {}
    where: dict[str, _Where] = {}
    kinds_left: dict[str, int] = {}
    base_dependent = False
    fixed: dict = {}
    for part_patches, model in ((unet_patches, unet_model), (clip_patches, clip_model)):
        if not part_patches:
            continue
        params = dict(model.named_parameters())
        skipped = [k for k in part_patches if (k if isinstance(k, str) else k[0]) not in params]
        if len(skipped) > _FORGE_REFUSES:
            what = "UNet" if model is unet_model else "text encoder"
            if model is unet_model:
                msg = (
                    f"[K-LoRA] Forge does not apply '{name}' to this model's {what}: {len(skipped)} of its targets "
                    "are not in the loaded checkpoint; is it made for this model?"
                )
                raise KLoraError(msg)
            notes.append(f"'{name}': Forge skips its {what} part ({len(skipped)} targets not in the model)")
            continue
        if skipped:
            notes.append(f"'{name}': {len(skipped)} targets are not in the loaded model and are left out")
        for k, value in part_patches.items():
            key, offset, function = (
                (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            )
            param = params.get(key)
            if param is None:
                continue
            canon = _canonical_id(key, flux)
            if canon is None:
                kinds_left["unnamed"] = kinds_left.get("unnamed", 0) + 1
                if model is unet_model:
                    fixed[k] = value
                continue
            layer_id, is_bias = canon
            full_shape = _param_shape(param)
            shape = full_shape
            if offset is not None:
                offset = tuple(int(x) for x in offset)
                shape = list(full_shape)
                shape[offset[0]] = offset[2]
                shape = tuple(shape)
                part = _slice_part(layer_id, full_shape, offset)
                layer_id = f"{layer_id}[{part}]" if part else f"{layer_id}[d{offset[0]}:{offset[1]}+{offset[2]}]"
            kind = value[0] if len(value) == 2 and isinstance(value[0], str) else "diff"
            source = (str(key),)
            if is_bias or kind == "set" or len(shape) < 2:
                sid = layer_id + BIAS_SUFFIX if is_bias else layer_id
                static[sid] = LoraLayer(sid, "bias" if is_bias else kind, 1, shape, 1.0, source, {})
                if model is unet_model:
                    fixed[k] = value
                continue
            layer = None if function is not None else _plain_layer(layer_id, value, shape, source)
            if layer is not None and _factor_numel(layer) not in (None, math.prod(shape)):
                notes.append(f"'{name}': {key} does not fit the model's weight {shape}; left out")
                continue
            if layer is None:
                if kind not in ("lora", "loha", "lokr", "glora", "diff"):
                    kinds_left[kind] = kinds_left.get(kind, 0) + 1
                    if model is unet_model:
                        fixed[k] = value
                    continue
                lazy = _LazyHostDelta(value, function, key, model, offset)
                try:
                    lazy.check()
                except Exception as exc:  # noqa: BLE001 - Forge's merge refuses it: Forge would not apply it either
                    notes.append(f"'{name}': Forge cannot merge {key} ({exc}); left out")
                    continue
                base_dependent = base_dependent or function is None  # a patch function alone needs no base
                rank = _value_rank(value)
                path = keys.layer_id_parts(layer_id)[1]
                parts = keys.fused_parts(path) if offset is None and layer_id.startswith("flux:") else None
                if parts and len(shape) == 2 and keys.fused_split_ok(path, shape[0], shape[1]):
                    for part in parts:  # the same slices as a split file of it (computed per slice, on demand)
                        start, stop = keys.slice_rows(part, int(shape[1]), int(shape[0]))
                        piece_id = f"{layer_id}[{part}]"
                        piece_shape = (stop - start, shape[1])
                        factors = _LazyHostDelta(value, function, key, model, offset, (start, stop))
                        layers[piece_id] = LoraLayer(piece_id, "full", rank, piece_shape, 1.0, source, factors)
                        where[piece_id] = _Where(key, (0, start, stop - start))
                    continue
                layer = LoraLayer(layer_id, "full", rank, shape, 1.0, source, lazy)
            pieces = _split_fused(layer, name) if offset is None else [layer]
            for piece in pieces:
                if piece.id in layers:
                    msg = (
                        f"[K-LoRA] '{name}' patches {piece.id} twice (a fused key and a split key); Forge would add "
                        "both, K-LoRA cannot switch them apart"
                    )
                    raise KLoraError(msg)
                layers[piece.id] = piece
                _, part = keys.split_slice(piece.id)
                if offset is None and part is not None:
                    start, stop = keys.slice_rows(part, int(shape[1]), int(shape[0]))
                    where[piece.id] = _Where(key, (0, start, stop - start))
                else:
                    where[piece.id] = _Where(key, offset)
    if kinds_left:
        notes.append(
            f"'{name}': patches K-LoRA cannot switch are left as Forge applies them: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds_left.items()))
        )
    if static:
        notes.append(
            f"'{name}': {len(static)} bias/set/norm patches are applied as Forge applies them, never switched"
        )
    if not layers and not static:
        msg = f"[K-LoRA] Forge patches nothing of '{name}' in the loaded model; is it made for this model?"
        raise KLoraError(msg)
    arch = "flux" if flux else ("sdxl" if any(i.startswith("te2:") for i in layers) else "sd15")
    lora = LoraFile(
        path=path,
        name=name,
        sha256=sha256,
        arch=arch,
        layers=dict(sorted(layers.items(), key=lambda kv: keys.forward_order_key(kv[0]))),
        unknown_keys=sorted(rest),
        static_layers=static,
        warnings=list(notes),
    )
    return HostLora(lora, where, notes, base_dependent, fixed)


def model_fingerprint(unet_model: Any, clip_model: Any) -> str:
    """Names and shapes of the model's parameters: the host layer mapping id in the score cache key."""
    import hashlib

    digest = hashlib.sha256()
    for model in (unet_model, clip_model):
        if model is None:
            continue
        for k, v in model.named_parameters():
            digest.update(f"{k}:{_param_shape(v)};".encode())
    return f"forge-host{HOST_MAPPING_VERSION}:{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------------------
# Per-run data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """Where one layer's delta lands in the model, and what the host applies there."""

    layer_id: str
    key: str  # parameter key in the KModel ("diffusion_model.<path>.weight")
    offset: tuple[int, int, int] | None  # (dim, start, length) for slices of fused weights (Flux qkv)
    module_path: str
    content: LoraLayer | None
    style: LoraLayer | None
    host_content: bool = False  # the host merges the content LoRA here
    mode: str = "A"


class ForgeAdapter(HostAdapter):
    name = "forge"

    def __init__(self) -> None:
        super().__init__()
        self._files: OrderedDict[tuple, HostLora] = OrderedDict()
        self._clear_run_state()

    def _clear_run_state(self) -> None:
        self._content: LoraFile | None = None
        self._style: LoraFile | None = None
        self._roles: dict[str, int] = {}  # wanted role of every non-text-encoder layer (static + plan)
        self._te_roles: dict[str, int] = {}
        self._model: Any = None  # the KModel the targets were built for
        self._targets: dict[str, _Target] = {}
        self._applied: dict[str, int] = {}  # layer -> role physically applied now (absent: what the host applies)
        self._clone: Any = None  # our UNet patcher clone
        self._te_clone: Any = None
        self._content_ident: tuple | None = None
        self._host_strength = 0.0
        self._prepared_pass = -1  # run.passes of the pass the layers were brought up to date for (-1: none)
        self._live_unet: Any = None  # the UNet patcher of the pass being sampled
        self._compute_device = torch.device("cpu")
        self._compute_dtype = torch.float32
        self._hosts: dict[str, _HostWeight] = {}  # param key -> how to recompute Forge's weight (mode A keys)
        self._merges: dict[tuple, torch.Tensor] = {}  # Forge merges of the key being edited (slices share them)
        self._style_entries: dict[str, list] = {}  # the style LoRA's UNet patch entries, made by Forge's add_patches
        self._style_fixed: dict = {}  # the style LoRA's UNet patches Forge applies as they are (see HostLora.fixed)

    # ---- detection ----------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls) -> bool:
        """True when the current Forge ``backend/`` patcher is importable."""
        return host_kind() == "forge2"

    @classmethod
    def unsupported_reason(cls) -> str | None:
        """A message for Forge builds K-LoRA does not support (the older ldm_patched backends), else None."""
        return LEGACY_MESSAGE if host_kind() == "forge-legacy" else None

    # ---- names --------------------------------------------------------------------------------------------------
    def list_loras(self) -> list[str]:
        networks = _networks()
        if not networks.available_networks:
            networks.list_available_networks()
        return sorted(networks.available_networks, key=str.lower)

    def resolve(self, name: str) -> LoraRef:
        networks = _networks()
        wanted = (name or "").strip()
        if not wanted:
            msg = "[K-LoRA] no LoRA name given"
            raise KLoraError(msg)
        entry = _lookup(networks, wanted)
        if entry is None:
            networks.list_available_networks()  # the file may have been added since the list was built
            entry = _lookup(networks, wanted)
        if entry is None:
            names = sorted(set(networks.available_networks) | set(networks.available_network_aliases), key=str.lower)
            close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            msg = f"[K-LoRA] LoRA '{wanted}' not found in Forge's LoRA list ({len(names)} known){hint}"
            raise KLoraError(msg)
        alias = (
            entry.get_alias() if callable(getattr(entry, "get_alias", None)) else getattr(entry, "alias", entry.name)
        )
        shorthash = getattr(entry, "shorthash", None) or ""
        if not shorthash and callable(getattr(entry, "read_hash", None)):
            try:
                entry.read_hash()
                shorthash = entry.shorthash or ""
            except (OSError, AttributeError):
                shorthash = ""
        return LoraRef(name=entry.name, alias=alias or entry.name, path=entry.filename, shorthash=shorthash)

    def refresh(self) -> list[str]:
        """Re-scan the LoRA folder (the UI's refresh button)."""
        _networks().list_available_networks()
        return self.list_loras()

    def score_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---- arming -------------------------------------------------------------------------------------------------
    def arm(self, p: Any, run: KLoraRun) -> None:
        self.restore()
        self._clear_run_state()
        from klora_ext.webui.neo import unsupported_model_reason  # Forge Neo's Nunchaku checkpoints (issue 9)

        reason = unsupported_model_reason()
        if reason:
            raise KLoraError(reason)
        self._build_targets(p, run)
        self.run = run
        logger.info(
            "armed on Forge: %d layers switched, %d static; content '%s' x%g, style '%s' x%g",
            len(run.session.plan_layer_ids()),
            len(self._roles),
            run.content.name,
            run.args.content_weight,
            run.style.name,
            run.args.style_weight,
        )

    def host_files(self, p: Any, content: LoraRef, style: LoraRef) -> tuple[str, LoraFile, LoraFile]:
        """(layer mapping id, content, style) as Forge's own loader patches them into the loaded model: the layer
        set K-LoRA scores and switches (issue 7). The mapping id (model parameter names and shapes) keys the score
        cache, so a cached pair skips the scoring but not this (cheap: Forge's state dicts are lru-cached)."""
        unet_model, clip_model = _models_of(p)
        mapping = model_fingerprint(unet_model, clip_model)
        c, s = self._host(content, unet_model, clip_model), self._host(style, unet_model, clip_model)
        if c.base_dependent or s.base_dependent:
            mapping += f":ckpt={_checkpoint_id(p)}"  # DoRA/GLoRA deltas depend on the checkpoint's weights
        return mapping, c.lora, s.lora

    def _host(self, ref: LoraRef, unet_model: Any, clip_model: Any) -> HostLora:
        try:
            st = os.stat(ref.path)
        except OSError as exc:
            msg = f"[K-LoRA] LoRA file not found: '{ref.path}'"
            raise KLoraError(msg) from exc
        key = (os.path.abspath(ref.path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, id(unet_model))
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        from klora_ext.webui.run import score_cache

        host = build_host_lora(ref.path, ref.name, score_cache().file_hash(ref.path), unet_model, clip_model)
        for note in host.notes:
            logger.info(note)
        self._files[key] = host
        while len(self._files) > _MAX_FILES:
            self._files.popitem(last=False)
        return host

    def _build_targets(self, p: Any, run: KLoraRun) -> None:
        """Every layer of both files at the target Forge's own loader gives it (parameter key and row slice)."""
        unet_model, clip_model = _models_of(p)
        content = self._host(run.content, unet_model, clip_model)
        style = self._host(run.style, unet_model, clip_model)
        self._content, self._style = content.lora, style.lora
        static = run.session.static_roles(self._content.layers, self._style.layers)
        self._te_roles = {i: r for i, r in static.items() if keys.is_text_encoder(i)}
        self._roles = {i: r for i, r in static.items() if i not in self._te_roles}
        targets: dict[str, _Target] = {}
        missing: list[str] = []
        for layer_id in self._roles.keys() | set(run.session.plan_layer_ids()):
            lc, ls = self._content.layers.get(layer_id), self._style.layers.get(layer_id)
            where = content.where.get(layer_id) or style.where.get(layer_id)
            if where is None or keys.is_text_encoder(layer_id):
                missing.append(layer_id)  # scored on another model (cached plan): Forge does not patch it here
                continue
            targets[layer_id] = _Target(layer_id, where.key, where.offset, where.key.rsplit(".", 1)[0], lc, ls)
        if missing:
            note = f"{len(missing)} planned layers are not patched by Forge in this model and are left out"
            logger.warning("%s (e.g. %s)", note, missing[0])
            run.notes.append(note)
        self._style_fixed = style.fixed
        self._model = unet_model
        self._targets = targets

    # ---- text encoders ------------------------------------------------------------------------------------------
    def on_networks_activated(self, p: Any) -> None:
        """Apply the text-encoder policy to the CLIP patcher Forge will compute conds with (idempotent)."""
        run = self.run
        if run is None or (run.owner is not None and p is not run.owner):
            return
        sd_model = p.sd_model
        after = getattr(sd_model, "forge_objects_after_applying_lora", None)
        clip = getattr(after, "clip", None)
        if clip is None or clip is self._te_clone:
            return
        want = {
            "content": any(r in (CONTENT, BOTH) for i, r in self._te_roles.items() if i in self._content.layers),
            "style": any(r in (STYLE, BOTH) for i, r in self._te_roles.items() if i in self._style.layers),
        }
        new = clip.clone()
        changed = False
        for side, ref, weight in (
            ("content", run.content, run.args.content_weight),
            ("style", run.style, run.args.style_weight),
        ):
            patches = new.patcher.lora_patches
            mine = [k for k in patches if _same_file(k[0], ref.path)]
            if mine:
                self.note_once(f"the {side} LoRA '{ref.name}' is also in the prompt; K-LoRA applies it instead")
            if want[side] and len(mine) == 1 and mine[0][1] == weight and mine[0][2] == 1.0:
                continue  # already there exactly as we would add it
            for k in mine:
                patches.pop(k)
                changed = True
            if want[side] and weight != 0:
                te_patches = _host_patches(ref.path, "clip", new.cond_stage_model)
                if te_patches:
                    new.add_patches(
                        filename=ref.path, patches=te_patches, strength_patch=weight, online_mode=_online_mode(p)
                    )
                    changed = True
        if not changed:
            return
        self._te_clone = new
        _LIVE.swaps.append(_Swap(after, "clip", clip, new))
        current = getattr(sd_model, "forge_objects", None)
        if current is not None and current is not after and getattr(current, "clip", None) is clip:
            _LIVE.swaps.append(_Swap(current, "clip", clip, new))
            current.clip = new
        after.clip = new
        caches = _cond_caches(p)
        _invalidate(caches)
        _LIVE.cond_caches.extend(c for c in caches if not any(c is o for o in _LIVE.cond_caches))

    # ---- sampling passes ----------------------------------------------------------------------------------------
    def before_sampling(self, p: Any, *, hires: bool) -> None:
        """Called right before each sampling pass (twice for Forge's hires pass): undo in-place edits before Forge
        may refresh its LoRA merge, and put our UNet patcher clone (content LoRA added, style removed) in place."""
        run = self.run
        if run is None or (run.owner is not None and p is not run.owner):
            return
        _LIVE.restore_weights()
        self._applied.clear()
        self._prepared_pass = -1
        forge_objects = p.sd_model.forge_objects
        unet = forge_objects.unet
        if unet is self._clone:
            return  # idempotent: the same pass asked twice
        if unet.model is not self._model:
            try:  # another checkpoint (XYZ checkpoint axis, hires checkpoint): same LoRAs, new targets
                self._build_targets(p, run)
            except KLoraError as exc:
                reason = str(exc).removeprefix("[K-LoRA] ")
                logger.warning("%s; K-LoRA is off for the rest of this generation", reason)
                if isinstance(getattr(p, "extra_generation_params", None), dict):
                    p.extra_generation_params["K-LoRA skipped"] = reason
                self.disarm(None)
                return
        clone = unet.clone()
        patches = clone.lora_patches
        for ident in [k for k in patches if _same_file(k[0], run.style.path)]:
            patches.pop(ident)
            self.note_once(f"the style LoRA '{run.style.name}' is also in the prompt; K-LoRA applies it instead")
        weight = run.args.content_weight
        mine = [k for k in patches if _same_file(k[0], run.content.path)]
        if mine:
            self.note_once(f"the content LoRA '{run.content.name}' is also in the prompt; K-LoRA applies it instead")
        if len(mine) == 1 and mine[0][1] == weight and mine[0][2] == 1.0:
            ident = mine[0]  # exactly what we would add: keep it (same identifier, so Forge's merge cache holds)
        else:
            for k in mine:
                patches.pop(k)
            ident = None
            if weight != 0:
                unet_patches = _host_patches(run.content.path, "unet", clone.model)
                online = _online_mode(p)
                clone.add_patches(
                    filename=run.content.path, patches=unet_patches, strength_patch=weight, online_mode=online
                )
                ident = (run.content.path, weight, 1.0, online)
        self._content_ident = ident
        self._host_strength = weight if ident is not None else 0.0
        self._style_entries = {}
        if run.args.style_weight != 0 and run.args.method != "content-only":
            if self._style_fixed:
                # what K-LoRA does not switch of the style LoRA (bias diffs, ...) is applied as Forge applies it
                clone.add_patches(
                    filename=run.style.path + FIXED_SUFFIX,
                    patches=self._style_fixed,
                    strength_patch=run.args.style_weight,
                    online_mode=_online_mode(p),
                )
            # the style's entries exactly as Forge would add them for <lora:style:w> (on a scratch clone that is
            # never sampled): an in-place style layer is then Forge's own merge of them, bit for bit
            scratch = clone.clone()
            scratch.lora_patches = {}
            own = {
                k: v
                for k, v in _host_patches(run.style.path, "unet", clone.model).items()
                if k not in self._style_fixed
            }
            scratch.add_patches(
                filename=run.style.path, patches=own, strength_patch=run.args.style_weight, online_mode=False
            )
            self._style_entries = next(iter(scratch.lora_patches.values()), {})
        hosted = clone.lora_patches.get(ident, {}) if ident is not None else {}
        for t in self._targets.values():
            # a fused (kohya) content patch covers every slice of its weight; a split one only its own rows
            t.host_content = t.content is not None and any(e[3] in (None, t.offset) for e in hosted.get(t.key, ()))
        if hasattr(clone, "add_extra_preserved_memory_during_sampling"):
            biggest = max((t.content or t.style).numel for t in self._targets.values()) if self._targets else 0
            clone.add_extra_preserved_memory_during_sampling(3 * 4 * biggest)  # fp32 merges of one weight
        _LIVE.swaps.append(_Swap(forge_objects, "unet", unet, clone))
        forge_objects.unet = clone
        self._clone = clone

    def step_info(self, params: Any) -> StepInfo | None:
        denoiser = getattr(params, "denoiser", None)
        run = self.run
        if denoiser is None or run is None:
            return None
        p = getattr(denoiser, "p", None)
        if run.owner is not None and p is not run.owner:
            return None
        calls = int(getattr(denoiser, "total_steps", 0) or 0)
        steps = int(getattr(denoiser, "steps", 0) or 0) or calls
        if calls <= 0 or steps <= 0:
            return None
        # Second-order samplers make ~2 calls per step: map calls onto the pass's steps (the plan's rows).
        step = min(int(denoiser.step) * steps // calls, steps - 1)
        if getattr(p, "is_hr_pass", False):
            kind = "hires"
        elif getattr(p, "init_images", None):
            kind = "img2img"
        else:
            kind = "first"
        denoise = getattr(p, "denoising_strength", None) if kind != "first" else None
        return StepInfo(pass_token=denoiser, step=step, total_steps=steps, kind=kind, denoise=denoise)

    def on_denoiser(self, params: Any) -> None:
        run = self.run
        if run is None:
            return
        p = getattr(getattr(params, "denoiser", None), "p", None)
        if p is None or (run.owner is not None and p is not run.owner):
            return
        unet = p.sd_model.forge_objects.unet
        if unet.model is not self._model:
            logger.warning("the model changed during sampling (refiner?); K-LoRA stops for the rest of this image")
            self.disarm(None)
            return
        self._live_unet = unet
        try:
            super().on_denoiser(params)
        except Exception:
            self.disarm(None)  # never leave a half-applied step behind
            raise

    def apply_changes(self, changes: list[Change]) -> None:
        for layer_id, role in changes:
            self._roles[layer_id] = role
        run = self.run
        if run is not None and run.passes != self._prepared_pass:
            self._prepare_pass()
            return
        try:
            for layer_id, _ in changes:
                self._apply(layer_id)
        finally:
            self._merges.clear()

    def _prepare_pass(self) -> None:
        """First denoiser call of a pass: Forge has merged (refresh ran); check that, pick (A)/(B) per layer from
        where each weight lives now, and bring every layer to its wanted role."""
        unet = self._live_unet
        run = self.run
        _LIVE.restore_weights()
        self._applied.clear()
        patches = unet.lora_patches
        if self._content_ident is not None and self._content_ident not in patches:
            msg = "[K-LoRA] another extension replaced the UNet patcher after K-LoRA prepared it; K-LoRA cannot run"
            raise KLoraError(msg)
        if any(_same_file(k[0], run.style.path) for k in patches):
            msg = "[K-LoRA] the style LoRA was added back to the UNet patcher by another extension; K-LoRA cannot run"
            raise KLoraError(msg)
        loader = getattr(unet, "lora_loader", None)
        if loader is not None and getattr(loader, "loaded_hash", None) != str(list(patches.keys())):
            msg = "[K-LoRA] Forge has not merged the LoRAs of this sampling pass yet; K-LoRA cannot run"
            raise KLoraError(msg)
        device = torch.device(getattr(unet, "load_device", "cpu"))
        counts = {"A": 0, "B": 0}
        merged = _merged_patches(patches)
        online = {key for ident, entries in patches.items() if ident[3] for key in entries}  # applied per forward
        backup = getattr(loader, "backup", None) or {}
        self._hosts = {}
        for t in self._targets.values():
            module = self._model.get_submodule(t.module_path)
            param = getattr(module, t.key.rsplit(".", 1)[1])
            t.mode = _mode(module, param, device)
            if t.mode == "A" and t.key not in self._hosts:
                original = backup.get(t.key)
                if t.key in merged and original is not None and not _same_storage(original, param):
                    content = patches.get(self._content_ident, {}).get(t.key, ())
                    self._hosts[t.key] = _HostWeight(loader, t.key, merged[t.key], param, content)
                elif t.key not in merged and t.key in self._style_entries and t.key not in online:
                    # only the style LoRA patches it: K-LoRA keeps the loaded weight while it edits it (on the
                    # offload device, where Forge keeps its own backups, as it would with the style in the prompt)
                    offload = getattr(unet, "offload_device", "cpu")
                    self._hosts[t.key] = _HostWeight(None, t.key, [], param, offload=offload)
                else:
                    t.mode = "B"  # Forge holds no original of it: a hook needs none either
            counts[t.mode] += 1
        self._compute_device = device
        self._compute_dtype = getattr(unet.model, "computation_dtype", torch.float32)
        try:
            for layer_id in self._roles:
                self._apply(layer_id)
        finally:
            self._merges.clear()
        self._prepared_pass = run.passes
        logger.debug("pass %d: %d layers in place (A), %d by forward hook (B)", run.passes, counts["A"], counts["B"])

    # ---- applying one layer -------------------------------------------------------------------------------------
    def _coefficients(self, t: _Target, role: int) -> tuple[float, float]:
        """(content coef, style coef) of the correction: wanted delta minus what the host applies."""
        args = self.run.args
        content = args.content_weight if role in (CONTENT, BOTH) and t.content is not None else 0.0
        style = args.style_weight if role in (STYLE, BOTH) and t.style is not None else 0.0
        if t.host_content:
            content -= self._host_strength
        return content, style

    def _apply(self, layer_id: str) -> None:
        t = self._targets.get(layer_id)
        role = self._roles.get(layer_id)
        if t is None or role is None or self._applied.get(layer_id) == role:
            return
        if t.mode == "A":
            style = self._style_entries.get(t.key, []) if role in (STYLE, BOTH) and t.style is not None else []
            wanted = self._hosts[t.key].wanted(role in (CONTENT, BOTH), style)
            if layer_id not in self._applied and wanted is None:
                return  # the host's weight is what this role wants, and it was never edited
            if self._apply_in_place(t, wanted):
                self._applied[layer_id] = role
                return
            t.mode = "B"
        c_coef, s_coef = self._coefficients(t, role)
        if layer_id not in self._applied and c_coef == 0 and s_coef == 0:
            return  # nothing to correct and nothing corrected before
        self._apply_hook(t, c_coef, s_coef)
        self._applied[layer_id] = role

    def _merge(self, host: _HostWeight, wanted: list | None) -> torch.Tensor:
        """Forge's merge of one key with the wanted list (None: its own); kept while the slices of that key (Flux
        qkv) are edited, dropped as soon as another key comes."""
        ident = (host.key, None if wanted is None else tuple(id(e) for e in wanted))
        if ident not in self._merges:
            if any(k[0] != host.key for k in self._merges):
                self._merges.clear()  # free the previous key's merges first
            self._merges[ident] = host.compute(wanted)
        return self._merges[ident]

    def _apply_in_place(self, t: _Target, wanted: list | None) -> bool:
        """Write Forge's own merge of the wanted patch list (from Forge's backup) into the layer's region. False
        (nothing touched) when Forge's merge, recomputed, is not bit-identical to the weight it holds (merged on
        another device, or changed by someone else): the caller then uses a hook, which needs no restore."""
        with torch.inference_mode():
            edit = _LIVE.edits.get(t.key)
            if edit is None:
                module = self._model.get_submodule(t.module_path)
                param = getattr(module, t.key.rsplit(".", 1)[1])
                host = self._hosts[t.key]
                if host.loader is None:
                    host.original = param.detach().to(device=host.offload, copy=True)
                if not torch.equal(self._merge(host, None), param):
                    logger.debug("%s: Forge's merge does not recompute bit-exactly; forward hook instead", t.key)
                    host.original = None
                    return False
                edit = _Edit(param, host)
                _LIVE.edits[t.key] = edit
            _region(edit.tensor, t.offset).copy_(_region(self._merge(edit.host, wanted), t.offset))
            return True

    def _apply_hook(self, t: _Target, c_coef: float, s_coef: float) -> None:
        if t.offset is not None and t.offset[0] != 0:
            logger.warning("layer %s: a slice along the input dim cannot be corrected by a forward hook", t.layer_id)
            return
        hook = _LIVE.hooks.get(t.module_path)
        module = self._model.get_submodule(t.module_path)
        terms = [
            _term(layer, coef, module, self._compute_device, self._compute_dtype)
            for coef, layer in ((c_coef, t.content), (s_coef, t.style))
            if coef != 0 and layer is not None
        ]
        if not terms:
            if hook is not None:
                hook.terms.pop(t.layer_id, None)
                if not hook.terms:
                    hook.handle.remove()
                    del _LIVE.hooks[t.module_path]
            return
        if hook is None:
            hook = _LIVE.hooks[t.module_path] = _Hook(module)
        hook.terms[t.layer_id] = (t.offset, terms)

    # ---- ending -------------------------------------------------------------------------------------------------
    def restore(self) -> None:
        touched = _LIVE.restore_all()
        self._applied.clear()
        self._prepared_pass = -1
        self._clone = None
        self._te_clone = None
        if touched:
            logger.debug("restored %d weights/hooks/objects", touched)


# ---------------------------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------------------------


def _networks() -> Any:
    try:
        import networks  # type: ignore[import-not-found]
    except ImportError as exc:
        msg = "[K-LoRA] Forge's built-in LoRA extension (sd_forge_lora) is not loaded; enable it in Extensions"
        raise KLoraError(msg) from exc
    return networks


def _lookup(networks: Any, name: str) -> Any:
    for candidate in (name, _HASH_SUFFIX.sub(r"\1", name)):
        for table in (networks.available_network_aliases, networks.available_networks):
            entry = table.get(candidate)
            if entry is not None:
                return entry
    lowered = name.lower()
    for table in (networks.available_networks, networks.available_network_aliases):
        for key, entry in table.items():
            if key.lower() == lowered:
                return entry
    return None


def _sd_model_of(p: Any) -> Any:
    """The loaded checkpoint of a generation, or the WebUI's current one when there is no generation (plan preview,
    plan API: ``p`` is None)."""
    sd_model = getattr(p, "sd_model", None)
    if sd_model is None:
        try:
            from modules import shared  # type: ignore[import-not-found]
        except ImportError:
            return None
        sd_model = getattr(shared, "sd_model", None)
    return sd_model


def _unet_of(p: Any) -> Any:
    forge_objects = getattr(_sd_model_of(p), "forge_objects", None)
    unet = getattr(forge_objects, "unet", None)
    if unet is None or not hasattr(unet, "lora_patches"):
        msg = "[K-LoRA] no Forge model is loaded (forge_objects.unet is missing); load a checkpoint first"
        raise KLoraError(msg)
    return unet


def _checkpoint_id(p: Any) -> str:
    """The loaded checkpoint as the WebUI names it (its hash when known)."""
    info = getattr(_sd_model_of(p), "sd_checkpoint_info", None)
    for attr in ("sha256", "shorthash", "title"):
        value = getattr(info, attr, None)
        if value:
            return str(value)
    return str(info)


def _models_of(p: Any) -> tuple[Any, Any]:
    """The loaded UNet (KModel) and text-encoder module Forge patches LoRAs into."""
    unet = _unet_of(p)
    clip = getattr(getattr(_sd_model_of(p), "forge_objects", None), "clip", None)
    return unet.model, getattr(clip, "cond_stage_model", None)


def _host_patches(path: str, part: str, model: Any) -> dict:
    """A LoRA file parsed by Forge itself for the UNet ("unet") or the text encoders ("clip"): its patch dict."""
    from backend.patcher import lora  # type: ignore[import-not-found]

    keymap = lora.model_lora_keys_unet(model, {}) if part == "unet" else lora.model_lora_keys_clip(model, {})
    patches, _ = lora.load_lora(_networks().load_lora_state_dict(path), keymap)  # Forge's lru-cached state dict
    return patches


def _online_mode(p: Any) -> bool:
    """What Forge's own LoRA loader would choose: online only when asked for and the UNet is not stored in float."""
    try:
        from backend.args import dynamic_args  # type: ignore[import-not-found]
    except ImportError:
        return False
    if not dynamic_args.get("online_lora", False):
        return False
    storage = getattr(_unet_of(p).model, "storage_dtype", torch.float16)
    return storage not in FLOAT_DTYPES


def _mode(module: torch.nn.Module, param: torch.Tensor, device: torch.device) -> str:
    """(A) in place for float weights resident on the compute device; (B) forward hook for everything else.

    Manual cast alone (storage dtype != computation dtype, e.g. an fp16 checkpoint computed in fp32) keeps (A): Forge
    casts ``layer.weight`` on every forward, so an in-place edit is seen. Modules Forge swaps for low VRAM carry
    ``prev_parameters_manual_cast`` (backend/memory_management.py) and their weight lives off the compute device."""
    if _is_quantized(param) or hasattr(module, "prev_parameters_manual_cast"):
        return "B"
    if param.dtype not in FLOAT_DTYPES or param.device != device:
        return "B"
    return "A"


def _merged_patches(lora_patches: dict) -> dict[str, list]:
    """Per parameter key, the patch list Forge's ``LoraLoader.refresh`` merges (offline patches, in dict order)."""
    merged: dict[str, list] = {}
    for ident, patches in lora_patches.items():
        if ident[3]:  # online patches are applied at the forward, not merged
            continue
        for key, entries in patches.items():
            merged[key] = merged.get(key, []) + list(entries)
    return merged


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _term(layer: LoraLayer, coef: float, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> _Term:
    """coef * delta as a forward branch: the file's own factors for plain LoRA/LoCon, else a low-rank factorization
    of the dense delta when it is exact to fp32 rounding, else the dense delta."""
    shape = _branch_shape(layer, module)
    conv = None
    if len(shape) == 4:
        conv = {
            "stride": getattr(module, "stride", 1),
            "padding": getattr(module, "padding", 0),
            "dilation": getattr(module, "dilation", 1),
            "groups": getattr(module, "groups", 1),
        }
    out = shape[0]
    grouped = conv is not None and conv["groups"] != 1
    f = layer.factors
    if layer.kind in ("lora", "locon") and "mid" not in f and not grouped:
        up = f["up"].to(device=device, dtype=torch.float32).reshape(out, -1) * (coef * layer.scale)
        down = f["down"].to(device=device, dtype=torch.float32)
        return _make_term(conv, shape, down, up, dtype)
    dense = layer.delta(device=device, dtype=torch.float32) * coef
    hint = layer.rank * layer.rank if layer.kind == "loha" else layer.rank
    factors = None if grouped or layer.kind in ("lokr", "full") else _low_rank(dense.reshape(out, -1), hint)
    if factors is None:
        return _Term(conv, dense.reshape(shape).to(dtype), None)
    up, down = factors
    return _make_term(conv, shape, down, up, dtype)


def _branch_shape(layer: LoraLayer, module: torch.nn.Module) -> tuple[int, ...]:
    """The delta's shape as the module computes with it: Conv2d (out, in/groups, kh, kw) or Linear (out, in)."""
    if isinstance(module, torch.nn.Conv2d):
        shape = (layer.shape[0], module.in_channels // module.groups, *module.kernel_size)
    else:
        shape = (layer.shape[0], layer.numel // layer.shape[0])
    if len(layer.shape) == 4 and not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        shape = tuple(layer.shape)  # an unknown module type: trust the file
    return shape if math.prod(shape) == layer.numel else tuple(layer.shape)


def _make_term(
    conv: dict[str, Any] | None, shape: tuple[int, ...], down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype
) -> _Term:
    rank = up.shape[1]
    if conv is None:
        return _Term(None, down.reshape(rank, -1).to(dtype), up.to(dtype))
    return _Term(conv, down.reshape(rank, *shape[1:]).to(dtype), up.reshape(shape[0], rank, 1, 1).to(dtype))


def _low_rank(matrix: torch.Tensor, rank_hint: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) with up @ down == matrix to fp32 rounding, or None when that is not cheaper than dense."""
    rows, cols = matrix.shape
    q = min(rank_hint + 8, rows, cols)
    if q * (rows + cols) * 2 >= rows * cols:
        return None
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(cols, q, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ probe)
    down = basis.T @ matrix
    residual = torch.linalg.matrix_norm(matrix - basis @ down)
    if residual > 1e-5 * torch.linalg.matrix_norm(matrix).clamp_min(1e-30):
        return None
    return basis, down


__all__ = ["LEGACY_MESSAGE", "ForgeAdapter", "host_kind"]
