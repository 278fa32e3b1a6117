"""The fake Forge host: ``backend`` patchers and LoRA loader, ``networks``, ``modules.*`` for Forge's flow.

Behaviour that matters to K-LoRA follows Forge f2 (``forge-internals.md`` §1, §4):

* ``ModelPatcher.lora_patches``: identifier ``(filename, strength_patch, strength_model, online_mode)`` ->
  ``{param key: [[strength, ("lora", (up, down, alpha, mid, dora)), strength_model, offset, function], ...]}``;
  ``add_patches`` keeps only keys the model has; ``clone`` copies the outer dict only (inner dicts shared).
* ``LoraLoader`` lives on the model (shared by all clones); ``refresh`` does nothing when ``str(list(keys))``
  equals the loaded hash, else restores the backed-up originals, drops the ``forge_online_loras`` it installed,
  backs up each patched weight (``weight.to(offload_device)``: the same object on CPU) and installs merged weights
  as new Parameters created under ``torch.inference_mode`` (fp32 math, cast back), or online slots for online
  identifiers; GGUF-like params are dequantized/requantized.
* ``sampling_prepare`` loads the UNet patcher: one not already loaded (identity) unloads its clones and refreshes.
* The ops (``Linear``/``Conv2d``) cast weights to the input dtype per forward (Forge's manual cast), dequantize
  GGUF-like weights and merge ``forge_online_loras`` per forward.
* ``process_images`` runs Forge's order: per batch iteration reset ``forge_objects``, activate prompt LoRAs (then
  ``after_extra_networks_activate``), ``forge_objects = after_applying_lora.shallow_copy()``, ``process_batch``,
  conds (cached by prompt/LoRAs, not by patcher contents), reset ``forge_objects`` again,
  ``process_before_every_sampling``, sampling; hires: activate, hires conds, ``before_hr``,
  ``process_before_every_sampling``, reset, ``process_before_every_sampling`` again, sampling; ``postprocess``
  (skipped when an exception escapes).
* The denoiser: a new object per pass; ``step`` counts calls from 0, ``total_steps`` = calls of the pass (second
  order: 2·steps − 1), ``steps`` = steps; ``on_cfg_denoiser`` fires before each model evaluation;
  ``params.sampling_step`` lags by one.
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

CPU = torch.device("cpu")

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


# ---------------------------------------------------------------------------------------------------------------
# backend.utils / ops
# ---------------------------------------------------------------------------------------------------------------


def get_attr_with_parent(obj: Any, attr: str) -> tuple[Any, str, Any]:
    parent, name = obj, None
    for name in attr.split("."):
        parent, obj = obj, getattr(obj, name)
    return parent, name, obj


def set_attr_raw(obj: Any, attr: str, value: Any) -> None:
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, value)


class FakeGGUF:
    """Marks a "quantized" parameter (Forge: ``weight.gguf_cls``); stored as fp16, dequantized to fp32."""

    @staticmethod
    def dequantize(param: torch.Tensor) -> torch.Tensor:
        return param.data.to(torch.float32)

    @staticmethod
    def quantize(weight: torch.Tensor) -> nn.Parameter:
        param = nn.Parameter(weight.to(torch.float16), requires_grad=False)
        param.gguf_cls = FakeGGUF
        return param


def _weight_and_bias(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = module.weight
    if getattr(weight, "gguf_cls", None) is not None:
        weight = weight.gguf_cls.dequantize(weight)
    weight = weight.to(dtype)
    online = getattr(module, "forge_online_loras", None)
    if online and "weight" in online:
        weight = merge_lora_to_weight(online["weight"], weight, "online_lora", computation_dtype=weight.dtype)
    bias = module.bias.to(dtype) if module.bias is not None else None
    return weight, bias


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _weight_and_bias(self, x.dtype)
        return F.linear(x, weight, bias)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _weight_and_bias(self, x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def make_layer(shape: tuple[int, ...], generator: torch.Generator) -> nn.Module:
    if len(shape) == 4:
        out_c, in_c, kh, _ = shape
        layer: nn.Module = Conv2d(in_c, out_c, kh, padding=kh // 2)
    else:
        layer = Linear(shape[1], shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    return layer


def build_tree(root: nn.Module, layers: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0) -> nn.Module:
    """Real torch layers at the given dotted paths (containers created on the way)."""
    g = torch.Generator().manual_seed(seed)
    for path, shape in layers:
        *parents, last = path.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, nn.Module())
            node = getattr(node, name)
        node.add_module(last, make_layer(shape, g))
    return root


# ---------------------------------------------------------------------------------------------------------------
# backend.patcher.lora
# ---------------------------------------------------------------------------------------------------------------


def _dora(magnitude, weight, diff, alpha, strength, dtype, function):
    """Forge's weight_decompose (backend/patcher/lora.py): note the norm on the output axis is of the ORIGINAL
    weight, on the input axis of the patched one (Forge's own quirk, kept)."""
    magnitude = magnitude.to(weight.device, dtype)
    diff = diff * alpha
    patched = weight + function(diff).type(weight.dtype)
    if magnitude.shape[0] == patched.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        cols = patched.shape[1]
        norm = patched.transpose(0, 1).reshape(cols, -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(cols, *[1] * (patched.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    patched *= (magnitude / norm).type(weight.dtype)
    if strength != 1.0:
        weight += strength * (patched - weight)
    else:
        weight[:] = patched
    return weight


def _mat(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device, dtype)


def _cp(t, wb, wa, device, dtype):
    return torch.einsum("ijkl,jr,ip->prkl", _mat(t, device, dtype), _mat(wb, device, dtype), _mat(wa, device, dtype))


@torch.inference_mode()
def merge_lora_to_weight(
    patches: list, weight: torch.Tensor, key: str = "online_lora", computation_dtype=torch.float32
):
    """Forge's merge: every patch type its loader produces (lora incl. CP mid and DoRA, loha, lokr, glora, diff,
    set), offsets (row slices of fused weights) and patch functions, fp32 math, cast back to the weight's dtype."""
    cast_back = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        cast_back = weight.dtype
        weight = weight.to(dtype=computation_dtype)
    for strength, value, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        whole = weight
        if offset is not None:
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(value, list):
            value = (merge_lora_to_weight(value[1:], value[0].clone(), key),)
        kind, v = ("diff", value) if len(value) == 1 else (value[0], value[1])
        dev, dt = weight.device, computation_dtype
        diff = None
        alpha = 1.0
        dora = None
        if kind == "diff":
            if strength != 0.0:
                assert v[0].shape == weight.shape, "the fake merges same-shape diffs only"
                weight += strength * v[0].to(dev, weight.dtype)
        elif kind == "set":
            weight.copy_(v[0])
        elif kind == "lora":
            up, down, a, mid, dora = v
            up, down = _mat(up, dev, dt), _mat(down, dev, dt)
            alpha = a / down.shape[0] if a is not None else 1.0
            if mid is not None:
                mid = _mat(mid, dev, dt)
                shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
                down = down.reshape(shape).transpose(0, 1)
            diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
        elif kind == "lokr":
            w1, w2, a, w1a, w1b, w2a, w2b, t2, dora = v
            dim = None
            if w1 is None:
                dim = w1b.shape[0]
                w1 = torch.mm(_mat(w1a, dev, dt), _mat(w1b, dev, dt))
            else:
                w1 = _mat(w1, dev, dt)
            if w2 is None:
                dim = w2b.shape[0]
                w2 = torch.mm(_mat(w2a, dev, dt), _mat(w2b, dev, dt)) if t2 is None else _cp(t2, w2b, w2a, dev, dt)
            else:
                w2 = _mat(w2, dev, dt)
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            alpha = a / dim if a is not None and dim is not None else 1.0
            diff = torch.kron(w1, w2).reshape(weight.shape)
        elif kind == "loha":
            w1a, w1b, a, w2a, w2b, t1, t2, dora = v
            alpha = a / w1b.shape[0] if a is not None else 1.0
            if t1 is not None:
                m1, m2 = _cp(t1, w1b, w1a, dev, dt), _cp(t2, w2b, w2a, dev, dt)
            else:
                m1 = torch.mm(_mat(w1a, dev, dt), _mat(w1b, dev, dt))
                m2 = torch.mm(_mat(w2a, dev, dt), _mat(w2b, dev, dt))
            diff = (m1 * m2).reshape(weight.shape)
        elif kind == "glora":
            a1, a2, b1, b2, a, dora = v
            old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
            if b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]:
                old = old and a2.shape[0] == weight.shape[0] == weight.shape[1]
            a1, a2 = _mat(a1.flatten(1), dev, dt), _mat(a2.flatten(1), dev, dt)
            b1, b2 = _mat(b1.flatten(1), dev, dt), _mat(b2.flatten(1), dev, dt)
            if a is not None:
                alpha = a / (v[0].shape[0] if old else v[1].shape[0])
            w = weight.to(dtype=dt)
            if old:
                diff = (torch.mm(b2, b1) + torch.mm(torch.mm(w.flatten(1), a2), a1)).reshape(weight.shape)
            else:
                diff = torch.mm(torch.mm(w.flatten(1), a1), a2).reshape(weight.shape) + torch.mm(b1, b2).reshape(
                    weight.shape
                )
        else:
            raise NotImplementedError(kind)
        if diff is not None:
            if dora is not None:
                weight = _dora(dora, weight, diff, alpha, strength, dt, function)
            else:
                weight += function(((strength * alpha) * diff).type(weight.dtype))
        if offset is not None:
            weight = whole
    if cast_back is not None:
        weight = weight.to(dtype=cast_back)
    return weight


# The key styles Forge's (ComfyUI-derived) load_lora reads: (up suffix, down suffix, mid suffix or None).
_LORA_STYLES = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
)


def load_lora(lora: dict[str, torch.Tensor], to_load: dict[str, Any]) -> tuple[dict, dict]:
    """Forge's load_lora: for each prefix of the key map, the patch its keys describe (LoRA in five key styles with
    CP mid and DoRA, LoHa, LoKr, GLoRA, w_norm/b_norm, diff, diff_b, set_weight); returns (patches, unused keys)."""
    patches: dict[Any, Any] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        if name in lora:
            used.add(name)
            return lora[name]
        return None

    for x, target in to_load.items():
        alpha_t = take(f"{x}.alpha")
        alpha = alpha_t.item() if alpha_t is not None else None
        dora = take(f"{x}.dora_scale")
        for up_s, down_s, mid_s in _LORA_STYLES:
            if f"{x}{up_s}" in lora:
                up, down = take(f"{x}{up_s}"), take(f"{x}{down_s}")
                mid = take(f"{x}{mid_s}") if mid_s else None
                patches[target] = ("lora", (up, down, alpha, mid, dora))
                break
        if f"{x}.hada_w1_a" in lora:
            t1, t2 = (take(f"{x}.hada_t1"), take(f"{x}.hada_t2")) if f"{x}.hada_t1" in lora else (None, None)
            w = [take(f"{x}.hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b")]
            patches[target] = ("loha", (w[0], w[1], alpha, w[2], w[3], t1, t2, dora))
        lokr = {n: take(f"{x}.lokr_{n}") for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")}
        if any(lokr[n] is not None for n in ("w1", "w2", "w1_a", "w2_a")):
            patches[target] = (
                "lokr",
                (
                    lokr["w1"],
                    lokr["w2"],
                    alpha,
                    lokr["w1_a"],
                    lokr["w1_b"],
                    lokr["w2_a"],
                    lokr["w2_b"],
                    lokr["t2"],
                    dora,
                ),
            )
        if f"{x}.a1.weight" in lora:
            g = [take(f"{x}.{n}.weight") for n in ("a1", "a2", "b1", "b2")]
            patches[target] = ("glora", (*g, alpha, dora))
        w_norm = take(f"{x}.w_norm")
        if w_norm is not None:
            patches[target] = ("diff", (w_norm,))
            b_norm = take(f"{x}.b_norm")
            if b_norm is not None:
                patches[f"{target[: -len('.weight')]}.bias"] = ("diff", (b_norm,))
        diff = take(f"{x}.diff")
        if diff is not None:
            patches[target] = ("diff", (diff,))
        diff_b = take(f"{x}.diff_b")
        if diff_b is not None:
            patches[f"{target[: -len('.weight')]}.bias"] = ("diff", (diff_b,))
        set_w = take(f"{x}.set_weight")
        if set_w is not None:
            patches[target] = ("set", (set_w,))
    return patches, {k: v for k, v in lora.items() if k not in used}


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_diffusers_keys(depth: int, depth_single: int, hidden: int) -> dict[str, Any]:
    """Forge's flux_to_diffusers weight entries (packages_3rdparty/comfyui_lora_collection/utils.py): diffusers
    module -> BFL key, q/k/v and proj_mlp as (fused key, (0, start, length)) row slices, norm_out with a function."""
    m: dict[str, Any] = {}
    h = hidden
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        for j, proj in enumerate(("q", "k", "v")):
            m[f"{src}.attn.to_{proj}"] = (f"{dst}.img_attn.qkv.weight", (0, j * h, h))
            m[f"{src}.attn.add_{proj}_proj"] = (f"{dst}.txt_attn.qkv.weight", (0, j * h, h))
        for a, b in (
            ("attn.to_out.0", "img_attn.proj"),
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
        ):
            m[f"{src}.{a}"] = f"{dst}.{b}.weight"
        for a, b in (
            ("attn.norm_q", "img_attn.norm.query_norm"),
            ("attn.norm_k", "img_attn.norm.key_norm"),
            ("attn.norm_added_q", "txt_attn.norm.query_norm"),
            ("attn.norm_added_k", "txt_attn.norm.key_norm"),
        ):
            m[f"{src}.{a}"] = f"{dst}.{b}.scale"
    for i in range(depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        for j, proj in enumerate(("q", "k", "v")):
            m[f"{src}.attn.to_{proj}"] = (f"{dst}.linear1.weight", (0, j * h, h))
        m[f"{src}.proj_mlp"] = (f"{dst}.linear1.weight", (0, 3 * h, 4 * h))
        m[f"{src}.norm.linear"] = f"{dst}.modulation.lin.weight"
        m[f"{src}.proj_out"] = f"{dst}.linear2.weight"
        m[f"{src}.attn.norm_q"] = f"{dst}.norm.query_norm.scale"
        m[f"{src}.attn.norm_k"] = f"{dst}.norm.key_norm.scale"
    for a, b in (
        ("proj_out", "final_layer.linear"),
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ):
        m[a] = f"diffusion_model.{b}.weight"
    m["norm_out.linear"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, swap_scale_shift)
    return m


def model_lora_keys_unet(model: nn.Module, key_map: dict = {}) -> dict:  # noqa: B006 - Forge's own signature
    """Forge's UNet key map: kohya ``lora_unet_<path_>`` and bare ``diffusion_model.<path>`` names of every weight,
    bare names of other params, the model's diffusers names (``model.diffusers_keys``: what Forge derives from the
    UNet config) in kohya/lycoris/diffusers/processor spellings, and for a Flux config the diffusers/OneTrainer/
    lycoris Flux names with their fused-weight slices."""
    for k in model.state_dict():
        if not k.startswith("diffusion_model."):
            continue
        if k.endswith(".weight"):
            stem = k[len("diffusion_model.") : -len(".weight")]
            key_map[f"lora_unet_{stem.replace('.', '_')}"] = k
            key_map[k[: -len(".weight")]] = k
        else:
            key_map[k] = k
    for diffusers, compvis in getattr(model, "diffusers_keys", {}).items():
        target = f"diffusion_model.{compvis}.weight"
        flat = diffusers.replace(".", "_")
        key_map[f"lora_unet_{flat}"] = target
        key_map[f"lycoris_{flat}"] = target
        for prefix in ("", "unet."):
            name = f"{prefix}{diffusers}".replace(".to_", ".processor.to_")
            key_map[name[:-2] if name.endswith(".to_out.0") else name] = target
    cfg = getattr(model, "flux_config", None)
    if cfg is not None:
        for k, to in flux_diffusers_keys(cfg["depth"], cfg["depth_single_blocks"], cfg["hidden_size"]).items():
            key_map[f"transformer.{k}"] = to
            key_map[f"lycoris_{k.replace('.', '_')}"] = to
            key_map[f"lora_transformer_{k.replace('.', '_')}"] = to
    key_map.update(getattr(model, "extra_lora_keys", {}))
    return key_map


def model_lora_keys_clip(model: nn.Module, key_map: dict = {}) -> dict:  # noqa: B006 - Forge's own signature
    """Forge's CLIP key map: CLIP-L (te/te1 kohya names, diffusers ``text_encoder.``), CLIP-G as te2 beside a CLIP-L,
    T5 as ``lora_te3_``/``lora_te2_`` (OneTrainer) and, from Forge's own wrapper, ``lora_te1_``."""
    sdk = set(model.state_dict().keys())
    clip_l = False
    for b in range(32):
        for c, flat in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{flat}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{flat}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                clip_l = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk and clip_l:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{flat}"] = k
                key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
    for k in sdk:
        if k.endswith(".weight") and k.startswith("t5xxl.transformer."):
            flat = k[len("t5xxl.transformer.") : -len(".weight")].replace(".", "_")
            for prefix in ("te3", "te2", "te1"):
                key_map[f"lora_{prefix}_{flat}"] = k
    return key_map


class LoraLoader:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}
        self.online_backup: list[nn.Module] = []
        self.loaded_hash = str([])
        self.merges = 0  # how many times a (full) merge ran

    @torch.inference_mode()
    def refresh(self, lora_patches: dict, offload_device: torch.device = CPU, force_refresh: bool = False) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.merges += 1
        all_patches: dict[tuple[str, bool], list] = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        for m in {id(m): m for m in self.online_backup}.values():
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            set_attr_raw(self.model, k, w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for (key, online_mode), current in all_patches.items():
            parent, child, weight = get_attr_with_parent(self.model, key)
            assert isinstance(weight, nn.Parameter), key
            if online_mode:
                if not hasattr(parent, "forge_online_loras"):
                    parent.forge_online_loras = {}
                parent.forge_online_loras[child] = current
                self.online_backup.append(parent)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            gguf = getattr(weight, "gguf_cls", None)
            if gguf is not None:
                merged = merge_lora_to_weight(current, gguf.dequantize(weight), key, computation_dtype=torch.float32)
                set_attr_raw(self.model, key, gguf.quantize(merged))
                continue
            merged = merge_lora_to_weight(current, weight, key, computation_dtype=torch.float32)
            set_attr_raw(self.model, key, nn.Parameter(merged, requires_grad=False))
        self.loaded_hash = hashes


# ---------------------------------------------------------------------------------------------------------------
# backend.patcher.base / unet / clip, diffusion engine
# ---------------------------------------------------------------------------------------------------------------


class KModel(nn.Module):
    def __init__(
        self,
        layers: Iterable[tuple[str, tuple[int, ...]]],
        *,
        seed: int = 0,
        storage_dtype: Any = torch.float32,
        computation_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.diffusion_model = build_tree(nn.Module(), layers, seed)
        self.storage_dtype = storage_dtype
        self.computation_dtype = computation_dtype
        self.extra_lora_keys: dict[str, Any] = {}


class ModelPatcher:
    def __init__(self, model: nn.Module, load_device=CPU, offload_device=CPU, size: int = 0, current_device=None):
        self.size = size
        self.model = model
        self.lora_patches: dict[tuple, dict] = {}
        self.object_patches: dict[str, Any] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device or offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader: LoraLoader = model.lora_loader

    def clone(self) -> ModelPatcher:
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = dict(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False) -> set:
        identifier = (filename, strength_patch, strength_model, online_mode)
        this: dict[str, list] = {}
        found = set()
        model_keys = {k for k, _ in self.model.named_parameters()}
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                if len(k) > 2:
                    function = k[2]
            if key in model_keys:
                found.add(k)
                this.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[identifier] = this
        return found

    def has_online_lora(self) -> bool:
        return any(ident[3] for ident in self.lora_patches)

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling: list = []

    def clone(self) -> UnetPatcher:
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = dict(self.model_options)
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        return n

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes: int) -> None:
        self.extra_preserved_memory_during_sampling += memory_in_bytes


class CLIP:
    def __init__(self, cond_stage_model: nn.Module | None = None) -> None:
        if cond_stage_model is None:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self) -> CLIP:
        n = CLIP()
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs) -> set:
        return self.patcher.add_patches(*args, **kwargs)


class ForgeObjects:
    def __init__(self, unet, clip, vae=None, clipvision=None) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class Engine:
    """The loaded checkpoint (``shared.sd_model``)."""

    def __init__(self, unet: UnetPatcher, clip: CLIP, title: str = "tiny.safetensors") -> None:
        self.forge_objects = ForgeObjects(unet, clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.sd_checkpoint_info = title
        self.is_sdxl = False


# ---------------------------------------------------------------------------------------------------------------
# networks (extensions-builtin/sd_forge_lora)
# ---------------------------------------------------------------------------------------------------------------


class NetworkOnDisk:
    def __init__(self, name: str, filename: str, alias: str | None = None, sha256: str = "") -> None:
        self.name = name
        self.filename = filename
        self.alias = alias or name
        self.hash = sha256
        self.shorthash = sha256[:12]
        self.metadata: dict[str, str] = {}

    def get_alias(self) -> str:
        return self.alias

    def read_hash(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# modules.* (shared, script_callbacks, processing)
# ---------------------------------------------------------------------------------------------------------------


class OptionInfo:
    def __init__(self, default: Any = None, label: str = "", component: Any = None, *args: Any, **kw: Any) -> None:
        self.default = default
        self.label = label


class Options:
    """``shared.opts``: attribute access to settings; ``add_option`` registers a default."""

    def __init__(self) -> None:
        self.__dict__["data"] = {"persistent_cond_cache": True}

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data.setdefault(key, info.default)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self.data[name] = value


AlwaysVisible = object()


class ScriptBase:
    """``modules.scripts.Script``: what the WebUI sets on a script instance."""

    filename: str | None = None
    args_from: int | None = None
    args_to: int | None = None
    is_txt2img = True
    is_img2img = False


class InterruptedException(BaseException):
    pass


@dataclass
class State:
    interrupted: bool = False
    skipped: bool = False
    stopping_generation: bool = False
    sampling_step: int = 0
    sampling_steps: int = 0
    job: str = ""
    textinfo: str = ""

    def interrupt(self) -> None:
        self.interrupted = True


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class StableDiffusionProcessing:
    cached_c: list = [None, None, None]  # noqa: RUF012 - the WebUI's class-level caches
    cached_uc: list = [None, None, None]  # noqa: RUF012

    def __init__(self, **kw: Any) -> None:
        self.prompt = "a photo"
        self.prompt_loras: list[tuple[str, float]] = []  # what <lora:name:w> tags in the prompt activate
        self.hr_prompt_loras: list[tuple[str, float]] | None = None
        self.steps = 6
        self.n_iter = 1
        self.batch_size = 1
        self.seed = 1
        self.enable_hr = False
        self.hr_steps = 0  # 0: same as steps
        self.denoising_strength = 0.5
        self.is_hr_pass = False
        self.init_images = None
        self.second_order = False
        self.disable_extra_networks = False
        self.extra_generation_params: dict[str, Any] = {}
        self.script_args: list[Any] = []
        self.scripts: Any = None
        self.override_settings: dict[str, Any] = {}
        self.refiner_switch_at_call: int | None = None  # fake: swap the model at this denoiser call
        self.sampler_name = "Euler"
        self.width = self.height = 64
        self.cfg_scale = 7.0
        self.c = self.uc = self.hr_c = None
        self.comments: dict[str, int] = {}
        self.cached_c = StableDiffusionProcessing.cached_c
        self.cached_uc = StableDiffusionProcessing.cached_uc
        for k, v in kw.items():
            setattr(self, k, v)

    def comment(self, text: str) -> None:
        self.comments[text] = 1

    @property
    def all_seeds(self) -> list[int]:
        return [self.seed]

    @property
    def sd_model(self) -> Engine:
        return sys.modules["modules.shared"].sd_model


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_c: list = [None, None, None]  # noqa: RUF012
    cached_hr_uc: list = [None, None, None]  # noqa: RUF012

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, **kw: Any) -> None:
        kw.setdefault("init_images", ["<image>"])
        super().__init__(**kw)


@dataclass
class Processed:
    images: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    extra_generation_params: dict = field(default_factory=dict)


class PostSampleArgs:
    def __init__(self, samples: Any) -> None:
        self.samples = samples


class CFGDenoiser:
    """One per sampling pass (a new sampler per pass)."""

    def __init__(self, host: FakeForge, p: StableDiffusionProcessing) -> None:
        self.host = host
        self.p = p
        self.step = 0
        self.steps: int | None = None
        self.total_steps: int | None = None

    def forward(self) -> None:
        state = self.host.state
        if self.p.refiner_switch_at_call is not None and self.step == self.p.refiner_switch_at_call:
            self.host.switch_to_refiner()
        if state.interrupted or state.skipped:
            raise InterruptedException
        params = CFGDenoiserParams(None, None, None, state.sampling_step, state.sampling_steps, None, None, self)
        self.host.cfg_denoiser_callback(params)
        for probe in list(self.host.probes):
            probe(self)
        state.sampling_step = self.step  # set by the sampler callback after the model call: lags by one
        self.step += 1


# ---------------------------------------------------------------------------------------------------------------
# The host
# ---------------------------------------------------------------------------------------------------------------


class ScriptRunner:
    """``p.scripts``: alwayson scripts with their args (what ``modules.scripts.ScriptRunner`` calls, in order)."""

    def __init__(self, scripts: list[tuple[Any, list[Any]]]) -> None:
        self.scripts = scripts

    def _call(self, method: str, p: Any, *pre: Any, **kw: Any) -> None:
        for script, args in self.scripts:
            fn = getattr(script, method, None)
            if fn is not None:
                fn(p, *pre, *args, **kw)

    def process(self, p):
        self._call("process", p)

    def before_process_batch(self, p, **kw):
        self._call("before_process_batch", p, **kw)

    def after_extra_networks_activate(self, p, **kw):
        self._call("after_extra_networks_activate", p, **kw)

    def process_batch(self, p, **kw):
        self._call("process_batch", p, **kw)

    def process_before_every_sampling(self, p, **kw):
        self._call("process_before_every_sampling", p, **kw)

    def before_hr(self, p):
        self._call("before_hr", p)

    def post_sample(self, p, ps):
        self._call("post_sample", p, ps)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)


class FakeForge:
    """One fake WebUI process: modules for ``sys.modules`` plus the generation driver."""

    def __init__(self, engine: Engine) -> None:
        self.state = State()
        self.sd_model = engine
        self.refiner: Engine | None = None
        self.loaded: list[ModelPatcher] = []  # memory_management.current_loaded_models (by patcher identity)
        self.callbacks: dict[str, list[Callable]] = {}
        self.probes: list[Callable[[CFGDenoiser], None]] = []
        self.disk: dict[str, NetworkOnDisk] = {}  # what a LoRA folder scan would find
        self.dynamic_args: dict[str, Any] = {"online_lora": False}
        self.lora_log: list[tuple[str, list[str]]] = []  # (file, keys Forge left unmatched) per prompt-LoRA load
        self.cond_computations = 0
        self.modules = self._build_modules()

    # ---- module objects ----------------------------------------------------------------------------------------
    def _build_modules(self) -> dict[str, types.ModuleType]:
        mods: dict[str, types.ModuleType] = {}

        def module(name: str, **attrs: Any) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() must see the fake as installed
            m.__dict__.update(attrs)
            if "." not in name or name in ("backend.patcher", "backend.sampling"):
                m.__path__ = []  # a package
            mods[name] = m
            return m

        module("backend")
        module("backend.patcher")
        module("backend.patcher.base", ModelPatcher=ModelPatcher)
        module("backend.patcher.unet", UnetPatcher=UnetPatcher)
        module("backend.patcher.clip", CLIP=CLIP)
        module(
            "backend.patcher.lora",
            LoraLoader=LoraLoader,
            load_lora=load_lora,
            model_lora_keys_unet=model_lora_keys_unet,
            model_lora_keys_clip=model_lora_keys_clip,
            merge_lora_to_weight=merge_lora_to_weight,
        )
        module("backend.args", dynamic_args=self.dynamic_args)
        module("backend.memory_management", load_models_gpu=self.load_models_gpu)
        module("backend.sampling")
        module(
            "backend.sampling.sampling_function",
            sampling_prepare=self.sampling_prepare,
            sampling_cleanup=lambda unet: None,
        )
        module("modules_forge")
        module("networks", **self._networks_namespace())
        module("modules")
        module(
            "modules.shared", state=self.state, opts=Options(), OptionInfo=OptionInfo, cmd_opts=types.SimpleNamespace()
        )
        module("modules.scripts", Script=ScriptBase, AlwaysVisible=AlwaysVisible, scripts_data=[])
        module(
            "modules.script_callbacks",
            CFGDenoiserParams=CFGDenoiserParams,
            cfg_denoiser_callback=self.cfg_denoiser_callback,
            remove_callbacks_for_function=self.remove_callbacks_for_function,
            **{
                f"on_{name}": self._register(name)
                for name in (
                    "cfg_denoiser",
                    "cfg_after_cfg",
                    "script_unloaded",
                    "before_ui",
                    "app_started",
                    "ui_settings",
                    "infotext_pasted",
                    "model_loaded",
                )
            },
        )
        module(
            "modules.processing",
            StableDiffusionProcessing=StableDiffusionProcessing,
            StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
            StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img,
            Processed=Processed,
            process_images=self.process_images,
        )
        module("modules.sd_samplers_common", InterruptedException=InterruptedException)
        for name, m in mods.items():
            if "." in name:
                parent, _, child = name.rpartition(".")
                setattr(mods[parent], child, m)
        return mods

    @property
    def shared(self) -> types.ModuleType:
        return self.modules["modules.shared"]

    def install(self, setitem: Callable[[Any, str, Any], None]) -> None:
        """Put the fake modules into ``sys.modules`` (``setitem`` = ``monkeypatch.setitem``: undone after a test)."""
        self.shared.sd_model = self.sd_model
        for name, m in self.modules.items():
            setitem(sys.modules, name, m)

    # ---- script_callbacks --------------------------------------------------------------------------------------
    def _register(self, name: str) -> Callable:
        def register(callback: Callable, **_: Any) -> None:
            self.callbacks.setdefault(name, []).append(callback)

        return register

    def remove_callbacks_for_function(self, fn: Callable) -> None:
        for callbacks in self.callbacks.values():
            while fn in callbacks:
                callbacks.remove(fn)

    def cfg_denoiser_callback(self, params: CFGDenoiserParams) -> None:
        for callback in self.callbacks.get("cfg_denoiser", []):
            callback(params)

    def unload_scripts(self) -> None:
        for callback in self.callbacks.get("script_unloaded", []):
            callback()

    # ---- networks ----------------------------------------------------------------------------------------------
    def _networks_namespace(self) -> dict[str, Any]:
        ns: dict[str, Any] = {
            "available_networks": {},
            "available_network_aliases": {},
            "forbidden_network_aliases": {},
            "available_network_hash_lookup": {},
            "loaded_networks": [],
            "NetworkOnDisk": NetworkOnDisk,
        }

        def list_available_networks() -> None:
            ns["available_networks"].clear()
            ns["available_network_aliases"].clear()
            ns["forbidden_network_aliases"].clear()
            ns["forbidden_network_aliases"].update({"none": 1, "Addams": 1})
            for name, entry in self.disk.items():
                ns["available_networks"][name] = entry
                if entry.alias in ns["available_network_aliases"]:
                    ns["forbidden_network_aliases"][entry.alias.lower()] = 1
                ns["available_network_aliases"][name] = entry
                ns["available_network_aliases"][entry.alias] = entry

        @functools.lru_cache(maxsize=5)
        def load_lora_state_dict(filename: str) -> dict[str, torch.Tensor]:
            return load_file(filename)

        def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename, online_mode=False):
            # Forge's rules: more than 12 keys matching nothing -> the file is not applied at all; a part (UNet,
            # CLIP) with more than 12 targets missing from the model -> that part is not applied
            lora_unet, rest = load_lora(lora, model_lora_keys_unet(model.model, {}))
            lora_clip, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
            self.lora_log.append((filename, sorted(rest)))
            if len(rest) > 12:
                return model, clip
            new_model, new_clip = model.clone(), clip.clone()
            if lora_unet:
                found = new_model.add_patches(
                    filename=filename, patches=lora_unet, strength_patch=strength_model, online_mode=online_mode
                )
                if len(lora_unet) - len(found) <= 12:
                    model = new_model
            if lora_clip:
                found = new_clip.add_patches(
                    filename=filename, patches=lora_clip, strength_patch=strength_clip, online_mode=online_mode
                )
                if len(lora_clip) - len(found) <= 12:
                    clip = new_clip
            return model, clip

        def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
            sd = self.shared.sd_model
            on_disk = [ns["available_network_aliases"].get(n) or ns["available_networks"].get(n) for n in names]
            online = bool(self.dynamic_args.get("online_lora", False))
            if sd.forge_objects.unet.model.storage_dtype in (torch.float32, torch.float16, torch.bfloat16):
                online = False
            targets = [[d.filename, u, t, online] for d, u, t in zip(on_disk, unet_multipliers, te_multipliers) if d]
            if sd.current_lora_hash == str(targets):
                return
            sd.current_lora_hash = str(targets)
            sd.forge_objects.unet = sd.forge_objects_original.unet
            sd.forge_objects.clip = sd.forge_objects_original.clip
            for filename, s_unet, s_te, online_mode in targets:
                sd.forge_objects.unet, sd.forge_objects.clip = load_lora_for_models(
                    sd.forge_objects.unet,
                    sd.forge_objects.clip,
                    load_lora_state_dict(filename),
                    s_unet,
                    s_te,
                    filename,
                    online_mode,
                )
            sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()

        ns.update(
            list_available_networks=list_available_networks,
            load_lora_state_dict=load_lora_state_dict,
            load_lora_for_models=load_lora_for_models,
            load_networks=load_networks,
        )
        return ns

    @property
    def networks(self) -> types.ModuleType:
        return self.modules["networks"]

    def add_lora_file(self, name: str, filename: str, alias: str | None = None, sha256: str = "") -> None:
        self.disk[name] = NetworkOnDisk(name, filename, alias, sha256)

    # ---- memory management / sampling ---------------------------------------------------------------------------
    def load_models_gpu(self, models: list[ModelPatcher]) -> None:
        for m in models:
            if any(x is m for x in self.loaded):
                continue
            self.loaded = [x for x in self.loaded if x.model is not m.model]  # unload_model_clones
            m.refresh_loras()  # LoadedModel.model_load
            self.loaded.append(m)

    def sampling_prepare(self, unet: UnetPatcher, x: Any = None) -> None:
        self.load_models_gpu([unet, *unet.extra_model_patchers_during_sampling])

    def switch_to_refiner(self) -> None:
        assert self.refiner is not None
        self.sd_model = self.refiner
        self.shared.sd_model = self.refiner
        self.refiner.forge_objects = self.refiner.forge_objects_original.shallow_copy()
        self.sampling_prepare(self.refiner.forge_objects.unet)

    # ---- processing --------------------------------------------------------------------------------------------
    def activate(self, p: StableDiffusionProcessing, loras: list[tuple[str, float]]) -> None:
        names = [n for n, _ in loras]
        mults = [w for _, w in loras]
        self.networks.load_networks(names, mults, mults)
        if p.scripts is not None:
            p.scripts.after_extra_networks_activate(p, batch_number=0, prompts=[p.prompt], extra_network_data={})

    def encode(self, p: StableDiffusionProcessing, caches: list[list], loras: list) -> torch.Tensor:
        """Conds through the CLIP patcher in ``forge_objects``; cached like the WebUI (by prompt and LoRAs only)."""
        key = (p.prompt, tuple(loras), p.steps)
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        clip = self.shared.sd_model.forge_objects.clip
        self.load_models_gpu([clip.patcher])
        self.cond_computations += 1
        x = torch.linspace(-1, 1, 8 * 3).reshape(3, 8)
        outs = []
        with torch.no_grad():
            for _, module in sorted(clip.cond_stage_model.named_modules()):
                if isinstance(module, Linear):
                    outs.append(module(x if module.in_features == 8 else torch.ones(3, module.in_features)).flatten())
        cond = torch.cat(outs)
        caches[0][0], caches[0][1] = key, cond
        return cond

    def sample(self, p: StableDiffusionProcessing, steps: int) -> None:
        denoiser = CFGDenoiser(self, p)
        self.sampling_prepare(self.shared.sd_model.forge_objects.unet)
        denoiser.steps = steps
        denoiser.total_steps = 2 * steps - 1 if p.second_order else steps
        self.state.sampling_steps, self.state.sampling_step = steps, 0
        try:
            for _ in range(denoiser.total_steps):
                denoiser.forward()
        except InterruptedException:
            return

    def process_images(self, p: StableDiffusionProcessing) -> Processed:
        sd = self.shared.sd_model
        self.state.interrupted = False
        if p.scripts is not None:
            p.scripts.process(p)
        for n in range(p.n_iter):
            if self.state.interrupted:
                break
            sd = self.shared.sd_model
            sd.forge_objects = sd.forge_objects_original.shallow_copy()
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=[p.prompt], seeds=[p.seed])
            if not p.disable_extra_networks:
                self.activate(p, p.prompt_loras)
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=[p.prompt], seeds=[p.seed])
            p.c = self.encode(p, [p.cached_c], p.prompt_loras)
            # txt2img / img2img sample()
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
            if p.scripts is not None:
                p.scripts.process_before_every_sampling(p, x=None, noise=None, c=p.c, uc=None)
            if p.init_images:
                self.sample(p, int(min(p.denoising_strength, 0.999) * p.steps) + 1)
            else:
                self.sample(p, p.steps)
            if p.enable_hr and not self.state.interrupted:
                self.hires_pass(p)
            if p.scripts is not None:
                p.scripts.post_sample(p, PostSampleArgs(None))
        processed = Processed(extra_generation_params=dict(p.extra_generation_params))
        if p.scripts is not None:
            p.scripts.postprocess(p, processed)
        return processed

    def hires_pass(self, p: StableDiffusionProcessing) -> None:
        sd = self.shared.sd_model
        p.is_hr_pass = True
        try:
            loras = p.hr_prompt_loras if p.hr_prompt_loras is not None else p.prompt_loras
            if not p.disable_extra_networks:
                self.activate(p, loras)
            p.hr_c = self.encode(p, [p.cached_hr_c, p.cached_c], loras)
            if p.scripts is not None:
                p.scripts.before_hr(p)
                p.scripts.process_before_every_sampling(p, x=None, noise=None, c=p.hr_c, uc=None)
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
            if p.scripts is not None:
                p.scripts.process_before_every_sampling(p, x=None, noise=None, c=p.hr_c, uc=None)
            steps = p.hr_steps or p.steps
            self.sample(p, int(min(p.denoising_strength, 0.999) * steps) + 1)
        finally:
            p.is_hr_pass = False


def make_engine(
    unet_layers: Iterable[tuple[str, tuple[int, ...]]],
    te_layers: Iterable[tuple[str, tuple[int, ...]]],
    *,
    seed: int = 0,
    storage_dtype: Any = torch.float32,
) -> Engine:
    """A loaded checkpoint: UNet layers at ``diffusion_model.<path>``, CLIP layers at ``clip_l.transformer.<path>``."""
    model = KModel(unet_layers, seed=seed, storage_dtype=storage_dtype)
    te = build_tree(nn.Module(), [(f"clip_l.transformer.{path}", shape) for path, shape in te_layers], seed + 1)
    return Engine(UnetPatcher(model), CLIP(te))
