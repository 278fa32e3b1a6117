"""Issue 7 on A1111: the layers K-LoRA scores and switches are the builtin Lora's own ``Network.modules``.

Fake A1111 host with real torch layers and the builtin's module types (tests/fakes/a1111). Expected layer sets come
from what each test writes into the files; expected deltas from the files' tensors and the model's weights, computed
here; the host-free reader (what the CLI uses) is the other side of the CLI/host agreement checks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

ARGS = {"enabled": True, "content": "c", "style": "s", "scope": "all", "te_policy": "both"}


@pytest.fixture
def host(fake_a1111, tmp_path):
    import fakehost

    return fakehost.FakeHost(tmp_path)


def _specs(prefixes=("unet:", "te1:")):
    import fakehost

    return [(i, s) for i, s in fakehost.layer_specs() if i.startswith(prefixes)]


def _save(host, name, sd):
    import networks

    from klora_ext import synthetic

    path = synthetic.save_lora(host.lora_dir / f"{name}.safetensors", sd)
    networks.list_available_networks()
    return path


def _sd(layers, *, kind="lora", rank=2, seed=0, alpha=1.0):
    from klora_ext import synthetic

    return synthetic.make_lora_state_dict(layers, rank, style="kohya", kind=kind, alpha=alpha, seed=seed, arch="sdxl")


def _host_files(content="c", style="s"):
    from klora_ext.webui.a1111 import A1111Adapter

    adapter = A1111Adapter()
    layers = adapter.host_layers(None, adapter.resolve(content), adapter.resolve(style))
    return layers.mapping, *layers.load()


def _reader_files(host, content="c", style="s"):
    from klora_ext.lora_file import read_lora

    return read_lora(host.lora_dir / f"{content}.safetensors"), read_lora(host.lora_dir / f"{style}.safetensors")


def _plan(scores, steps=6):
    from klora_ext.args import KLoraArgs
    from klora_ext.runtime import Session

    args = KLoraArgs(enabled=True, content="c", style="s", scope="all")
    return Session(args, scores).plan_for_pass(steps).to_json()


def _last_plan():
    from klora_ext.webui import script

    return script.STATE.last_plan


# ---- the layer set ------------------------------------------------------------------------------------------------
def test_layers_are_the_modules_the_builtin_merges_and_the_rest_is_reported(host):
    specs = _specs()
    content = _sd(specs, seed=1)
    # keys the builtin matches to no layer of this model: a module the model lacks and a T5 (sd-scripts lora_te3_) key
    extra = {
        "lora_unet_input_blocks_9_9_nowhere.lora_down.weight": torch.ones(2, 8),
        "lora_unet_input_blocks_9_9_nowhere.lora_up.weight": torch.ones(8, 2),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(2, 8),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(8, 2),
    }
    _save(host, "c", {**content, **extra})
    style_specs = [x for x in specs if x[0].startswith("te1:")] + [x for x in specs if x[0].startswith("unet:")][:5]
    _save(host, "s", _sd(style_specs, seed=2, rank=3))

    _, c, s = _host_files()
    assert set(c.layers) == {i for i, _ in specs}
    assert set(s.layers) == {i for i, _ in style_specs}
    assert any("leaves out 4 keys of 'c'" in w for w in c.warnings), c.warnings
    assert not s.warnings

    _, res = host.generate(ARGS, prompt="x", steps=4)
    assert len(res.images) == 1
    plan = _last_plan()
    shared_unet = [i for i, _ in style_specs if i.startswith("unet:")]
    assert [x["id"] for x in plan["layers"]] == shared_unet  # scope "all" switches the shared UNet layers
    assert "[K-LoRA] A1111 leaves out 4 keys of 'c'" in res.comments
    # from the cache: same notes, no rescoring
    from klora_ext.webui import run

    hits = run.score_cache().stats.memory_hits
    _, res = host.generate(ARGS, prompt="x", steps=4)
    assert run.score_cache().stats.memory_hits == hits + 1
    assert "[K-LoRA] A1111 leaves out 4 keys of 'c'" in res.comments


def test_plain_lora_is_scored_from_the_host_modules_factors(host):
    import network_lora

    _save(host, "c", _sd(_specs(), seed=1))
    _save(host, "s", _sd(_specs(), seed=2, rank=4, alpha=3.0))
    network_lora.calc_log.clear()
    _, c, s = _host_files()
    from klora_ext.scoring import compute_scores

    scores = compute_scores(c, s)
    assert network_lora.calc_log == []  # no dense delta through calc_updown for a product of factors
    assert {layer.kind for layer in c.layers.values()} <= {"lora", "locon"}
    assert all(layer.scale == pytest.approx(3.0 / 4) for layer in s.layers.values())
    assert len(scores.layers) == len(_specs())


# ---- CLI (host-free reader) and host agree ----------------------------------------------------------------------
def _full_sd(layers, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer_id, shape in layers:
        from klora_ext import synthetic

        module = synthetic.module_key(layer_id, "kohya", "sdxl")
        # a rank-2 dense diff, so the numerical rank is meaningful
        a = torch.randn(shape[0], 2, generator=g)
        b = torch.randn(2, int(torch.tensor(shape[1:]).prod()), generator=g)
        sd[f"{module}.diff"] = (a @ b).reshape(shape) * 0.01
    return sd


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full"])
def test_host_scores_and_plan_equal_the_cli_reader(host, kind):
    import network_lora

    specs = _specs(("unet:",))
    content = _full_sd(specs, 5) if kind == "full" else _sd(specs, kind=kind, rank=2, seed=5, alpha=1.5)
    _save(host, "c", content)
    _save(host, "s", _sd(specs, rank=3, seed=6))
    network_lora.calc_log.clear()
    _, hc, hs = _host_files()
    rc, rs = _reader_files(host)
    from klora_ext.scoring import compute_scores

    host_scores, reader_scores = compute_scores(hc, hs), compute_scores(rc, rs)
    assert [x.id for x in host_scores.layers] == [x.id for x in reader_scores.layers] == [i for i, _ in specs]
    for h, r in zip(host_scores.layers, reader_scores.layers):
        assert (h.rank_content, h.rank_style, h.k) == (r.rank_content, r.rank_style, r.k), h.id
        for field in ("score_content", "score_style", "sum_abs_content", "sum_abs_style"):
            assert getattr(h, field) == pytest.approx(getattr(r, field), rel=1e-5), (h.id, field)
    hp, rp = _plan(host_scores), _plan(reader_scores)
    assert [(x["id"], x["flip_step"]) for x in hp["layers"]] == [(x["id"], x["flip_step"]) for x in rp["layers"]]
    # scored from the host module's own tensors, as products (no dense delta made through calc_updown)
    want = {"lora", "locon"} if kind == "lora" else {kind}
    assert {layer.kind for layer in hc.layers.values()} <= want
    assert all(type(layer.factors) is dict for layer in hc.layers.values())


def test_dora_is_scored_as_the_builtin_applies_it_on_the_original_weight(host):
    import networks

    specs = [x for x in _specs(("unet:",)) if len(x[1]) == 2]
    content = _sd(specs, seed=7, alpha=2.0)
    g = torch.Generator().manual_seed(3)
    from klora_ext import synthetic

    for layer_id, shape in specs:
        content[f"{synthetic.module_key(layer_id, 'kohya', 'sdxl')}.dora_scale"] = torch.rand(1, shape[1], generator=g)
    _save(host, "c", content)
    _save(host, "s", _sd(specs, seed=8))
    _save(host, "p", _sd(specs, seed=9))
    # a prompt LoRA merged first: the layers now hold merged weights and the builtin's backups
    host.generate(None, prompt="x <lora:p:1>", steps=2)
    layer_id = specs[0][0]
    name = "diffusion_model_" + layer_id.split(":", 1)[1].replace(".", "_")
    assert networks.loaded_networks and not torch.equal(
        host.model.weights()[name], host.pristine[name]
    ), "precondition: the layer is merged"
    mapping, c, _ = _host_files()
    assert "ckpt=" in mapping  # DoRA deltas depend on the checkpoint's weights
    module = synthetic.module_key(layer_id, "kohya", "sdxl")
    up, down = content[f"{module}.lora_up.weight"], content[f"{module}.lora_down.weight"]
    w = host.pristine[name]
    merged = w + up @ down * (2.0 / down.shape[0])
    norm = merged.norm(dim=0, keepdim=True)  # per input column, the builtin's only form
    want = merged * (content[f"{module}.dora_scale"] / norm) - w
    got = c.layers[layer_id].delta()
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, up @ down * (2.0 / down.shape[0]), atol=1e-4)  # not the plain delta


def test_static_types_are_applied_not_switched(host):
    from klora_ext import synthetic

    specs = _specs(("unet:",))
    content = _sd(specs[1:], seed=1)
    ia3_id, shape = specs[0]
    content[f"{synthetic.module_key(ia3_id, 'kohya', 'sdxl')}.weight"] = torch.rand(shape[0])
    content[f"{synthetic.module_key(ia3_id, 'kohya', 'sdxl')}.on_input"] = torch.tensor(0)
    _save(host, "c", content)
    _save(host, "s", _sd(specs, seed=2))
    _, c, _ = _host_files()
    assert ia3_id not in c.layers and c.static_layers[ia3_id].kind == "ia3"
    _, res = host.generate(ARGS, prompt="x", steps=3)
    assert len(res.images) == 1
    assert ia3_id not in [x["id"] for x in _last_plan()["layers"]]
    assert "applied by A1111 as they are, never switched" in res.comments


# ---- SDXL text encoder 2: nn.MultiheadAttention -------------------------------------------------------------------
def test_te2_attention_counts_only_when_the_file_has_q_k_v_and_out(fake_a1111, tmp_path):
    import fakehost

    host = fakehost.FakeHost(tmp_path, te2=(2, 8))
    te2 = fakehost.te2_layer_ids(2, 8)
    unet = _specs(("unet:",))
    _save(host, "c", _sd(unet + te2, seed=1))
    missing = "te2:text_model.encoder.layers.0.self_attn.k_proj"
    _save(host, "s", _sd(unet + [x for x in te2 if x[0] != missing], seed=2))
    _, c, s = _host_files()
    assert {i for i in c.layers if i.startswith("te2:")} == {i for i, _ in te2}
    block0 = {f"te2:text_model.encoder.layers.0.self_attn.{x}_proj" for x in ("q", "v", "out")}
    want_style = {i for i, _ in te2} - block0 - {missing}
    assert {i for i in s.layers if i.startswith("te2:")} == want_style
    assert any("does not merge 3 modules of 's'" in w for w in s.warnings), s.warnings
    # the TE2 q delta is the in_proj chunk's shape and the file's product
    q = c.layers["te2:text_model.encoder.layers.1.self_attn.q_proj"]
    assert q.shape == (8, 8)


# ---- cache identity -----------------------------------------------------------------------------------------------
def test_mapping_id_follows_the_models_layer_map(host):
    from modules import shared

    _save(host, "c", _sd(_specs(), seed=1))
    _save(host, "s", _sd(_specs(), seed=2))
    first, _, _ = _host_files()
    assert first.startswith("a1111:v1:") and "ckpt=" not in first
    assert _host_files()[0] == first
    shared.sd_model.network_layer_mapping["diffusion_model_extra"] = torch.nn.Linear(2, 2)
    assert _host_files()[0] != first


def test_a_replaced_file_with_its_mtime_kept_is_read_again(host):
    specs = _specs(("unet:",))
    _save(host, "c", _sd(specs, seed=1))
    path = Path(_save(host, "s", _sd(specs, seed=2)))
    from klora_ext.webui.a1111 import A1111Adapter

    adapter = A1111Adapter()
    refs = adapter.resolve("c"), adapter.resolve("s")
    before = adapter.host_layers(None, *refs).load()[1].layers[specs[0][0]].delta()
    st = os.stat(path)
    tmp = path.with_suffix(".new")
    from klora_ext import synthetic

    synthetic.save_lora(tmp, _sd(specs, seed=3))
    assert os.path.getsize(tmp) == st.st_size
    os.replace(tmp, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = adapter.host_layers(None, *refs).load()[1].layers[specs[0][0]].delta()
    assert not torch.allclose(before, after)


def test_a_module_the_builtin_cannot_merge_is_left_out_with_a_note(host):
    from klora_ext import synthetic

    specs = _specs(("unet:",))
    bad_id, bad_shape = specs[0]
    other_shape = next(s for _, s in specs if math.prod(s) != math.prod(bad_shape))
    content = _sd(specs[1:], kind="loha", seed=1)
    # LoHa factors of another layer's shape: the builtin's calc_updown fails there and it skips the module
    wrong = synthetic.make_lora_state_dict([(bad_id, other_shape)], 2, style="kohya", kind="loha", seed=4, arch="sdxl")
    _save(host, "c", {**content, **wrong})
    _save(host, "s", _sd(specs, seed=2))
    _, c, _ = _host_files()
    assert bad_id not in c.layers and set(c.layers) == {i for i, _ in specs[1:]}
    assert any("A1111 skips 1 modules of 'c'" in w for w in c.warnings), c.warnings
    _, res = host.generate(ARGS, prompt="x", steps=3)
    assert len(res.images) == 1 and bad_id not in [x["id"] for x in _last_plan()["layers"]]


def test_reference_numbers_come_from_the_files_as_stored(host):
    """The authors' code reads the files in their own dtype (fp16 here); the builtin keeps factors in its compute
    dtype (fp32 in the fake), so the reference clocks' top sums must come from the files, not the host modules."""
    from klora_ext.args import KLoraArgs
    from klora_ext.lora_file import read_lora
    from klora_ext.reference import reference_scores
    from klora_ext.webui import run
    from klora_ext.webui.a1111 import A1111Adapter

    specs = _specs(("unet:",))
    for name, seed in (("c", 1), ("s", 2)):
        _save(host, name, {k: v.half() for k, v in _sd(specs, seed=seed, rank=3).items()})
    args = KLoraArgs(enabled=True, content="c", style="s", clock="reference", scope="attention")
    got = run.prepare_run(args, A1111Adapter(), None, steps=4).session.scores.reference
    want = reference_scores(read_lora(host.lora_dir / "c.safetensors"), read_lora(host.lora_dir / "s.safetensors"))
    assert got.layer_ids == want.layer_ids and got.dtype_content == want.dtype_content == ("float16",) * len(got.k)
    assert got.top_content == want.top_content and got.top_style == want.top_style


def test_a_file_the_builtin_applies_nothing_of_is_refused_with_a_clear_message(host):
    """A PEFT-style file: the reader (CLI) reads it, but A1111's loader matches none of its keys (it splits a key at
    the first dot), so K-LoRA must not apply it either, and says why."""
    from klora_ext import synthetic
    from klora_ext.lora_file import read_lora

    specs = _specs(("unet:",))
    peft = synthetic.make_lora_state_dict(specs, 2, style="peft", seed=1)
    _save(host, "c", peft)
    _save(host, "s", _sd(specs, seed=2))
    assert read_lora(host.lora_dir / "c.safetensors").layers  # the host-free reader does read it
    _, res = host.generate(ARGS, prompt="x", steps=3)
    assert res.images == []
    assert "A1111's Lora loader matches none of its keys" in res.comments
