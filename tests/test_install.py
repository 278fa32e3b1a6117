"""install.py (run by the WebUI when it loads the extension): repairs only what is missing, Pillow included, through
the WebUI's own pip helper; never gradio."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def install(monkeypatch):
    spec = importlib.util.spec_from_file_location("klora_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def _launch(monkeypatch):
    calls: list[str] = []
    fake = types.ModuleType("launch")
    fake.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", fake)
    return calls


def test_nothing_missing_installs_nothing(install, monkeypatch):
    calls = _launch(monkeypatch)
    install.main()
    assert calls == []


def test_missing_pillow_is_installed_with_the_webui_pip(install, monkeypatch):
    _hide(monkeypatch, "PIL")
    calls = _launch(monkeypatch)
    assert install.missing_packages() == ["pillow"]
    install.main()
    assert calls == ["install pillow"]


def test_outside_the_webui_it_only_says_what_to_install(install, monkeypatch, capsys):
    _hide(monkeypatch, "PIL", "safetensors")
    monkeypatch.setitem(sys.modules, "launch", None)  # import launch -> ImportError
    install.main()
    out = capsys.readouterr().out
    assert out.startswith("[K-LoRA]") and "pillow" in out and "safetensors" in out


def test_gradio_and_torch_are_never_installed(install):
    assert not {"gradio", "torch"} & set(install.REQUIRED.values())
