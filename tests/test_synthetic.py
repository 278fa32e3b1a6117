"""Synthetic LoRA generators: layer inventories match the real UNets, output is deterministic and style-independent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from klora_ext import keys
from klora_ext.synthetic import layer_shapes, make_lora_state_dict, module_key, save_lora


def _blocks(shapes: list[tuple[str, tuple[int, ...]]]) -> set[str]:
    return {m.group(0) for i, _ in shapes if (m := re.match(r"unet:.*transformer_blocks\.\d+", i))}


@pytest.mark.parametrize(
    ("arch", "scope", "count"),
    [
        ("sd15", "attention", 128),
        ("sd15", "transformer", 192),  # kohya's default SD1.5 LoRA targets (Forge logs 192)
        ("sdxl", "attention", 560),
        ("sdxl", "transformer", 722),  # kohya's default SDXL LoRA targets (Forge logs 722)
        ("tiny", "attention", 24),
    ],
)
def test_layer_counts(arch: str, scope: str, count: int) -> None:
    shapes = layer_shapes(arch, scope)
    assert len(shapes) == count
    assert len({i for i, _ in shapes}) == count


def test_transformer_block_counts() -> None:
    assert len(_blocks(layer_shapes("sd15", "attention"))) == 16
    sdxl = _blocks(layer_shapes("sdxl", "attention"))
    assert len(sdxl) == 70
    per_prefix: dict[str, int] = {}
    for block in sdxl:
        prefix = block.split(".transformer_blocks")[0]
        per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
    assert per_prefix == {
        "unet:input_blocks.4.1": 2,
        "unet:input_blocks.5.1": 2,
        "unet:input_blocks.7.1": 10,
        "unet:input_blocks.8.1": 10,
        "unet:middle_block.1": 10,
        "unet:output_blocks.0.1": 10,
        "unet:output_blocks.1.1": 10,
        "unet:output_blocks.2.1": 10,
        "unet:output_blocks.3.1": 2,
        "unet:output_blocks.4.1": 2,
        "unet:output_blocks.5.1": 2,
    }


def test_sd15_shapes() -> None:
    s = dict(layer_shapes("sd15", "all", include_te=True))
    tb = "unet:input_blocks.1.1.transformer_blocks.0"
    assert s[f"{tb}.attn1.to_q"] == (320, 320)
    assert s[f"{tb}.attn1.to_k"] == (320, 320)
    assert s[f"{tb}.attn2.to_k"] == (320, 768)
    assert s[f"{tb}.attn2.to_v"] == (320, 768)
    assert s[f"{tb}.attn2.to_out.0"] == (320, 320)
    assert s[f"{tb}.ff.net.0.proj"] == (2560, 320)
    assert s[f"{tb}.ff.net.2"] == (320, 1280)
    assert s["unet:input_blocks.1.1.proj_in"] == (320, 320, 1, 1)
    assert s["unet:middle_block.1.transformer_blocks.0.attn2.to_k"] == (1280, 768)
    assert s["unet:input_blocks.4.0.in_layers.2"] == (640, 320, 3, 3)
    assert s["unet:input_blocks.4.0.skip_connection"] == (640, 320, 1, 1)
    assert s["unet:input_blocks.4.0.emb_layers.1"] == (640, 1280)
    assert s["unet:input_blocks.3.0.op"] == (320, 320, 3, 3)
    assert s["unet:output_blocks.5.0.skip_connection"] == (1280, 1920, 1, 1)
    assert s["unet:output_blocks.8.0.in_layers.2"] == (640, 960, 3, 3)
    assert s["unet:output_blocks.11.0.skip_connection"] == (320, 640, 1, 1)
    assert s["unet:output_blocks.2.1.conv"] == (1280, 1280, 3, 3)
    assert s["unet:output_blocks.8.2.conv"] == (640, 640, 3, 3)
    assert "unet:output_blocks.11.2.conv" not in s
    assert "unet:input_blocks.10.1.proj_in" not in s  # the lowest level has no attention
    assert s["te1:text_model.encoder.layers.11.mlp.fc1"] == (3072, 768)


def test_sdxl_shapes() -> None:
    s = dict(layer_shapes("sdxl", "all", include_te=True))
    assert s["unet:input_blocks.4.1.transformer_blocks.1.attn2.to_k"] == (640, 2048)
    assert s["unet:input_blocks.7.1.transformer_blocks.9.attn1.to_v"] == (1280, 1280)
    assert s["unet:input_blocks.4.1.proj_in"] == (640, 640)
    assert s["unet:output_blocks.2.0.skip_connection"] == (1280, 1920, 1, 1)
    assert s["unet:output_blocks.2.2.conv"] == (1280, 1280, 3, 3)
    assert s["unet:output_blocks.5.2.conv"] == (640, 640, 3, 3)
    assert s["unet:output_blocks.6.0.in_layers.2"] == (320, 960, 3, 3)
    assert "unet:output_blocks.8.2.conv" not in s
    assert "unet:input_blocks.1.1.proj_in" not in s
    assert s["te2:text_model.encoder.layers.31.mlp.fc2"] == (1280, 5120)


def test_order_and_tiny_ids_are_real() -> None:
    shapes = layer_shapes("tiny", "all", include_te=True)
    ids = [i for i, _ in shapes]
    assert ids == sorted(ids, key=keys.forward_order_key)
    sd15_all = {i for i, _ in layer_shapes("sd15", "all", include_te=True)}
    assert set(ids) <= sd15_all


def test_deterministic_and_layer_independent() -> None:
    shapes = layer_shapes("tiny", "attention")
    a = make_lora_state_dict(shapes, 4, seed=3)
    b = make_lora_state_dict(shapes, 4, seed=3)
    c = make_lora_state_dict(shapes, 4, seed=4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    alone = make_lora_state_dict(shapes[5:6], 4, seed=3)
    assert all(torch.equal(v, a[k]) for k, v in alone.items())


def test_key_names_per_style() -> None:
    sd15 = [("unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q", (8, 8))]
    assert set(make_lora_state_dict(sd15, 2, alpha=1.0)) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
    }
    assert set(make_lora_state_dict(sd15, 2, style="diffusers")) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight",
    }
    assert set(make_lora_state_dict(sd15, 2, style="peft")) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
    }
    sdxl = [("unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q", (8, 8))]
    assert set(make_lora_state_dict(sdxl, 2, arch="sdxl")) == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
    }
    assert module_key("te1:text_model.encoder.layers.0.mlp.fc1", "kohya", "sdxl") == (
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    )
    assert set(make_lora_state_dict(sd15, 2, kind="loha")) == {
        f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w{i}_{ab}"
        for i in (1, 2)
        for ab in "ab"
    }


def test_factor_shapes_dtype_and_rank_clamp() -> None:
    shapes = [("unet:input_blocks.1.0.in_layers.2", (8, 4, 3, 3)), ("unet:input_blocks.1.1.proj_in", (8, 8, 1, 1))]
    sd = make_lora_state_dict(shapes, 16, dtype=torch.bfloat16)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape == (8, 4, 3, 3)  # rank clamped to out_features 8
    assert sd[f"{conv}.lora_up.weight"].shape == (8, 8, 1, 1)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    per_layer = make_lora_state_dict(shapes, {shapes[0][0]: 2, shapes[1][0]: 3})
    assert per_layer[f"{conv}.lora_down.weight"].shape[0] == 2
    assert per_layer["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 3


def test_lokr_factors() -> None:
    sd = make_lora_state_dict(
        [("unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q", (320, 320))], 4, kind="lokr", alpha=4.0
    )
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{prefix}.lokr_w1"].shape == (16, 16)
    assert sd[f"{prefix}.lokr_w2_a"].shape == (20, 4)
    assert sd[f"{prefix}.lokr_w2_b"].shape == (4, 20)


def test_scale_multiplies_magnitude() -> None:
    shapes = layer_shapes("tiny", "attention")[:1]
    a = make_lora_state_dict(shapes, 2)
    b = make_lora_state_dict(shapes, 2, scale=3.0)
    up = next(k for k in a if k.endswith("lora_up.weight"))
    torch.testing.assert_close(b[up], a[up] * 3.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scope"):
        layer_shapes("sd15", "everything")
    with pytest.raises(ValueError, match="arch"):
        layer_shapes("sd3")
    with pytest.raises(ValueError, match="style"):
        make_lora_state_dict([], 2, style="comfy")
    with pytest.raises(ValueError, match="kind"):
        make_lora_state_dict([], 2, kind="oft")
    with pytest.raises(ValueError, match="no diffusers-style key"):
        make_lora_state_dict([("flux:double_blocks.0.img_attn.qkv", (4, 4))], 2, style="diffusers", arch="flux")


def test_save_lora(tmp_path: Path) -> None:
    sd = make_lora_state_dict(layer_shapes("tiny", "attention")[:2], 2, dtype=torch.float16)
    path = save_lora(tmp_path / "x.safetensors", sd, {"ss_network_dim": 2})
    with safe_open(path, framework="pt") as fh:
        assert fh.metadata() == {"ss_network_dim": "2"}
        assert set(fh.keys()) == set(sd)
        for k in sd:
            assert torch.equal(fh.get_tensor(k), sd[k])


def test_flux_shapes_and_key_names() -> None:
    from klora_ext.synthetic import FLUX_STYLES, flux_layer_shapes, make_flux_state_dict

    shapes = flux_layer_shapes(double=1, single=1, hidden=8)
    ids = [i for i, _ in shapes]
    assert ids == sorted(ids, key=keys.forward_order_key)
    assert dict(shapes)["flux:single_blocks.0.linear1[mlp]"] == (32, 8)
    assert dict(shapes)["flux:single_blocks.0.linear2"] == (8, 40)
    names = {style: set(make_flux_state_dict(shapes, 2, style=style, alpha=1.0)) for style in FLUX_STYLES}
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in names["kohya"]
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in names["kohya"]
    assert "diffusion_model.double_blocks.0.txt_attn.qkv.lora_A.weight" in names["bfl"]
    assert "single_blocks.0.linear2.lora_B.weight" in names["bfl-bare"]
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in names["diffusers"]
    assert "transformer.single_transformer_blocks.0.proj_mlp.alpha" in names["diffusers"]
    assert "transformer.norm_out.linear.lora_B.weight" in names["diffusers"]
    assert "lora_transformer_single_transformer_blocks_0_attn_to_v.lora_down.weight" in names["onetrainer"]
    assert "lycoris_transformer_blocks_0_ff_context_net_2.lora_up.weight" in names["lycoris"]
    assert "base_model.model.x_embedder.lora_A.weight" in names["peft"]
    assert not any("qkv" in k or "linear1" in k for k in names["diffusers"])  # split styles never fuse


def test_flux_fused_layouts() -> None:
    from klora_ext.synthetic import flux_layer_shapes, make_flux_state_dict

    shapes = flux_layer_shapes(double=1, single=1, hidden=8, globals_=False)
    mod = "lora_unet_single_blocks_0_linear1"
    sparse = make_flux_state_dict(shapes, 2, style="kohya", fused="sparse", alpha=1.5)
    split = make_flux_state_dict(shapes, 2, style="diffusers", alpha=1.5)
    assert sparse[f"{mod}.lora_down.weight"].shape == (8, 8)  # 4 slices x rank 2
    up = sparse[f"{mod}.lora_up.weight"]
    assert up.shape == (56, 8) and float(sparse[f"{mod}.alpha"]) == 6.0
    assert torch.count_nonzero(up[:8, 2:]) == 0 and torch.count_nonzero(up[24:, :6]) == 0  # block-diagonal
    q = "transformer.single_transformer_blocks.0.attn.to_q"
    assert torch.equal(up[:8, :2], split[f"{q}.lora_B.weight"])
    dense = make_flux_state_dict(shapes, 2, style="kohya", fused="dense", alpha=1.5)
    dense_split = make_flux_state_dict(shapes, 2, style="diffusers", fused="dense", alpha=1.5)
    assert dense[f"{mod}.lora_down.weight"].shape == (2, 8) and float(dense[f"{mod}.alpha"]) == 1.5
    for p in ("attn.to_k", "proj_mlp"):
        name = f"transformer.single_transformer_blocks.0.{p}.lora_A.weight"
        assert torch.equal(dense_split[name], dense[f"{mod}.lora_down.weight"])  # one shared down
    with pytest.raises(ValueError, match="style must be one of"):
        make_flux_state_dict(shapes, 2, style="comfy")
