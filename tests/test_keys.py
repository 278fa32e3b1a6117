"""Key styles -> normalized layer ids. Expected values are written out by hand from the mapping rules
(A1111 convert_diffusers_name_to_compvis, the diffusers <-> LDM UNet layout), not produced by the code under test."""

from __future__ import annotations

import random

import pytest

from klora_ext import keys
from klora_ext.synthetic import layer_shapes

SD15_KOHYA = [
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    ),
    (
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
        "unet:input_blocks.2.1.transformer_blocks.0.attn2.to_out.0",
    ),
    ("lora_unet_down_blocks_1_attentions_0_proj_in", "unet:input_blocks.4.1.proj_in"),
    (
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "unet:input_blocks.8.1.transformer_blocks.0.ff.net.0.proj",
    ),
    (
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2",
        "unet:input_blocks.8.1.transformer_blocks.0.ff.net.2",
    ),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet:input_blocks.1.0.in_layers.2"),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "unet:input_blocks.4.0.skip_connection"),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "unet:input_blocks.11.0.out_layers.3"),
    ("lora_unet_down_blocks_3_resnets_0_time_emb_proj", "unet:input_blocks.10.0.emb_layers.1"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "unet:input_blocks.3.0.op"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "unet:input_blocks.9.0.op"),
    (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
        "unet:middle_block.1.transformer_blocks.0.attn2.to_k",
    ),
    ("lora_unet_mid_block_resnets_0_conv1", "unet:middle_block.0.in_layers.2"),
    ("lora_unet_mid_block_resnets_1_conv2", "unet:middle_block.2.out_layers.3"),
    ("lora_unet_up_blocks_0_resnets_2_conv1", "unet:output_blocks.2.0.in_layers.2"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet:output_blocks.2.1.conv"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "unet:output_blocks.5.2.conv"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", "unet:output_blocks.8.2.conv"),
    (
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v",
        "unet:output_blocks.3.1.transformer_blocks.0.attn1.to_v",
    ),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "unet:output_blocks.11.1.proj_out"),
    ("lora_unet_up_blocks_3_resnets_2_conv_shortcut", "unet:output_blocks.11.0.skip_connection"),
    ("lora_unet_up_blocks_3_resnets_0_norm1", "unet:output_blocks.9.0.in_layers.0"),
    ("lora_unet_conv_in", "unet:input_blocks.0.0"),
    ("lora_unet_conv_out", "unet:out.2"),
    ("lora_unet_time_embedding_linear_1", "unet:time_embed.0"),
    ("lora_unet_time_embedding_linear_2", "unet:time_embed.2"),
]

SDXL_KOHYA = [
    (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ),
    (
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        "unet:input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
    ),
    (
        "lora_unet_middle_block_1_transformer_blocks_3_ff_net_0_proj",
        "unet:middle_block.1.transformer_blocks.3.ff.net.0.proj",
    ),
    ("lora_unet_output_blocks_2_2_conv", "unet:output_blocks.2.2.conv"),
    ("lora_unet_output_blocks_0_0_in_layers_2", "unet:output_blocks.0.0.in_layers.2"),
    ("lora_unet_output_blocks_0_0_emb_layers_1", "unet:output_blocks.0.0.emb_layers.1"),
    ("lora_unet_output_blocks_0_0_skip_connection", "unet:output_blocks.0.0.skip_connection"),
    ("lora_unet_input_blocks_3_0_op", "unet:input_blocks.3.0.op"),
    ("lora_unet_label_emb_0_0", "unet:label_emb.0.0"),
    ("lora_unet_output_blocks_5_1_proj_out", "unet:output_blocks.5.1.proj_out"),
]

SDXL_DIFFUSERS = [
    ("unet.up_blocks.0.upsamplers.0.conv", "unet:output_blocks.2.2.conv"),
    ("unet.up_blocks.1.upsamplers.0.conv", "unet:output_blocks.5.2.conv"),
    ("unet.up_blocks.2.resnets.2.conv1", "unet:output_blocks.8.0.in_layers.2"),
    (
        "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
        "unet:input_blocks.5.1.transformer_blocks.1.attn2.to_k",
    ),
    ("unet.down_blocks.1.downsamplers.0.conv", "unet:input_blocks.6.0.op"),
    ("unet.add_embedding.linear_2", "unet:label_emb.0.2"),
    (
        "unet.mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0",
        "unet:middle_block.1.transformer_blocks.9.attn1.to_out.0",
    ),
]

TE = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "te1:text_model.encoder.layers.0.self_attn.q_proj"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", "te1:text_model.encoder.layers.11.mlp.fc1"),
    ("lora_te1_text_model_encoder_layers_5_self_attn_out_proj", "te1:text_model.encoder.layers.5.self_attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2", "te2:text_model.encoder.layers.31.mlp.fc2"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "te1:text_model.encoder.layers.0.self_attn.k_proj"),
    (
        "text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj",
        "te2:text_model.encoder.layers.3.self_attn.v_proj",
    ),
]

DIFFUSERS_PREFIXES = [
    (
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ),
    (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ),
    (
        "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ),
    (
        "unet.up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2",
        "unet:output_blocks.9.1.transformer_blocks.0.ff.net.2",
    ),
    ("model.diffusion_model.input_blocks.1.1.proj_in", "unet:input_blocks.1.1.proj_in"),
    ("diffusion_model.out.2", "unet:out.2"),
]

# Canonical Flux ids are BFL paths (Forge's model) with fused weights split into [q]/[k]/[v]/[mlp] slices; the
# diffusers -> BFL table is Forge's own (comfyui_lora_collection/utils.py flux_to_diffusers).
FLUX = [
    ("lora_unet_double_blocks_0_img_attn_qkv", "flux:double_blocks.0.img_attn.qkv"),
    ("lora_unet_double_blocks_18_txt_mlp_2", "flux:double_blocks.18.txt_mlp.2"),
    ("lora_unet_double_blocks_3_img_mod_lin", "flux:double_blocks.3.img_mod.lin"),
    ("lora_unet_single_blocks_37_linear1", "flux:single_blocks.37.linear1"),
    ("lora_unet_single_blocks_0_modulation_lin", "flux:single_blocks.0.modulation.lin"),
    ("lora_unet_final_layer_adaLN_modulation_1", "flux:final_layer.adaLN_modulation.1"),
    ("lora_unet_time_in_in_layer", "flux:time_in.in_layer"),
    ("diffusion_model.double_blocks.2.img_attn.proj", "flux:double_blocks.2.img_attn.proj"),
    ("model.diffusion_model.single_blocks.4.linear2", "flux:single_blocks.4.linear2"),
    ("double_blocks.1.txt_attn.qkv", "flux:double_blocks.1.txt_attn.qkv"),
    ("transformer.double_blocks.1.img_mlp.0", "flux:double_blocks.1.img_mlp.0"),
    ("transformer.transformer_blocks.0.attn.to_q", "flux:double_blocks.0.img_attn.qkv[q]"),
    ("transformer.transformer_blocks.0.attn.to_k", "flux:double_blocks.0.img_attn.qkv[k]"),
    ("transformer.transformer_blocks.0.attn.to_v", "flux:double_blocks.0.img_attn.qkv[v]"),
    ("transformer.transformer_blocks.0.attn.add_v_proj", "flux:double_blocks.0.txt_attn.qkv[v]"),
    ("transformer.transformer_blocks.2.attn.to_out.0", "flux:double_blocks.2.img_attn.proj"),
    ("transformer.transformer_blocks.5.attn.to_add_out", "flux:double_blocks.5.txt_attn.proj"),
    ("transformer.transformer_blocks.1.norm1.linear", "flux:double_blocks.1.img_mod.lin"),
    ("transformer.transformer_blocks.1.norm1_context.linear", "flux:double_blocks.1.txt_mod.lin"),
    ("transformer.transformer_blocks.0.ff.net.0.proj", "flux:double_blocks.0.img_mlp.0"),
    ("transformer.transformer_blocks.0.ff.net.2", "flux:double_blocks.0.img_mlp.2"),
    ("transformer.transformer_blocks.0.ff_context.net.0.proj", "flux:double_blocks.0.txt_mlp.0"),
    ("transformer.transformer_blocks.0.ff_context.net.2", "flux:double_blocks.0.txt_mlp.2"),
    ("transformer.single_transformer_blocks.3.attn.to_q", "flux:single_blocks.3.linear1[q]"),
    ("transformer.single_transformer_blocks.3.proj_mlp", "flux:single_blocks.3.linear1[mlp]"),
    ("transformer.single_transformer_blocks.3.proj_out", "flux:single_blocks.3.linear2"),
    ("transformer.single_transformer_blocks.3.norm.linear", "flux:single_blocks.3.modulation.lin"),
    ("transformer.x_embedder", "flux:img_in"),
    ("transformer.context_embedder", "flux:txt_in"),
    ("transformer.time_text_embed.timestep_embedder.linear_2", "flux:time_in.out_layer"),
    ("transformer.time_text_embed.text_embedder.linear_1", "flux:vector_in.in_layer"),
    ("transformer.time_text_embed.guidance_embedder.linear_1", "flux:guidance_in.in_layer"),
    ("transformer.proj_out", "flux:final_layer.linear"),
    ("transformer.norm_out.linear", "flux:final_layer.adaLN_modulation.1"),
    ("base_model.model.transformer_blocks.0.attn.to_k", "flux:double_blocks.0.img_attn.qkv[k]"),
    ("transformer_blocks.0.attn.add_q_proj", "flux:double_blocks.0.txt_attn.qkv[q]"),
    ("lora_transformer_transformer_blocks_0_attn_add_q_proj", "flux:double_blocks.0.txt_attn.qkv[q]"),
    ("lora_transformer_single_transformer_blocks_7_norm_linear", "flux:single_blocks.7.modulation.lin"),
    ("lora_transformer_single_transformer_blocks_7_proj_mlp", "flux:single_blocks.7.linear1[mlp]"),
    ("lycoris_transformer_blocks_0_attn_to_v", "flux:double_blocks.0.img_attn.qkv[v]"),
    ("lycoris_single_transformer_blocks_2_attn_to_k", "flux:single_blocks.2.linear1[k]"),
]

T5 = [
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "t5:encoder.block.0.layer.0.SelfAttention.q"),
    ("lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1", "t5:encoder.block.23.layer.1.DenseReluDense.wi_1"),
    ("lora_te2_encoder_block_3_layer_0_SelfAttention_o", "t5:encoder.block.3.layer.0.SelfAttention.o"),  # OneTrainer
    ("lora_te1_encoder_block_3_layer_1_DenseReluDense_wo", "t5:encoder.block.3.layer.1.DenseReluDense.wo"),
    (
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k",
        "t5:encoder.block.0.layer.0.SelfAttention.k",
    ),
    (
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
        "te1:text_model.encoder.layers.0.mlp.fc1",
    ),
]

# The authors' diffusers-0.24 SDXL trainer (HVision-NKU/K-LoRA utils.py reads "unet.unet.<path>.to_q.lora.down").
AUTHORS = [
    (
        "unet.unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ),
    (
        "unet.unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0",
        "unet:output_blocks.2.1.transformer_blocks.9.attn2.to_out.0",
    ),
    (
        "unet.unet.mid_block.attentions.0.transformer_blocks.3.attn1.to_k",
        "unet:middle_block.1.transformer_blocks.3.attn1.to_k",
    ),
]


@pytest.mark.parametrize(("key", "expected"), SD15_KOHYA)
def test_sd15_kohya(key: str, expected: str) -> None:
    assert keys.normalize_key(key, "sd15") == expected
    if "upsamplers" not in key:  # the only arch-dependent rule
        assert keys.normalize_key(key, None) == expected


@pytest.mark.parametrize(("key", "expected"), SDXL_KOHYA)
def test_sdxl_kohya(key: str, expected: str) -> None:
    assert keys.normalize_key(key, "sdxl") == expected


@pytest.mark.parametrize(("key", "expected"), SDXL_DIFFUSERS)
def test_sdxl_diffusers(key: str, expected: str) -> None:
    assert keys.normalize_key(key, "sdxl") == expected


def test_upsampler_depends_on_arch() -> None:
    assert keys.normalize_key("unet.up_blocks.0.upsamplers.0.conv", "sd15") == "unet:output_blocks.2.1.conv"
    assert keys.normalize_key("unet.up_blocks.0.upsamplers.0.conv", "sdxl") == "unet:output_blocks.2.2.conv"
    assert keys.normalize_key("unet.up_blocks.0.upsamplers.0.conv", None) == "unet:output_blocks.2.1.conv"


@pytest.mark.parametrize(("key", "expected"), TE + DIFFUSERS_PREFIXES)
def test_te_and_diffusers_prefixes(key: str, expected: str) -> None:
    assert keys.normalize_key(key, None) == expected


@pytest.mark.parametrize(("key", "expected"), FLUX)
def test_flux(key: str, expected: str) -> None:
    assert keys.normalize_key(key, "flux") == expected
    assert keys.normalize_key(key, None) == expected


def test_flux_norm_out_is_marked_swapped() -> None:
    # diffusers' norm_out.linear stores (scale, shift); BFL's adaLN_modulation.1 (shift, scale): Forge swaps the halves
    assert keys.resolve_key("transformer.norm_out.linear").swap_halves
    assert not keys.resolve_key("lora_unet_final_layer_adaLN_modulation_1").swap_halves
    assert not keys.resolve_key("transformer.proj_out").swap_halves


@pytest.mark.parametrize(("key", "expected"), T5)
def test_t5_is_its_own_text_encoder(key: str, expected: str) -> None:
    assert keys.normalize_key(key, "flux") == expected
    assert keys.is_text_encoder(expected)


@pytest.mark.parametrize(("key", "expected"), AUTHORS)
def test_authors_key_style(key: str, expected: str) -> None:
    assert keys.normalize_key(key, "sdxl") == expected
    assert keys.resolve_key(key, "sdxl").style == "authors"
    assert keys.split_key(key + ".lora.down.weight") == (key, "down")


def test_unrecognised() -> None:
    assert keys.normalize_key("foo.bar", None) is None
    assert keys.normalize_key("emb_params", None) is None
    assert keys.normalize_key("lora_unet_something_odd", None) == "other:lora_unet_something_odd"
    assert keys.normalize_key("lora_te3_encoder_block_0", None) == "t5:encoder.block.0"
    assert keys.normalize_key("unet.down_blocks.x.attentions", None) == "other:unet.down_blocks.x.attentions"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_a_b.lora_down.weight", ("lora_unet_a_b", "down")),
        ("lora_unet_a_b.lora_up.weight", ("lora_unet_a_b", "up")),
        ("lora_unet_a_b.lora_mid.weight", ("lora_unet_a_b", "mid")),
        ("lora_unet_a_b.alpha", ("lora_unet_a_b", "alpha")),
        ("lora_unet_a_b.hada_w1_a", ("lora_unet_a_b", "hada_w1_a")),
        ("lora_unet_a_b.lokr_w2_b", ("lora_unet_a_b", "lokr_w2_b")),
        ("lora_unet_a_b.lokr_t2", ("lora_unet_a_b", "lokr_t2")),
        ("lora_unet_a_b.diff", ("lora_unet_a_b", "diff")),
        ("lora_unet_a_b.diff_b", ("lora_unet_a_b", "diff_b")),
        ("lora_unet_a_b.dora_scale", ("lora_unet_a_b", "dora_scale")),
        ("lora_te1_text_model_x.lora_A.weight", ("lora_te1_text_model_x", "down")),
        ("unet.a.b.to_q.lora_A.weight", ("unet.a.b.to_q", "down")),
        ("unet.a.b.to_q.lora_B.weight", ("unet.a.b.to_q", "up")),
        ("unet.a.b.to_q.lora_A.default.weight", ("unet.a.b.to_q", "down")),
        ("unet.a.b.to_q.lora.down.weight", ("unet.a.b.to_q", "down")),
        ("unet.a.b.to_q.lora.up.weight", ("unet.a.b.to_q", "up")),
        ("text_encoder.t.q_proj.lora_linear_layer.down.weight", ("text_encoder.t.q_proj", "down")),
        ("text_encoder.t.q_proj.lora_linear_layer.up.weight", ("text_encoder.t.q_proj", "up")),
        ("unet.a.b.to_q.alpha", ("unet.a.b.to_q", "alpha")),
        ("unet.a.attn1.processor.to_out_lora.down.weight", ("unet.a.attn1.to_out.0", "down")),
        ("unet.a.attn2.processor.to_k_lora.up.weight", ("unet.a.attn2.to_k", "up")),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",
            ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "down"),
        ),
        ("unet.a.b.lora_magnitude_vector", ("unet.a.b", "magnitude")),  # PEFT DoRA: read since issue 7
        ("lora_unet_a_b.weight", ("lora_unet_a_b", "ia3_w")),  # (IA)3 vector, kohya-style names only
        ("lora_unet_a_b.a1.weight", ("lora_unet_a_b", "glora_a1")),
        ("lora_unet_a_b.oft_blocks", ("lora_unet_a_b", "oft_blocks")),
        ("unet.a.b.weight", None),
        ("lora_unet_a_b.weird_part", None),
        ("no_dot_at_all", None),
    ],
)
def test_split_key(key: str, expected: tuple[str, str] | None) -> None:
    assert keys.split_key(key) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        ),
        ("input_blocks_1_0_in_layers_2", "input_blocks.1.0.in_layers.2"),
        ("mid_block_resnets_0_time_emb_proj", "mid_block.resnets.0.time_emb_proj"),
        ("text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_model_encoder_layers_0_layer_norm1", "text_model.encoder.layers.0.layer_norm1"),
        ("double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj"),
    ],
)
def test_unflatten(name: str, expected: str) -> None:
    assert keys.unflatten(name) == expected


# ---- inverse mapping and round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer_id", "arch", "kohya", "diffusers"),
    [
        (
            "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            "sd15",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "unet:input_blocks.4.1.transformer_blocks.1.attn2.to_out.0",
            "sdxl",
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0",
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
        ),
        (
            "unet:output_blocks.2.1.conv",
            "sd15",
            "lora_unet_up_blocks_0_upsamplers_0_conv",
            "unet.up_blocks.0.upsamplers.0.conv",
        ),
        (
            "unet:output_blocks.2.2.conv",
            "sdxl",
            "lora_unet_output_blocks_2_2_conv",
            "unet.up_blocks.0.upsamplers.0.conv",
        ),
        (
            "unet:middle_block.2.out_layers.3",
            "sd15",
            "lora_unet_mid_block_resnets_1_conv2",
            "unet.mid_block.resnets.1.conv2",
        ),
        (
            "unet:input_blocks.9.0.op",
            "sd15",
            "lora_unet_down_blocks_2_downsamplers_0_conv",
            "unet.down_blocks.2.downsamplers.0.conv",
        ),
        (
            "te1:text_model.encoder.layers.0.mlp.fc1",
            "sd15",
            "lora_te_text_model_encoder_layers_0_mlp_fc1",
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        ),
        (
            "te1:text_model.encoder.layers.0.mlp.fc1",
            "sdxl",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1",
            "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        ),
        (
            "te2:text_model.encoder.layers.2.self_attn.q_proj",
            "sdxl",
            "lora_te2_text_model_encoder_layers_2_self_attn_q_proj",
            "text_encoder_2.text_model.encoder.layers.2.self_attn.q_proj",
        ),
    ],
)
def test_inverse_names(layer_id: str, arch: str, kohya: str, diffusers: str) -> None:
    assert keys.kohya_name(layer_id, arch) == kohya
    assert keys.diffusers_name(layer_id, arch) == diffusers


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_round_trip_every_synthetic_layer(arch: str) -> None:
    ids = [i for i, _ in layer_shapes(arch, "all", include_te=True)]
    extra = [
        "unet:input_blocks.0.0",
        "unet:out.2",
        "unet:time_embed.0",
        "unet:time_embed.2",
        "unet:input_blocks.1.0.in_layers.0",
        "unet:output_blocks.3.0.out_layers.0",
    ]
    if arch == "sdxl":
        extra += ["unet:label_emb.0.0", "unet:label_emb.0.2"]
    for layer_id in ids + extra:
        kohya = keys.kohya_name(layer_id, arch)
        diff = keys.diffusers_name(layer_id, arch)
        assert kohya is not None
        assert diff is not None
        assert keys.normalize_key(kohya, arch) == layer_id, kohya
        assert keys.normalize_key(diff, arch) == layer_id, diff
        component, path = keys.layer_id_parts(layer_id)
        if component == "unet":
            assert keys.diffusers_to_compvis(keys.compvis_to_diffusers(path, arch), arch) == path


def test_flux_round_trip() -> None:
    for layer_id in ("flux:double_blocks.0.img_attn.qkv", "flux:single_blocks.12.linear2", "flux:img_in"):
        assert keys.normalize_key(keys.kohya_name(layer_id, "flux"), "flux") == layer_id
    for layer_id, diffusers in (
        ("flux:double_blocks.3.img_attn.qkv[q]", "transformer.transformer_blocks.3.attn.to_q"),
        ("flux:double_blocks.3.txt_attn.qkv[k]", "transformer.transformer_blocks.3.attn.add_k_proj"),
        ("flux:single_blocks.1.linear1[mlp]", "transformer.single_transformer_blocks.1.proj_mlp"),
        ("flux:single_blocks.1.linear2", "transformer.single_transformer_blocks.1.proj_out"),
        ("flux:final_layer.linear", "transformer.proj_out"),
    ):
        assert keys.diffusers_name(layer_id, "flux") == diffusers
        assert keys.normalize_key(diffusers, None) == layer_id
    assert keys.kohya_name("flux:double_blocks.3.img_attn.qkv[q]", "flux") is None  # kohya stores the fused weight
    assert keys.diffusers_name("flux:double_blocks.3.img_attn.qkv", "flux") is None  # diffusers never fuses


def test_flux_slices_and_forge_offsets() -> None:
    assert keys.fused_parts("double_blocks.0.img_attn.qkv") == ("q", "k", "v")
    assert keys.fused_parts("single_blocks.0.linear1") == ("q", "k", "v", "mlp")
    assert keys.fused_parts("single_blocks.0.linear2") is None
    assert keys.split_slice("flux:single_blocks.0.linear1[mlp]") == ("flux:single_blocks.0.linear1", "mlp")
    assert keys.split_slice("flux:single_blocks.0.linear2") == ("flux:single_blocks.0.linear2", None)
    # Forge's flux_to_diffusers offsets at Flux-dev widths (h = 3072, linear1 = 3h + 4h rows).
    qkv, lin1 = (9216, 3072), (21504, 3072)
    assert keys.forge_target("flux:double_blocks.0.img_attn.qkv[q]", qkv) == (
        "diffusion_model.double_blocks.0.img_attn.qkv.weight",
        (0, 0, 3072),
    )
    assert keys.forge_target("flux:double_blocks.0.txt_attn.qkv[v]", qkv)[1] == (0, 6144, 3072)
    assert keys.forge_target("flux:single_blocks.5.linear1[k]", lin1)[1] == (0, 3072, 3072)
    assert keys.forge_target("flux:single_blocks.5.linear1[mlp]", lin1)[1] == (0, 9216, 12288)
    assert keys.forge_target("flux:single_blocks.5.linear2") == (
        "diffusion_model.single_blocks.5.linear2.weight",
        None,
    )
    assert keys.forge_target("te1:text_model.encoder.layers.0.mlp.fc1") is None
    with pytest.raises(ValueError, match="needs the fused weight"):
        keys.forge_target("flux:single_blocks.5.linear1[q]")


def test_flux_forward_order_follows_forge_blocks() -> None:
    # backend/nn/flux.py: img_in, time_in, guidance_in, vector_in, txt_in, double blocks, single blocks, final_layer;
    # DoubleStreamBlock.forward: img_mod, img qkv, txt_mod, txt qkv, img proj, img_mlp, txt proj, txt_mlp.
    expected = [
        "flux:img_in",
        "flux:time_in.in_layer",
        "flux:time_in.out_layer",
        "flux:guidance_in.in_layer",
        "flux:vector_in.in_layer",
        "flux:txt_in",
        "flux:double_blocks.0.img_mod.lin",
        "flux:double_blocks.0.img_attn.qkv[q]",
        "flux:double_blocks.0.img_attn.qkv[k]",
        "flux:double_blocks.0.img_attn.qkv[v]",
        "flux:double_blocks.0.txt_mod.lin",
        "flux:double_blocks.0.txt_attn.qkv[q]",
        "flux:double_blocks.0.txt_attn.qkv[k]",
        "flux:double_blocks.0.txt_attn.qkv[v]",
        "flux:double_blocks.0.img_attn.proj",
        "flux:double_blocks.0.img_mlp.0",
        "flux:double_blocks.0.img_mlp.2",
        "flux:double_blocks.0.txt_attn.proj",
        "flux:double_blocks.0.txt_mlp.0",
        "flux:double_blocks.0.txt_mlp.2",
        "flux:double_blocks.2.img_mod.lin",
        "flux:double_blocks.10.img_mod.lin",
        "flux:single_blocks.0.modulation.lin",
        "flux:single_blocks.0.linear1[q]",
        "flux:single_blocks.0.linear1[k]",
        "flux:single_blocks.0.linear1[v]",
        "flux:single_blocks.0.linear1[mlp]",
        "flux:single_blocks.0.linear2",
        "flux:single_blocks.1.modulation.lin",
        "flux:final_layer.adaLN_modulation.1",
        "flux:final_layer.linear",
    ]
    shuffled = expected[::-1]
    assert sorted(shuffled, key=keys.forward_order_key) == expected
    te = ["te1:text_model.encoder.layers.0.mlp.fc1", "t5:encoder.block.0.layer.0.SelfAttention.q"]
    assert sorted(expected + te, key=keys.forward_order_key)[:2] == te


# ---- arch detection -----------------------------------------------------------------------------------------------


def test_detect_arch() -> None:
    sfx = ".lora_down.weight"
    assert keys.detect_arch([SD15_KOHYA[0][0] + sfx]) == "sd15"
    assert keys.detect_arch([SDXL_KOHYA[1][0] + sfx]) == "sdxl"  # transformer depth > 1
    assert keys.detect_arch(["lora_te2_text_model_encoder_layers_0_mlp_fc1" + sfx]) == "sdxl"
    assert keys.detect_arch(["lora_unet_input_blocks_1_1_proj_in" + sfx]) == "sd15"  # SDXL has no attention there
    assert keys.detect_arch(["unet.up_blocks.3.attentions.0.proj_in.lora_A.weight"]) == "sd15"
    deep = "unet.down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q.lora_A.weight"
    assert keys.detect_arch([deep]) == "sdxl"
    assert keys.detect_arch([FLUX[0][0] + sfx]) == "flux"
    assert keys.detect_arch(["transformer.single_transformer_blocks.0.proj_out.lora_A.weight"]) == "flux"
    assert keys.detect_arch(["lora_te_text_model_encoder_layers_0_mlp_fc1" + sfx]) == "sd15"
    assert keys.detect_arch(["something.else"]) == "unknown"


def test_detect_arch_from_cross_attention_width() -> None:
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert keys.detect_arch([key]) == "unknown"  # this block exists in both SD1.5 and SDXL
    assert keys.detect_arch([key], {key: (4, 2048)}) == "sdxl"
    assert keys.detect_arch([key], {key: (4, 768)}) == "sd15"


# ---- order, classification, labels, host names -----------------------------------------------------------------


def test_forward_order() -> None:
    attn = [f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    expected = [
        "te1:text_model.encoder.layers.0.self_attn.q_proj",
        "te1:text_model.encoder.layers.0.self_attn.k_proj",
        "te1:text_model.encoder.layers.0.mlp.fc1",
        "te1:text_model.encoder.layers.2.self_attn.q_proj",
        "te1:text_model.encoder.layers.10.self_attn.q_proj",
        "te2:text_model.encoder.layers.0.self_attn.q_proj",
        "unet:time_embed.0",
        "unet:input_blocks.0.0",
        "unet:input_blocks.1.0.in_layers.2",
        "unet:input_blocks.1.0.emb_layers.1",
        "unet:input_blocks.1.0.out_layers.3",
        "unet:input_blocks.1.0.skip_connection",
        "unet:input_blocks.1.1.proj_in",
        *[f"unet:input_blocks.1.1.transformer_blocks.0.{a}" for a in attn],
        "unet:input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
        "unet:input_blocks.1.1.transformer_blocks.0.ff.net.2",
        "unet:input_blocks.1.1.transformer_blocks.1.attn1.to_q",
        "unet:input_blocks.1.1.proj_out",
        "unet:input_blocks.2.1.proj_in",
        "unet:input_blocks.3.0.op",
        "unet:input_blocks.10.0.in_layers.2",
        "unet:middle_block.0.in_layers.2",
        "unet:middle_block.1.transformer_blocks.0.attn1.to_q",
        "unet:middle_block.2.in_layers.2",
        "unet:output_blocks.0.0.in_layers.2",
        "unet:output_blocks.2.1.conv",
        "unet:output_blocks.3.1.transformer_blocks.0.attn2.to_v",
        "unet:output_blocks.11.1.proj_out",
        "unet:out.2",
        "flux:double_blocks.0.img_attn.qkv",
        "flux:double_blocks.2.img_attn.qkv",
        "flux:double_blocks.10.img_attn.qkv",
        "flux:single_blocks.0.linear1",
        "other:lora_unet_x",
    ]
    shuffled = expected[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=keys.forward_order_key) == expected


@pytest.mark.parametrize(
    ("layer_id", "expected"),
    [
        ("unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q", True),
        ("unet:input_blocks.1.1.transformer_blocks.0.attn1.to_k", True),
        ("unet:middle_block.1.transformer_blocks.3.attn2.to_v", True),
        ("unet:output_blocks.5.1.transformer_blocks.1.attn2.to_out.0", True),
        ("unet:output_blocks.5.1.transformer_blocks.1.ff.net.0.proj", False),
        ("unet:output_blocks.5.1.proj_in", False),
        ("unet:output_blocks.5.0.in_layers.2", False),
        ("te1:text_model.encoder.layers.0.self_attn.q_proj", False),
        ("flux:transformer_blocks.0.attn.to_q", False),
    ],
)
def test_is_attention(layer_id: str, expected: bool) -> None:
    assert keys.is_attention(layer_id) is expected


@pytest.mark.parametrize(
    ("layer_id", "expected"),
    [
        ("unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q", "IN4"),
        ("unet:middle_block.1.proj_in", "MID"),
        ("unet:output_blocks.3.0.in_layers.2", "OUT3"),
        ("unet:time_embed.0", "EMB"),
        ("unet:out.2", "END"),
        ("te1:text_model.encoder.layers.0.self_attn.q_proj", "TE1"),
        ("te2:text_model.encoder.layers.0.self_attn.q_proj", "TE2"),
        ("flux:double_blocks.3.img_attn.qkv", "FLUX-D3"),
        ("flux:single_blocks.12.linear1", "FLUX-S12"),
        ("flux:double_blocks.3.img_attn.qkv[q]", "FLUX-D3"),
        ("flux:single_blocks.12.linear1[mlp]", "FLUX-S12"),
        ("t5:encoder.block.0.layer.0.SelfAttention.q", "T5"),
        ("flux:img_in", "FLUX"),
        ("other:x", "OTHER"),
    ],
)
def test_layer_group(layer_id: str, expected: str) -> None:
    assert keys.layer_group(layer_id) == expected


def test_a1111_names() -> None:
    uid = "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert keys.a1111_name(uid) == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    te = "te1:text_model.encoder.layers.0.self_attn.q_proj"
    assert keys.a1111_name(te, "sd15") == "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert keys.a1111_name(te, "sdxl") == "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"
    te2 = "te2:text_model.encoder.layers.{}.{}"
    assert keys.a1111_name(te2.format(0, "self_attn.q_proj"), "sdxl") == "1_model_transformer_resblocks_0_attn_q_proj"
    assert keys.a1111_name(te2.format(3, "self_attn.out_proj"), "sdxl") == (
        "1_model_transformer_resblocks_3_attn_out_proj"
    )
    assert keys.a1111_name(te2.format(5, "mlp.fc1"), "sdxl") == "1_model_transformer_resblocks_5_mlp_c_fc"
    assert keys.a1111_name(te2.format(5, "mlp.fc2"), "sdxl") == "1_model_transformer_resblocks_5_mlp_c_proj"
    assert keys.a1111_name(te2.format(5, "layer_norm1"), "sdxl") is None
    assert keys.a1111_name("flux:double_blocks.0.img_attn.qkv") is None


def test_forge_keys() -> None:
    assert keys.forge_key("unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q") == (
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    )
    assert keys.forge_key("flux:double_blocks.0.img_attn.qkv") == "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert (
        keys.forge_key("flux:double_blocks.0.img_attn.qkv[q]") == "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    )
    assert keys.forge_key("te1:text_model.encoder.layers.0.self_attn.q_proj") is None


@pytest.mark.parametrize(
    ("layer_id", "arch", "expected"),
    [
        ("unet:input_blocks.1.0.in_layers.2", "sd15", 3),
        ("unet:input_blocks.3.0.op", "sdxl", 3),
        ("unet:output_blocks.2.1.conv", "sd15", 3),
        ("unet:output_blocks.2.0.skip_connection", "sd15", 1),
        ("unet:input_blocks.1.1.proj_in", "sd15", 1),
        ("unet:input_blocks.4.1.proj_in", "sdxl", 0),
        ("unet:input_blocks.4.1.proj_in", "unknown", None),
        ("unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q", "sd15", 0),
        ("unet:input_blocks.4.0.emb_layers.1", "sd15", 0),
        ("te1:text_model.encoder.layers.0.mlp.fc1", "sd15", 0),
        ("flux:double_blocks.0.img_attn.qkv", "flux", 0),  # every Flux LoRA target is a Linear
    ],
)
def test_conv_kernel(layer_id: str, arch: str, expected: int | None) -> None:
    assert keys.conv_kernel(layer_id, arch) == expected
