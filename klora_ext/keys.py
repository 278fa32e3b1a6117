"""Key-style detection and layer-id normalization.

A layer id is ``"<component>:<dotted module path>"``; component is one of ``unet``, ``te1``, ``te2``, ``flux``,
``other``. UNet ids use the compvis/LDM module path (the layout of A1111's ``model.diffusion_model`` and Forge's
``diffusion_model``); text-encoder ids use the HF CLIP module path; Flux ids keep the path found in the file.

Supported key styles (module part; the LoRA suffix is split off by :func:`split_key`):

* kohya: ``lora_unet_<underscored>`` (SD1.5: diffusers block names; SDXL: compvis names; Flux: BFL names),
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` (HF CLIP paths), ``lora_transformer_`` (diffusers Flux names).
* diffusers / PEFT: ``unet.<diffusers path>`` (or without ``unet.``), ``text_encoder.`` / ``text_encoder_2.``,
  ``transformer.`` (Flux), with an optional PEFT ``base_model.model.`` wrapper; the old attention-processor
  form ``...attn1.processor.to_q_lora.down.weight``.
* compvis dotted: ``diffusion_model.<path>`` / ``model.diffusion_model.<path>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

COMPONENTS = ("te1", "te2", "unet", "flux", "other")
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
}
# Parts we recognise but do not model (bias deltas, DoRA, IA3, OFT, GLoRA, norm): reported as unknown keys.
UNSUPPORTED_PARTS: frozenset[str] = frozenset(
    {
        "diff_b",
        "dora_scale",
        "lora_magnitude_vector",
        "lora_magnitude_vector.weight",
        "bias_indices",
        "bias_values",
        "bias_size",
        "on_input",
        "w_norm",
        "b_norm",
        "oft_blocks",
        "oft_diag",
        "a1.weight",
        "a2.weight",
        "b1.weight",
        "b2.weight",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_A.bias",
        "lora_B.bias",
        "lora_up.bias",
        "lora_down.bias",
    }
)
_SUFFIXES = sorted(set(PARTS) | UNSUPPORTED_PARTS, key=len, reverse=True)
# PEFT with a named adapter: "...lora_A.<adapter>.weight".
_PEFT_NAMED = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.[A-Za-z0-9_]+\.weight$")
# Old diffusers attention-processor form: "...attn1.processor.to_q_lora.down.weight".
_PROCESSOR = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$"
)
_KOHYA_PREFIX = re.compile(r"^lora_(unet|te\d?|transformer)_")
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_key(key: str) -> tuple[str, str] | None:
    """Split a state-dict key into (module key, part).

    The part is canonical for supported parts ("down", "up", "mid", "alpha", "hada_w1_a", "lokr_w1", "diff", ...)
    and the suffix as found for recognised-but-unsupported parts (see ``UNSUPPORTED_PARTS``). None: not a LoRA key.
    """
    if _KOHYA_PREFIX.match(key) and "." in key:
        # kohya: the module name has no dots, everything after the first dot is the part.
        module, part = key.split(".", 1)
        if part in PARTS:
            return module, PARTS[part]
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


def _flux_id(path: str) -> str | None:
    root = path.split(".", 1)[0]
    if root in _BFL_FLUX_ROOTS or root in _DIFFUSERS_FLUX_ROOTS:
        return f"flux:{path}"
    return None


def _te_id(component: str, path: str) -> str | None:
    # HF CLIP modules live under text_model.; T5 (Flux/SD3 "te2") under encoder./shared.
    if path.startswith(("text_model.", "encoder.", "shared", "text_projection")):
        return f"{component}:{path}"
    return None


def normalize_key(module_key: str, arch_hint: str | None = None) -> str | None:
    """The module part of a key (no ``.lora_down.weight`` etc.) in any supported style -> layer id.

    Returns ``"other:<module_key>"`` when the style is recognised but the module path is not (so the layer is kept
    and reported), and None when the key is in no known style at all.
    """
    k = module_key
    if k.startswith("base_model.model."):  # PEFT wrapper
        k = k[len("base_model.model.") :]
    if k.startswith("lora_"):
        m = _KOHYA_PREFIX.match(k)
        if not m:
            return None
        kind, rest = m.group(1), k[m.end() :]
        path = unflatten(rest)
        if kind == "unet":
            is_flux = arch_hint == "flux" or path.split(".", 1)[0] in _BFL_FLUX_ROOTS
            ident = _flux_id(path) if is_flux else _unet_id(path, arch_hint)
        elif kind == "transformer":
            ident = _flux_id(path)
        elif kind in ("te", "te1"):
            ident = _te_id("te1", path)
        elif kind == "te2":
            ident = _te_id("te2", path)
        else:  # lora_te3_ (SD3's T5) and beyond: no component of ours
            ident = None
        return ident or f"other:{module_key}"
    for prefix, component in (("text_encoder_2.", "te2"), ("text_encoder.", "te1")):
        if k.startswith(prefix):
            return _te_id(component, k[len(prefix) :]) or f"other:{module_key}"
    if k.startswith("unet."):
        return _unet_id(k[len("unet.") :], arch_hint) or f"other:{module_key}"
    if k.startswith("transformer."):
        return _flux_id(k[len("transformer.") :]) or f"other:{module_key}"
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if k.startswith(prefix):
            return _unet_id(k[len(prefix) :], arch_hint) or f"other:{module_key}"
    # Bare dotted paths (PEFT without a component prefix).
    root = k.split(".", 1)[0]
    if root in _COMPVIS_ROOTS or root in _DIFFUSERS_ROOTS:
        return _unet_id(k, arch_hint) or f"other:{module_key}"
    if root == "text_model":
        return f"te1:{k}"
    if root in _BFL_FLUX_ROOTS or root in ("transformer_blocks", "single_transformer_blocks"):
        return _flux_id(k)
    return None


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
    r"|^base_model\.model\.transformer_blocks"
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

_COMPONENT_RANK = {"te1": 0, "te2": 1, "unet": 2, "flux": 3, "other": 4}
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
_FLUX_ORDER = (
    "img_in",
    "x_embedder",
    "txt_in",
    "context_embedder",
    "time_in",
    "time_text_embed",
    "vector_in",
    "guidance_in",
    "double_blocks",
    "transformer_blocks",
    "single_blocks",
    "single_transformer_blocks",
    "final_layer",
    "norm_out",
    "proj_out",
    "img_mod",
    "img_attn",
    "img_mlp",
    "txt_mod",
    "txt_attn",
    "txt_mlp",
    "norm1",
    "norm1_context",
    "attn",
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out",
    "to_add_out",
    "ff",
    "ff_context",
    "proj_mlp",
    "qkv",
    "proj",
    "lin",
    "linear1",
    "linear2",
)
_ORDER_TABLES = {
    "unet": {n: i for i, n in enumerate(_UNET_ORDER)},
    "te1": {n: i for i, n in enumerate(_TE_ORDER)},
    "te2": {n: i for i, n in enumerate(_TE_ORDER)},
    "flux": {n: i for i, n in enumerate(_FLUX_ORDER)},
}


def forward_order_key(layer_id: str) -> tuple:
    """Sort key in forward-execution order: text encoders (te1, te2) first, then the UNet (input blocks by number,
    middle, output blocks; attn1, attn2, ff; to_q, to_k, to_v, to_out.0; resnet in/emb/out/skip), then Flux, then
    other. Numbers sort numerically; unknown names after known ones, alphabetically."""
    component, path = layer_id_parts(layer_id)
    table = _ORDER_TABLES.get(component, {})
    unknown = len(table)
    toks = tuple((0, int(t), "") if _is_int(t) else (1, table.get(t, unknown), t) for t in path.split("."))
    return (_COMPONENT_RANK.get(component, len(_COMPONENT_RANK)), toks)


_ATTENTION = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def is_attention(layer_id: str) -> bool:
    """True for UNet attn1/attn2 to_q/to_k/to_v/to_out.0 (the reference implementation's scope)."""
    component, path = layer_id_parts(layer_id)
    return component == "unet" and bool(_ATTENTION.search(path))


def layer_group(layer_id: str) -> str:
    """Short label for map ticks: IN4, MID, OUT3, EMB, END, TE1, TE2, FLUX-D3, FLUX-S12, FLUX, OTHER."""
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
    if component in ("te1", "te2"):
        return component.upper()
    if component == "flux":
        if len(t) > 1 and t[0] in ("double_blocks", "transformer_blocks"):
            return f"FLUX-D{t[1]}"
        if len(t) > 1 and t[0] in ("single_blocks", "single_transformer_blocks"):
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
    if component in ("te1", "te2"):
        return 0
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
    """Forge state-dict key of the target weight: ``diffusion_model.<path>.weight`` for UNet ids and for Flux ids in
    BFL naming (Forge's Flux modules use BFL names). None for text encoders, diffusers-named Flux ids (their
    targets are slices of fused weights) and other ids."""
    component, path = layer_id_parts(layer_id)
    if component == "unet" or (component == "flux" and path.split(".", 1)[0] in _BFL_FLUX_ROOTS):
        return f"diffusion_model.{path}.weight"
    return None


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
    if component == "flux" and path.split(".", 1)[0] in _DIFFUSERS_FLUX_ROOTS:
        return f"transformer.{path}"
    return None


def kohya_name(layer_id: str, arch: str | None = "sd15") -> str | None:
    """The kohya (sd-scripts) module key of a layer id.

    SD1.x UNet keys use diffusers block names, SDXL UNet keys compvis names; SD1.x text encoder ``lora_te_``,
    SDXL ``lora_te1_``/``lora_te2_``; Flux BFL paths ``lora_unet_``, diffusers Flux paths ``lora_transformer_``.
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
        root = path.split(".", 1)[0]
        prefix = "lora_unet_" if root in _BFL_FLUX_ROOTS else "lora_transformer_"
        return prefix + path.replace(".", "_")
    return None
