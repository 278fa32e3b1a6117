"""The real shared Script (scripts/klora.py -> klora_ext.webui.script) on the fake Forge: adapter detection, both API
argument forms, XYZ cells, infotext, hires and error handling take the same path as on A1111; only what differs on
Forge is checked here (the per-step weights, Forge's double hook call, the legacy-Forge refusal)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from klora_ext.args import FIELDS, KLoraArgs
from klora_ext.errors import KLoraError
from tests.fakes.forge.fixture import Checker, World, assert_equal_state, no_hooks, watch_prepare

pytest_plugins = ["tests.fakes.forge.fixture"]  # the `forge` fixture

REPO = Path(__file__).resolve().parents[1]
GLUE = (
    "klora_ext.webui.script",
    "klora_ext.webui.a1111",
    "klora_ext.webui.ui",
    "klora_ext.webui.xyz",
    "klora_ext.webui.api",
    "klora_ext.webui.forge",
    "klora.py",
)
ARGS = {"enabled": True, "content": "content", "style": "style", "content_weight": 0.8, "style_weight": 1.1}


class Loaded:
    """The extension as the WebUI loads it: scripts/klora.py imported, one Script instance with its args slice."""

    def __init__(self, world: World) -> None:
        self.world = world
        spec = importlib.util.spec_from_file_location("klora.py", REPO / "scripts" / "klora.py")
        self.entry = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.entry)
        self.module = sys.modules["klora_ext.webui.script"]
        self.script = self.entry.Script()
        self.script.filename = str(REPO / "scripts" / "klora.py")
        self.script.args_from, self.script.args_to = 0, len(FIELDS)

    @property
    def adapter(self) -> Any:
        return self.module.get_adapter()

    def run(self, p: Any, args: list[Any], probe: Any = None) -> Any:
        return self.world.generate(p, [(self.script, args)], probe)

    def checked(self, p: Any, args: list[Any], monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Checker, Any]:
        values = KLoraArgs.from_script_args(args).replace(**kw) if kw else KLoraArgs.from_script_args(args)
        checker = Checker(self.world, self.adapter, values.content_weight, values.style_weight)
        checker.host_states = watch_prepare(self.world, monkeypatch)
        return checker, self.run(p, args, checker)


@pytest.fixture
def loaded(forge: World, monkeypatch: pytest.MonkeyPatch) -> Loaded:
    for name in GLUE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    import klora_ext.webui as glue

    for attr in ("script", "a1111", "ui", "xyz", "api", "forge"):
        monkeypatch.delitem(glue.__dict__, attr, raising=False)
    return Loaded(forge)


def positional(**kw: Any) -> list[Any]:
    return KLoraArgs(**{**ARGS, **kw}).to_positional()


def test_script_picks_the_forge_adapter(loaded: Loaded) -> None:
    adapter = loaded.adapter
    assert type(adapter).__name__ == "ForgeAdapter" and adapter.name == "forge"
    assert loaded.module.host_info() == {"host": "forge", "disabled_reason": None}
    assert loaded.module.list_loras() == ["content", "other", "style"]
    callbacks = loaded.world.host.callbacks
    assert loaded.module.on_cfg_denoiser in callbacks["cfg_denoiser"]
    assert loaded.module.on_script_unloaded in callbacks["script_unloaded"]


@pytest.mark.parametrize("form", ["positional", "short positional", "dict"])
def test_api_argument_forms_and_infotext(loaded: Loaded, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    args = {
        "positional": positional(),
        "short positional": [True, "content", 0.8, "style", 1.1],  # API callers often send only the first few
        "dict": [dict(ARGS)],
    }[form]
    p = loaded.world.txt2img(steps=6)
    checker, processed = loaded.checked(p, args, monkeypatch)
    assert len(checker.calls) == 6
    info = p.extra_generation_params
    assert info["K-LoRA"] == "v1" and info["K-LoRA content"] == "content" and info["K-LoRA style"] == "style"
    assert info["K-LoRA content hash"] == "01" * 6 and info["K-LoRA style hash"] == "02" * 6
    assert info["K-LoRA content weight"] == "0.8" and info["K-LoRA style weight"] == "1.1"
    assert KLoraArgs.from_infotext(info) == KLoraArgs(**ARGS)  # paste-back gives the same arguments
    assert loaded.adapter.run is None and no_hooks(loaded.world)
    assert_equal_state(loaded.world.snapshot(), checker.host_states[-1])


def test_xyz_cell_values_apply_on_forge(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    from klora_ext.webui import xyz

    p = loaded.world.txt2img(steps=5)
    xyz.make_apply("method")(p, "merge", None)
    xyz.make_apply("alpha")(p, "2.5", None)
    checker, _ = loaded.checked(p, positional(enabled=False), monkeypatch, method="merge", alpha=2.5, enabled=True)
    assert len(checker.calls) == 5  # an XYZ axis turns K-LoRA on for the cell
    assert {r for c in checker.calls for r in c.roles.values()} == {2, 1, 0}  # merge: BOTH (shared), own roles
    assert p.extra_generation_params["K-LoRA method"] == "merge"
    assert p.extra_generation_params["K-LoRA alpha"] == "2.5"


def test_hires_through_the_script(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    p = loaded.world.txt2img(steps=6, enable_hr=True, hr_steps=6, denoising_strength=0.5)
    checker, _ = loaded.checked(p, positional(hires="continue"), monkeypatch)
    assert [c.kind for c in checker.calls] == ["first"] * 6 + ["hires"] * 4
    assert loaded.world.kmodel.lora_loader.merges == 1
    assert_equal_state(loaded.world.snapshot(), checker.host_states[-1])


def test_disabled_after_enabled_equals_never_enabled(loaded: Loaded) -> None:
    seen: list[dict[str, torch.Tensor]] = []
    grab = lambda d: seen.append(loaded.world.snapshot())  # noqa: E731
    first = loaded.world.txt2img(steps=3, prompt_loras=[("other", 0.7)])
    loaded.run(first, positional(enabled=False), grab)
    never, never_c = seen[-1], first.c.clone()
    loaded.run(loaded.world.txt2img(steps=3, prompt_loras=[("other", 0.7)]), positional())
    again = loaded.world.txt2img(steps=3, prompt_loras=[("other", 0.7)])
    loaded.run(again, positional(enabled=False), grab)
    assert_equal_state(seen[-1], never)
    assert torch.equal(again.c, never_c)


def test_unknown_lora_stops_with_suggestions(loaded: Loaded) -> None:
    p = loaded.world.txt2img(steps=3)
    before = loaded.world.snapshot()
    with pytest.raises(KLoraError, match=r"'stlye' not found.*did you mean 'style'"):
        loaded.run(p, positional(style="stlye"))
    assert any("did you mean 'style'" in c for c in p.comments)
    assert loaded.world.host.state.interrupted  # the WebUI stops before the first step
    assert_equal_state(loaded.world.snapshot(), before)


def test_failure_during_sampling_continues_without_k_lora(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    class Rogue:  # another extension that replaces the UNet patcher after K-LoRA prepared it
        def process_before_every_sampling(self, p: Any, *args: Any, **kw: Any) -> None:
            p.sd_model.forge_objects.unet = p.sd_model.forge_objects_after_applying_lora.unet.clone()

    states = watch_prepare(loaded.world, monkeypatch)
    p = loaded.world.txt2img(steps=4)
    calls: list[int] = []
    loaded.world.generate(p, [(loaded.script, positional()), (Rogue(), [])], lambda d: calls.append(d.step))
    assert calls == [0, 1, 2, 3]  # the image is still made
    assert "another extension replaced the UNet patcher" in p.extra_generation_params["K-LoRA skipped"]
    assert loaded.adapter.run is None
    assert_equal_state(loaded.world.snapshot(), states[-1])


def test_script_unload_restores(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    states = watch_prepare(loaded.world, monkeypatch)

    def unload_mid_run(d: Any) -> None:
        if d.step == 2:
            loaded.world.host.unload_scripts()  # e.g. "Reload UI" while generating

    loaded.run(loaded.world.txt2img(steps=5), positional(), unload_mid_run)
    assert loaded.adapter.run is None
    assert_equal_state(loaded.world.snapshot(), states[-1])


def test_legacy_forge_is_refused_with_what_is_supported(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old Forge / reForge main: ldm_patched, no backend/, and A1111's Lora hook names as inert stubs."""
    for name in [n for n in sys.modules if n == "backend" or n.startswith("backend.")]:
        monkeypatch.setitem(sys.modules, name, None)
    legacy = types.ModuleType("ldm_patched")
    legacy.__spec__ = importlib.machinery.ModuleSpec("ldm_patched", None)
    monkeypatch.setitem(sys.modules, "ldm_patched", legacy)
    networks = sys.modules["networks"]
    monkeypatch.setattr(networks, "network_apply_weights", lambda *a: None, raising=False)  # a stub, as in old Forge
    adapter, reason = loaded.module.detect_adapter()
    assert adapter is None and "ldm_patched" in reason and "AUTOMATIC1111" in reason
    loaded.module.STATE.detected = False
    p = loaded.world.txt2img(steps=2)
    with pytest.raises(KLoraError, match="ldm_patched"):
        loaded.run(p, positional())
    loaded.world.host.state.interrupted = False
    loaded.run(loaded.world.txt2img(steps=2), positional(enabled=False))  # disabled: the WebUI works as usual
