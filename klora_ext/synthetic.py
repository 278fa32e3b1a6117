"""Deterministic synthetic LoRA state dicts for tests, the demo and benchmarks.

``layer_shapes`` lists real layer ids with the target weight shapes of an SD1.5 / SDXL UNet (worked out from the
block layout, so skip-connection widths are exact) or of a ``tiny`` set of SD1.5 ids with small dims.
``make_lora_state_dict`` draws factors per layer from a generator seeded by (seed, layer id), independent of the key
style, so the same weights can be written in kohya, diffusers and PEFT styles.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from klora_ext import keys

SCOPES = ("attention", "transformer", "all")
ARCHES = ("sd15", "sdxl", "tiny")
STYLES = ("kohya", "diffusers", "peft")
KINDS = ("lora", "loha", "lokr")

LayerShape = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class _UNetSpec:
    channels: int
    mult: tuple[int, ...]
    num_res: int
    depth: tuple[int, ...]  # transformer depth per level (0 = no attention)
    mid_depth: int
    context: int
    temb: int
    linear_proj: bool  # SDXL: proj_in/proj_out are Linear; SD1.x: 1x1 Conv2d


_SPECS = {
    "sd15": _UNetSpec(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, 768, 1280, False),
    "sdxl": _UNetSpec(320, (1, 2, 4), 2, (0, 2, 10), 10, 2048, 1280, True),
}
_TE_SPECS = {"sd15": (("te1", 12, 768, 3072),), "sdxl": (("te1", 12, 768, 3072), ("te2", 32, 1280, 5120))}


def _transformer(prefix: str, d: int, depth: int, ctx: int, linear_proj: bool, scope: str) -> list[LayerShape]:
    out: list[LayerShape] = []
    proj = (d, d) if linear_proj else (d, d, 1, 1)
    if scope != "attention":
        out.append((f"unet:{prefix}.proj_in", proj))
    for i in range(depth):
        tb = f"unet:{prefix}.transformer_blocks.{i}"
        for attn, kv_in in (("attn1", d), ("attn2", ctx)):
            out += [
                (f"{tb}.{attn}.to_q", (d, d)),
                (f"{tb}.{attn}.to_k", (d, kv_in)),
                (f"{tb}.{attn}.to_v", (d, kv_in)),
                (f"{tb}.{attn}.to_out.0", (d, d)),
            ]
        if scope != "attention":
            out += [(f"{tb}.ff.net.0.proj", (8 * d, d)), (f"{tb}.ff.net.2", (d, 4 * d))]  # GEGLU: 2 x 4d
    if scope != "attention":
        out.append((f"unet:{prefix}.proj_out", proj))
    return out


def _resblock(prefix: str, cin: int, cout: int, temb: int) -> list[LayerShape]:
    out: list[LayerShape] = [
        (f"unet:{prefix}.in_layers.2", (cout, cin, 3, 3)),
        (f"unet:{prefix}.emb_layers.1", (cout, temb)),
        (f"unet:{prefix}.out_layers.3", (cout, cout, 3, 3)),
    ]
    if cin != cout:
        out.append((f"unet:{prefix}.skip_connection", (cout, cin, 1, 1)))
    return out


def _unet_layers(spec: _UNetSpec, scope: str) -> list[LayerShape]:
    """Walk the LDM UNet layout (input blocks, middle, output blocks with skip concatenation)."""
    full = scope == "all"
    layers: list[LayerShape] = []
    ch = spec.channels
    skips = [ch]  # conv_in output
    idx = 1
    last = len(spec.mult) - 1
    for level, m in enumerate(spec.mult):
        for _ in range(spec.num_res):
            cout = spec.channels * m
            if full:
                layers += _resblock(f"input_blocks.{idx}.0", ch, cout, spec.temb)
            ch = cout
            if spec.depth[level]:
                layers += _transformer(
                    f"input_blocks.{idx}.1", ch, spec.depth[level], spec.context, spec.linear_proj, scope
                )
            skips.append(ch)
            idx += 1
        if level != last:
            if full:
                layers.append((f"unet:input_blocks.{idx}.0.op", (ch, ch, 3, 3)))
            skips.append(ch)
            idx += 1
    if full:
        layers += _resblock("middle_block.0", ch, ch, spec.temb)
    layers += _transformer("middle_block.1", ch, spec.mid_depth, spec.context, spec.linear_proj, scope)
    if full:
        layers += _resblock("middle_block.2", ch, ch, spec.temb)
    idx = 0
    for level in range(last, -1, -1):
        m = spec.mult[level]
        for i in range(spec.num_res + 1):
            cin = ch + skips.pop()
            cout = spec.channels * m
            if full:
                layers += _resblock(f"output_blocks.{idx}.0", cin, cout, spec.temb)
            ch = cout
            has_attn = bool(spec.depth[level])
            if has_attn:
                layers += _transformer(
                    f"output_blocks.{idx}.1", ch, spec.depth[level], spec.context, spec.linear_proj, scope
                )
            if full and level != 0 and i == spec.num_res:
                layers.append((f"unet:output_blocks.{idx}.{2 if has_attn else 1}.conv", (ch, ch, 3, 3)))
            idx += 1
    return layers


def _tiny_layers(scope: str) -> list[LayerShape]:
    # Real SD1.5 ids, tiny dims: two 8-wide blocks and a 16-wide middle block; context width 12.
    layers: list[LayerShape] = []
    for prefix, d in (("input_blocks.1.1", 8), ("middle_block.1", 16), ("output_blocks.11.1", 8)):
        layers += _transformer(prefix, d, 1, 12, False, scope)
    if scope == "all":
        layers += _resblock("input_blocks.1.0", 8, 8, 16)
        layers.append(("unet:input_blocks.3.0.op", (8, 8, 3, 3)))
        layers.append(("unet:output_blocks.2.1.conv", (16, 16, 3, 3)))  # SD1.5's attention-less up block
        layers += _resblock("output_blocks.11.0", 16, 8, 16)
    return layers


def _te_layers(component: str, n: int, d: int, ffn: int) -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(n):
        base = f"{component}:text_model.encoder.layers.{i}"
        out += [(f"{base}.self_attn.{p}", (d, d)) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        out += [(f"{base}.mlp.fc1", (ffn, d)), (f"{base}.mlp.fc2", (d, ffn))]
    return out


def layer_shapes(arch: str, scope: str = "transformer", *, include_te: bool = False) -> list[LayerShape]:
    """(layer id, target weight shape) in forward order.

    scope: ``attention`` (attn1/attn2 to_q/k/v/out.0 only), ``transformer`` (plus ff and proj_in/proj_out: kohya's
    default LoRA targets, 192 layers on SD1.5, 722 on SDXL) or ``all`` (plus resnet convs, time-embedding
    projections, down/up-samplers: a LoCon). ``include_te`` adds the CLIP text-encoder attention/MLP layers.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if arch == "tiny":
        layers = _tiny_layers(scope)
        te = (("te1", 1, 8, 32),)
    elif arch in _SPECS:
        layers = _unet_layers(_SPECS[arch], scope)
        te = _TE_SPECS[arch]
    else:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    if include_te:
        for component, n, d, ffn in te:
            layers += _te_layers(component, n, d, ffn)
    return sorted(layers, key=lambda ls: keys.forward_order_key(ls[0]))


def naming_arch(arch: str) -> str:
    """The architecture whose key conventions a synthetic arch uses ("tiny" uses SD1.5 ids)."""
    return "sd15" if arch == "tiny" else arch


# ---------------------------------------------------------------------------------------------------------------
# Factors and keys
# ---------------------------------------------------------------------------------------------------------------


def _generator(seed: int, layer_id: str) -> torch.Generator:
    # Per-layer seed: a layer gets the same factors whatever other layers are in the list.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(layer_id.encode())) % (2**63))
    return g


def _randn(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


def _near_sqrt_factor(n: int) -> int:
    """Largest divisor of n that is <= sqrt(n) (the small Kronecker factor, like LyCORIS' factorization)."""
    for f in range(math.isqrt(n), 0, -1):
        if n % f == 0:
            return f
    return 1


def _lora_factors(g: torch.Generator, shape: tuple[int, ...], r: int, scale: float) -> dict[str, torch.Tensor]:
    out_f, in_f = shape[0], shape[1]
    kernel = shape[2:]
    fan_in = math.prod(shape[1:])
    down = _randn(g, r, in_f, *kernel, std=1.0 / math.sqrt(fan_in))
    up = _randn(g, out_f, r, *((1, 1) if kernel else ()), std=scale / math.sqrt(r))
    return {"down": down, "up": up}


def _loha_factors(g: torch.Generator, shape: tuple[int, ...], r: int, scale: float) -> dict[str, torch.Tensor]:
    out_f, fan_in = shape[0], math.prod(shape[1:])
    std = math.sqrt(scale) / math.sqrt(math.sqrt(r * fan_in))
    return {
        "hada_w1_a": _randn(g, out_f, r, std=std),
        "hada_w1_b": _randn(g, r, fan_in, std=std),
        "hada_w2_a": _randn(g, out_f, r, std=std),
        "hada_w2_b": _randn(g, r, fan_in, std=std),
    }


def _lokr_factors(g: torch.Generator, shape: tuple[int, ...], r: int, scale: float) -> dict[str, torch.Tensor]:
    out_f, in_f, kernel = shape[0], shape[1], shape[2:]
    a, c = _near_sqrt_factor(out_f), _near_sqrt_factor(in_f)
    b, d = out_f // a, in_f // c
    flat = d * math.prod(kernel)
    f = {"lokr_w1": _randn(g, a, c, std=1.0)}
    if r < min(b, flat):
        f["lokr_w2_a"] = _randn(g, b, r, std=scale / math.sqrt(r))
        f["lokr_w2_b"] = _randn(g, r, flat, std=1.0 / math.sqrt(flat))
    else:
        f["lokr_w2"] = _randn(g, b, d, *kernel, std=scale / math.sqrt(flat))
    return f


_FACTORS = {"lora": _lora_factors, "loha": _loha_factors, "lokr": _lokr_factors}
_LORA_SUFFIX = {
    "kohya": {"down": "lora_down.weight", "up": "lora_up.weight"},
    "diffusers": {"down": "lora.down.weight", "up": "lora.up.weight"},
    "peft": {"down": "lora_A.weight", "up": "lora_B.weight"},
}


def module_key(layer_id: str, style: str, arch: str = "sd15") -> str:
    """The module part of a key for ``layer_id`` in a file style (kohya uses SD1.5 diffusers / SDXL compvis names)."""
    a = naming_arch(arch)
    name = keys.kohya_name(layer_id, a) if style == "kohya" else keys.diffusers_name(layer_id, a)
    if name is None:
        raise ValueError(f"layer {layer_id} has no {style}-style key for arch {arch}")
    return name


def make_lora_state_dict(
    layers: Iterable[LayerShape],
    rank: int | Mapping[str, int],
    *,
    style: str = "kohya",
    kind: str = "lora",
    alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    arch: str = "sd15",
) -> dict[str, torch.Tensor]:
    """A random LoRA state dict for ``layers``.

    ``rank``: one rank, or a rank per layer id; clamped to what the layer's shape allows. ``alpha``: written as an
    ``.alpha`` key per layer in every style (None: no alpha keys, scale 1). ``scale`` multiplies the delta
    magnitude. LoHa/LoKr factors use LyCORIS key names under the chosen style's module names. ``arch`` picks the
    key conventions ("sd15", "sdxl", "tiny" = sd15).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    sd: dict[str, torch.Tensor] = {}
    for layer_id, shape in layers:
        want = rank[layer_id] if isinstance(rank, Mapping) else rank
        r = max(1, min(int(want), shape[0], math.prod(shape[1:])))
        factors = _FACTORS[kind](_generator(seed, layer_id), tuple(shape), r, scale)
        module = module_key(layer_id, style, arch)
        for part, tensor in factors.items():
            suffix = _LORA_SUFFIX[style][part] if kind == "lora" else part
            sd[f"{module}.{suffix}"] = tensor.to(dtype).contiguous()
        if alpha is not None:
            sd[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return sd


def save_lora(
    path: str | os.PathLike[str], sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write a state dict as .safetensors; returns the path."""
    from safetensors.torch import save_file

    p = os.fspath(path)
    save_file(
        {k: v.detach().contiguous() for k, v in sd.items()},
        p,
        metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None,
    )
    return p


def write_demo_pair(folder: str | os.PathLike[str]) -> tuple[str, str]:
    """Two SD1.5-shaped LoRAs (kohya keys, fp16) whose strength shifts across the network: the "content" one is
    strongest in the first blocks, the "style" one in the last, so the demo's plan flips layers at many steps."""
    layers = layer_shapes("sd15", "transformer")
    content = make_lora_state_dict(layers, 8, alpha=8.0, seed=1)
    style = make_lora_state_dict(layers, 16, alpha=8.0, seed=2)
    last = max(len(layers) - 1, 1)
    for index, (layer_id, _shape) in enumerate(layers):
        up = f"{module_key(layer_id, 'kohya')}.lora_up.weight"
        position = index / last  # 0 at the first layer of the forward pass, 1 at the last
        content[up] = content[up] * (1.8 - 1.2 * position)
        style[up] = style[up] * (0.6 + 1.2 * position)
    base = os.fspath(folder)
    content_path = save_lora(os.path.join(base, "demo_content.safetensors"), _half(content))
    style_path = save_lora(os.path.join(base, "demo_style.safetensors"), _half(style))
    return content_path, style_path


def _half(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float16) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# Flux: the same weights in fused (kohya / BFL) and split (diffusers / ai-toolkit / PEFT / OneTrainer) key styles
# ---------------------------------------------------------------------------------------------------------------

FLUX_STYLES = ("kohya", "bfl", "bfl-bare", "diffusers", "onetrainer", "lycoris", "peft")
_FLUX_SUFFIX = {
    "kohya": ("lora_down.weight", "lora_up.weight"),
    "onetrainer": ("lora_down.weight", "lora_up.weight"),
    "lycoris": ("lora_down.weight", "lora_up.weight"),
    "bfl": ("lora_A.weight", "lora_B.weight"),
    "bfl-bare": ("lora_A.weight", "lora_B.weight"),
    "diffusers": ("lora_A.weight", "lora_B.weight"),
    "peft": ("lora_A.weight", "lora_B.weight"),
}


def flux_layer_shapes(double: int = 1, single: int = 1, hidden: int = 8, *, globals_: bool = True) -> list[LayerShape]:
    """Canonical Flux ids (BFL paths, fused weights as [q]/[k]/[v]/[mlp] slices) with their target shapes, at a small
    hidden size (mlp ratio 4 like Flux-dev; in/out channels 16, context 12, vector 10, timestep 256 -> 8 here)."""
    h, m = hidden, 4 * hidden
    out: list[LayerShape] = []
    if globals_:
        out += [
            ("flux:img_in", (h, 16)),
            ("flux:time_in.in_layer", (h, 8)),
            ("flux:time_in.out_layer", (h, h)),
            ("flux:vector_in.in_layer", (h, 10)),
            ("flux:txt_in", (h, 12)),
        ]
    for n in range(double):
        b = f"flux:double_blocks.{n}"
        for side in ("img", "txt"):
            out.append((f"{b}.{side}_mod.lin", (6 * h, h)))
            out += [(f"{b}.{side}_attn.qkv[{p}]", (h, h)) for p in ("q", "k", "v")]
            out += [(f"{b}.{side}_attn.proj", (h, h)), (f"{b}.{side}_mlp.0", (m, h)), (f"{b}.{side}_mlp.2", (h, m))]
    for n in range(single):
        b = f"flux:single_blocks.{n}"
        out.append((f"{b}.modulation.lin", (3 * h, h)))
        out += [(f"{b}.linear1[{p}]", (h, h)) for p in ("q", "k", "v")]
        out += [(f"{b}.linear1[mlp]", (m, h)), (f"{b}.linear2", (h, h + m))]
    if globals_:
        out += [("flux:final_layer.adaLN_modulation.1", (2 * h, h)), ("flux:final_layer.linear", (16, h))]
    return sorted(out, key=lambda ls: keys.forward_order_key(ls[0]))


def _flux_module(layer_id: str, style: str) -> str:
    """The module key of a canonical Flux id (a fused id for kohya/BFL styles) in a file style."""
    path = keys.layer_id_parts(layer_id)[1]
    if style in ("kohya", "bfl", "bfl-bare"):
        if style == "kohya":
            return "lora_unet_" + path.replace(".", "_")
        return ("diffusion_model." if style == "bfl" else "") + path
    d = keys.diffusers_name(layer_id, "flux")
    if d is None:
        raise ValueError(f"{layer_id} has no diffusers name")
    d = d[len("transformer.") :]
    if style == "diffusers":
        return "transformer." + d
    if style == "peft":
        return "base_model.model." + d
    return ("lora_transformer_" if style == "onetrainer" else "lycoris_") + d.replace(".", "_")


def make_flux_state_dict(
    layers: Iterable[LayerShape],
    rank: int,
    *,
    style: str = "kohya",
    fused: str = "sparse",
    alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A Flux LoRA state dict for canonical ids (from :func:`flux_layer_shapes`), the same weights in every style.

    Split styles (diffusers, onetrainer, lycoris, peft) write one LoRA per slice (to_q, add_k_proj, proj_mlp, ...);
    fused styles (kohya, bfl, bfl-bare) write one per fused weight, the way sd-scripts' convert_flux_lora does:
    ``fused="sparse"``: slices drawn independently, fused down = their downs stacked (rank n*r), up block-diagonal,
    alpha n*alpha; ``fused="dense"``: the slices of a fused weight share one down (drawn per fused weight), fused up =
    their ups stacked, rank r. diffusers' ``norm_out.linear`` gets the BFL rows' halves swapped (Forge's
    swap_scale_shift)."""
    if style not in FLUX_STYLES:
        raise ValueError(f"style must be one of {FLUX_STYLES}, got {style!r}")
    if fused not in ("sparse", "dense"):
        raise ValueError(f"fused must be 'sparse' or 'dense', got {fused!r}")
    down_k, up_k = _FLUX_SUFFIX[style]
    factors: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, list[str]] = {}
    for layer_id, shape in layers:
        base, part = keys.split_slice(layer_id)
        r = max(1, min(rank, shape[0], shape[1]))
        f = _lora_factors(_generator(seed, layer_id), tuple(shape), r, 1.0)
        if part is not None and fused == "dense":
            f["down"] = _lora_factors(_generator(seed, base), tuple(shape), r, 1.0)["down"]
        factors[layer_id] = f
        groups.setdefault(base if part else layer_id, []).append(layer_id)
    sd: dict[str, torch.Tensor] = {}

    def put(module: str, down: torch.Tensor, up: torch.Tensor, a: float | None) -> None:
        sd[f"{module}.{down_k}"] = down.to(dtype).contiguous()
        sd[f"{module}.{up_k}"] = up.to(dtype).contiguous()
        if a is not None:
            sd[f"{module}.alpha"] = torch.tensor(float(a), dtype=dtype)

    split_style = style not in ("kohya", "bfl", "bfl-bare")
    for base, members in groups.items():
        if split_style or members == [base]:
            for layer_id in members:
                f = factors[layer_id]
                up = f["up"]
                if split_style and keys.flux_needs_swap(layer_id):
                    half = up.shape[0] // 2
                    up = torch.cat([up[half:], up[:half]])
                put(_flux_module(layer_id, style), f["down"], up, alpha)
            continue
        order = sorted(members, key=keys.forward_order_key)
        ups = [factors[i]["up"] for i in order]
        if fused == "dense":
            put(_flux_module(base, style), factors[order[0]]["down"], torch.cat(ups), alpha)
        else:
            down = torch.cat([factors[i]["down"] for i in order])
            up = torch.block_diag(*ups)
            put(_flux_module(base, style), down, up, None if alpha is None else alpha * len(order))
    return sd
