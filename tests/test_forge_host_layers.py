"""Issue 7 on Forge: the layers K-LoRA scores and switches are the patches Forge's own loader makes of a file.

A fake Forge Flux model (1 double + 1 single block, hidden 8) whose key map, loader and merge follow Forge's
(tests/fakes/forge/host.py). Expected values come from the files' raw tensors, computed here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from klora_ext import synthetic
from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.lora_file import read_lora
from klora_ext.plan import BOTH, CONTENT, NONE, STYLE
from klora_ext.webui import forge as forge_module
from klora_ext.webui import run as run_module
from klora_ext.webui.forge import ForgeAdapter, build_host_lora
from tests.fakes.forge.fixture import DirectScript
from tests.fakes.forge.host import FakeForge, ScriptRunner, StableDiffusionProcessingTxt2Img, make_engine

H = 8
LAYERS = synthetic.flux_layer_shapes(1, 1, H)
SHAPES = dict(LAYERS)
FUSED_ROWS = {
    "double_blocks.0.img_attn.qkv": 3 * H,
    "double_blocks.0.txt_attn.qkv": 3 * H,
    "single_blocks.0.linear1": 7 * H,
}


def bfl_params() -> list[tuple[str, tuple[int, int]]]:
    """The model's weights: fused qkv/linear1 whole, everything else as in LAYERS."""
    out: dict[str, tuple[int, int]] = {}
    for layer_id, shape in LAYERS:
        path = layer_id.split(":", 1)[1]
        base = path.split("[", 1)[0]
        out[base] = (FUSED_ROWS[base], shape[1]) if base in FUSED_ROWS else shape
    return list(out.items())


def where_of(layer_id: str) -> tuple[str, tuple[int, int, int] | None]:
    """Forge's target of a canonical id, worked out by hand: q/k/v are rows [0,h), [h,2h), [2h,3h); mlp the rest."""
    path = layer_id.split(":", 1)[1]
    if "[" not in path:
        return f"diffusion_model.{path}.weight", None
    base, part = path[:-1].split("[")
    start = {"q": 0, "k": H, "v": 2 * H, "mlp": 3 * H}[part]
    length = 4 * H if part == "mlp" else H
    return f"diffusion_model.{base}.weight", (0, start, length)


class FluxWorld:
    def __init__(self, host: FakeForge, tmp: Path) -> None:
        self.host, self.tmp = host, tmp
        self.sds: dict[str, dict[str, torch.Tensor]] = {}
        self.styles: dict[str, str] = {}
        self.paths: dict[str, str] = {}

    @property
    def kmodel(self) -> Any:
        return self.host.shared.sd_model.forge_objects_original.unet.model

    @property
    def clip_model(self) -> Any:
        return self.host.shared.sd_model.forge_objects_original.clip.cond_stage_model

    def add(self, name: str, style: str, *, seed: int, rank: int = 2, alpha: float | None = None, extra=None) -> str:
        sd = synthetic.make_flux_state_dict(LAYERS, rank, style=style, seed=seed, alpha=alpha)
        sd.update(extra or {})
        path = synthetic.save_lora(self.tmp / f"{name}.safetensors", sd)
        self.sds[name], self.styles[name], self.paths[name] = sd, style, str(path)
        self.host.add_lora_file(name, str(path))
        self.host.networks.list_available_networks()
        return str(path)

    def delta(self, name: str, layer_id: str) -> torch.Tensor:
        """The slice/whole delta of a canonical id from the file's raw factors (fused files: rows of the fused one)."""
        sd, style = self.sds[name], self.styles[name]
        path = layer_id.split(":", 1)[1]
        base = path.split("[", 1)[0]
        fused = style in ("kohya", "bfl") and "[" in path
        module = synthetic._flux_module(f"flux:{base}" if fused else layer_id, style)
        down_k, up_k = synthetic._FLUX_SUFFIX[style]
        up, down = sd[f"{module}.{up_k}"].double(), sd[f"{module}.{down_k}"].double()
        alpha = sd.get(f"{module}.alpha")
        d = up @ down * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        if fused:
            key, offset = where_of(layer_id)
            d = d[offset[1] : offset[1] + offset[2]]
        if style not in ("kohya", "bfl") and path == "final_layer.adaLN_modulation.1":
            d = torch.cat([d[H:], d[:H]])  # Forge's swap_scale_shift of diffusers' norm_out
        return d


@pytest.fixture
def flux(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FluxWorld]:
    import klora_ext.webui as glue

    monkeypatch.setitem(sys.modules, "klora_ext.webui.forge", forge_module)
    monkeypatch.setattr(glue, "forge", forge_module, raising=False)
    monkeypatch.setenv("KLORA_CACHE_PATH", str(tmp_path / "cache" / "scores.json"))
    monkeypatch.setattr(run_module, "_cache", None)
    engine = make_engine(bfl_params(), [("text_model.encoder.layers.0.mlp.fc1", (8, 8))])
    engine.forge_objects.unet.model.flux_config = {"depth": 1, "depth_single_blocks": 1, "hidden_size": H}
    host = FakeForge(engine)
    host.install(monkeypatch.setitem)
    yield FluxWorld(host, tmp_path)
    forge_module._LIVE.restore_all()


def host_lora(flux: FluxWorld, name: str) -> Any:
    return build_host_lora(flux.paths[name], name, "", flux.kmodel, flux.clip_model)


# ---------------------------------------------------------------------------------------------------------------
# the layer set and its targets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["kohya", "bfl", "diffusers", "onetrainer", "lycoris"])
def test_layers_are_forge_targets_in_every_style_forge_reads(flux: FluxWorld, style: str) -> None:
    flux.add("f", style, seed=3, alpha=4.0)
    host = host_lora(flux, "f")
    assert set(host.lora.layers) == set(SHAPES)  # same canonical ids whatever the key style
    for layer_id in SHAPES:
        assert (host.where[layer_id].key, host.where[layer_id].offset) == where_of(layer_id), layer_id
        got = host.lora.layers[layer_id].delta().double()
        want = flux.delta("f", layer_id)
        assert torch.allclose(got, want, atol=1e-5), layer_id
    # what Forge itself patched for this file: every patch lands on a target of one of our layers
    patcher = flux.host.networks.load_lora_for_models(
        flux.host.shared.sd_model.forge_objects.unet,
        flux.host.shared.sd_model.forge_objects.clip,
        flux.host.networks.load_lora_state_dict(flux.paths["f"]),
        1.0,
        1.0,
        "f",
    )[0]
    forge_targets = {
        (key, e[3]) for patches in patcher.lora_patches.values() for key, es in patches.items() for e in es
    }
    ours = {(w.key, w.offset) for w in host.where.values()}
    for key, offset in forge_targets:
        assert (key, offset) in ours or (offset is None and any(k == key for k, _ in ours)), (key, offset)
    assert host.notes == []


def test_host_layers_agree_with_the_cli_reader(flux: FluxWorld) -> None:
    for name, style in (("k", "kohya"), ("d", "diffusers")):
        flux.add(name, style, seed=5)
        host, cli = host_lora(flux, name).lora, read_lora(flux.paths[name])
        assert set(host.layers) == set(cli.layers)
        for layer_id, layer in host.layers.items():
            assert layer.rank == cli.layers[layer_id].rank, layer_id
            assert torch.allclose(layer.delta(), cli.layers[layer_id].delta(), atol=1e-6), layer_id


def test_keys_forge_does_not_apply_are_left_out_with_a_note(flux: FluxWorld) -> None:
    extra = {
        "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, H),  # PEFT prefix: unmapped
        "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(H, 2),
    }
    flux.add("f", "kohya", seed=3, extra=extra)
    host = host_lora(flux, "f")
    assert set(host.lora.layers) == set(SHAPES)
    assert any("2 keys Forge does not apply are left out" in n for n in host.notes), host.notes


def test_a_file_forge_refuses_is_refused_with_forges_reason(flux: FluxWorld) -> None:
    flux.add("bare", "bfl-bare", seed=3)  # BFL paths without 'diffusion_model.': Forge's key map has no such names
    with pytest.raises(KLoraError, match="Forge does not load 'bare' for this model"):
        host_lora(flux, "bare")


def test_dora_delta_is_forges_weight_decompose(flux: FluxWorld) -> None:
    module = synthetic._flux_module("flux:double_blocks.0.img_attn.proj", "kohya")
    magnitude = torch.rand(H, 1) + 0.5
    flux.add("dora", "kohya", seed=4, extra={f"{module}.dora_scale": magnitude})
    host = host_lora(flux, "dora")
    layer = host.lora.layers["flux:double_blocks.0.img_attn.proj"]
    w = flux.kmodel.get_parameter("diffusion_model.double_blocks.0.img_attn.proj.weight").double()
    merged = w + flux.delta("dora", "flux:double_blocks.0.img_attn.proj")
    norm = w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps  # Forge: the norm of the original rows
    want = merged * (magnitude.double() / norm) - w
    assert torch.allclose(layer.delta().double(), want, atol=1e-5)
    assert layer.rank == 2


def test_dora_on_a_fused_weight_gives_the_slices_of_forges_delta(flux: FluxWorld) -> None:
    fused = "flux:double_blocks.0.img_attn.qkv"
    module = synthetic._flux_module(fused, "kohya")
    magnitude = torch.rand(3 * H, 1) + 0.5
    flux.add("dora", "kohya", seed=4, extra={f"{module}.dora_scale": magnitude})
    host = host_lora(flux, "dora")
    w = flux.kmodel.get_parameter("diffusion_model.double_blocks.0.img_attn.qkv.weight").double()
    merged = w.clone()
    for part in ("q", "k", "v"):
        _, offset = where_of(f"{fused}[{part}]")
        merged[offset[1] : offset[1] + offset[2]] += flux.delta("dora", f"{fused}[{part}]")
    norm = w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    whole = merged * (magnitude.double() / norm) - w
    for part in ("q", "k", "v"):
        _, offset = where_of(f"{fused}[{part}]")
        layer = host.lora.layers[f"{fused}[{part}]"]
        assert (host.where[layer.id].key, host.where[layer.id].offset) == where_of(layer.id)
        want = whole[offset[1] : offset[1] + offset[2]]
        assert torch.allclose(layer.delta().double(), want, atol=1e-5), part
    assert host.base_dependent


# ---------------------------------------------------------------------------------------------------------------
# a mixed-format pair through a generation
# ---------------------------------------------------------------------------------------------------------------


def run_pair(flux: FluxWorld, args: KLoraArgs, steps: int, probe) -> Any:
    """One txt2img generation with K-LoRA; ``probe(adapter, denoiser)`` before every model call. Returns the plan."""
    adapter = ForgeAdapter()
    plans: list[Any] = []

    def call(d: Any) -> None:
        plans.append(adapter.run.controller.plan)
        probe(adapter, d)

    flux.host.modules["modules.script_callbacks"].on_cfg_denoiser(adapter.on_denoiser)
    p = StableDiffusionProcessingTxt2Img(steps=steps)
    p.scripts = ScriptRunner([(DirectScript(adapter, args), [])])
    flux.host.probes.append(call)
    try:
        flux.host.process_images(p)
    finally:
        flux.host.probes.clear()
    return plans[-1]


def expected_weights(flux: FluxWorld, pristine: dict, roles: dict[str, int], wc: float, ws: float) -> dict:
    want = {k: v.clone() for k, v in pristine.items()}
    for layer_id in SHAPES:
        key, offset = where_of(layer_id)
        region = want[key] if offset is None else want[key][offset[1] : offset[1] + offset[2]]
        if roles[layer_id] in (CONTENT, BOTH):
            region += wc * flux.delta("c", layer_id)
        if roles[layer_id] in (STYLE, BOTH):
            region += ws * flux.delta("s", layer_id)
    return want


@pytest.mark.parametrize(("content", "style"), [("kohya", "diffusers"), ("diffusers", "onetrainer"), ("bfl", "kohya")])
def test_mixed_format_pair_switches_every_slice(flux: FluxWorld, content: str, style: str) -> None:
    flux.add("c", content, seed=7, alpha=2.0)
    flux.add("s", style, seed=8)
    pristine = {k: v.detach().clone().double() for k, v in flux.kmodel.named_parameters()}
    wc, ws = 0.7, 1.2
    args = KLoraArgs(enabled=True, content="c", style="s", content_weight=wc, style_weight=ws)
    seen: list[int] = []

    def probe(adapter: ForgeAdapter, d: Any) -> None:
        plan = adapter.run.controller.plan
        assert set(plan.layer_ids) == set(SHAPES)  # every slice and whole weight is a shared, switched layer
        roles = dict(zip(plan.layer_ids, (int(r) for r in plan.row(d.step))))
        assert NONE not in roles.values()
        for key, w in expected_weights(flux, pristine, roles, wc, ws).items():
            if not key.endswith(".weight"):
                continue
            module = flux.kmodel.get_submodule(key.rsplit(".", 1)[0])
            x = torch.randn(3, w.shape[1])
            got = module(x).double()
            ref = x.double() @ w.T + module.bias.double()
            assert torch.allclose(got, ref, atol=1e-4), (key, d.step, float((got - ref).abs().max()))
        seen.append(d.step)

    plan = run_pair(flux, args, 6, probe)
    assert seen == list(range(6))
    flips = [j for j in range(len(plan.layer_ids)) if len({int(plan.row(t)[j]) for t in range(plan.steps)}) > 1]
    assert flips, "the plan should switch some layer during the pass"
    # afterwards: Forge's own merge of the content LoRA only, every K-LoRA edit undone
    after = expected_weights(flux, pristine, dict.fromkeys(SHAPES, CONTENT), wc, ws)
    for key, want in after.items():
        assert torch.allclose(flux.kmodel.get_parameter(key).double(), want, atol=1e-5), key


@pytest.mark.parametrize("method", ["k-lora", "style-only"])
def test_dora_layer_switches_without_residual(flux: FluxWorld, method: str) -> None:
    """The host-applied DoRA content delta is what is taken away when the layer flips to style (issue 7: a plain
    LoRA delta was subtracted and a residual stayed in the weight)."""
    target = "flux:double_blocks.0.img_attn.proj"
    module = synthetic._flux_module(target, "kohya")
    magnitude = torch.rand(H, 1) + 0.5
    flux.add("c", "kohya", seed=7, extra={f"{module}.dora_scale": magnitude})
    flux.add("s", "diffusers", seed=8)
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    w = flux.kmodel.get_parameter(key).detach().clone().double()
    norm = w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    dora = (w + flux.delta("c", target)) * (magnitude.double() / norm) - w
    wc, ws = 0.9, 1.1
    args = KLoraArgs(enabled=True, content="c", style="s", content_weight=wc, style_weight=ws, method=method)
    roles_seen: set[int] = set()

    def probe(adapter: ForgeAdapter, d: Any) -> None:
        plan = adapter.run.controller.plan
        if target in plan.layer_ids:
            role = int(plan.row(d.step)[plan.layer_ids.index(target)])
        else:
            role = adapter._roles[target]  # a static role (style-only: style everywhere)
        roles_seen.add(role)
        want = w.clone()
        if role in (CONTENT, BOTH):
            want += wc * dora
        if role in (STYLE, BOTH):
            want += ws * flux.delta("s", target)
        proj = flux.kmodel.get_submodule(key.rsplit(".", 1)[0])
        x = torch.randn(3, H)
        ref = x.double() @ want.T + proj.bias.double()
        assert torch.allclose(proj(x).double(), ref, atol=1e-4), (d.step, role)

    run_pair(flux, args, 8, probe)
    if method == "style-only":
        assert roles_seen == {STYLE}  # Forge merged the DoRA content; K-LoRA takes exactly that away
    else:
        assert roles_seen


def test_scores_are_cached_per_host_mapping(flux: FluxWorld) -> None:
    flux.add("c", "kohya", seed=7)
    flux.add("s", "diffusers", seed=8)
    args = KLoraArgs(enabled=True, content="c", style="s")
    adapter = ForgeAdapter()
    p = StableDiffusionProcessingTxt2Img(steps=4)
    first = run_module.prepare_run(args, adapter, p, steps=4)
    second = run_module.prepare_run(args, adapter, p, steps=4)
    assert not first.from_cache and second.from_cache
    assert {s.id for s in first.session.scores.layers} == set(SHAPES)
    mapping = adapter.host_files(p, first.content, first.style)[0]
    assert mapping.startswith("forge-host")
    assert any(f":m{mapping}" in k for k in run_module.score_cache()._entries)  # keyed by the host mapping


@pytest.mark.parametrize("method", ["k-lora", "content-only"])
def test_style_bias_diffs_are_applied_as_forge_applies_them(flux: FluxWorld, method: str) -> None:
    """diff_b (bias deltas) are never switched: the content's come with Forge's merge of the content LoRA, the
    style's are added to the patcher as they are (and left out for content-only)."""
    module = synthetic._flux_module("flux:double_blocks.0.img_attn.proj", "kohya")
    cb, sb = torch.randn(H), torch.randn(H)
    flux.add("c", "kohya", seed=7, extra={f"{module}.diff_b": cb})
    flux.add("s", "kohya", seed=8, extra={f"{module}.diff_b": sb})
    bias_key = "diffusion_model.double_blocks.0.img_attn.proj.bias"
    pristine = flux.kmodel.get_parameter(bias_key).detach().clone()
    wc, ws = 0.6, 1.3
    args = KLoraArgs(enabled=True, content="c", style="s", content_weight=wc, style_weight=ws, method=method)
    want = pristine + wc * cb + (ws * sb if method == "k-lora" else 0)
    seen: list[int] = []

    def probe(adapter: ForgeAdapter, d: Any) -> None:
        got = flux.kmodel.get_parameter(bias_key)
        assert torch.allclose(got, want, atol=1e-6), (d.step, float((got - want).abs().max()))
        seen.append(d.step)

    run_pair(flux, args, 4, probe)
    assert seen == list(range(4))
    # the next plain generation's patcher (no LoRAs): Forge restores its backup, nothing of either LoRA is left
    flux.host.sampling_prepare(flux.host.shared.sd_model.forge_objects.unet)
    assert torch.equal(flux.kmodel.get_parameter(bias_key), pristine)


def test_plan_without_a_generation_uses_the_loaded_model(flux: FluxWorld) -> None:
    """The plan preview and the plan API have no processing object: the WebUI's loaded checkpoint is used."""
    flux.add("c", "kohya", seed=7)
    flux.add("s", "diffusers", seed=8)
    run = run_module.prepare_run(KLoraArgs(enabled=True, content="c", style="s"), ForgeAdapter(), None, steps=4)
    assert {s.id for s in run.session.scores.layers} == set(SHAPES)
