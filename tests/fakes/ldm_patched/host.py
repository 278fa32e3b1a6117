"""A fake ``ldm_patched`` WebUI (Forge Classic / reForge main), written after reading the hosts' code.

What K-LoRA relies on, per flavour (Classic = ``Haoming02/sd-webui-forge-classic`` branch ``classic``,
``ldm_patched/modules/model_patcher.py``; reForge = ``Panchovix/stable-diffusion-webui-reForge`` ``main``, the 2025
ComfyUI-style ``model_patcher.py`` and ``model_management.load_models_gpu``):

* ``patcher.patches``: param key -> list of entries; Classic ``(strength_patch, value, strength_model)``, reForge
  ``(strength_patch, value, strength_model, offset, function)``. ``add_patches`` keeps keys the model has;
  ``clone`` copies each list. reForge: ``patches_uuid`` renewed by ``add_patches`` and copied by ``clone``;
  ``backup`` shared by clones and holding ``(weight, inplace_update)`` tuples; Classic: a backup per patcher holding
  ``model_state_dict()[key].to(offload_device)``: on CPU a detached alias of the Parameter's storage, not the
  Parameter object (checked on the real Classic ``ModelPatcher``).
* ``patch_model``: for each patched key, back the weight up if not yet, ``calculate_weight(patches[key],
  weight.float().clone())`` cast back and installed as a NEW Parameter (``set_attr``; weight_inplace_update False).
  Classic: ``calculate_weight`` is a patcher method; reForge: ``ldm_patched.modules.lora.calculate_weight`` and
  ``ldm_patched.float.stochastic_rounding`` for the cast.
* ``unpatch_model``: backups put back as Parameters; backup cleared.
* ``load_models_gpu``: a patcher already loaded (identity) is kept; else loaded clones of the same model are
  unloaded (Classic: ``unpatch_model``; reForge: ``detach(unpatch_all=False)``, and the new one unpatches first only
  when ``model.current_weight_patches_uuid`` differs from its ``patches_uuid``, re-patching nothing otherwise).
  reForge low-VRAM: patched modules of a partially loaded model get ``weight_function = [LowVramPatch]`` instead.
* ``networks.load_networks`` (builtin Lora extension): ``current_lora_hash`` of ``[filename, unet, te]``; reset
  ``forge_objects`` to the original, ``sd.load_lora_for_models`` per LoRA (lru-cached state dict),
  ``forge_objects_after_applying_lora = shallow_copy()``; ``loaded_networks`` carry ``network_on_disk``.
* Processing order and the denoiser are the Forge fake's (``tests/fakes/forge/host.py``): the same A1111-based flow.
"""

from __future__ import annotations

import collections
import functools
import types
import uuid
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from tests.fakes.forge.host import (
    CPU,
    Engine,
    FakeForge,
    NetworkOnDisk,
    build_tree,
    load_lora,
    model_lora_keys_clip,
    model_lora_keys_unet,
)

Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # reForge's inline namedtuple


def _merge(patches: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """ComfyUI's calculate_weight for plain LoRA and diff entries (the part these tests exercise)."""
    for entry in patches:
        strength, value, strength_model = entry[0], entry[1], entry[2]
        offset = entry[3] if len(entry) > 3 else None
        target = weight.narrow(offset[0], offset[1], offset[2]) if offset is not None else weight
        if strength_model != 1.0:
            target *= strength_model
        kind, data = value
        if kind == "lora":
            up, down, alpha, mid, _dora = data
            assert mid is None
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            diff = up.to(weight.device, torch.float32).flatten(1) @ down.to(weight.device, torch.float32).flatten(1)
            target += ((strength * scale) * diff.reshape(target.shape)).to(target.dtype)
        elif kind == "diff":
            target += strength * data[0].to(weight.device, target.dtype).reshape(target.shape)
        else:
            raise NotImplementedError(kind)
    return weight


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):  # reForge
    return _merge(patches, weight, key)


def string_to_seed(data: str) -> int:
    return sum(data.encode()) & 0xFFFFFFFF


def stochastic_rounding(value: torch.Tensor, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype=dtype)
    raise NotImplementedError(dtype)


def _set_param(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, attr = key.rsplit(".", 1)
    setattr(model.get_submodule(module_path), attr, nn.Parameter(value, requires_grad=False))


class LowVramPatch:
    def __init__(self, key: str, patches: dict) -> None:
        self.key, self.patches = key, patches

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return calculate_weight(self.patches[self.key], weight, self.key)


class ModelPatcher:
    flavour = "classic"

    def __init__(self, model: nn.Module, load_device=CPU, offload_device=CPU, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.patches: dict[str, list] = {}
        self.backup: dict[str, Any] = {}
        self.object_patches: dict[str, Any] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.model_keys = set(model.state_dict().keys())
        if self.flavour == "reforge":
            self.patches_uuid = uuid.uuid4()
            if not hasattr(model, "current_weight_patches_uuid"):
                model.current_weight_patches_uuid = None

    def clone(self) -> ModelPatcher:
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = dict(self.model_options)
        if self.flavour == "reforge":
            n.patches_uuid = self.patches_uuid
            n.backup = self.backup  # ComfyUI 2025: clones share the backup
        return n

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        added = set()
        for k in patches:
            if k in self.model_keys:
                added.add(k)
                entry = (strength_patch, patches[k], strength_model)
                if self.flavour == "reforge":
                    entry = (*entry, None, None)
                self.patches.setdefault(k, []).append(entry)
        if self.flavour == "reforge":
            self.patches_uuid = uuid.uuid4()
        return list(added)

    def calculate_weight(self, patches, weight, key):  # Classic: a method
        return _merge(patches, weight, key)

    @torch.no_grad()
    def patch_weight(self, key: str) -> None:
        weight = self.model.get_parameter(key)
        if self.flavour != "reforge":
            weight = self.model.state_dict()[key]  # Classic: model_state_dict(), a detached alias of the Parameter
        if key not in self.backup:
            backup = weight.to(device=self.offload_device, copy=self.weight_inplace_update)
            self.backup[key] = Backup(backup, False) if self.flavour == "reforge" else backup
        temp = weight.to(torch.float32, copy=True)
        if self.flavour == "reforge":
            out = stochastic_rounding(calculate_weight(self.patches[key], temp, key), weight.dtype)
        else:
            out = self.calculate_weight(self.patches[key], temp, key).to(weight.dtype)
        _set_param(self.model, key, out)

    def patch_model(self, device_to=None, lowvram: bool = False) -> nn.Module:
        for key in self.patches:
            if lowvram:
                self.model.get_submodule(key.rsplit(".", 1)[0]).weight_function = [LowVramPatch(key, self.patches)]
            else:
                self.patch_weight(key)
        if self.flavour == "reforge":
            self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model

    def unpatch_model(self, device_to=None) -> None:
        for m in self.model.modules():
            if hasattr(m, "weight_function"):
                m.weight_function = []
        for key, backup in self.backup.items():
            _set_param(self.model, key, backup.weight if self.flavour == "reforge" else backup)
        self.backup.clear()
        if self.flavour == "reforge":
            self.model.current_weight_patches_uuid = None


class ReForgePatcher(ModelPatcher):
    flavour = "reforge"


class CLIP:
    def __init__(self, cond_stage_model: nn.Module | None = None, patcher_class: type = ModelPatcher) -> None:
        if cond_stage_model is None:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = patcher_class(cond_stage_model)

    def clone(self) -> CLIP:
        n = CLIP()
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default"):
    """``ldm_patched.modules.sd.load_lora_for_models``: clones with the file's entries added."""
    unet_keys = model_lora_keys_unet(model.model, {}) if model is not None else {}
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    lora_unet, rest = load_lora(lora, unet_keys)
    lora_clip, rest = load_lora(rest, clip_keys)
    if len(rest) > 12:
        return model, clip  # "LoRA version mismatch"
    new_model = model.clone() if model is not None else None
    if new_model is not None:
        new_model.add_patches(lora_unet, strength_model)
    new_clip = clip.clone() if clip is not None else None
    if new_clip is not None:
        new_clip.add_patches(lora_clip, strength_clip)
    return new_model, new_clip


class FakeLdmPatched(FakeForge):
    """The Forge fake's processing flow over an ``ldm_patched`` backend."""

    def __init__(self, engine: Engine, flavour: str = "classic") -> None:
        self.flavour = flavour
        self.lowvram = False
        super().__init__(engine)

    def _build_modules(self) -> dict[str, types.ModuleType]:
        mods = {k: v for k, v in super()._build_modules().items() if k != "backend" and not k.startswith("backend.")}

        def module(name: str, **attrs: Any) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__spec__ = __import__("importlib.machinery").machinery.ModuleSpec(name, None)
            m.__dict__.update(attrs)
            m.__path__ = []
            mods[name] = m
            return m

        patcher = ReForgePatcher if self.flavour == "reforge" else ModelPatcher
        module("ldm_patched")
        module("ldm_patched.modules")
        mp = module("ldm_patched.modules.model_patcher", ModelPatcher=patcher, LowVramPatch=LowVramPatch)
        lora = module(
            "ldm_patched.modules.lora",
            load_lora=load_lora,
            model_lora_keys_unet=model_lora_keys_unet,
            model_lora_keys_clip=model_lora_keys_clip,
        )
        if self.flavour == "reforge":
            lora.calculate_weight = calculate_weight
            mp.string_to_seed = string_to_seed
            module("ldm_patched.float", stochastic_rounding=stochastic_rounding)
        module("ldm_patched.modules.sd", load_lora_for_models=load_lora_for_models, CLIP=CLIP)
        module("ldm_patched.modules.model_management", load_models_gpu=self.load_models_gpu)
        module("modules_forge.forge_sampler", sampling_prepare=self.sampling_prepare)
        for name, m in mods.items():
            if "." in name:
                parent, _, child = name.rpartition(".")
                setattr(mods[parent], child, m)
        return mods

    def _networks_namespace(self) -> dict[str, Any]:
        ns = super()._networks_namespace()

        @functools.lru_cache(maxsize=5)
        def load_lora_state_dict(filename: str) -> dict[str, torch.Tensor]:
            return load_file(filename)

        def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
            sd = self.shared.sd_model
            ns["loaded_networks"].clear()
            on_disk = [ns["available_network_aliases"].get(n) or ns["available_networks"].get(n) for n in names]
            for d, name in zip(on_disk, names):
                if d is not None:
                    ns["loaded_networks"].append(types.SimpleNamespace(name=name, network_on_disk=d))
            targets = [[d.filename, u, t] for d, u, t in zip(on_disk, unet_multipliers, te_multipliers) if d]
            if sd.current_lora_hash == str(targets):
                return
            sd.current_lora_hash = str(targets)
            sd.forge_objects.unet = sd.forge_objects_original.unet
            sd.forge_objects.clip = sd.forge_objects_original.clip
            for filename, s_unet, s_te in targets:
                sd.forge_objects.unet, sd.forge_objects.clip = load_lora_for_models(
                    sd.forge_objects.unet,
                    sd.forge_objects.clip,
                    load_lora_state_dict(filename),
                    s_unet,
                    s_te,
                    filename,
                )
            sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()

        ns.update(load_lora_state_dict=load_lora_state_dict, load_networks=load_networks)
        ns.pop("load_lora_for_models", None)
        return ns

    def load_models_gpu(self, models: list[ModelPatcher]) -> None:
        for m in models:
            if any(x is m for x in self.loaded):
                continue
            clones = [x for x in self.loaded if x.is_clone(m)]
            self.loaded = [x for x in self.loaded if not x.is_clone(m)]
            if self.flavour == "classic":
                for x in clones:
                    x.unpatch_model()
                m.patch_model(lowvram=self.lowvram)
            else:
                current = getattr(m.model, "current_weight_patches_uuid", None)
                if current is not None and current != m.patches_uuid:
                    m.unpatch_model()
                if m.model.current_weight_patches_uuid is None:
                    m.patch_model(lowvram=self.lowvram)
            self.loaded.append(m)

    def unload_all(self) -> None:
        """``model_management.unload_all_models`` (e.g. a checkpoint change): every loaded patcher unpatches."""
        for m in self.loaded:
            m.unpatch_model()
        self.loaded = []

    def sampling_prepare(self, unet: ModelPatcher, x: Any = None) -> None:
        self.load_models_gpu([unet])


def make_engine(
    unet_layers: Iterable[tuple[str, tuple[int, ...]]],
    te_layers: Iterable[tuple[str, tuple[int, ...]]],
    *,
    flavour: str = "classic",
    seed: int = 0,
) -> Engine:
    patcher = ReForgePatcher if flavour == "reforge" else ModelPatcher
    model = nn.Module()
    model.diffusion_model = build_tree(nn.Module(), unet_layers, seed)
    te = build_tree(nn.Module(), [(f"clip_l.transformer.{path}", shape) for path, shape in te_layers], seed + 1)
    return Engine(patcher(model), CLIP(te, patcher))


__all__ = ["CLIP", "FakeLdmPatched", "ModelPatcher", "NetworkOnDisk", "ReForgePatcher", "make_engine"]
