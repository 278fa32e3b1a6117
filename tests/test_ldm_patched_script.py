"""The real shared Script (scripts/klora.py) on the fake ldm_patched hosts: it picks LdmPatchedAdapter, runs a
generation with per-step switching, writes its infotext and leaves the model as the host alone would."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from klora_ext.args import FIELDS, KLoraArgs
from klora_ext.webui import ldm_patched as ldm_module
from tests.fakes.forge.fixture import Checker, assert_equal_state
from tests.test_ldm_patched_adapter import FLAVOURS, _make_world

REPO = Path(__file__).resolve().parents[1]
GLUE = (
    "klora_ext.webui.script",
    "klora_ext.webui.a1111",
    "klora_ext.webui.ui",
    "klora_ext.webui.xyz",
    "klora_ext.webui.api",
    "klora.py",
)
ARGS = {"enabled": True, "content": "content", "style": "style", "content_weight": 0.8, "style_weight": 1.1}


@pytest.fixture(params=FLAVOURS)
def loaded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    world = _make_world(monkeypatch, tmp_path, request.param)
    for name in GLUE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    import klora_ext.webui as glue

    for attr in ("script", "a1111", "ui", "xyz", "api"):
        monkeypatch.delitem(glue.__dict__, attr, raising=False)
    spec = importlib.util.spec_from_file_location("klora.py", REPO / "scripts" / "klora.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    script = entry.Script()
    script.filename = str(REPO / "scripts" / "klora.py")
    script.args_from, script.args_to = 0, len(FIELDS)
    yield world, sys.modules["klora_ext.webui.script"], script
    ldm_module._LIVE.restore_all()


def positional(**kw: Any) -> list[Any]:
    return KLoraArgs(**{**ARGS, **kw}).to_positional()


def test_script_picks_the_ldm_patched_adapter(loaded: Any) -> None:
    _, module, _ = loaded
    adapter = module.get_adapter()
    assert type(adapter).__name__ == "LdmPatchedAdapter" and adapter.name == "ldm_patched"
    assert module.STATE.reason is None
    assert module.host_info() == {"host": "ldm_patched", "disabled_reason": None}


def test_generation_through_the_script(loaded: Any) -> None:
    world, module, script = loaded
    adapter = module.get_adapter()
    checker = Checker(world, adapter, 0.8, 1.1)
    checker.host_states = [world.pristine]
    p = world.txt2img(steps=6)
    world.generate(p, [(script, positional())], checker)
    assert len(checker.calls) == 6
    assert p.extra_generation_params.get("K-LoRA") and "K-LoRA skipped" not in p.extra_generation_params
    assert module.STATE.last_plan is not None and module.STATE.last_error is None
    assert adapter.run is None
    assert_equal_state(world.snapshot(), world.pristine)


def test_disabled_script_never_touches_the_model(loaded: Any) -> None:
    world, module, script = loaded
    seen: list[dict[str, torch.Tensor]] = []
    world.generate(
        world.txt2img(steps=3),
        [(script, positional(enabled=False))],
        lambda d: seen.append({k: v.clone() for k, v in world.kmodel.named_parameters()}),
    )
    pristine = {k: v for k, v in world.pristine.items() if k.startswith("diffusion_model.")}
    for state in seen:
        assert_equal_state(state, pristine)
    assert not ldm_module._LIVE.installed and not ldm_module._LIVE.swaps


def test_error_during_sampling_is_reported_and_restored(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world, module, script = loaded
    adapter = module.get_adapter()

    def broken(self: Any, layer_id: str) -> None:
        raise RuntimeError("simulated host change")

    world.generate(world.txt2img(steps=3), [(script, positional())])  # warm: a first run works
    monkeypatch.setattr(type(adapter), "_apply", broken)
    p = world.txt2img(steps=3)
    world.generate(p, [(script, positional())])
    assert "simulated host change" in p.extra_generation_params.get("K-LoRA skipped", "")
    assert adapter.run is None
    assert_equal_state(world.snapshot(), world.pristine)
