"""Key-style detection and layer-id normalization.

A layer id is ``"<component>:<dotted module path>"``; component is one of ``unet``, ``te1``, ``te2``, ``t5``,
``flux``, ``other``. UNet ids use the compvis/LDM module path (the layout of A1111's ``model.diffusion_model`` and
Forge's ``diffusion_model``); text-encoder ids use the HF CLIP / HF T5 module path; Flux ids use BFL module paths (the
layout of Forge's Flux ``diffusion_model``), and the fused weights (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``)
are split into row slices named ``[q]``, ``[k]``, ``[v]``, ``[mlp]`` (``flux:double_blocks.0.img_attn.qkv[q]``), so
kohya/BFL files (fused) and diffusers files (split ``to_q``/``proj_mlp``) of the same weights give the same ids.

Supported key styles (module part; the LoRA suffix is split off by :func:`split_key`):

* kohya: ``lora_unet_<underscored>`` (SD1.5: diffusers block names; SDXL: compvis names; Flux: BFL names),
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` (HF CLIP paths, or HF T5 paths for OneTrainer Flux),
  ``lora_te3_`` (T5), ``lora_transformer_`` (OneTrainer: diffusers Flux names), ``lycoris_`` (SimpleTuner).
* diffusers / PEFT: ``unet.<diffusers path>`` (or without ``unet.``; the authors' trainer writes ``unet.unet.``),
  ``text_encoder.`` / ``text_encoder_2.``, ``transformer.`` (Flux, diffusers or BFL names), with an optional PEFT
  ``base_model.model.`` wrapper; the old attention-processor form ``...attn1.processor.to_q_lora.down.weight``.
* compvis / BFL dotted: ``diffusion_model.<path>`` / ``model.diffusion_model.<path>``; ComfyUI text encoders
  ``text_encoders.clip_l|clip_g|t5xxl.transformer.<path>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

COMPONENTS = ("te1", "te2", "t5", "unet", "flux", "other")
ARCHES = ("sd15", "sdxl", "flux", "unknown")

# Multi-word module names (they contain "_"), needed to turn kohya's flattened names back into dotted paths.
# Every other underscore separates two path components.
_VOCAB = frozenset(
    {
        # UNet, diffusers naming
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "conv_shortcut",
        "time_emb_proj",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        # UNet, compvis naming
        "input_blocks",
        "output_blocks",
        "middle_block",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        # CLIP text encoders (HF)
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "layer_norm1",
        "layer_norm2",
        "final_layer_norm",
        "token_embedding",
        "position_embedding",
        "text_projection",
        # T5
        "wi_0",
        "wi_1",
        "layer_norm",
        "relative_attention_bias",
        "shared",
        # Flux, BFL naming
        "double_blocks",
        "single_blocks",
        "img_attn",
        "txt_attn",
        "img_mlp",
        "txt_mlp",
        "img_mod",
        "txt_mod",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "in_layer",
        "out_layer",
        "final_layer",
        "adaLN_modulation",
        # Flux, diffusers naming
        "single_transformer_blocks",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff_context",
        "norm1_context",
        "proj_mlp",
        "norm_out",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "timestep_embedder",
        "guidance_embedder",
        "text_embedder",
        "query_norm",
        "key_norm",
        "norm_added_q",
        "norm_added_k",
    }
)
_VOCAB_MAX_WORDS = max(len(v.split("_")) for v in _VOCAB)

_COMPVIS_ROOTS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"})
_DIFFUSERS_ROOTS = frozenset(
    {
        "down_blocks",
        "mid_block",
        "up_blocks",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "add_embedding",
    }
)
_BFL_FLUX_ROOTS = frozenset(
    {"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"}
)
_DIFFUSERS_FLUX_ROOTS = frozenset(
    {
        "transformer_blocks",
        "single_transformer_blocks",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "norm_out",
        "proj_out",
    }
)

# diffusers ResnetBlock2D child -> compvis ResBlock child.
_RESNET_TO_COMPVIS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_COMPVIS.items()}

# Which diffusers down/up blocks carry attentions; decides the compvis index of the up-sampler
# (A1111: output_blocks_{2+3b}_{2 if b > 0 else 1}_conv for SD1.x; SDXL's up_blocks 0 and 1 have attentions).
_DOWN_ATTN = {"sd15": frozenset({0, 1, 2}), "sdxl": frozenset({1, 2})}
_UP_ATTN = {"sd15": frozenset({1, 2, 3}), "sdxl": frozenset({0, 1})}

_DIGITS = re.compile(r"^\d+$")


def _unet_arch(arch: str | None) -> str:
    # SD1.x/2.x share a UNet layout; "unknown" gets the SD1.x rules (the common case for diffusers-named keys).
    return "sdxl" if arch == "sdxl" else "sd15"


# ---------------------------------------------------------------------------------------------------------------
# Splitting a state-dict key into (module key, part)
# ---------------------------------------------------------------------------------------------------------------

# Part suffix as found in files -> canonical part name. Supported parts feed a LoraLayer.
PARTS: dict[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
    "scale": "scale",
    "hada_w1_a": "hada_w1_a",
    "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1",
    "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1_a",
    "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b",
    "lokr_t2": "lokr_t2",
    "diff": "diff",
    "diff_b": "diff_b",  # bias delta (LyCORIS full / Forge "diff" on <module>.bias)
    "dora_scale": "dora_scale",  # DoRA magnitude (LyCORIS / kohya; what both hosts read)
    "lora_magnitude_vector": "magnitude",  # DoRA magnitude, PEFT naming (no host reads it)
    "lora_magnitude_vector.weight": "magnitude",
    "a1.weight": "glora_a1",
    "a2.weight": "glora_a2",
    "b1.weight": "glora_b1",
    "b2.weight": "glora_b2",
    "w_norm": "w_norm",
    "b_norm": "b_norm",
    "on_input": "ia3_on_input",
}
# (IA)3's vector is stored under the bare ``.weight`` suffix: only read that for kohya-style module names, where it
# cannot be the weight of a full checkpoint.
_KOHYA_ONLY_PARTS = {"weight": "ia3_w"}
# Parts we recognise but do not model: reported as unknown keys, naming the format.
UNSUPPORTED_PARTS: frozenset[str] = frozenset(
    {
        "bias_indices",
        "bias_values",
        "bias_size",
        "oft_blocks",
        "oft_diag",
        "alpha_oft",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_A.bias",
        "lora_B.bias",
        "lora_up.bias",
        "lora_down.bias",
        "set_weight",
    }
)
_SUFFIXES = sorted(set(PARTS) | UNSUPPORTED_PARTS, key=len, reverse=True)
# PEFT with a named adapter: "...lora_A.<adapter>.weight".
_PEFT_NAMED = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.[A-Za-z0-9_]+\.weight$")
# Old diffusers attention-processor form: "...attn1.processor.to_q_lora.down.weight".
_PROCESSOR = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$"
)
_KOHYA_PREFIX = re.compile(r"^(?:lora_(unet|te\d?|transformer)|(lycoris))_")
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_key(key: str) -> tuple[str, str] | None:
    """Split a state-dict key into (module key, part).

    The part is canonical for supported parts ("down", "up", "mid", "alpha", "hada_w1_a", "lokr_w1", "diff",
    "dora_scale", "glora_a1", "ia3_w", ...) and the suffix as found for recognised-but-unsupported parts (see
    ``UNSUPPORTED_PARTS``). None: not a LoRA key.
    """
    if _KOHYA_PREFIX.match(key) and "." in key:
        # kohya: the module name has no dots, everything after the first dot is the part.
        module, part = key.split(".", 1)
        if part in PARTS:
            return module, PARTS[part]
        if part in _KOHYA_ONLY_PARTS:
            return module, _KOHYA_ONLY_PARTS[part]
        if part in UNSUPPORTED_PARTS:
            return module, part
        m = re.match(r"^lora_([AB])\.[A-Za-z0-9_]+\.weight$", part)
        if m:
            return module, "down" if m.group(1) == "A" else "up"
        return None
    m = _PROCESSOR.match(key)
    if m:
        # Rebuild the module path the processor belongs to; "to_out" is the Linear inside to_out (to_out.0).
        proj = m.group("proj")
        module = m.group("module")
        if module.startswith(("text_encoder.", "text_encoder_2.")):
            module = f"{module}.{_TE_PROC[proj]}"
        else:
            module = f"{module}.{'to_out.0' if proj == 'to_out' else proj}"
        return module, m.group("ud")
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            module = key[: -len(suffix) - 1]
            return module, PARTS.get(suffix, suffix)
    m = _PEFT_NAMED.match(key)
    if m:
        return m.group("module"), "down" if m.group("ab") == "A" else "up"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------------


def unflatten(name: str) -> str:
    """kohya's underscored module name -> dotted path, using the vocabulary of multi-word module names.

    ``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` -> ``down_blocks.0.attentions.0.
    transformer_blocks.0.attn1.to_out.0``; ``ff_net_0_proj`` -> ``ff.net.0.proj``.
    """
    words = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(words):
        # Longest vocabulary match first, so "time_emb_proj" wins over "time".
        for n in range(min(_VOCAB_MAX_WORDS, len(words) - i), 1, -1):
            cand = "_".join(words[i : i + n])
            if cand in _VOCAB:
                out.append(cand)
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(w for w in out if w != "")


def _is_int(tok: str) -> bool:
    return bool(_DIGITS.match(tok))


def diffusers_to_compvis(path: str, arch: str | None = None) -> str | None:
    """A diffusers UNet module path -> compvis path (SD1.x and SDXL layouts); None if the structure is unknown."""
    t = path.split(".")
    a = _unet_arch(arch)
    root = t[0]
    if root == "conv_in":
        return ".".join(["input_blocks.0.0", *t[1:]])
    if root == "conv_out":
        return ".".join(["out.2", *t[1:]])
    if root == "conv_norm_out":
        return ".".join(["out.0", *t[1:]])
    if root in ("time_embedding", "add_embedding") and len(t) >= 2 and t[1] in ("linear_1", "linear_2"):
        base = "time_embed" if root == "time_embedding" else "label_emb.0"
        return ".".join([f"{base}.{0 if t[1] == 'linear_1' else 2}", *t[2:]])
    if root in ("down_blocks", "up_blocks") and len(t) >= 5 and _is_int(t[1]) and _is_int(t[3]):
        b, kind, j, rest = int(t[1]), t[2], int(t[3]), t[4:]
        if root == "down_blocks":
            if kind == "attentions":
                return ".".join([f"input_blocks.{1 + 3 * b + j}.1", *rest])
            if kind == "resnets":
                suffix = _resnet_suffix(rest)
                return f"input_blocks.{1 + 3 * b + j}.0.{suffix}" if suffix else None
            if kind == "downsamplers" and j == 0 and rest == ["conv"]:
                return f"input_blocks.{3 + 3 * b}.0.op"
            return None
        if kind == "attentions":
            return ".".join([f"output_blocks.{3 * b + j}.1", *rest])
        if kind == "resnets":
            suffix = _resnet_suffix(rest)
            return f"output_blocks.{3 * b + j}.0.{suffix}" if suffix else None
        if kind == "upsamplers" and j == 0 and rest == ["conv"]:
            sub = 2 if b in _UP_ATTN[a] else 1
            return f"output_blocks.{3 * b + 2}.{sub}.conv"
        return None
    if root == "mid_block" and len(t) >= 4 and _is_int(t[2]):
        kind, j, rest = t[1], int(t[2]), t[3:]
        if kind == "attentions" and j == 0:
            return ".".join(["middle_block.1", *rest])
        if kind == "resnets":
            suffix = _resnet_suffix(rest)
            return f"middle_block.{2 * j}.{suffix}" if suffix else None
    return None


def _resnet_suffix(rest: list[str]) -> str | None:
    return _RESNET_TO_COMPVIS.get(".".join(rest))


def compvis_to_diffusers(path: str, arch: str | None = None) -> str | None:
    """Inverse of :func:`diffusers_to_compvis`; None where a compvis module has no diffusers counterpart."""
    t = path.split(".")
    a = _unet_arch(arch)
    if t[:3] == ["input_blocks", "0", "0"]:
        return ".".join(["conv_in", *t[3:]])
    if t[:2] == ["out", "2"]:
        return ".".join(["conv_out", *t[2:]])
    if t[:2] == ["out", "0"]:
        return ".".join(["conv_norm_out", *t[2:]])
    if t[0] == "time_embed" and len(t) >= 2 and t[1] in ("0", "2"):
        return ".".join([f"time_embedding.linear_{1 if t[1] == '0' else 2}", *t[2:]])
    if t[:2] == ["label_emb", "0"] and len(t) >= 3 and t[2] in ("0", "2"):
        return ".".join([f"add_embedding.linear_{1 if t[2] == '0' else 2}", *t[3:]])
    if t[0] == "middle_block" and len(t) >= 3 and _is_int(t[1]):
        sub, rest = int(t[1]), t[2:]
        if sub == 1:
            return ".".join(["mid_block.attentions.0", *rest])
        if sub in (0, 2):
            suffix = _RESNET_TO_DIFFUSERS.get(".".join(rest))
            return f"mid_block.resnets.{sub // 2}.{suffix}" if suffix else None
        return None
    if len(t) < 3 or not (_is_int(t[1]) and _is_int(t[2])):
        return None
    n, sub, rest = int(t[1]), int(t[2]), t[3:]
    if t[0] == "input_blocks" and n >= 1:
        b, j = divmod(n - 1, 3)
        if j == 2:  # the down-sampler slot
            return f"down_blocks.{b}.downsamplers.0.conv" if sub == 0 and rest == ["op"] else None
        if sub == 1 and b in _DOWN_ATTN[a]:
            return ".".join([f"down_blocks.{b}.attentions.{j}", *rest])
        if sub == 0:
            suffix = _RESNET_TO_DIFFUSERS.get(".".join(rest))
            return f"down_blocks.{b}.resnets.{j}.{suffix}" if suffix else None
        return None
    if t[0] == "output_blocks":
        b, j = divmod(n, 3)
        has_attn = b in _UP_ATTN[a]
        up_sub = 2 if has_attn else 1
        if j == 2 and sub == up_sub and rest == ["conv"]:
            return f"up_blocks.{b}.upsamplers.0.conv"
        if sub == 1 and has_attn:
            return ".".join([f"up_blocks.{b}.attentions.{j}", *rest])
        if sub == 0:
            suffix = _RESNET_TO_DIFFUSERS.get(".".join(rest))
            return f"up_blocks.{b}.resnets.{j}.{suffix}" if suffix else None
    return None


def _unet_id(path: str, arch: str | None) -> str | None:
    root = path.split(".", 1)[0]
    if root in _COMPVIS_ROOTS:
        return f"unet:{path}"
    if root in _DIFFUSERS_ROOTS:
        conv = diffusers_to_compvis(path, arch)
        return f"unet:{conv}" if conv else None
    return None


# ---- Flux: BFL module paths (Forge's Flux model), fused weights split into row slices ----------------------------

# Fused BFL weights and the named row slices they are split into (rows from h = in_features of the weight).
_FUSED_QKV = ("q", "k", "v")
_FUSED_LINEAR1 = ("q", "k", "v", "mlp")
SLICE_PARTS = _FUSED_LINEAR1
_SLICE = re.compile(r"^(?P<base>.+)\[(?P<part>q|k|v|mlp)\]$")

# diffusers Flux block child -> (BFL child, slice part) (Forge: comfyui_lora_collection/utils.py flux_to_diffusers).
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", "q"),
    "attn.to_k": ("img_attn.qkv", "k"),
    "attn.to_v": ("img_attn.qkv", "v"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"),
    "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", "q"),
    "attn.to_k": ("linear1", "k"),
    "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_FLUX_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # shift/scale halves swapped (diffusers vs BFL order)
}
_SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})
_BFL_TO_DIFFUSERS_DOUBLE = {v: k for k, v in _FLUX_DOUBLE.items()}
_BFL_TO_DIFFUSERS_SINGLE = {v: k for k, v in _FLUX_SINGLE.items()}
_BFL_TO_DIFFUSERS_GLOBAL = {v: k for k, v in _FLUX_GLOBAL.items()}


def fused_parts(bfl_path: str) -> tuple[str, ...] | None:
    """The slices a fused BFL Flux weight is split into: q/k/v for ``*_attn.qkv``, q/k/v/mlp for ``linear1``."""
    t = bfl_path.split(".")
    if len(t) == 4 and t[0] == "double_blocks" and t[2] in ("img_attn", "txt_attn") and t[3] == "qkv":
        return _FUSED_QKV
    if len(t) == 3 and t[0] == "single_blocks" and t[2] == "linear1":
        return _FUSED_LINEAR1
    return None


def slice_rows(part: str, hidden: int, rows: int) -> tuple[int, int]:
    """Rows [start, stop) of slice ``part`` in a fused weight with ``rows`` rows and in_features ``hidden``."""
    if part == "mlp":
        return 3 * hidden, rows
    i = _FUSED_QKV.index(part)
    return i * hidden, (i + 1) * hidden


def fused_split_ok(bfl_path: str, rows: int, hidden: int) -> bool:
    """Whether a fused weight of this shape splits into its slices (qkv: 3h rows; linear1: more than 3h rows)."""
    parts = fused_parts(bfl_path)
    if parts is None or hidden <= 0:
        return False
    return rows == 3 * hidden if parts == _FUSED_QKV else rows > 3 * hidden


def split_slice(layer_id: str) -> tuple[str, str | None]:
    """``"flux:single_blocks.0.linear1[mlp]"`` -> ``("flux:single_blocks.0.linear1", "mlp")``; (id, None) otherwise."""
    m = _SLICE.match(layer_id)
    return (m.group("base"), m.group("part")) if m else (layer_id, None)


def _flux_bfl(path: str) -> tuple[str, str | None] | None:
    """A Flux module path in BFL or diffusers naming -> (BFL path, slice part); None if unknown."""
    t = path.split(".")
    root = t[0]
    if root in _BFL_FLUX_ROOTS:
        return path, None
    if root in ("transformer_blocks", "single_transformer_blocks") and len(t) >= 3 and _is_int(t[1]):
        table = _FLUX_DOUBLE if root == "transformer_blocks" else _FLUX_SINGLE
        hit = table.get(".".join(t[2:]))
        if hit is None:
            return None
        prefix = "double_blocks" if root == "transformer_blocks" else "single_blocks"
        return f"{prefix}.{t[1]}.{hit[0]}", hit[1]
    bfl = _FLUX_GLOBAL.get(path)
    return (bfl, None) if bfl else None


def flux_needs_swap(layer_id: str) -> bool:
    """True for the Flux layer whose diffusers delta has its two row halves in the other order (norm_out.linear)."""
    component, path = layer_id_parts(layer_id)
    return component == "flux" and path in _SWAPPED


@dataclass(frozen=True)
class Target:
    """Where a file's module key lands: the layer id, plus how the file's delta maps onto it."""

    id: str  # normalized layer id (slices of fused Flux weights end in [q]/[k]/[v]/[mlp])
    style: str  # key style: kohya, lycoris, diffusers, diffusers-processor, peft, authors, compvis, bfl, comfy, bare
    swap_halves: bool = False  # delta rows' halves swapped (diffusers norm_out.linear -> BFL adaLN_modulation.1)


def _flux_target(path: str, style: str) -> Target | None:
    hit = _flux_bfl(path)
    if hit is None:
        return None
    bfl, part = hit
    swap = path.split(".", 1)[0] not in _BFL_FLUX_ROOTS and bfl in _SWAPPED
    return Target(f"flux:{bfl}[{part}]" if part else f"flux:{bfl}", style, swap)


def _flux_id(path: str) -> str | None:
    t = _flux_target(path, "")
    return t.id if t else None


def _te_id(component: str, path: str) -> str | None:
    # HF CLIP modules live under text_model.; T5 under encoder./shared (any kohya te prefix: sd-scripts uses
    # lora_te3_, OneTrainer Flux lora_te2_): T5 is its own component, never switched.
    if path.startswith(("encoder.", "shared")):
        return f"t5:{path}"
    if path.startswith(("text_model.", "text_projection")):
        return f"{component}:{path}"
    return None


_COMFY_TE = (("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_g.transformer.", "te2"))


def resolve_key(module_key: str, arch_hint: str | None = None) -> Target | None:
    """The module part of a key (no ``.lora_down.weight`` etc.) in any supported style -> :class:`Target`.

    The id is ``"other:<module_key>"`` when the style is recognised but the module path is not (so the layer is kept
    and reported); None when the key is in no known style at all.
    """
    k = module_key
    wrapped = k.startswith("base_model.model.")  # PEFT wrapper
    if wrapped:
        k = k[len("base_model.model.") :]
    other = f"other:{module_key}"
    if k.startswith(("lora_", "lycoris_")):
        m = _KOHYA_PREFIX.match(k)
        if not m:
            return None
        kind, rest = m.group(1) or m.group(2), k[m.end() :]
        path = unflatten(rest)
        style = "lycoris" if kind == "lycoris" else "kohya"
        target: Target | None
        if kind in ("unet", "lycoris"):
            # UNet and Flux roots never overlap (SimpleTuner's lycoris_ uses diffusers names for both).
            root = path.split(".", 1)[0]
            if arch_hint == "flux" or root in _BFL_FLUX_ROOTS or root in _DIFFUSERS_FLUX_ROOTS:
                target = _flux_target(path, style)
            else:
                unet = _unet_id(path, arch_hint)
                target = Target(unet, style) if unet else None
        elif kind == "transformer":
            target = _flux_target(path, style)
        else:
            component = {"te": "te1", "te1": "te1", "te2": "te2"}.get(kind)
            te = _te_id(component, path) if component else None
            if te is None and path.startswith(("encoder.", "shared")):
                te = f"t5:{path}"  # lora_te3_ (sd-scripts' T5) and beyond
            target = Target(te, style) if te else None
        return target or Target(other, style)
    for prefix, component in (("text_encoder_2.", "te2"), ("text_encoder.", "te1"), *_COMFY_TE):
        if k.startswith(prefix):
            te = _te_id(component, k[len(prefix) :])
            return Target(te or other, "comfy" if prefix.startswith("text_encoders.") else "diffusers")
    if k.startswith("text_encoders.t5xxl.transformer."):
        return Target(f"t5:{k[len('text_encoders.t5xxl.transformer.') :]}", "comfy")
    if k.startswith("unet."):
        style = "peft" if wrapped else "diffusers"
        while k.startswith("unet.unet."):  # the authors' diffusers-0.24 trainer
            k = k[len("unet.") :]
            style = "authors"
        unet = _unet_id(k[len("unet.") :], arch_hint)
        return Target(unet or other, style)
    if k.startswith("transformer."):
        return _flux_target(k[len("transformer.") :], "peft" if wrapped else "diffusers") or Target(other, "diffusers")
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if k.startswith(prefix):
            path = k[len(prefix) :]
            if path.split(".", 1)[0] in _BFL_FLUX_ROOTS:
                return _flux_target(path, "bfl") or Target(other, "bfl")
            unet = _unet_id(path, arch_hint)
            return Target(unet or other, "compvis")
    # Bare dotted paths (PEFT without a component prefix).
    style = "peft" if wrapped else "bare"
    root = k.split(".", 1)[0]
    if root in _COMPVIS_ROOTS or root in _DIFFUSERS_ROOTS:
        return Target(_unet_id(k, arch_hint) or other, style)
    if root == "text_model":
        return Target(f"te1:{k}", style)
    if root in _BFL_FLUX_ROOTS or root in _DIFFUSERS_FLUX_ROOTS:
        return _flux_target(k, style)
    return None


def normalize_key(module_key: str, arch_hint: str | None = None) -> str | None:
    """The module part of a key in any supported style -> layer id (see :func:`resolve_key`)."""
    target = resolve_key(module_key, arch_hint)
    return target.id if target else None


TEXT_ENCODERS = ("te1", "te2", "t5")


def is_text_encoder(layer_id: str) -> bool:
    """True for CLIP (te1, te2) and T5 (t5) layers: patched by the LoRA, never switched by K-LoRA."""
    return layer_id.startswith(("te1:", "te2:", "t5:"))


def layer_id_parts(layer_id: str) -> tuple[str, str]:
    """``"unet:a.b"`` -> ``("unet", "a.b")``."""
    component, sep, path = layer_id.partition(":")
    if not sep:
        return "other", layer_id
    return component, path


# ---------------------------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------------------------

_TB_INDEX = re.compile(r"transformer_blocks[._](\d+)")
_SD15_ONLY = re.compile(
    r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]|down_blocks[._]3[._]"
    r"|input_blocks[._][12][._]1[._]|input_blocks[._]1[01][._]|output_blocks[._](9|10|11)[._]"
)
_SDXL_ONLY = re.compile(r"^lora_te2_|^text_encoder_2\.|add_embedding|label_emb")
_FLUX = re.compile(
    r"double_blocks|single_blocks|single_transformer_blocks|^transformer\.|^lora_transformer_"
    r"|^base_model\.model\.transformer_blocks|^(lycoris_)?transformer_blocks[._]"
)


def detect_arch(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """Guess the base model family from state-dict keys ("sd15" | "sdxl" | "flux" | "unknown").

    Key structure decides first (Flux block names; SDXL-only modules such as a second text encoder or transformer
    depth > 1; SD1.x-only blocks). ``shapes`` (key -> shape) is a fallback: the in-features of a cross-attention
    to_k (768 SD1.x, 2048 SDXL).
    """
    keys = list(keys)
    sdxl = sd15 = False
    for key in keys:
        if _FLUX.search(key):
            return "flux"
        if _SDXL_ONLY.search(key):
            sdxl = True
        for m in _TB_INDEX.finditer(key):
            if int(m.group(1)) >= 1 and "single_" not in key:
                sdxl = True
        if _SD15_ONLY.search(key):
            sd15 = True
    if sdxl:
        return "sdxl"
    if sd15:
        return "sd15"
    if shapes:
        for key, shape in shapes.items():
            split = split_key(key)
            if split is None or split[1] not in ("down", "hada_w1_b", "hada_w2_b") or len(shape) < 2:
                continue
            module = split[0]
            if "attn2" in module and re.search(r"to_k$", module):
                if shape[1] == 768:
                    return "sd15"
                if shape[1] == 2048:
                    return "sdxl"
    if any(k.startswith("lora_te_") for k in keys) and not any(k.startswith("lora_te1_") for k in keys):
        return "sd15"  # kohya's single-text-encoder prefix
    return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Ordering, classification, labels
# ---------------------------------------------------------------------------------------------------------------

_COMPONENT_RANK = {"te1": 0, "te2": 1, "t5": 2, "unet": 3, "flux": 4, "other": 5}
# Forward-execution order of sibling module names (only siblings are ever compared).
_UNET_ORDER = (
    "time_embed",
    "label_emb",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "out",
    "norm",
    "proj_in",
    "transformer_blocks",
    "proj_out",
    "norm1",
    "attn1",
    "norm2",
    "attn2",
    "norm3",
    "ff",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "net",
    "proj",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "op",
    "conv",
)
_TE_ORDER = (
    "embeddings",
    "token_embedding",
    "position_embedding",
    "encoder",
    "layers",
    "layer_norm1",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm2",
    "mlp",
    "fc1",
    "fc2",
    "final_layer_norm",
    "text_projection",
    "shared",
    "block",
    "layer",
    "SelfAttention",
    "DenseReluDense",
    "q",
    "k",
    "v",
    "o",
    "wi_0",
    "wi_1",
    "wo",
)
# Flux (BFL names), checked against Forge's backend/nn/flux.py forward: model level, then inside a double block the
# execution order img_mod, img qkv, txt_mod, txt qkv, (attention), img proj, img mlp, txt proj, txt mlp.
_FLUX_ORDER = (
    "img_in",
    "time_in",
    "guidance_in",
    "vector_in",
    "txt_in",
    "double_blocks",
    "single_blocks",
    "final_layer",
    "in_layer",
    "out_layer",
    "adaLN_modulation",
    "linear",
)
_FLUX_DOUBLE_ORDER = {
    n: i
    for i, n in enumerate(
        (
            "img_mod.lin",
            "img_attn.qkv",
            "txt_mod.lin",
            "txt_attn.qkv",
            "img_attn.proj",
            "img_mlp.0",
            "img_mlp.2",
            "txt_attn.proj",
            "txt_mlp.0",
            "txt_mlp.2",
        )
    )
}
# Single block: modulation, then linear1 (q, k, v and mlp slices come out of one fused matmul), then linear2.
_FLUX_SINGLE_ORDER = {"modulation.lin": 0, "linear1": 1, "linear2": 2}
_SLICE_ORDER = {p: i for i, p in enumerate(SLICE_PARTS)}
_ORDER_TABLES = {
    "unet": {n: i for i, n in enumerate(_UNET_ORDER)},
    "te1": {n: i for i, n in enumerate(_TE_ORDER)},
    "te2": {n: i for i, n in enumerate(_TE_ORDER)},
    "t5": {n: i for i, n in enumerate(_TE_ORDER)},
    "flux": {n: i for i, n in enumerate(_FLUX_ORDER)},
}


def forward_order_key(layer_id: str) -> tuple:
    """Sort key in forward-execution order: text encoders (te1, te2, t5) first, then the UNet (input blocks by number,
    middle, output blocks; attn1, attn2, ff; to_q, to_k, to_v, to_out.0; resnet in/emb/out/skip), then Flux (embedders,
    double blocks, single blocks, final layer; inside blocks in execution order, slices q, k, v, mlp), then other.
    Numbers sort numerically; unknown names after known ones, alphabetically."""
    component, path = layer_id_parts(layer_id)
    table = _ORDER_TABLES.get(component, {})
    unknown = len(table)
    rank = _COMPONENT_RANK.get(component, len(_COMPONENT_RANK))
    if component == "flux":
        base, part = split_slice(path)
        t = base.split(".")
        if len(t) >= 3 and t[0] in ("double_blocks", "single_blocks") and _is_int(t[1]):
            child = ".".join(t[2:])
            order = _FLUX_DOUBLE_ORDER if t[0] == "double_blocks" else _FLUX_SINGLE_ORDER
            toks = (
                (1, table[t[0]], t[0]),
                (0, int(t[1]), ""),
                (1, order.get(child, len(order)), child),
                (1, _SLICE_ORDER.get(part or "", -1), part or ""),
            )
            return (rank, toks)
    toks = tuple((0, int(t), "") if _is_int(t) else (1, table.get(t, unknown), t) for t in path.split("."))
    return (rank, toks)


_ATTENTION = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def is_attention(layer_id: str) -> bool:
    """True for UNet attn1/attn2 to_q/to_k/to_v/to_out.0 (the reference implementation's scope)."""
    component, path = layer_id_parts(layer_id)
    return component == "unet" and bool(_ATTENTION.search(path))


def layer_group(layer_id: str) -> str:
    """Short label for map ticks: IN4, MID, OUT3, EMB, END, TE1, TE2, T5, FLUX-D3, FLUX-S12, FLUX, OTHER."""
    component, path = layer_id_parts(layer_id)
    t = path.split(".")
    if component == "unet":
        if t[0] == "input_blocks" and len(t) > 1:
            return f"IN{t[1]}"
        if t[0] == "middle_block":
            return "MID"
        if t[0] == "output_blocks" and len(t) > 1:
            return f"OUT{t[1]}"
        if t[0] in ("time_embed", "label_emb"):
            return "EMB"
        return "END"
    if component in ("te1", "te2", "t5"):
        return component.upper()
    if component == "flux":
        if len(t) > 1 and t[0] == "double_blocks":
            return f"FLUX-D{t[1]}"
        if len(t) > 1 and t[0] == "single_blocks":
            return f"FLUX-S{t[1]}"
        return "FLUX"
    return "OTHER"


_CONV3 = re.compile(
    r"(^input_blocks\.0\.0$|^out\.2$|\.in_layers\.2$|\.out_layers\.3$|\.0\.op$|^output_blocks\.\d+\.[12]\.conv$)"
)


def conv_kernel(layer_id: str, arch: str | None = None) -> int | None:
    """Kernel size of the target weight: 3 or 1 for a Conv2d, 0 for a Linear, None when not known.

    Lets flattened LoHa/LoKr factors be given the target's 4-D shape (the file does not store the kernel size).
    """
    component, path = layer_id_parts(layer_id)
    if component in ("te1", "te2", "t5", "flux"):
        return 0  # every LoRA target there is a Linear
    if component != "unet":
        return None
    if _CONV3.search(path):
        return 3
    if path.endswith(".skip_connection"):
        return 1
    if path.endswith((".proj_in", ".proj_out")):
        # SD1.x: 1x1 Conv2d; SDXL: Linear (use_linear_in_transformer); SD2.x is Linear too, so unknown -> None.
        return {"sd15": 1, "sdxl": 0}.get(arch or "")
    if re.search(r"(\.to_[qkv]|\.to_out\.0|\.ff\.net\.0\.proj|\.ff\.net\.2|\.emb_layers\.1)$", path):
        return 0
    if re.match(r"^(time_embed\.[02]|label_emb\.0\.[02])$", path):
        return 0
    return None


# ---------------------------------------------------------------------------------------------------------------
# Host names and file-style names of a layer id
# ---------------------------------------------------------------------------------------------------------------

_TE2_OPENCLIP = (
    (re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"), "attn_{1}"),
    (re.compile(r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc1$"), "mlp_c_fc"),
    (re.compile(r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc2$"), "mlp_c_proj"),
)


def a1111_name(layer_id: str, arch: str | None = "sd15") -> str | None:
    """The ``network_layer_name`` A1111's builtin Lora gives the module (its ``net.modules`` key).

    * unet: ``diffusion_model_<path with . -> _>``.
    * te1: SD1.x ``transformer_<path_>``; SDXL ``0_transformer_<path_>``.
    * te2 (SDXL, OpenCLIP): ``1_model_transformer_resblocks_<N>_attn_q_proj`` (q/k/v/out of the fused
      MultiheadAttention are keyed this way), ``..._mlp_c_fc``, ``..._mlp_c_proj``; None for other te2 modules.
    * flux / other: None (A1111 has no such models).
    """
    component, path = layer_id_parts(layer_id)
    flat = path.replace(".", "_")
    if component == "unet":
        return f"diffusion_model_{flat}"
    if component == "te1":
        if arch == "sdxl":
            return f"0_transformer_{flat}"
        if arch == "flux":
            return None
        return f"transformer_{flat}"
    if component == "te2":
        for pattern, template in _TE2_OPENCLIP:
            m = pattern.match(path)
            if m:
                groups = m.groups()
                tail = template.format(*groups)
                return f"1_model_transformer_resblocks_{groups[0]}_{tail}"
        return None
    return None


def forge_key(layer_id: str) -> str | None:
    """Forge state-dict key of the target weight: ``diffusion_model.<path>.weight`` for UNet and Flux ids (for a
    slice, the fused weight's key; see :func:`forge_target` for the offset). None for text encoders and other ids."""
    component, path = layer_id_parts(layer_id)
    if component == "unet":
        return f"diffusion_model.{path}.weight"
    if component == "flux":
        return f"diffusion_model.{split_slice(path)[0]}.weight"
    return None


def forge_target(
    layer_id: str, weight_shape: tuple[int, ...] | None = None
) -> tuple[str, tuple[int, int, int] | None] | None:
    """(Forge param key, offset) of a layer: offset ``(0, start, length)`` for a slice of a fused Flux weight (what
    Forge's own diffusers key map gives ``to_q``/``proj_mlp``), None for a whole weight. ``weight_shape``: the fused
    parameter's shape (needed for slices only). None when Forge has no such param key."""
    key = forge_key(layer_id)
    if key is None:
        return None
    _, part = split_slice(layer_id)
    if part is None:
        return key, None
    if weight_shape is None or len(weight_shape) < 2:
        raise ValueError(f"forge_target({layer_id!r}) needs the fused weight's shape")
    start, stop = slice_rows(part, int(weight_shape[1]), int(weight_shape[0]))
    return key, (0, start, stop - start)


def diffusers_name(layer_id: str, arch: str | None = "sd15") -> str | None:
    """The diffusers/PEFT module key of a layer id (``unet.down_blocks...``, ``text_encoder.``, ``transformer.``)."""
    component, path = layer_id_parts(layer_id)
    if component == "unet":
        d = compvis_to_diffusers(path, arch)
        return f"unet.{d}" if d else None
    if component == "te1":
        return f"text_encoder.{path}"
    if component == "te2":
        return f"text_encoder_2.{path}"
    if component == "flux":
        d = _bfl_to_diffusers(path)
        return f"transformer.{d}" if d else None
    return None


def _bfl_to_diffusers(path: str) -> str | None:
    """A canonical Flux path (BFL, maybe a slice) -> the diffusers module path; None where there is none (a fused
    weight as a whole)."""
    base, part = split_slice(path)
    t = base.split(".")
    if len(t) >= 3 and t[0] in ("double_blocks", "single_blocks") and _is_int(t[1]):
        table = _BFL_TO_DIFFUSERS_DOUBLE if t[0] == "double_blocks" else _BFL_TO_DIFFUSERS_SINGLE
        d = table.get((".".join(t[2:]), part))
        prefix = "transformer_blocks" if t[0] == "double_blocks" else "single_transformer_blocks"
        return f"{prefix}.{t[1]}.{d}" if d else None
    return None if part else _BFL_TO_DIFFUSERS_GLOBAL.get(base)


def kohya_name(layer_id: str, arch: str | None = "sd15") -> str | None:
    """The kohya (sd-scripts) module key of a layer id.

    SD1.x UNet keys use diffusers block names, SDXL UNet keys compvis names; SD1.x text encoder ``lora_te_``,
    SDXL ``lora_te1_``/``lora_te2_``; T5 ``lora_te3_``; Flux BFL paths ``lora_unet_`` (None for a slice of a fused
    weight).
    """
    component, path = layer_id_parts(layer_id)
    if component == "unet":
        if arch == "sdxl":
            return "lora_unet_" + path.replace(".", "_")
        d = compvis_to_diffusers(path, arch)
        return "lora_unet_" + d.replace(".", "_") if d else None
    if component == "te1":
        return ("lora_te1_" if arch in ("sdxl", "flux") else "lora_te_") + path.replace(".", "_")
    if component == "te2":
        return "lora_te2_" + path.replace(".", "_")
    if component == "flux":
        if split_slice(path)[1]:
            return None  # a slice has no kohya key: kohya stores the fused weight (see fused_parts)
        return "lora_unet_" + path.replace(".", "_")
    if component == "t5":
        return "lora_te3_" + path.replace(".", "_")
    return None
