"""LoraFile / LoraLayer: deltas against independent formulas, key-style parity, errors, unknown keys."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from klora_ext import keys
from klora_ext.errors import KLoraError
from klora_ext.keys import split_slice
from klora_ext.lora_file import LoraFile, parse_state_dict, read_lora
from klora_ext.synthetic import layer_shapes, make_lora_state_dict, save_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5 kohya
Q_ID = "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv
CONV_ID = "unet:input_blocks.1.0.in_layers.2"


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


def _one(sd: dict[str, torch.Tensor], **kw: object) -> tuple[LoraFile, object]:
    lora = parse_state_dict(sd, name="mem", **kw)
    assert len(lora.layers) == 1
    return lora, next(iter(lora.layers.values()))


# ---- LoRA / LoCon ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_linear_delta(dtype: torch.dtype) -> None:
    down, up = _r(4, 10, seed=1, dtype=dtype), _r(6, 4, seed=2, dtype=dtype)
    sd = {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{Q}.alpha": torch.tensor(2.0, dtype=dtype)}
    lora, layer = _one(sd)
    assert layer.id == Q_ID
    assert layer.kind == "lora"
    assert layer.rank == 4
    assert layer.shape == (6, 10)
    assert layer.scale == pytest.approx(0.5)
    assert layer.factors["up"].dtype == dtype  # factors stay in the file's dtype
    d = layer.delta()
    assert d.dtype == torch.float32
    expected = up.float() @ down.float() * (2.0 / 4)
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-6)
    assert layer.delta(dtype=torch.float16).dtype == torch.float16
    assert lora.arch == "sd15"
    assert layer.source_keys == tuple(sd)


def test_no_alpha_means_scale_one_and_scale_key_wins() -> None:
    down, up = _r(3, 5, seed=1), _r(4, 3, seed=2)
    _, layer = _one({f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up})
    assert layer.scale == 1.0
    torch.testing.assert_close(layer.delta(), up @ down)
    _, layer = _one(
        {
            f"{Q}.lora_down.weight": down,
            f"{Q}.lora_up.weight": up,
            f"{Q}.alpha": torch.tensor(3.0),
            f"{Q}.scale": torch.tensor(0.25),
        }
    )
    assert layer.scale == 0.25


@given(
    out_f=st.integers(1, 9),
    in_f=st.integers(1, 9),
    rank=st.integers(1, 6),
    alpha=st.floats(0.5, 16),
    half=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_lora_delta_property(out_f: int, in_f: int, rank: int, alpha: float, half: bool) -> None:
    dtype = torch.float16 if half else torch.float32
    down, up = _r(rank, in_f, seed=3, dtype=dtype), _r(out_f, rank, seed=4, dtype=dtype)
    sd = {f"{Q}.lora_A.weight": down, f"{Q}.lora_B.weight": up, f"{Q}.alpha": torch.tensor(alpha)}
    _, layer = _one(sd)
    expected = torch.einsum("or,ri->oi", up.float(), down.float()) * (alpha / rank)
    torch.testing.assert_close(layer.delta(), expected, rtol=1e-5, atol=1e-5)


def test_locon_conv_delta_matches_the_conv_chain() -> None:
    down, up = _r(4, 3, 3, 3, seed=1), _r(5, 4, 1, 1, seed=2)
    sd = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_up.weight": up, f"{CONV}.alpha": torch.tensor(4.0)}
    _, layer = _one(sd)
    assert layer.id == CONV_ID
    assert layer.kind == "locon"
    assert layer.shape == (5, 3, 3, 3)
    x = _r(2, 3, 8, 8, seed=5)
    # The LoRA branch of a LoCon is conv(down) followed by the 1x1 conv(up); the dense delta must do the same.
    torch.testing.assert_close(F.conv2d(x, layer.delta()), F.conv2d(F.conv2d(x, down), up), rtol=1e-4, atol=1e-4)


def test_cp_mid_delta_matches_the_conv_chain() -> None:
    down, mid, up = _r(4, 3, 1, 1, seed=1), _r(4, 4, 3, 3, seed=2), _r(5, 4, 1, 1, seed=3)
    sd = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid, f"{CONV}.lora_up.weight": up}
    _, layer = _one(sd)
    assert layer.shape == (5, 3, 3, 3)
    assert layer.rank == 4
    x = _r(2, 3, 8, 8, seed=5)
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid), up)
    torch.testing.assert_close(F.conv2d(x, layer.delta()), chain, rtol=1e-4, atol=1e-4)


def test_sd15_proj_in_1x1_is_4d_in_every_style() -> None:
    proj = "unet:input_blocks.1.1.proj_in"
    lora_4d = parse_state_dict(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _r(2, 8, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _r(8, 2, 1, 1),
        },
        arch="sd15",
    )
    lora_2d = parse_state_dict(
        {
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _r(2, 8),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _r(8, 2),
        },
        arch="sd15",
    )
    assert lora_4d.layers[proj].shape == lora_2d.layers[proj].shape == (8, 8, 1, 1)
    torch.testing.assert_close(lora_4d.layers[proj].delta(), lora_2d.layers[proj].delta())


# ---- LoHa -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loha_delta(dtype: torch.dtype) -> None:
    w1a, w1b, w2a, w2b = (_r(*s, seed=i, dtype=dtype) for i, s in enumerate([(6, 3), (3, 5), (6, 3), (3, 5)]))
    sd = {
        f"{Q}.hada_w1_a": w1a,
        f"{Q}.hada_w1_b": w1b,
        f"{Q}.hada_w2_a": w2a,
        f"{Q}.hada_w2_b": w2b,
        f"{Q}.alpha": torch.tensor(1.5),
    }
    _, layer = _one(sd)
    assert (layer.kind, layer.rank, layer.shape) == ("loha", 3, (6, 5))
    expected = (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float()) * (1.5 / 3)
    torch.testing.assert_close(layer.delta(), expected, rtol=1e-6, atol=1e-6)


def test_loha_conv_flattened_gets_the_kernel_shape() -> None:
    w1a, w1b, w2a, w2b = (_r(*s, seed=i) for i, s in enumerate([(6, 2), (2, 27), (6, 2), (2, 27)]))
    sd = {f"{CONV}.hada_w1_a": w1a, f"{CONV}.hada_w1_b": w1b, f"{CONV}.hada_w2_a": w2a, f"{CONV}.hada_w2_b": w2b}
    lora, layer = _one(sd, arch="sd15")
    assert layer.shape == (6, 3, 3, 3)
    torch.testing.assert_close(layer.delta(), ((w1a @ w1b) * (w2a @ w2b)).reshape(6, 3, 3, 3))


def _cp_reference(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS Tucker: for each kernel tap (k, l): wa^T @ t[:, :, k, l] @ wb; wa (R, out), wb (R', in).
    out = torch.zeros(wa.shape[1], wb.shape[1], t.shape[2], t.shape[3])
    for k in range(t.shape[2]):
        for ll in range(t.shape[3]):
            out[:, :, k, ll] = wa.T @ t[:, :, k, ll] @ wb
    return out


def test_loha_cp_delta() -> None:
    t1, w1a, w1b = _r(2, 2, 3, 3, seed=1), _r(2, 5, seed=2), _r(2, 4, seed=3)
    t2, w2a, w2b = _r(2, 2, 3, 3, seed=4), _r(2, 5, seed=5), _r(2, 4, seed=6)
    sd = {
        f"{CONV}.hada_t1": t1,
        f"{CONV}.hada_w1_a": w1a,
        f"{CONV}.hada_w1_b": w1b,
        f"{CONV}.hada_t2": t2,
        f"{CONV}.hada_w2_a": w2a,
        f"{CONV}.hada_w2_b": w2b,
        f"{CONV}.alpha": torch.tensor(1.0),
    }
    _, layer = _one(sd)
    assert layer.shape == (5, 4, 3, 3)
    expected = _cp_reference(t1, w1a, w1b) * _cp_reference(t2, w2a, w2b) * 0.5
    torch.testing.assert_close(layer.delta(), expected, rtol=1e-5, atol=1e-5)


# ---- LoKr -----------------------------------------------------------------------------------------------------------


def test_lokr_full_halves_ignore_alpha() -> None:
    w1, w2 = _r(2, 3, seed=1), _r(4, 5, seed=2)
    _, layer = _one({f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2, f"{Q}.alpha": torch.tensor(7.0)})
    assert (layer.kind, layer.shape, layer.scale) == ("lokr", (8, 15), 1.0)
    assert layer.rank == 8  # no factor dim: min(shape)
    torch.testing.assert_close(layer.delta(), torch.kron(w1, w2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lokr_factored_w2(dtype: torch.dtype) -> None:
    w1, w2a, w2b = _r(2, 3, seed=1, dtype=dtype), _r(4, 2, seed=2, dtype=dtype), _r(2, 5, seed=3, dtype=dtype)
    sd = {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2_a": w2a, f"{Q}.lokr_w2_b": w2b, f"{Q}.alpha": torch.tensor(1.0)}
    _, layer = _one(sd)
    assert (layer.rank, layer.scale) == (2, 0.5)
    expected = torch.kron(w1.float(), w2a.float() @ w2b.float()) * 0.5
    torch.testing.assert_close(layer.delta(), expected, rtol=1e-6, atol=1e-6)


def test_lokr_factored_w1_uses_w1_rank() -> None:
    w1a, w1b, w2 = _r(2, 1, seed=1), _r(1, 3, seed=2), _r(4, 5, seed=3)
    sd = {f"{Q}.lokr_w1_a": w1a, f"{Q}.lokr_w1_b": w1b, f"{Q}.lokr_w2": w2, f"{Q}.alpha": torch.tensor(3.0)}
    _, layer = _one(sd)
    assert (layer.rank, layer.scale) == (1, 3.0)
    torch.testing.assert_close(layer.delta(), torch.kron(w1a @ w1b, w2) * 3.0)


def _kron4_reference(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    a, c = w1.shape
    b, d, kh, kw = w2.shape
    out = torch.zeros(a * b, c * d, kh, kw)
    for i in range(a):
        for j in range(c):
            out[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


def test_lokr_conv_full_and_factored_agree_on_layout() -> None:
    w1 = _r(2, 2, seed=1)
    w2a, w2b = _r(3, 2, seed=2), _r(2, 2 * 9, seed=3)
    w2 = (w2a @ w2b).reshape(3, 2, 3, 3)
    _, full = _one({f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_w2": w2})
    _, fact = _one({f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_w2_a": w2a, f"{CONV}.lokr_w2_b": w2b}, arch="sd15")
    expected = _kron4_reference(w1, w2)
    assert full.shape == fact.shape == (6, 4, 3, 3)
    torch.testing.assert_close(full.delta(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fact.delta(), expected, rtol=1e-5, atol=1e-5)


def test_lokr_t2() -> None:
    w1, t2, w2a, w2b = _r(2, 2, seed=1), _r(2, 2, 3, 3, seed=2), _r(2, 3, seed=3), _r(2, 2, seed=4)
    sd = {
        f"{CONV}.lokr_w1": w1,
        f"{CONV}.lokr_t2": t2,
        f"{CONV}.lokr_w2_a": w2a,
        f"{CONV}.lokr_w2_b": w2b,
        f"{CONV}.alpha": torch.tensor(2.0),
    }
    _, layer = _one(sd)
    assert layer.shape == (6, 4, 3, 3)
    expected = _kron4_reference(w1, _cp_reference(t2, w2a, w2b)) * (2.0 / 2)
    torch.testing.assert_close(layer.delta(), expected, rtol=1e-5, atol=1e-5)


def test_full_diff() -> None:
    diff = _r(6, 5, seed=1, dtype=torch.float16)
    _, layer = _one({f"{Q}.diff": diff})
    assert (layer.kind, layer.rank, layer.scale) == ("full", 5, 1.0)
    torch.testing.assert_close(layer.delta(), diff.float())


# ---- key-style parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_same_weights_in_every_style_give_same_ids_and_deltas(arch: str, kind: str) -> None:
    shapes = layer_shapes(arch, "all", include_te=True)
    if arch == "sdxl":
        # Every SDXL id, with small stand-in shapes (naming depends on the id only; this keeps the test fast).
        shapes = [(i, (8, 6, *s[2:])) for i, s in shapes]
    files = {
        style: parse_state_dict(
            make_lora_state_dict(shapes, 4, style=style, kind=kind, alpha=2.0, arch=arch, dtype=torch.float16),
            name=style,
        )
        for style in ("kohya", "diffusers", "peft")
    }
    ref = files["kohya"]
    assert list(ref.layers) == [i for i, _ in shapes]
    for lora in files.values():
        assert not lora.unknown_keys
        assert list(lora.layers) == list(ref.layers)
        for layer_id, layer in lora.layers.items():
            other = ref.layers[layer_id]
            assert (layer.kind, layer.rank, layer.shape, layer.scale) == (
                other.kind,
                other.rank,
                other.shape,
                other.scale,
            )
            assert torch.equal(layer.delta(), other.delta())


def test_old_diffusers_processor_keys_match_kohya() -> None:
    down, up = _r(2, 8, seed=1), _r(8, 2, seed=2)
    kohya = parse_state_dict(
        {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight": down,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight": up,
        }
    )
    proc = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    old = parse_state_dict({f"{proc}.down.weight": down, f"{proc}.up.weight": up})
    layer_id = "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"
    assert list(kohya.layers) == list(old.layers) == [layer_id]
    assert torch.equal(kohya.layers[layer_id].delta(), old.layers[layer_id].delta())


def test_peft_base_model_prefix_and_te() -> None:
    sd = {
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": _r(2, 768),
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": _r(320, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": _r(2, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": _r(768, 2),
    }
    lora = parse_state_dict(sd)
    assert list(lora.layers) == [
        "te1:text_model.encoder.layers.0.self_attn.q_proj",
        "unet:input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    ]
    assert lora.arch == "sd15"


# ---- files ----------------------------------------------------------------------------------------------------------


def test_read_lora_round_trip(tmp_path: Path) -> None:
    shapes = layer_shapes("tiny", "transformer")
    sd = make_lora_state_dict(shapes, 4, alpha=2.0, dtype=torch.float16)
    path = save_lora(tmp_path / "my_style.safetensors", sd, {"ss_network_dim": "4", "ss_base_model_version": "sd_v1"})
    lora = read_lora(path)
    assert lora.name == "my_style"
    assert lora.path == str(path)
    assert lora.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert lora.metadata == {"ss_network_dim": "4", "ss_base_model_version": "sd_v1"}
    assert lora.arch == "sd15"
    assert list(lora.layers) == [i for i, _ in shapes]
    mem = parse_state_dict(sd)
    for layer_id, layer in lora.layers.items():
        assert torch.equal(layer.delta(), mem.layers[layer_id].delta())
    assert read_lora(path, name="other", sha256="abc").name == "other"
    assert read_lora(path, sha256="abc").sha256 == "abc"
    assert mem.sha256 == ""
    assert mem.path is None


def test_kinds_summary() -> None:
    lora = parse_state_dict(make_lora_state_dict(layer_shapes("tiny", "all"), 2))
    kinds = lora.kinds()
    assert kinds["locon"] == 6 + 7  # 6 proj_in/out (SD1.5 1x1 convs) + 7 resnet/sampler convs
    assert sum(kinds.values()) == len(lora.layers)


# ---- unknown keys ---------------------------------------------------------------------------------------------------


def test_unknown_keys_are_reported() -> None:
    # dora_scale and diff_b are read since issue 7 (both hosts apply them): only the alpha without factors and the
    # non-LoRA key stay unknown.
    down, up = _r(2, 8), _r(8, 2)
    sd = {
        f"{Q}.lora_down.weight": down,
        f"{Q}.lora_up.weight": up,
        f"{Q}.dora_scale": _r(8, 1),
        f"{CONV}.diff_b": _r(4),
        "lora_unet_conv_in.alpha": torch.tensor(1.0),  # an alpha without factors
        "some_embedding.weight": _r(3, 3),
    }
    lora = parse_state_dict(sd, name="mix")
    assert list(lora.layers) == [Q_ID]
    assert lora.layers[Q_ID].is_dora
    assert list(lora.static_layers) == [CONV_ID + "#bias"]
    assert sorted(lora.unknown_keys) == ["lora_unet_conv_in.alpha", "some_embedding.weight"]
    assert lora.describe_unknown().startswith("2 unknown keys, e.g. ")
    assert any("DoRA" in w for w in lora.warnings)
    assert any("static layers (bias)" in w for w in lora.warnings)
    assert any("2 unknown keys" in w for w in lora.warnings)


def test_describe_unknown_empty_and_other_layers() -> None:
    lora = parse_state_dict(
        {"lora_unet_strange_module.lora_down.weight": _r(2, 4), "lora_unet_strange_module.lora_up.weight": _r(4, 2)}
    )
    assert lora.describe_unknown() == ""
    assert list(lora.layers) == ["other:lora_unet_strange_module"]
    assert any("does not know" in w for w in lora.warnings)


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\] LoRA file not found: .*nope\.safetensors"):
        read_lora(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("ext", [".pt", ".ckpt"])
def test_pickle_files_are_refused(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"old{ext}"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(KLoraError, match=rf"old\{ext}: '\{ext}' files are not supported.*\.safetensors"):
        read_lora(path)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 5) + b"nope!",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 9) + b'{"a": 1}',
    ],
)
def test_not_a_safetensors_file(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(payload)
    with pytest.raises(KLoraError, match=r"broken\.safetensors: not a safetensors file"):
        read_lora(path)


def test_truncated_tensor_data(tmp_path: Path) -> None:
    header = json.dumps({"x.lora_down.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    with pytest.raises(KLoraError, match=r"cut\.safetensors: could not read the tensors"):
        read_lora(path)


def test_no_lora_layers(tmp_path: Path) -> None:
    path = save_lora(tmp_path / "model.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": _r(4, 4)})
    with pytest.raises(KLoraError, match=r"model\.safetensors: no LoRA layers recognised \(1 keys, e\.g\. model\."):
        read_lora(path)
    with pytest.raises(KLoraError, match="no LoRA layers recognised"):
        parse_state_dict({})


def _err(sd: dict[str, torch.Tensor], pattern: str) -> None:
    with pytest.raises(KLoraError, match=pattern):
        parse_state_dict(sd, name="bad.safetensors")


def test_missing_halves() -> None:
    _err(
        {f"{Q}.lora_down.weight": _r(2, 8), f"{Q}.alpha": torch.tensor(1.0)},
        rf"^\[K-LoRA\] bad\.safetensors: layer {Q_ID} \(key {Q}\..*\): has a down .* but no up",
    )
    _err({f"{Q}.lora_B.weight": _r(8, 2)}, rf"bad\.safetensors: layer {Q_ID} .*has an up .* but no down")
    _err(
        {f"{Q}.hada_w1_a": _r(8, 2), f"{Q}.hada_w1_b": _r(2, 8), f"{Q}.hada_w2_a": _r(8, 2)},
        rf"layer {Q_ID} .*LoHa layer is incomplete: .* no hada_w2_b",
    )
    _err({f"{Q}.lokr_w1": _r(2, 2)}, rf"layer {Q_ID} .*LoKr layer \(w2\) is incomplete")
    _err({f"{Q}.lora_mid.weight": _r(2, 2, 3, 3)}, rf"layer {Q_ID} .*incomplete")


def test_rank_mismatch_and_rank_zero() -> None:
    _err(
        {f"{Q}.lora_down.weight": _r(4, 8), f"{Q}.lora_up.weight": _r(8, 2)},
        rf"bad\.safetensors: layer {Q_ID} .*rank mismatch: down has rank 4 but up has rank 2",
    )
    _err(
        {f"{Q}.lora_down.weight": torch.zeros(0, 8), f"{Q}.lora_up.weight": torch.zeros(8, 0)},
        rf"bad\.safetensors: layer {Q_ID} .*rank 0",
    )
    _err(
        {
            f"{Q}.hada_w1_a": _r(8, 2),
            f"{Q}.hada_w1_b": _r(3, 8),
            f"{Q}.hada_w2_a": _r(8, 2),
            f"{Q}.hada_w2_b": _r(2, 8),
        },
        rf"layer {Q_ID} .*rank mismatch: hada_w1_a has rank 2 but hada_w1_b has rank 3",
    )
    _err(
        {
            f"{CONV}.lora_down.weight": _r(4, 3, 1, 1),
            f"{CONV}.lora_mid.weight": _r(3, 3, 3, 3),
            f"{CONV}.lora_up.weight": _r(5, 4, 1, 1),
        },
        rf"layer {CONV_ID} .*rank mismatch: up .*mid",
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf(bad: float) -> None:
    up = _r(8, 2, dtype=torch.float16)
    up[3, 1] = bad
    _err(
        {f"{Q}.lora_down.weight": _r(2, 8), f"{Q}.lora_up.weight": up},
        rf"bad\.safetensors: layer {Q_ID}: key {Q}\.lora_up\.weight contains NaN/Inf",
    )
    _err(
        {f"{Q}.lora_down.weight": _r(2, 8), f"{Q}.lora_up.weight": _r(8, 2), f"{Q}.alpha": torch.tensor(bad)},
        rf"layer {Q_ID}: key {Q}\.alpha contains NaN/Inf",
    )


def test_shape_inconsistencies() -> None:
    _err(
        {f"{Q}.lora_down.weight": _r(2, 8, 1), f"{Q}.lora_up.weight": _r(8, 2)},
        rf"layer {Q_ID} .*down must be 2-D or 4-D, has shape \(2, 8, 1\)",
    )
    _err(
        {f"{CONV}.lora_down.weight": _r(2, 3, 3, 3), f"{CONV}.lora_up.weight": _r(4, 2, 3, 3)},
        rf"layer {CONV_ID} .*conv up factor must be 1x1",
    )
    _err(
        {
            f"{Q}.hada_w1_a": _r(8, 2),
            f"{Q}.hada_w1_b": _r(2, 8),
            f"{Q}.hada_w2_a": _r(6, 2),
            f"{Q}.hada_w2_b": _r(2, 8),
        },
        rf"layer {Q_ID} .*LoHa halves disagree on the shape",
    )
    _err(
        {f"{Q}.lora_down.weight": _r(2, 8), f"{Q}.lora_up.weight": _r(8, 2), f"{Q}.alpha": _r(2)},
        rf"layer {Q_ID}: key {Q}\.alpha should be a single number",
    )
    _err(
        {f"{Q}.lora_down.weight": torch.ones(2, 8, dtype=torch.int32), f"{Q}.lora_up.weight": _r(8, 2)},
        rf"layer {Q_ID}: key {Q}\.lora_down\.weight is not a float tensor",
    )


def test_mixed_styles_and_mixed_types() -> None:
    _err(
        {
            f"{Q}.lora_down.weight": _r(2, 8),
            f"{Q}.lora_up.weight": _r(8, 2),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": _r(2, 8),
        },
        rf"bad\.safetensors: keys '{Q}\.lora_down\.weight' and 'unet\..*lora_A\.weight' both give the down factor "
        rf"of layer {Q_ID}",
    )
    _err(
        {f"{Q}.lora_down.weight": _r(2, 8), f"{Q}.lora_up.weight": _r(8, 2), f"{Q}.hada_w1_a": _r(8, 2)},
        rf"layer {Q_ID} .*mixes factor types",
    )


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^\[K-LoRA\]"):
        parse_state_dict({"x": _r(1)})


def test_low_rank_factors_reproduce_the_delta() -> None:
    from klora_ext import synthetic
    from klora_ext.lora_file import parse_state_dict

    layers = synthetic.layer_shapes("tiny", "all")  # linear and conv (LoCon) layers
    lora = parse_state_dict(synthetic.make_lora_state_dict(layers, 3, alpha=1.5, seed=4, dtype=torch.float16))
    for layer in lora.layers.values():
        up, down = layer.low_rank()
        assert up.shape == (layer.shape[0], layer.rank) and down.shape[0] == layer.rank
        assert torch.allclose((up @ down).reshape(layer.shape), layer.delta(), rtol=1e-5, atol=1e-6)
    for kind in ("loha", "lokr"):
        other = parse_state_dict(synthetic.make_lora_state_dict(layers[:4], 2, kind=kind, seed=5))
        assert all(layer.low_rank() is None for layer in other.layers.values())


# ---- issue 7: formats the hosts apply -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_alpha_is_read_like_the_hosts_item(dtype: torch.dtype) -> None:
    # diffusers' kohya converter writes integer alphas; A1111 and Forge read alpha with .item()
    down, up = _r(4, 8, seed=1), _r(8, 4, seed=2)
    _, layer = _one(
        {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{Q}.alpha": torch.tensor(2, dtype=dtype)}
    )
    assert layer.scale == 2 / 4
    torch.testing.assert_close(layer.delta(), (up @ down) * 0.5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_files(tmp_path: Path, dtype: torch.dtype) -> None:
    down, up = _r(4, 8, seed=1).to(dtype), _r(8, 4, seed=2).to(dtype)
    sd = {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{Q}.alpha": torch.tensor(4.0)}
    path = save_lora(tmp_path / "fp8.safetensors", sd)
    layer = read_lora(path).layers[Q_ID]
    assert layer.factors["up"].dtype == dtype  # kept as stored
    expected = up.to(torch.float64) @ down.to(torch.float64)  # the stored fp8 values, multiplied exactly
    torch.testing.assert_close(layer.delta(), expected.float(), rtol=1e-6, atol=1e-6)
    bad = dict(sd)
    bad[f"{Q}.lora_up.weight"] = torch.full((8, 4), float("nan")).to(dtype)
    with pytest.raises(KLoraError, match="NaN/Inf"):
        parse_state_dict(bad, name="bad")


def _dora_reference(w: np.ndarray, d: np.ndarray, m: np.ndarray, axis: str) -> np.ndarray:
    merged = w + d
    if axis == "out":
        norm = np.linalg.norm(merged.reshape(merged.shape[0], -1), axis=1).reshape(-1, *[1] * (w.ndim - 1))
    else:
        norm = np.sqrt((merged**2).sum(axis=tuple(i for i in range(w.ndim) if i != 1), keepdims=True))
    return merged * (m.reshape(norm.shape) / norm) - w


@pytest.mark.parametrize(
    ("mag_shape", "axis", "suffix"),
    [((1, 8), "in", "dora_scale"), ((6, 1), "out", "dora_scale"), ((6,), "out", "lora_magnitude_vector")],
)
def test_dora_delta_against_a_direct_formula(mag_shape: tuple[int, ...], axis: str, suffix: str) -> None:
    down, up, mag = _r(3, 8, seed=1), _r(6, 3, seed=2), _r(*mag_shape, seed=3).abs() + 0.5
    w = _r(6, 8, seed=4)
    module = Q if suffix == "dora_scale" else "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    names = ("lora_down.weight", "lora_up.weight") if suffix == "dora_scale" else ("lora_A.weight", "lora_B.weight")
    sd = {f"{module}.{names[0]}": down, f"{module}.{names[1]}": up, f"{module}.alpha": torch.tensor(1.5)}
    sd[f"{module}.{suffix}"] = mag
    lora, layer = _one(sd)
    assert layer.is_dora and layer.needs_base and not layer.static
    assert layer.low_rank() is None  # a DoRA delta has no (up, down) factorisation
    plain = (up.double() @ down.double()).numpy() * (1.5 / 3)
    np.testing.assert_allclose(layer.delta().numpy(), plain, rtol=1e-5, atol=1e-6)  # no base: plain dW (+ a note)
    assert any("DoRA" in w and "plain" in w for w in lora.warnings)
    expected = _dora_reference(w.double().numpy(), plain, mag.double().numpy(), axis)
    np.testing.assert_allclose(layer.delta(base_weight=w).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert lora.kinds() == {"lora+dora": 1}


def test_dora_conv_input_axis() -> None:
    down, up, mag = _r(2, 4, 3, 3, seed=1), _r(6, 2, 1, 1, seed=2), _r(1, 4, 1, 1, seed=3).abs() + 0.5
    w = _r(6, 4, 3, 3, seed=4)
    _, layer = _one({f"{CONV}.lora_down.weight": down, f"{CONV}.lora_up.weight": up, f"{CONV}.dora_scale": mag})
    plain = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down).double().numpy()
    expected = _dora_reference(w.double().numpy(), plain, mag.double().numpy(), "in")
    np.testing.assert_allclose(layer.delta(base_weight=w).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_full_layers_get_a_numerical_rank() -> None:
    a, b = _r(40, 3, seed=1), _r(3, 36, seed=2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        _, layer = _one({f"{Q}.diff": (a @ b).to(dtype)})
        assert (layer.kind, layer.rank) == ("full", 3), dtype  # not min(out, in) = 36
    _, layer = _one({f"{Q}.diff": _r(40, 36, seed=3)})
    assert layer.rank == 36  # a random matrix has full rank
    _, layer = _one({f"{Q}.diff": _r(300, 280, seed=4)})
    assert layer.rank == 256  # capped (MAX_NUMERICAL_RANK)
    # the same count as numpy's SVD with the documented tolerance
    m = (a @ b + 1e-5 * _r(40, 36, seed=5)).double().numpy()
    s = np.linalg.svd(m, compute_uv=False)
    _, layer = _one({f"{Q}.diff": torch.from_numpy(m).float()})
    assert layer.rank == int((s > 1e-3 * s[0]).sum()) == 3


def test_ia3_glora_norm_and_bias_are_static_layers() -> None:
    k_mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    k_id = "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_k"
    w = _r(6, 8, seed=9)
    vec = _r(6, seed=1)
    a1, a2, b1, b2 = _r(2, 8, seed=2), _r(8, 2, seed=3), _r(2, 8, seed=4), _r(6, 2, seed=5)
    sd = {
        f"{Q}.lora_down.weight": _r(2, 8, seed=6),
        f"{Q}.lora_up.weight": _r(6, 2, seed=7),
        f"{k_mod}.weight": vec,  # (IA)3: scales the output rows
        f"{k_mod}.on_input": torch.tensor(False),
        f"{CONV}.a1.weight": a1,
        f"{CONV}.a2.weight": a2,
        f"{CONV}.b1.weight": b1,
        f"{CONV}.b2.weight": b2,
        f"{CONV}.alpha": torch.tensor(2.0),
        f"{Q}.diff_b": _r(6, seed=8),
        "lora_unet_down_blocks_0_resnets_0_norm1.w_norm": _r(4, seed=10),
        "lora_unet_down_blocks_0_resnets_0_norm1.b_norm": _r(4, seed=11),
    }
    lora = parse_state_dict(sd, name="static")
    assert list(lora.layers) == [Q_ID]  # only the LoRA layer is switchable
    kinds = {i: layer.kind for i, layer in lora.static_layers.items()}
    assert kinds == {
        k_id: "ia3",
        CONV_ID: "glora",
        Q_ID + "#bias": "bias",
        "unet:input_blocks.1.0.in_layers.0": "norm",
    }
    assert all(layer.static for layer in lora.static_layers.values())
    ia3 = lora.static_layers[k_id]
    torch.testing.assert_close(ia3.delta(base_weight=w), w * vec.reshape(-1, 1))
    with pytest.raises(KLoraError, match="depends on the base weight"):
        ia3.delta()
    glora = lora.static_layers[CONV_ID]
    wc = _r(6, 8, seed=12)
    torch.testing.assert_close(glora.delta(base_weight=wc), b2 @ b1 + (wc @ a2) @ a1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.static_layers[Q_ID + "#bias"].delta(), sd[f"{Q}.diff_b"])
    assert any("static layers" in w for w in lora.warnings)
    assert lora.unknown_keys == []


def test_ia3_on_input_scales_columns() -> None:
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    vec, w = _r(8, seed=1), _r(6, 8, seed=2)
    lora = parse_state_dict({f"{mod}.weight": vec, f"{mod}.on_input": torch.tensor(1)}, name="ia3")
    layer = next(iter(lora.static_layers.values()))
    torch.testing.assert_close(layer.delta(base_weight=w), w * vec.reshape(1, -1))


def test_unknown_format_names_what_was_seen() -> None:
    sd = {f"lora_unet_a_{i}.oft_blocks": _r(2, 4, 4) for i in range(3)}
    with pytest.raises(KLoraError, match=r"no LoRA layers recognised .*'oft_blocks' \(3 keys\)"):
        parse_state_dict(sd, name="oft")
    with pytest.raises(KLoraError, match=r"key endings seen: 'foo.weight' \(2\)"):
        parse_state_dict({"model.foo.weight": _r(2, 2), "other.foo.weight": _r(2, 2)}, name="ckpt")


# ---- Flux: fused (kohya / BFL) and split (diffusers / PEFT / OneTrainer) files of the same weights ----------------


def _flux_reference(sd: dict[str, torch.Tensor], module: str, down_k: str, up_k: str) -> torch.Tensor:
    # Direct formula in float64: up @ down * alpha / rank.
    down, up = sd[f"{module}.{down_k}"].double(), sd[f"{module}.{up_k}"].double()
    return up @ down * (float(sd[f"{module}.alpha"]) / down.shape[0])


@pytest.mark.parametrize("fused", ["sparse", "dense"])
def test_flux_fused_and_split_files_agree(fused: str) -> None:
    from klora_ext import synthetic

    shapes = synthetic.flux_layer_shapes(double=2, single=2, hidden=8)
    ids = [i for i, _ in shapes]
    files = {
        style: parse_state_dict(
            synthetic.make_flux_state_dict(shapes, 2, style=style, fused=fused, alpha=1.0, seed=3), name=style
        )
        for style in synthetic.FLUX_STYLES
    }
    kohya_sd = synthetic.make_flux_state_dict(shapes, 2, style="kohya", fused=fused, alpha=1.0, seed=3)
    diff_sd = synthetic.make_flux_state_dict(shapes, 2, style="diffusers", fused=fused, alpha=1.0, seed=3)
    for style, lora in files.items():
        assert lora.arch == "flux", style
        assert list(lora.layers) == ids, style
        assert not lora.unknown_keys, style
    h = 8
    for layer_id, shape in shapes:
        base, part = split_slice(layer_id)
        path = base.split(":", 1)[1]
        # independent references: the kohya file's fused product, rows of the slice; the diffusers file's product
        kohya_full = _flux_reference(
            kohya_sd, "lora_unet_" + path.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        )
        if part is not None:
            start = {"q": 0, "k": h, "v": 2 * h, "mlp": 3 * h}[part]
            kohya_ref = kohya_full[start : start + shape[0]]
        else:
            kohya_ref = kohya_full
        dname = keys.diffusers_name(layer_id, "flux")
        diff_ref = _flux_reference(diff_sd, dname, "lora_A.weight", "lora_B.weight")
        if keys.flux_needs_swap(layer_id):  # diffusers norm_out.linear: (scale, shift) vs BFL (shift, scale)
            diff_ref = torch.cat([diff_ref[shape[0] // 2 :], diff_ref[: shape[0] // 2]])
        torch.testing.assert_close(kohya_ref, diff_ref, rtol=1e-6, atol=1e-7)  # the fixture holds the same weights
        ranks = {style: lora.layers[layer_id].rank for style, lora in files.items()}
        assert set(ranks.values()) == {2}, (layer_id, ranks)  # K = r_c * r_s the same whichever way it is stored
        for style, lora in files.items():
            layer = lora.layers[layer_id]
            assert layer.shape == shape
            torch.testing.assert_close(layer.delta().double(), kohya_ref, rtol=1e-5, atol=1e-6, msg=style)


def test_flux_mixed_pair_gives_the_same_plan() -> None:
    from klora_ext import synthetic
    from klora_ext.args import KLoraArgs
    from klora_ext.plan import Plan
    from klora_ext.scoring import compute_scores

    shapes = synthetic.flux_layer_shapes(double=2, single=2, hidden=8)

    def lora(style: str, seed: int, rank: int) -> LoraFile:
        sd = synthetic.make_flux_state_dict(shapes, rank, style=style, alpha=1.0, seed=seed)
        return parse_state_dict(sd, name=f"{style}{seed}")

    args = KLoraArgs(enabled=True, content="c", style="s")
    plans = {}
    for c_style, s_style in (("kohya", "kohya"), ("diffusers", "diffusers"), ("kohya", "diffusers"), ("peft", "bfl")):
        scores = compute_scores(lora(c_style, 1, 2), lora(s_style, 2, 3), k_multiplier=1.0)
        assert len(scores.layers) == len(shapes)
        assert not scores.content_only and not scores.style_only
        plans[(c_style, s_style)] = (scores, Plan.build(scores, args, 10))
    ref_scores, ref_plan = plans[("kohya", "kohya")]
    for (c_style, s_style), (scores, plan) in plans.items():
        assert plan.layer_ids == ref_plan.layer_ids
        assert np.array_equal(plan.roles, ref_plan.roles), (c_style, s_style)
        for a, b in zip(scores.layers, ref_scores.layers):
            assert (a.id, a.k, a.rank_content, a.rank_style) == (b.id, b.k, b.rank_content, b.rank_style)
            assert a.score_content == pytest.approx(b.score_content, rel=1e-5)
            assert a.score_style == pytest.approx(b.score_style, rel=1e-5)


def test_flux_t5_and_clip_keys_are_text_encoders() -> None:
    from klora_ext import synthetic

    shapes = synthetic.flux_layer_shapes(double=1, single=0, hidden=8, globals_=False)
    sd = synthetic.make_flux_state_dict(shapes, 2, style="kohya", alpha=1.0)
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = _r(2, 8)
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = _r(8, 2)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = _r(2, 8)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = _r(32, 2)
    lora = parse_state_dict(sd, name="flux-te")
    assert "t5:encoder.block.0.layer.0.SelfAttention.q" in lora.layers
    assert "te1:text_model.encoder.layers.0.mlp.fc1" in lora.layers
    assert not any(i.startswith("other:") for i in lora.layers)
    support = lora.host_support["forge"]
    assert not support.refused and "t5:encoder.block.0.layer.0.SelfAttention.q" in support.applied


def test_fused_dora_layer_is_kept_whole() -> None:
    mod = "lora_unet_double_blocks_0_img_attn_qkv"
    sd = {
        f"{mod}.lora_down.weight": _r(2, 8),
        f"{mod}.lora_up.weight": _r(24, 2),
        f"{mod}.dora_scale": _r(24, 1).abs(),
    }
    lora = parse_state_dict(sd, name="fused-dora")
    assert list(lora.layers) == ["flux:double_blocks.0.img_attn.qkv"]


# ---- what each host applies -----------------------------------------------------------------------------------------


def test_host_support_kohya_vs_diffusers_sd_files() -> None:
    shapes = layer_shapes("tiny", "attention")
    kohya = parse_state_dict(make_lora_state_dict(shapes, 2, style="kohya"), name="k")
    for host in ("a1111", "forge"):
        s = kohya.host_support[host]
        assert not s.refused and set(s.applied) == set(kohya.layers) and not s.ignored, host
    # diffusers/PEFT dotted keys: A1111 splits keys at their first dot (nothing matches); Forge keys attention
    # projections only in the processor form, leaves > 12 keys unmatched and then loads nothing of the file.
    for style in ("diffusers", "peft"):
        lora = parse_state_dict(make_lora_state_dict(shapes, 2, style=style), name=style)
        assert lora.host_support["a1111"].refused
        forge = lora.host_support["forge"]
        assert forge.refused and "unmatched" in forge.note
    authors = {
        f"unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}.lora.{ud}.weight": _r(8, 2)
        if ud == "up"
        else _r(2, 8)
        for p in ("to_q", "to_k", "to_v", "to_out.0")
        for ud in ("up", "down")
    }
    lora = parse_state_dict(authors, name="authors")
    assert len(lora.layers) == 4  # read as UNet layers with normal ids
    assert all(i.startswith("unet:input_blocks.1.1.transformer_blocks.0.attn1.") for i in lora.layers)
    assert lora.host_support["forge"].refused and lora.host_support["a1111"].refused


def test_host_support_processor_form_and_non_attention_diffusers_keys_on_forge() -> None:
    proc = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    ff = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    sd = {
        f"{proc}.down.weight": _r(2, 8),
        f"{proc}.up.weight": _r(8, 2),
        f"{ff}.lora_A.weight": _r(2, 32),
        f"{ff}.lora_B.weight": _r(8, 2),
    }
    lora = parse_state_dict(sd, name="mixed")
    forge = lora.host_support["forge"]
    assert not forge.refused and set(forge.applied) == set(lora.layers)


def test_host_support_flux_and_forge_only_suffixes() -> None:
    from klora_ext import synthetic

    shapes = synthetic.flux_layer_shapes(double=1, single=1, hidden=8)
    for style, forge_ok in (
        ("kohya", True),
        ("diffusers", True),
        ("onetrainer", True),
        ("bfl", True),
        ("peft", False),
    ):
        lora = parse_state_dict(synthetic.make_flux_state_dict(shapes, 2, style=style), name=style)
        assert lora.host_support["a1111"].refused and "Flux" in lora.host_support["a1111"].note
        assert lora.host_support["forge"].refused is not forge_ok, style
    # IA3 is A1111-only; a PEFT magnitude is read by neither host
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    ia3 = parse_state_dict({f"{mod}.weight": _r(8), f"{mod}.on_input": torch.tensor(0)}, name="ia3")
    assert ia3.host_support["a1111"].applied and not ia3.host_support["forge"].applied
