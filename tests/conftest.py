"""Shared fixtures. ``webui`` installs the fake AUTOMATIC1111 host (tests/fakes/a1111) into ``sys.modules`` for one
test and removes it afterwards, together with K-LoRA's host-glue modules that imported it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKE_A1111 = Path(__file__).parent / "fakes" / "a1111"
_HOST_MODULES = (
    "modules",
    "networks",
    "network",
    "network_lora",
    "network_lyco",
    "extra_networks_lora",
    "gradio",
    "xyz_grid",
    "fakehost",
    "klora.py",
)
_GLUE_MODULES = (
    "klora_ext.webui.script",
    "klora_ext.webui.a1111",
    "klora_ext.webui.ui",
    "klora_ext.webui.xyz",
    "klora_ext.webui.api",
    "klora_ext.webui.forge",
)


def _purge() -> None:
    for name in list(sys.modules):
        root = name.split(".", 1)[0]
        if root in _HOST_MODULES or name in _HOST_MODULES or name in _GLUE_MODULES:
            del sys.modules[name]
    import klora_ext.webui as glue

    for attr in ("script", "a1111", "ui", "xyz", "api", "forge"):
        glue.__dict__.pop(attr, None)


@pytest.fixture
def fake_a1111(monkeypatch, tmp_path):
    """The fake host's modules on sys.path (nothing built yet); cleaned up after the test."""
    _purge()
    monkeypatch.syspath_prepend(str(FAKE_A1111))
    monkeypatch.setenv("KLORA_CACHE_PATH", str(tmp_path / "klora-cache" / "scores.json"))
    from klora_ext.webui import run

    monkeypatch.setattr(run, "_cache", None)
    yield FAKE_A1111
    _purge()


@pytest.fixture
def webui(fake_a1111, tmp_path):
    """A fake A1111 WebUI with the real K-LoRA Script loaded from scripts/klora.py, a tiny model and three LoRAs."""
    import fakehost

    return fakehost.FakeHost(tmp_path)


class Expect:
    """Expected layer weights computed straight from the LoRA files (up @ down * alpha / rank), independent of the
    host and of K-LoRA's adapter; roles come from the core's plan for the same arguments."""

    def __init__(self, host):
        from safetensors.torch import load_file

        self.host = host
        self.deltas = {}
        for key, path in host.files().items():
            sd = load_file(path)
            per_module: dict[str, dict] = {}
            for full, tensor in sd.items():
                module, _, part = full.partition(".")
                per_module.setdefault(module, {})[part] = tensor
            out = {}
            for module, parts in per_module.items():
                up, down = parts["lora_up.weight"], parts["lora_down.weight"]
                rank = down.shape[0]
                scale = parts["alpha"].item() / rank if "alpha" in parts else 1.0
                if down.dim() == 4:
                    delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
                else:
                    delta = up @ down
                out[self.a1111_name_of_kohya(module)] = delta * scale
            self.deltas[key] = out

    @staticmethod
    def a1111_name_of_kohya(module: str) -> str:
        if module.startswith("lora_unet_"):
            return "diffusion_model_" + module[len("lora_unet_") :]
        return "transformer_" + module[len("lora_te1_") :]  # the fake model is SD1-like

    @staticmethod
    def a1111_name(layer_id: str) -> str:
        component, path = layer_id.split(":", 1)
        prefix = "diffusion_model_" if component == "unet" else "transformer_"
        return prefix + path.replace(".", "_")

    def scores(self):
        from klora_ext.lora_file import read_lora
        from klora_ext.scoring import compute_scores

        files = self.host.files()
        return compute_scores(read_lora(files["content"]), read_lora(files["style"]))

    def roles(self, args, plan, step) -> dict[str, int]:
        """A1111 layer name -> role (STYLE/CONTENT/BOTH/NONE) at ``step`` of ``plan``, static layers included."""
        from klora_ext.runtime import static_role

        row = plan.row(step)
        out = {self.a1111_name(i): int(r) for i, r in zip(plan.layer_ids, row)}
        content, style = self.deltas["content"], self.deltas["style"]
        for name in set(content) | set(style):
            if name in out:
                continue
            layer_id = ("unet:" if name.startswith("diffusion_model_") else "te1:") + name
            out[name] = static_role(layer_id, name in content, name in style, args)
        return out

    def weights(self, roles, *, prompt=(), wc=1.0, ws=1.0):
        """name -> expected weight: base, then the prompt LoRAs, then content and style (the builtin's list order)."""
        from klora_ext.runtime import BOTH, CONTENT, STYLE

        out = {}
        for name, base in self.host.pristine.items():
            w = base.clone()
            for key, strength in prompt:
                if name in self.deltas[key]:
                    w = w + self.deltas[key][name] * strength
            role = roles.get(name)
            if role in (CONTENT, BOTH) and name in self.deltas["content"]:
                w = w + self.deltas["content"][name] * wc
            if role in (STYLE, BOTH) and name in self.deltas["style"]:
                w = w + self.deltas["style"][name] * ws
            out[name] = w
        return out

    def contributors(self, name, roles, prompt=()) -> int:
        """How many calc_updown calls a re-merge of ``name`` makes."""
        from klora_ext.runtime import BOTH, CONTENT, STYLE

        n = sum(1 for key, _ in prompt if name in self.deltas[key])
        role = roles.get(name)
        n += role in (CONTENT, BOTH) and name in self.deltas["content"]
        n += role in (STYLE, BOTH) and name in self.deltas["style"]
        return int(n)


@pytest.fixture
def expect(webui):
    return Expect(webui)


def assert_weights(actual: dict, expected: dict, *, where: str = "") -> None:
    import torch

    for name, want in expected.items():
        got = actual[name]
        assert torch.allclose(
            got, want, rtol=0, atol=1e-6
        ), f"{where}: layer {name} differs by {(got - want).abs().max()}"
