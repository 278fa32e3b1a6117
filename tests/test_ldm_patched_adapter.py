"""LdmPatchedAdapter (reForge main / Forge Classic) against the fake ldm_patched hosts, both patcher flavours.

Weights are checked at every model evaluation against an independent computation from the files' raw tensors
(``World.expected``), and after each generation against what the host itself holds without K-LoRA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from klora_ext.errors import KLoraError
from klora_ext.plan import CONTENT, STYLE
from klora_ext.webui import forge as forge_module
from klora_ext.webui import ldm_patched as ldm_module
from klora_ext.webui import run as run_module
from klora_ext.webui.ldm_patched import LdmPatchedAdapter
from tests.fakes.forge.fixture import (
    CONTENT_ONLY,
    OTHER_LAYERS,
    STYLE_ONLY,
    TE_SHAPES,
    UNET_SHAPES,
    Checker,
    World,
    assert_equal_state,
    default_args,
    param_key,
)
from tests.fakes.ldm_patched.host import FakeLdmPatched, make_engine

FLAVOURS = ("classic", "reforge")


def _make_world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flavour: str) -> World:
    monkeypatch.setitem(sys.modules, "klora_ext.webui.ldm_patched", ldm_module)
    monkeypatch.setitem(sys.modules, "klora_ext.webui.forge", forge_module)
    monkeypatch.setenv("KLORA_CACHE_PATH", str(tmp_path / "cache" / "scores.json"))
    monkeypatch.setattr(run_module, "_cache", None)
    engine = make_engine(
        [(lid.split(":", 1)[1], shape) for lid, shape in UNET_SHAPES.items()],
        [(lid.split(":", 1)[1], shape) for lid, shape in TE_SHAPES.items()],
        flavour=flavour,
    )
    host = FakeLdmPatched(engine, flavour)
    host.install(monkeypatch.setitem)
    world = World(host, tmp_path)
    unet_ids, te_ids = list(UNET_SHAPES), list(TE_SHAPES)
    world.add_lora("content", [i for i in unet_ids if i != STYLE_ONLY] + te_ids, rank=2, seed=1, alpha=1.0, scale=2.0)
    world.add_lora("style", [i for i in unet_ids if i != CONTENT_ONLY] + te_ids, rank=3, seed=2, alpha=None)
    world.add_lora("other", list(OTHER_LAYERS), rank=2, seed=3, alpha=2.0)
    host.networks.list_available_networks()
    return world


@pytest.fixture(params=FLAVOURS)
def ldm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[World]:
    world = _make_world(monkeypatch, tmp_path, request.param)
    yield world
    ldm_module._LIVE.restore_all()  # never leak installed weights into the next test


@pytest.fixture
def reforge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[World]:
    world = _make_world(monkeypatch, tmp_path, "reforge")
    yield world
    ldm_module._LIVE.restore_all()


def unet_state(world: World) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in world.kmodel.named_parameters()}


def host_reference(world: World, p: Any) -> list[dict[str, torch.Tensor]]:
    """The UNet weights at each model evaluation of a generation without K-LoRA (what the host alone does)."""
    seen: list[dict[str, torch.Tensor]] = []
    world.generate(p, [], lambda denoiser: seen.append(unet_state(world)))
    return seen


def checked(world: World, p: Any, adapter: LdmPatchedAdapter | None = None, **kw: Any) -> tuple[Any, Checker]:
    args = default_args(**kw)
    adapter = adapter or LdmPatchedAdapter()
    prompt = tuple((n, w) for n, w in p.prompt_loras if n not in (args.content, args.style))
    checker = Checker(world, adapter, args.content_weight, args.style_weight, prompt)
    checker.host_states = [world.pristine]
    world.generate(p, [(world.direct(adapter, args), [])], checker)
    return adapter, checker


def flipped_layers(checker: Checker) -> set[str]:
    out: set[str] = set()
    for a, b in zip(checker.calls, checker.calls[1:]):
        if a.kind == b.kind:
            out.update(lid for lid, r in b.roles.items() if a.roles.get(lid) != r)
    return out


# ---------------------------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------------------------


def test_detects_both_flavours_and_not_forge2(ldm: World) -> None:
    assert LdmPatchedAdapter.detect() is True
    assert forge_module.host_kind() == "forge-legacy"  # the Forge adapter would refuse this host


def test_not_detected_without_the_patcher(ldm: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ldm_patched.modules.model_patcher", None)
    monkeypatch.delattr(sys.modules["ldm_patched.modules"], "model_patcher")
    assert LdmPatchedAdapter.detect() is False


# ---------------------------------------------------------------------------------------------------------------
# switching
# ---------------------------------------------------------------------------------------------------------------


def test_every_step_matches_the_plan_and_restores_exactly(ldm: World) -> None:
    adapter, checker = checked(ldm, ldm.txt2img(steps=8))
    assert len(checker.calls) == 8
    assert flipped_layers(checker), "the plan switched no layer: the test would prove nothing"
    assert adapter.run is None
    assert_equal_state(ldm.snapshot(), ldm.pristine)
    assert not ldm_module._LIVE.installed and not ldm_module._LIVE.swaps


def test_only_the_flipping_layers_are_recomputed(ldm: World) -> None:
    adapter = LdmPatchedAdapter()
    computed: list[list[str]] = []
    calc = adapter._calc

    def spy(*a: Any) -> Any:
        computed[-1].append(a[-1])  # the param key
        return calc(*a)

    adapter._calc = spy
    # registered before the adapter's own callback (world.direct), so it opens each call's list first
    ldm.host.modules["modules.script_callbacks"].on_cfg_denoiser(lambda params: computed.append([]))
    _, checker = checked(ldm, ldm.txt2img(steps=8), adapter)
    assert len(computed) == len(checker.calls) == 8
    assert len(computed[0]) > 40  # the first call brings every layer to its role
    key_of = {lid: param_key(lid) for lid in UNET_SHAPES}
    for before, after, keys in zip(checker.calls, checker.calls[1:], computed[1:]):
        flips = {key_of[lid] for lid, r in after.roles.items() if before.roles.get(lid) != r}
        assert sorted(keys) == sorted(flips)
    assert any(computed[1:]), "no layer flipped after the first step: the test would prove nothing"


def test_content_role_is_bit_identical_to_the_hosts_own_merge(ldm: World) -> None:
    wc = 0.8
    host = host_reference(ldm, ldm.txt2img(steps=3, prompt_loras=[("content", wc)]))
    mine: list[dict[str, torch.Tensor]] = []
    adapter = LdmPatchedAdapter()
    args = default_args(method="content-only", content_weight=wc)
    ldm.generate(ldm.txt2img(steps=3), [(ldm.direct(adapter, args), [])], lambda d: mine.append(unet_state(ldm)))
    assert len(mine) == len(host) == 3
    for key in host[0]:
        assert torch.equal(mine[0][key], host[0][key]), key


def test_prompt_copies_are_taken_over_and_other_loras_kept(ldm: World) -> None:
    prompt = [("content", 0.5), ("other", 0.7), ("style", 0.3)]
    before = host_reference(ldm, ldm.txt2img(steps=4, prompt_loras=prompt))
    adapter = LdmPatchedAdapter()
    notes: list[str] = []
    ldm.host.probes.append(lambda d: notes.extend(adapter.run.notes if adapter.run else []))
    try:
        checked(ldm, ldm.txt2img(steps=4, prompt_loras=prompt), adapter)
    finally:
        ldm.host.probes.pop()
    assert any("content LoRA 'content' is also in the prompt" in n for n in notes)
    assert any("style LoRA 'style' is also in the prompt" in n for n in notes)
    after = host_reference(ldm, ldm.txt2img(steps=4, prompt_loras=prompt))
    for a, b in zip(before, after):
        assert_equal_state(b, a)
    assert_equal_state(host_reference(ldm, ldm.txt2img(steps=2))[0], unet_state_of(ldm.pristine))


def unet_state_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("diffusion_model.")}


def test_hires_pass_switches_again_and_restores(ldm: World) -> None:
    _, checker = checked(ldm, ldm.txt2img(steps=6, enable_hr=True, hr_steps=6, denoising_strength=0.5))
    kinds = {c.kind for c in checker.calls}
    assert kinds == {"first", "hires"}
    assert_equal_state(ldm.snapshot(), ldm.pristine)


def test_img2img_and_second_order(ldm: World) -> None:
    _, checker = checked(ldm, ldm.img2img(steps=10, denoising_strength=0.6, second_order=True))
    assert checker.calls
    assert_equal_state(ldm.snapshot(), ldm.pristine)


def test_text_encoder_gets_the_static_sides_and_is_restored(ldm: World) -> None:
    conds: list[torch.Tensor] = []
    p = ldm.txt2img(steps=2)
    ldm.generate(p, [])
    plain = p.c.clone()
    q = ldm.txt2img(steps=2)
    adapter = LdmPatchedAdapter()
    ldm.generate(q, [(ldm.direct(adapter, default_args(te_policy="both")), [])])
    conds.append(q.c.clone())
    assert not torch.equal(conds[0], plain), "the text-encoder LoRAs changed nothing"
    r = ldm.txt2img(steps=2)
    ldm.generate(r, [])
    assert torch.equal(r.c, plain)
    assert_equal_state(ldm.snapshot(), ldm.pristine)


def test_unet_only_style_lora_in_the_prompt_keeps_the_text_encoder_policy(ldm: World) -> None:
    """reForge's load_lora_for_models returns a CLIP clone even for a LoRA with no text-encoder keys (Classic's
    fake does too): a UNet-only style LoRA in the prompt has nothing to strip on the CLIP side, so the content's
    text-encoder part is applied exactly as without the prompt copy (seen live on reForge: K-LoRA's TE entries were
    dropped by a "cannot tell its patches apart" error)."""
    ldm.add_lora("style_unet", [i for i in UNET_SHAPES if i != CONTENT_ONLY], rank=3, seed=4, alpha=None)
    ldm.host.networks.list_available_networks()
    args = {"style": "style_unet", "te_policy": "both"}
    plain = ldm.txt2img(steps=2)
    ldm.generate(plain, [(ldm.direct(LdmPatchedAdapter(), default_args(**args)), [])])
    adapter = LdmPatchedAdapter()
    te_clone_seen: list[bool] = []
    ldm.host.probes.append(lambda d: te_clone_seen.append(adapter._te_clone is not None))
    try:
        copy = ldm.txt2img(steps=2, prompt_loras=[("style_unet", 0.4)])
        ldm.generate(copy, [(ldm.direct(adapter, default_args(**args)), [])])
    finally:
        ldm.host.probes.pop()
    assert te_clone_seen and all(te_clone_seen)
    assert torch.equal(copy.c, plain.c)  # the content's TE delta, the prompt copy taken over
    assert_equal_state(ldm.snapshot(), ldm.pristine)


# ---------------------------------------------------------------------------------------------------------------
# errors, interrupts, unloads
# ---------------------------------------------------------------------------------------------------------------


def test_exception_during_sampling_is_cleaned_up_by_the_next_generation(ldm: World) -> None:
    adapter = LdmPatchedAdapter()

    def boom(denoiser: Any) -> None:
        if denoiser.step == 3:
            raise RuntimeError("sampler failed")

    with pytest.raises(RuntimeError, match="sampler failed"):
        ldm.generate(ldm.txt2img(steps=6), [(ldm.direct(adapter, default_args()), [])], boom)
    assert ldm_module._LIVE.installed, "K-LoRA had installed nothing: the test would prove nothing"
    # postprocess never ran; the next generation (K-LoRA off) starts with disarm(None)
    seen = []
    ldm.generate(
        ldm.txt2img(steps=2),
        [(ldm.direct(adapter, default_args(enabled=False)), [])],
        lambda d: seen.append(unet_state(ldm)),
    )
    assert_equal_state(seen[0], unet_state_of(ldm.pristine))
    assert_equal_state(ldm.snapshot(), ldm.pristine)


def test_interrupt_restores(ldm: World) -> None:
    adapter = LdmPatchedAdapter()

    def stop(denoiser: Any) -> None:
        if denoiser.step == 2:
            ldm.host.state.interrupt()

    ldm.generate(ldm.txt2img(steps=6), [(ldm.direct(adapter, default_args()), [])], stop)
    assert adapter.run is None
    assert_equal_state(ldm.snapshot(), ldm.pristine)


def test_host_unload_mid_sampling_is_not_undone(ldm: World) -> None:
    """The host unpatches (puts its backups back) while K-LoRA's weights are in: restore must not re-install the
    host's stale merged Parameters, nor leave any of K-LoRA's."""
    adapter = LdmPatchedAdapter()
    prompt = [("other", 0.7)]

    def unload(denoiser: Any) -> None:
        if denoiser.step == 2:
            ldm.host.unload_all()

    ldm.generate(ldm.txt2img(steps=5, prompt_loras=prompt), [(ldm.direct(adapter, default_args()), [])], unload)
    assert_equal_state(ldm.snapshot(), ldm.pristine)  # unloaded: the originals, nothing of K-LoRA's


def test_low_vram_partial_load_is_refused_with_a_message(reforge: World) -> None:
    reforge.host.lowvram = True
    adapter = LdmPatchedAdapter()
    p = reforge.txt2img(steps=4, prompt_loras=[("other", 0.7)])
    with pytest.raises(KLoraError, match="low-VRAM"):
        reforge.generate(p, [(reforge.direct(adapter, default_args()), [])])
    assert adapter.run is None
    assert not ldm_module._LIVE.installed and not ldm_module._LIVE.swaps


def test_roles_follow_content_and_style_weights(ldm: World) -> None:
    """A hand-checked layer: content-only layer at CONTENT, style-only layer at STYLE (static roles)."""
    _, checker = checked(ldm, ldm.txt2img(steps=3), content_weight=0.6, style_weight=1.3)
    first = checker.calls[0]
    assert first.roles[CONTENT_ONLY] == CONTENT and first.roles[STYLE_ONLY] == STYLE
    key = param_key(STYLE_ONLY)
    want = ldm.pristine[key] + 1.3 * ldm.delta("style", STYLE_ONLY)
    assert torch.allclose(first.weights[key], want, atol=1e-6)
