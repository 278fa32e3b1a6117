"""Forge Neo on the fake Forge host: the Forge adapter serves it unchanged, except Nunchaku checkpoints, which K-LoRA
refuses with a message naming what it supports (``klora_ext/webui/neo.py`` has the comparison of the two trees)."""

from __future__ import annotations

import pytest

from klora_ext.errors import KLoraError
from klora_ext.webui import neo
from klora_ext.webui.forge import ForgeAdapter
from tests.fakes.forge.fixture import World, assert_equal_state, checked_run

pytest_plugins = ["tests.fakes.forge.fixture"]  # the `forge` fixture


def test_no_reason_on_upstream_forge_or_a_plain_neo_checkpoint(forge: World) -> None:
    assert "nunchaku" not in forge.host.dynamic_args
    assert neo.unsupported_model_reason() is None
    forge.host.dynamic_args["nunchaku"] = False  # what Neo's loader sets for a non-Nunchaku checkpoint
    assert neo.unsupported_model_reason() is None


def test_no_reason_without_forge_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "backend.args", None)
    assert neo.unsupported_model_reason() is None


def test_nunchaku_checkpoint_is_refused_before_anything_is_touched(
    forge: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    forge.host.dynamic_args["nunchaku"] = True
    with pytest.raises(KLoraError, match="Nunchaku") as info:
        checked_run(forge, monkeypatch, forge.txt2img(steps=3), adapter=ForgeAdapter())
    assert "fp32/fp16/bf16" in str(info.value)
    assert_equal_state(forge.snapshot(), forge.pristine)


def test_neo_plain_checkpoint_switches_as_on_forge(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    forge.host.dynamic_args["nunchaku"] = False
    adapter, checker = checked_run(forge, monkeypatch, forge.txt2img(steps=4))
    assert len(checker.calls) == 4 and adapter.run is None
