"""SDXL's second text encoder in the fake A1111: a real ``nn.MultiheadAttention`` keyed and merged the builtin's way.

The builtin keys TE2 LoRA modules ``1_model_transformer_resblocks_N_attn_{q,k,v,out}_proj`` and merges them through
the parent attention module (``in_proj_weight`` chunks + ``out_proj.weight``). Expected weights here come straight
from the files (up @ down * alpha / rank), independent of the host fake and of the adapter.
"""

from __future__ import annotations

import pytest
import torch

ATTN = "1_model_transformer_resblocks_{}_attn"
TE2 = (2, 8)  # two OpenCLIP blocks of width 8


@pytest.fixture
def sdxl(fake_a1111, tmp_path):
    import fakehost

    return fakehost.FakeHost(tmp_path, te2=TE2)


def _file_delta(path, module_key):
    from safetensors.torch import load_file

    sd = load_file(path)
    up, down = sd[f"{module_key}.lora_up.weight"].float(), sd[f"{module_key}.lora_down.weight"].float()
    alpha = float(sd[f"{module_key}.alpha"]) if f"{module_key}.alpha" in sd else down.shape[0]
    return (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])


def _te2_expected(host, weights):
    """{'<attn>:in_proj' / ':out_proj': base + sum(w * delta)} for the given {role: strength}."""
    files = host.files()
    out = {}
    for i in range(TE2[0]):
        name = ATTN.format(i)
        base_in, base_out = host.pristine[name + ":in_proj"].clone(), host.pristine[name + ":out_proj"].clone()
        for role, w in weights.items():
            key = f"lora_te2_text_model_encoder_layers_{i}_self_attn"
            qkv = torch.vstack([_file_delta(files[role], f"{key}_{x}_proj") for x in "qkv"])
            base_in += w * qkv
            base_out += w * _file_delta(files[role], f"{key}_out_proj")
        out[name + ":in_proj"], out[name + ":out_proj"] = base_in, base_out
    return out


def _check_te2(conds, want, where):
    for key, value in want.items():
        assert torch.allclose(conds[key], value, rtol=0, atol=1e-5), f"{where}: {key} differs"


ARGS = {"enabled": True, "content": "subject_v1", "style": "painterly", "content_weight": 0.8, "style_weight": 1.3}


def test_te2_lora_modules_are_the_builtins_attention_keys(sdxl):
    """The fake's loader keys q/k/v on the parent attention module and out_proj on its child Linear."""
    import networks
    from modules import shared

    entry = networks.available_networks["subject_v1"]
    net = networks.load_network("subject_v1", entry)
    attn = sdxl.model.attn_layers[0]
    name = ATTN.format(0)
    for x in "qkv":
        assert net.modules[f"{name}_{x}_proj"].sd_module is attn
    assert net.modules[f"{name}_out_proj"].sd_module is attn.out_proj
    assert f"{name}_q_proj" not in shared.sd_model.network_layer_mapping


def test_plain_prompt_lora_merges_te2_through_the_attention(sdxl):
    """The fake host itself: a prompt LoRA changes in_proj/out_proj exactly by the file's deltas."""
    p, _ = sdxl.generate(None, prompt="x <lora:subject_v1:0.7>", steps=2)
    _check_te2(p.conds_used[0], _te2_expected(sdxl, {"content": 0.7}), "plain")


def test_xyz_over_method_gives_each_cell_its_own_te2_deltas(sdxl):
    """Cell 1 (k-lora, TE policy both) has content+style on TE2; cell 2 (content-only) must have content alone.
    Before the fix the attention module was never marked stale and kept cell 1's merge."""
    import xyz_grid

    p = sdxl.make_p(ARGS, prompt="a photo", steps=4)
    cells = xyz_grid.run_axis(p, "[K-LoRA] Method", ["k-lora", "content-only", "style-only"])
    assert not any(r.comments for _, r in cells)
    conds = p.conds_used  # copy(p) shares this list: one entry per cell, in order
    assert len(conds) == 3 and all(pc.conds_used is conds for pc, _ in cells)
    _check_te2(conds[0], _te2_expected(sdxl, {"content": 0.8, "style": 1.3}), "cell 1 (k-lora)")
    _check_te2(conds[1], _te2_expected(sdxl, {"content": 0.8}), "cell 2 (content-only)")
    _check_te2(conds[2], _te2_expected(sdxl, {"style": 1.3}), "cell 3 (style-only)")


def test_te2_restored_after_the_run(sdxl):
    """A plain generation after K-LoRA sees the pristine attention weights (and bias)."""
    sdxl.generate(ARGS, prompt="a photo", steps=3)
    p, _ = sdxl.generate(None, prompt="a photo", steps=2)
    conds = p.conds_used[0]
    for i in range(TE2[0]):
        name = ATTN.format(i)
        for part in (":in_proj", ":out_proj", ":out_bias"):
            assert torch.equal(conds[name + part], sdxl.pristine[name + part]), name + part


def test_te2_restored_right_away_after_an_aborted_run(sdxl):
    """An exception mid-sampling leaves the run armed; the next process() cleans up and the attention weights are
    the pristine ones again at once (from the builtin's backup), before any forward."""
    p = sdxl.make_p(ARGS, prompt="a photo", steps=4)
    p.fail_at = (1, 2)
    with pytest.raises(RuntimeError):
        sdxl.run(p)
    for attn in sdxl.model.attn_layers:
        assert not torch.equal(attn.in_proj_weight, sdxl.pristine[attn.network_layer_name + ":in_proj"])
    sdxl.module.Script().process(sdxl.make_p(None))
    assert sdxl.adapter.run is None
    for attn in sdxl.model.attn_layers:
        name = attn.network_layer_name
        assert torch.equal(attn.in_proj_weight, sdxl.pristine[name + ":in_proj"]), name
        assert torch.equal(attn.out_proj.weight, sdxl.pristine[name + ":out_proj"]), name
