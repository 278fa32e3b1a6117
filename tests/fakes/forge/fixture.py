"""The ``forge`` pytest fixture: a fake Forge process with three LoRA files and an independent reference.

Use it from a test module with ``pytest_plugins = ["tests.fakes.forge.fixture"]``. It is separate from the A1111
fakes: it installs its own ``modules.*``/``backend``/``networks`` into ``sys.modules`` for one test only, and pins
``klora_ext.webui.forge`` to the module the test modules imported (the A1111 fixture purges host-glue modules).

LoRA files (kohya keys in compvis naming, which Forge's generic key map handles): ``content`` (every UNet layer but
one, plus the text encoder), ``style`` (every UNet layer but another one, plus the text encoder), ``other`` (a few
layers; a third LoRA the user writes into the prompt). The reference deltas are computed here from the raw tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from klora_ext import synthetic
from klora_ext.args import KLoraArgs
from klora_ext.plan import BOTH, CONTENT, STYLE
from klora_ext.webui import forge as forge_module
from klora_ext.webui import run as run_module
from tests.fakes.forge.host import (
    FakeForge,
    StableDiffusionProcessingImg2Img,
    StableDiffusionProcessingTxt2Img,
    make_engine,
)

TINY = synthetic.layer_shapes("tiny", "all", include_te=True)
UNET_SHAPES = {lid: shape for lid, shape in TINY if lid.startswith("unet:")}
TE_SHAPES = {lid: shape for lid, shape in TINY if lid.startswith("te1:")}
CONTENT_ONLY = "unet:middle_block.1.proj_in"  # the style file lacks it
STYLE_ONLY = "unet:output_blocks.11.1.transformer_blocks.0.ff.net.2"  # the content file lacks it
OTHER_LAYERS = (
    "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "unet:middle_block.1.transformer_blocks.0.attn2.to_k",
    "unet:output_blocks.11.0.in_layers.2",
)


def param_key(layer_id: str) -> str:
    component, path = layer_id.split(":", 1)
    return f"diffusion_model.{path}.weight" if component == "unet" else f"clip_l.transformer.{path}.weight"


def module_path(layer_id: str) -> str:
    return param_key(layer_id)[: -len(".weight")]


@dataclass
class DirectScript:
    """Drives an adapter through the adapter_base call sequence (what the shared Script does), without the Script."""

    adapter: Any
    args: KLoraArgs
    errors: list[BaseException] = field(default_factory=list)

    def process(self, p: Any) -> None:
        self.adapter.disarm(None)
        if self.args.enabled:
            run = run_module.prepare_run(self.args, self.adapter, p, steps=p.steps, seed=p.seed)
            self.adapter.arm(p, run)

    def after_extra_networks_activate(self, p: Any, **_: Any) -> None:
        self.adapter.on_networks_activated(p)

    def process_before_every_sampling(self, p: Any, **_: Any) -> None:
        self.adapter.before_sampling(p, hires=bool(p.is_hr_pass))

    def before_hr(self, p: Any) -> None:
        self.adapter.before_sampling(p, hires=True)

    def postprocess(self, p: Any, processed: Any) -> None:
        self.adapter.disarm(p)


class World:
    def __init__(self, host: FakeForge, tmp: Path) -> None:
        self.host = host
        self.tmp = tmp
        self.files: dict[str, str] = {}
        self.sds: dict[str, dict[str, torch.Tensor]] = {}
        self.layers: dict[str, list[str]] = {}
        self.pristine = self.snapshot()
        self._inputs: dict[str, torch.Tensor] = {}

    # ---- model access ------------------------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self.host.shared.sd_model

    @property
    def kmodel(self) -> nn.Module:
        return self.engine.forge_objects_original.unet.model

    @property
    def te_model(self) -> nn.Module:
        return self.engine.forge_objects_original.clip.cond_stage_model

    def module(self, layer_id: str) -> nn.Module:
        root = self.kmodel if layer_id.startswith("unet:") else self.te_model
        return root.get_submodule(module_path(layer_id))

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().clone() for k, v in self.kmodel.named_parameters()}
        out.update({k: v.detach().clone() for k, v in self.te_model.named_parameters()})
        return out

    def live(self) -> dict[str, torch.Tensor]:
        out = dict(self.kmodel.named_parameters())
        out.update(dict(self.te_model.named_parameters()))
        return out

    # ---- LoRA files --------------------------------------------------------------------------------------------
    def add_lora(
        self, name: str, layer_ids: list[str], *, rank: int, seed: int, alpha: float | None, scale: float = 1.0
    ) -> str:
        shapes = [(lid, UNET_SHAPES.get(lid) or TE_SHAPES[lid]) for lid in layer_ids]
        sd = synthetic.make_lora_state_dict(
            shapes, rank, style="kohya", alpha=alpha, seed=seed, scale=scale, arch="sdxl"
        )
        path = str(self.tmp / f"{name}.safetensors")
        synthetic.save_lora(path, sd)
        self.files[name], self.sds[name], self.layers[name] = path, sd, list(layer_ids)
        self.host.add_lora_file(name, path, sha256=f"{seed:02d}" * 32)
        return path

    def delta(self, name: str, layer_id: str) -> torch.Tensor:
        """Per unit strength, straight from the file's tensors (independent of klora_ext.lora_file)."""
        sd = self.sds[name]
        module = synthetic.module_key(layer_id, "kohya", "sdxl")
        up, down = sd[f"{module}.lora_up.weight"].float(), sd[f"{module}.lora_down.weight"].float()
        alpha = sd.get(f"{module}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        shape = self.pristine[param_key(layer_id)].shape
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale

    def expected(
        self, layer_id: str, role: int | None, *, wc: float, ws: float, prompt: tuple[tuple[str, float], ...] = ()
    ) -> torch.Tensor:
        """base + chosen delta(s) x strength + prompt LoRAs, fp32."""
        w = self.pristine[param_key(layer_id)].float().clone()
        if role in (CONTENT, BOTH) and layer_id in self.layers["content"]:
            w += wc * self.delta("content", layer_id)
        if role in (STYLE, BOTH) and layer_id in self.layers["style"]:
            w += ws * self.delta("style", layer_id)
        for name, strength in prompt:
            if layer_id in self.layers[name]:
                w += strength * self.delta(name, layer_id)
        return w

    # ---- forward checks ----------------------------------------------------------------------------------------
    def probe_input(self, layer_id: str) -> torch.Tensor:
        if layer_id not in self._inputs:
            g = torch.Generator().manual_seed(len(self._inputs) + 7)
            shape = self.pristine[param_key(layer_id)].shape
            size = (2, shape[1], 5, 5) if len(shape) == 4 else (3, shape[1])
            self._inputs[layer_id] = torch.randn(size, generator=g)
        return self._inputs[layer_id]

    def output(self, layer_id: str) -> torch.Tensor:
        with torch.no_grad():
            return self.module(layer_id)(self.probe_input(layer_id))

    def reference_output(self, layer_id: str, weight: torch.Tensor) -> torch.Tensor:
        module = self.module(layer_id)
        x = self.probe_input(layer_id)
        bias = self.pristine[param_key(layer_id)[: -len("weight")] + "bias"].float()
        if weight.dim() == 4:
            return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
        return F.linear(x, weight, bias)

    # ---- generations -------------------------------------------------------------------------------------------
    def txt2img(self, **kw: Any) -> StableDiffusionProcessingTxt2Img:
        return StableDiffusionProcessingTxt2Img(**kw)

    def img2img(self, **kw: Any) -> StableDiffusionProcessingImg2Img:
        return StableDiffusionProcessingImg2Img(**kw)

    def direct(self, adapter: Any, args: KLoraArgs) -> DirectScript:
        """A call-sequence driver for ``adapter``; registers its denoiser callback like the Script does at import."""
        self.host.modules["modules.script_callbacks"].on_cfg_denoiser(adapter.on_denoiser)
        return DirectScript(adapter, args)

    def generate(self, p: Any, scripts: list[tuple[Any, list[Any]]], probe: Callable | None = None) -> Any:
        from tests.fakes.forge.host import ScriptRunner

        p.scripts = ScriptRunner(scripts)
        if probe is not None:
            self.host.probes.append(probe)
        try:
            return self.host.process_images(p)
        finally:
            if probe is not None:
                self.host.probes.remove(probe)


# ---------------------------------------------------------------------------------------------------------------
# checks shared by the Forge test modules
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    step: int
    roles: dict[str, int]
    weights: dict[str, torch.Tensor]
    modes: dict[str, str]


@dataclass
class Checker:
    """A probe run at every model evaluation: every UNet layer's output (and in-place weight) against the reference."""

    world: World
    adapter: Any
    wc: float
    ws: float
    prompt: tuple[tuple[str, float], ...] = ()
    host_states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    skip_after_disarm: bool = False
    online: bool = False  # the host applies the content LoRA per forward (Forge's online slots)

    def __call__(self, denoiser: Any) -> None:
        run = self.adapter.run
        if run is None:
            assert self.skip_after_disarm, "K-LoRA disarmed during sampling"
            return
        step = min(denoiser.step * denoiser.steps // denoiser.total_steps, denoiser.steps - 1)
        static = run.session.static_roles(self.world.layers["content"], self.world.layers["style"])
        roles = role_rows(run.controller.plan, static)(step)
        modes = {lid: t.mode for lid, t in self.adapter._targets.items()}
        host = self.host_states[-1]
        for lid in UNET_SHAPES:
            role = roles.get(lid)
            want = self.world.expected(lid, role, wc=self.wc, ws=self.ws, prompt=self.prompt)
            what = f"{lid} step {step} role {role}"
            if modes.get(lid, "A") == "A":
                assert_close(self.world.live()[param_key(lid)], want, f"weight of {what}")
                ref = self.world.reference_output(lid, want)
            else:
                # (B): the host's (possibly quantized) weight is untouched; the hook adds exactly the correction
                assert torch.equal(self.world.live()[param_key(lid)], host[param_key(lid)]), what
                hosted = self.world.expected(lid, CONTENT, wc=self.wc, ws=self.ws, prompt=self.prompt)
                effective = host[param_key(lid)].float()
                if self.online and lid in self.world.layers["content"]:
                    effective = effective + self.wc * self.world.delta("content", lid)
                ref = self.world.reference_output(lid, effective + (want - hosted))
            assert_close(self.world.output(lid), ref, f"output of {what}", atol=1e-4)
        kind = "hires" if run.owner.is_hr_pass else "first"
        weights = {k: v.detach().clone() for k, v in self.world.live().items()}
        self.calls.append(Call(kind, step, roles, weights, modes))


def watch_prepare(world: World, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """Snapshots of every weight right after Forge's sampling_prepare (= what the host put there)."""
    states: list[dict[str, torch.Tensor]] = []
    original = world.host.sampling_prepare

    def prepare(unet: Any, x: Any = None) -> None:
        original(unet, x)
        states.append(world.snapshot())

    monkeypatch.setattr(world.host, "sampling_prepare", prepare)
    world.host.modules["backend.sampling.sampling_function"].sampling_prepare = prepare
    return states


def checked_run(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    p: Any,
    *,
    adapter: Any = None,
    **kw: Any,
) -> tuple[Any, Checker]:
    from klora_ext.webui.forge import ForgeAdapter

    args = default_args(**kw)
    adapter = adapter or ForgeAdapter()
    prompt = tuple((n, w) for n, w in p.prompt_loras if n not in (args.content, args.style))  # taken over
    checker = Checker(world, adapter, args.content_weight, args.style_weight, prompt)
    checker.host_states = watch_prepare(world, monkeypatch)
    world.generate(p, [(world.direct(adapter, args), [])], checker)
    return adapter, checker


def assert_equal_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    bad = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not bad, f"not restored exactly: {bad[:3]}"


def no_hooks(world: World) -> bool:
    return all(not m._forward_hooks for m in world.kmodel.modules())


def patches_fingerprint(patcher: Any) -> list:
    """The patches dict by value and by identity of its inner dicts/lists (shared with Forge's cached objects)."""
    return [
        (ident, id(inner), [(key, id(entries), [list(e) for e in entries]) for key, entries in inner.items()])
        for ident, inner in patcher.lora_patches.items()
    ]


def default_args(**kw: Any) -> KLoraArgs:
    base = {"enabled": True, "content": "content", "style": "style", "content_weight": 0.8, "style_weight": 1.1}
    base.update(kw)
    return KLoraArgs(**base)


@pytest.fixture
def forge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[World]:
    import klora_ext.webui as glue

    monkeypatch.setitem(sys.modules, "klora_ext.webui.forge", forge_module)  # one module, one live-edit registry
    monkeypatch.setattr(glue, "forge", forge_module, raising=False)
    monkeypatch.setenv("KLORA_CACHE_PATH", str(tmp_path / "cache" / "scores.json"))
    monkeypatch.setattr(run_module, "_cache", None)
    engine = make_engine(
        [(lid.split(":", 1)[1], shape) for lid, shape in UNET_SHAPES.items()],
        [(lid.split(":", 1)[1], shape) for lid, shape in TE_SHAPES.items()],
    )
    host = FakeForge(engine)
    host.install(monkeypatch.setitem)
    world = World(host, tmp_path)
    unet_ids = list(UNET_SHAPES)
    te_ids = list(TE_SHAPES)
    content = [i for i in unet_ids if i != STYLE_ONLY] + te_ids
    style = [i for i in unet_ids if i != CONTENT_ONLY] + te_ids
    world.add_lora("content", content, rank=2, seed=1, alpha=1.0, scale=2.0)
    world.add_lora("style", style, rank=3, seed=2, alpha=None)
    world.add_lora("other", list(OTHER_LAYERS), rank=2, seed=3, alpha=2.0)
    host.networks.list_available_networks()
    yield world
    for module in {id(m): m for m in (forge_module, sys.modules.get("klora_ext.webui.forge")) if m}.values():
        module._LIVE.restore_all()  # never leak hooks/edits into the next test


def role_rows(plan: Any, static: dict[str, int]) -> Callable[[int], dict[str, int]]:
    """step -> {layer id: role} for every non-text-encoder layer (plan layers + static ones)."""

    def at(step: int) -> dict[str, int]:
        row = plan.row(step)
        roles = {lid: r for lid, r in static.items() if not lid.startswith(("te1:", "te2:"))}
        roles.update({lid: int(r) for lid, r in zip(plan.layer_ids, row)})
        return roles

    return at


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    actual, expected = actual.float(), expected.float()
    if not torch.allclose(actual, expected, atol=atol, rtol=1e-5):
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max abs error {err:.3g} (atol {atol})")


__all__ = [
    "CONTENT_ONLY",
    "OTHER_LAYERS",
    "STYLE_ONLY",
    "Checker",
    "DirectScript",
    "World",
    "assert_close",
    "assert_equal_state",
    "checked_run",
    "default_args",
    "forge",
    "module_path",
    "no_hooks",
    "param_key",
    "patches_fingerprint",
    "role_rows",
    "watch_prepare",
]
