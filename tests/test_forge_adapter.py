"""ForgeAdapter against the fake Forge surface, driven through the adapter_base call sequence."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

from klora_ext.errors import KLoraError
from klora_ext.plan import CONTENT, NONE, STYLE
from klora_ext.webui import forge as forge_module
from klora_ext.webui.forge import LEGACY_MESSAGE, ForgeAdapter, host_kind
from tests.fakes.forge.fixture import (
    CONTENT_ONLY,
    STYLE_ONLY,
    TE_SHAPES,
    UNET_SHAPES,
    Checker,
    World,
    assert_close,
    assert_equal_state,
    checked_run,
    default_args,
    no_hooks,
    param_key,
    patches_fingerprint,
    watch_prepare,
)
from tests.fakes.forge.host import FakeGGUF, make_engine

pytest_plugins = ["tests.fakes.forge.fixture"]  # the `forge` fixture

UNET = list(UNET_SHAPES)
TE = list(TE_SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# detection and names
# ---------------------------------------------------------------------------------------------------------------


def test_detect_current_forge(forge: World) -> None:
    assert ForgeAdapter.detect() is True
    assert ForgeAdapter.unsupported_reason() is None
    assert host_kind() == "forge2"


def test_detect_legacy_and_a1111(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "backend" or n.startswith("backend.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails like on A1111 / old Forge
    assert ForgeAdapter.detect() is False
    assert ForgeAdapter.unsupported_reason() is None  # A1111: not ours to complain about
    legacy = types.ModuleType("ldm_patched")
    legacy.__spec__ = importlib.machinery.ModuleSpec("ldm_patched", None)
    monkeypatch.setitem(sys.modules, "ldm_patched", legacy)
    assert ForgeAdapter.detect() is False
    assert ForgeAdapter.unsupported_reason() == LEGACY_MESSAGE
    assert "ldm_patched" in LEGACY_MESSAGE and "AUTOMATIC1111" in LEGACY_MESSAGE and "f2" in LEGACY_MESSAGE


def test_resolve_names_aliases_and_suggestions(forge: World) -> None:
    adapter = ForgeAdapter()
    assert adapter.list_loras() == ["content", "other", "style"]
    ref = adapter.resolve("content")
    assert ref.path == forge.files["content"] and ref.shorthash == "01" * 6
    assert adapter.resolve("CONTENT").path == forge.files["content"]
    assert adapter.resolve("style(020202020202)").path == forge.files["style"]
    forge.host.add_lora_file("later", forge.files["other"], alias="Later Alias")  # added after the list was built
    assert adapter.resolve("Later Alias").name == "later"
    with pytest.raises(KLoraError, match=r"'contnt' not found.*did you mean 'content'"):
        adapter.resolve("contnt")
    with pytest.raises(KLoraError, match="no LoRA name"):
        adapter.resolve("  ")


# ---------------------------------------------------------------------------------------------------------------
# weights per step, restore, cache
# ---------------------------------------------------------------------------------------------------------------


def test_weights_every_step_and_exact_restore(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    p = forge.txt2img(steps=6, prompt_loras=[("other", 0.7)])
    adapter, checker = checked_run(forge, monkeypatch, p)
    assert len(checker.calls) == 6
    flips = [sum(a.roles[k] != b.roles[k] for k in a.roles) for a, b in zip(checker.calls, checker.calls[1:])]
    assert sum(flips) >= 10  # the pair is not degenerate: many layers flip content -> style during the pass
    assert checker.calls[0].roles[STYLE_ONLY] == STYLE and checker.calls[0].roles[CONTENT_ONLY] == CONTENT
    # exact restore: every weight is what Forge had put there, bit for bit; no hook left
    assert_equal_state(forge.snapshot(), checker.host_states[-1])
    assert no_hooks(forge) and adapter.run is None
    assert forge_module._LIVE.edits == {} and forge_module._LIVE.swaps == []


def test_only_flipped_layers_are_touched(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    p = forge.txt2img(steps=8)
    _, checker = checked_run(forge, monkeypatch, p)
    for before, after in zip(checker.calls, checker.calls[1:]):
        flipped = {param_key(lid) for lid in after.roles if after.roles[lid] != before.roles[lid]}
        changed = {k for k in after.weights if not torch.equal(after.weights[k], before.weights[k])}
        assert changed == flipped, f"step {after.step}"
    assert any(len({k for k in c.roles if c.roles[k] == STYLE}) for c in checker.calls[1:])


def test_forge_merge_cache_is_not_corrupted(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = forge.txt2img(steps=4, prompt_loras=[("other", 0.7)])
    states = watch_prepare(forge, monkeypatch)
    seen: list[dict[str, torch.Tensor]] = []
    forge.generate(plain, [], lambda d: seen.append(forge.snapshot()))
    never_enabled = seen[-1]
    after = forge.engine.forge_objects_after_applying_lora
    before_patches = patches_fingerprint(after.unet)
    before_clip_patches = patches_fingerprint(after.clip.patcher)
    unet_obj, clip_obj = after.unet, after.clip

    p = forge.txt2img(steps=4, prompt_loras=[("other", 0.7), ("style", 0.5)])
    checked_run(forge, monkeypatch, p, te_policy="both")
    loader = forge.kmodel.lora_loader
    assert len(states) == 2
    # Forge's cached objects were never changed in place
    after = forge.engine.forge_objects_after_applying_lora
    assert after.unet is not unet_obj  # the prompt changed (style added): Forge built new objects itself
    assert patches_fingerprint(unet_obj) == before_patches
    assert patches_fingerprint(clip_obj.patcher) == before_clip_patches
    assert any(k[0] == forge.files["style"] for k in after.unet.lora_patches)  # the prompt's style stays Forge's
    for key, saved in loader.backup.items():
        assert torch.equal(saved, forge.pristine[key]), key  # Forge's restore points are the originals
    # disabled after enabled == never enabled, bit for bit
    seen.clear()
    forge.generate(forge.txt2img(steps=4, prompt_loras=[("other", 0.7)]), [], lambda d: seen.append(forge.snapshot()))
    assert_equal_state(seen[-1], never_enabled)


def test_cached_pair_does_not_re_merge(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = forge.kmodel.lora_loader
    adapter = ForgeAdapter()
    for i in range(3):
        p = forge.txt2img(steps=5, prompt_loras=[("other", 0.7)])
        _, checker = checked_run(forge, monkeypatch, p, adapter=adapter)
        assert len(checker.calls) == 5
        assert loader.merges == 1, f"generation {i}: Forge re-merged the LoRAs"


def test_exception_mid_sampling_then_next_job_cleans_up(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    states = watch_prepare(forge, monkeypatch)
    adapter = ForgeAdapter()
    script = forge.direct(adapter, default_args())

    def boom(denoiser: Any) -> None:
        if denoiser.step == 3:
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        forge.generate(forge.txt2img(steps=6), [(script, [])], boom)
    assert adapter.run is not None  # postprocess never ran
    modified = forge.snapshot()
    assert any(not torch.equal(modified[k], states[-1][k]) for k in modified)
    # the next job's process() -> disarm(None), even from another adapter instance (img2img tab's Script)
    other = ForgeAdapter()
    other.disarm(None)
    assert_equal_state(forge.snapshot(), states[-1])
    assert no_hooks(forge)
    assert forge.engine.forge_objects.unet is forge.engine.forge_objects_after_applying_lora.unet
    other.disarm(None)  # idempotent
    adapter.disarm(None)
    assert adapter.run is None
    # and a fresh enabled run works normally afterwards
    _, checker = checked_run(forge, monkeypatch, forge.txt2img(steps=6), adapter=adapter)
    assert len(checker.calls) == 6


def test_interrupt_restores(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(denoiser: Any) -> None:
        if denoiser.step == 2:
            forge.host.state.interrupt()

    monkeypatch.setattr(forge.host, "probes", [interrupt])
    p = forge.txt2img(steps=6, enable_hr=True)
    adapter, checker = checked_run(forge, monkeypatch, p)
    assert len(checker.calls) == 3 and {c.kind for c in checker.calls} == {"first"}
    assert adapter.run is None
    assert_equal_state(forge.snapshot(), checker.host_states[-1])
    assert no_hooks(forge)


def test_disarm_of_another_generation_is_ignored(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = ForgeAdapter()
    seen: list[Any] = []

    def probe(denoiser: Any) -> None:
        if denoiser.step == 3:
            adapter.disarm(forge.txt2img())  # e.g. an XYZ copy of p postprocessing
            seen.append(adapter.run)

    checked = Checker(forge, adapter, 0.8, 1.1)
    checked.host_states = watch_prepare(forge, monkeypatch)
    forge.generate(
        forge.txt2img(steps=5), [(forge.direct(adapter, default_args()), [])], lambda d: (checked(d), probe(d))
    )
    assert seen and seen[0] is not None and len(checked.calls) == 5


# ---------------------------------------------------------------------------------------------------------------
# hires, img2img, samplers, methods
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["restart", "continue", "keep"])
def test_hires_second_pass_idempotent_before_sampling(
    forge: World, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    adapter = ForgeAdapter()
    calls: list[bool] = []
    original = adapter.before_sampling

    def spy(p: Any, *, hires: bool) -> None:
        calls.append(hires)
        original(p, hires=hires)

    monkeypatch.setattr(adapter, "before_sampling", spy)
    p = forge.txt2img(steps=6, enable_hr=True, hr_steps=8, denoising_strength=0.6, prompt_loras=[("other", 0.7)])
    _, checker = checked_run(forge, monkeypatch, p, adapter=adapter, hires=policy)
    assert calls == [False, True, True, True]  # before_hr + Forge's process_before_every_sampling twice
    kinds = [c.kind for c in checker.calls]
    assert kinds == ["first"] * 6 + ["hires"] * 5  # int(0.6 * 8) + 1 hires steps
    assert forge.kmodel.lora_loader.merges == 1  # the hires clone has the same identifiers: no re-merge
    assert_equal_state(forge.snapshot(), checker.host_states[-1])
    if policy == "keep":
        final = checker.calls[5].roles
        assert all(c.roles == final for c in checker.calls[6:])


def test_img2img_and_second_order_sampler(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    p = forge.img2img(steps=10, denoising_strength=0.5, second_order=True)
    adapter, checker = checked_run(forge, monkeypatch, p, hires="continue")
    # 6 steps (int(0.5 * 10) + 1), 11 denoiser calls mapped onto them
    assert len(checker.calls) == 11
    assert sorted({c.step for c in checker.calls}) == list(range(6))


@pytest.mark.parametrize("method", ["merge", "content-only", "style-only", "random", "fixed"])
def test_methods_and_any_role_change(forge: World, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    p = forge.txt2img(steps=5, prompt_loras=[("other", 0.7)])
    _, checker = checked_run(forge, monkeypatch, p, method=method, scope="attention")
    roles = {r for c in checker.calls for r in c.roles.values()}
    if method == "style-only":
        assert NONE in roles  # content layers lose the host-merged content delta
    assert_equal_state(forge.snapshot(), checker.host_states[-1])


def _plain_unet_weights(forge: World, prompt_loras: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    """The UNet weights Forge itself holds while sampling with these prompt LoRAs (no K-LoRA)."""
    seen: list[dict[str, torch.Tensor]] = []
    forge.generate(forge.txt2img(steps=2, prompt_loras=prompt_loras), [], lambda d: seen.append(forge.snapshot()))
    return {k: v for k, v in seen[-1].items() if k.startswith("diffusion_model.")}


@pytest.mark.parametrize("prompt", [(), (("other", 0.7),)], ids=["alone", "with-other-prompt-lora"])
def test_in_place_weights_are_bit_identical_to_forges_own_merge(
    forge: World, monkeypatch: pytest.MonkeyPatch, prompt: tuple
) -> None:
    """A layer K-LoRA gives to the style LoRA holds exactly what Forge merges for <lora:style:w> in the prompt (not
    Forge's content merge plus a correction, which rounds differently), and a content layer exactly Forge's
    <lora:content:w>; the same for every step of a merge run, other prompt LoRAs included."""
    wc, ws = 0.8, 1.1
    plain_content = _plain_unet_weights(forge, [*prompt, ("content", wc)])
    plain_style = _plain_unet_weights(forge, [*prompt, ("style", ws)])
    plain_none = _plain_unet_weights(forge, list(prompt))
    # the two plain merges differ on every shared layer, so the checks below can tell them apart
    shared = [lid for lid in UNET_SHAPES if lid not in (CONTENT_ONLY, STYLE_ONLY)]
    assert all(not torch.equal(plain_content[param_key(i)], plain_style[param_key(i)]) for i in shared)
    for method in ("style-only", "content-only", "merge"):
        p = forge.txt2img(steps=6, prompt_loras=list(prompt))
        _, checker = checked_run(forge, monkeypatch, p, method=method, content_weight=wc, style_weight=ws)
        assert checker.calls
        for call in checker.calls:
            for lid in UNET_SHAPES:
                role, key = call.roles.get(lid), param_key(lid)
                if role == STYLE or (role == NONE and lid not in forge.layers["style"]):
                    want = plain_style if lid in forge.layers["style"] else plain_none
                elif role == CONTENT:
                    want = plain_content if lid in forge.layers["content"] else plain_none
                else:
                    continue
                assert torch.equal(call.weights[key], want[key]), f"{method} step {call.step} {lid} role {role}"
        if method != "merge":
            continue
        roles = {r for c in checker.calls for r in c.roles.values()}
        assert {CONTENT, STYLE} <= roles  # the merge run switched layers both ways


def test_s_star_schedule_switches_back_and_forth(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    p = forge.txt2img(steps=12)
    _, checker = checked_run(forge, monkeypatch, p, schedule="s*", alpha=1.5, beta=1.3)
    changes = {
        (before.roles[k], after.roles[k])
        for before, after in zip(checker.calls, checker.calls[1:])
        for k in after.roles
        if after.roles[k] != before.roles[k]
    }
    assert (STYLE, CONTENT) in changes or (CONTENT, STYLE) in changes
    assert_equal_state(forge.snapshot(), checker.host_states[-1])


def test_batch_count_two_iterations(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    p = forge.txt2img(steps=4, n_iter=2)
    adapter, checker = checked_run(forge, monkeypatch, p)
    assert len(checker.calls) == 8 and adapter.run is None
    assert_equal_state(forge.snapshot(), checker.host_states[-1])


# ---------------------------------------------------------------------------------------------------------------
# (B): quantized / offloaded / online, and Flux-style fused slices
# ---------------------------------------------------------------------------------------------------------------

GGUF = "unet:input_blocks.1.1.transformer_blocks.0.attn2.to_k"
OFFLOADED = "unet:output_blocks.11.0.in_layers.2"
FP8 = "unet:middle_block.1.transformer_blocks.0.ff.net.0.proj"


def _quantize(world: World) -> None:
    """One GGUF-like weight, one module Forge streams from CPU, one fp8 weight; refresh the pristine snapshot."""
    module = world.module(GGUF)
    module.weight = FakeGGUF.quantize(module.weight.detach().float())
    offloaded = world.module(OFFLOADED)
    offloaded.prev_parameters_manual_cast, offloaded.parameters_manual_cast = False, True  # as Forge's low-VRAM swap
    fp8 = world.module(FP8)
    fp8.weight = nn.Parameter(fp8.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    world.pristine = world.snapshot()


def test_hook_path_for_quantized_and_offloaded_layers(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    _quantize(forge)
    hooks_seen: list[int] = []
    adapter = ForgeAdapter()
    p = forge.txt2img(steps=6, prompt_loras=[("other", 0.7)])
    args = default_args()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight, tuple(p.prompt_loras))
    checker.host_states = watch_prepare(forge, monkeypatch)

    def probe(d: Any) -> None:
        checker(d)
        hooks_seen.append(sum(bool(m._forward_hooks) for m in forge.kmodel.modules()))

    forge.generate(p, [(forge.direct(adapter, args), [])], probe)
    modes = checker.calls[0].modes
    assert {modes[GGUF], modes[OFFLOADED], modes[FP8]} == {"B"}
    # the style-only layer: Forge merged nothing into it; K-LoRA keeps the loaded weight while editing it in place
    assert modes[STYLE_ONLY] == "A"
    assert sum(m == "A" for m in modes.values()) == len(modes) - 3
    assert max(hooks_seen) >= 1
    assert_equal_state(forge.snapshot(), checker.host_states[-1])
    assert no_hooks(forge)


def test_in_place_path_keeps_no_weight_copy(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7: the in-place path holds the live parameter and a recipe (Forge's backup + patch list), never a copy
    of a weight Forge backs up; it keeps the loaded weight only where Forge merged nothing (a style-only layer), on
    the offload device, which is exactly the backup Forge itself would hold with both LoRAs in the prompt."""
    seen: list[int] = []
    both = forge.txt2img(steps=2, prompt_loras=[("other", 0.7), ("content", 0.8), ("style", 1.1)])
    forge.generate(both, [], None)
    plain_backup = set(forge.kmodel.lora_loader.backup)
    kept: set[str] = set()

    def probe(d: Any) -> None:
        edits = forge_module._LIVE.edits
        forge_backup = forge.kmodel.lora_loader.backup
        for key, edit in edits.items():
            assert set(vars(edit)) == {"tensor", "host"}
            live = dict(forge.kmodel.named_parameters())[key]
            assert edit.tensor is live  # the model's own parameter, edited in place
            if edit.host.loader is None:
                assert key not in forge_backup and edit.host.original.device == torch.device("cpu")
                kept.add(key)
            else:
                assert edit.host.original is None
                assert edit.host.loader.backup[key] is forge_backup[key]  # recomputed from Forge's own backup
        assert not kept & set(forge_backup) and kept | set(forge_backup) <= plain_backup
        seen.append(len(edits))

    p = forge.txt2img(steps=6, prompt_loras=[("other", 0.7)])
    adapter = ForgeAdapter()
    args = default_args()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight, (("other", 0.7),))
    checker.host_states = watch_prepare(forge, monkeypatch)
    forge.generate(p, [(forge.direct(adapter, args), [])], lambda d: (checker(d), probe(d)))
    assert max(seen) >= 10 and kept == {param_key(STYLE_ONLY)}
    assert_equal_state(forge.snapshot(), checker.host_states[-1])


def test_weight_forge_would_not_recompute_exactly_uses_a_hook(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """If Forge's merge, recomputed, differs from what it holds (merged on another device), nothing is edited in place:
    the forward hook needs no restore, and the weights stay exactly Forge's."""
    real = forge_module._HostWeight.compute
    monkeypatch.setattr(forge_module._HostWeight, "compute", lambda self, patches=None: real(self, patches) + 1e-3)
    p = forge.txt2img(steps=6, prompt_loras=[("other", 0.7)])
    adapter = ForgeAdapter()
    args = default_args()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight, (("other", 0.7),))
    checker.host_states = watch_prepare(forge, monkeypatch)
    edits, hooks = [], []

    def probe(d: Any) -> None:
        checker(d)
        edits.append(len(forge_module._LIVE.edits))
        hooks.append(len(forge_module._LIVE.hooks))

    forge.generate(p, [(forge.direct(adapter, args), [])], probe)
    assert max(edits) == 0 and max(hooks) >= 10
    for call in checker.calls:  # no weight ever changed: everything went through hooks
        assert_equal_state(call.weights, checker.host_states[-1])
    assert_equal_state(forge.snapshot(), checker.host_states[-1])
    assert no_hooks(forge) and forge_module._LIVE.edits == {}


def test_failed_recompute_at_restore_lets_forge_restore(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recomputing the host weight fails at the end (e.g. out of memory): Forge's merge is marked stale, so Forge
    itself restores from its backup at the next refresh; the next plain generation equals a never-enabled one."""
    plain_seen: list[dict[str, torch.Tensor]] = []
    forge.generate(forge.txt2img(steps=3), [], lambda d: plain_seen.append(forge.snapshot()))
    never = plain_seen[-1]
    real = forge_module._HostWeight.compute
    state = {"fail": False, "calls": 0}

    def compute(self: Any, patches: Any = None) -> torch.Tensor:
        if state["fail"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, patches)

    monkeypatch.setattr(forge_module._HostWeight, "compute", compute)
    adapter = ForgeAdapter()
    p = forge.txt2img(steps=4)

    def probe(d: Any) -> None:
        state["calls"] += 1
        state["fail"] = state["calls"] == 4  # from the last step on: the restore cannot recompute

    forge.generate(p, [(forge.direct(adapter, default_args()), [])], probe)
    assert forge.kmodel.lora_loader.loaded_hash == forge_module.STALE_HASH
    assert adapter.run is None and no_hooks(forge) and forge_module._LIVE.edits == {}
    state["fail"] = False
    plain_seen.clear()
    forge.generate(forge.txt2img(steps=3), [], lambda d: plain_seen.append(forge.snapshot()))
    assert_equal_state(plain_seen[-1], never)


def test_manual_cast_of_a_resident_weight_is_edited_in_place(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage dtype != computation dtype (e.g. an fp16 checkpoint computed in fp32): Forge casts the resident weight
    on every forward, so the in-place path applies; only low-VRAM swapped modules need the hook path."""
    cast = forge.module(UNET[0])
    cast.parameters_manual_cast = True  # no prev_parameters_manual_cast: not a swapped module
    adapter = ForgeAdapter()
    args = default_args()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight)
    checker.host_states = watch_prepare(forge, monkeypatch)
    forge.generate(forge.txt2img(steps=6), [(forge.direct(adapter, args), [])], checker)
    assert checker.calls[0].modes[UNET[0]] == "A"
    assert no_hooks(forge)
    assert_equal_state(forge.snapshot(), checker.host_states[-1])


def test_online_content_lora_with_hooks(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized model with Forge's "(fp16 LoRA)" option: content in the online slots, corrections by hooks."""
    for lid in UNET:
        module = forge.module(lid)
        module.weight = FakeGGUF.quantize(module.weight.detach().float())
    forge.pristine = forge.snapshot()
    forge.kmodel.storage_dtype = "gguf"
    forge.host.dynamic_args["online_lora"] = True
    adapter = ForgeAdapter()
    args = default_args()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight, online=True)
    checker.host_states = watch_prepare(forge, monkeypatch)
    idents: list[tuple] = []
    forge.generate(
        forge.txt2img(steps=5),
        [(forge.direct(adapter, args), [])],
        lambda d: (checker(d), idents.append(adapter._content_ident)),
    )
    assert idents[0] == (forge.files["content"], 0.8, 1.0, True)
    assert all(set(c.modes.values()) == {"B"} for c in checker.calls)
    assert any(hasattr(m, "forge_online_loras") for m in forge.kmodel.modules())
    assert_equal_state(forge.snapshot(), checker.host_states[-1])
    assert no_hooks(forge)


@pytest.mark.parametrize("offloaded", [False, True])
def test_flux_fused_qkv_slices(forge: World, offloaded: bool) -> None:
    from klora_ext import synthetic
    from tests.fakes.forge.host import Linear

    fused = Linear(8, 24)
    fused.weight.requires_grad_(False)
    fused.bias.requires_grad_(False)
    fused.parameters_manual_cast = offloaded
    if offloaded:
        fused.prev_parameters_manual_cast = False  # Forge's marker of a module it swaps for low VRAM
    blocks = nn.Module()
    blocks.add_module("0", nn.Module())
    getattr(blocks, "0").add_module("img_attn", nn.Module())
    getattr(blocks, "0").img_attn.add_module("qkv", fused)
    forge.kmodel.diffusion_model.add_module("double_blocks", blocks)
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        forge.kmodel.extra_lora_keys[f"transformer.transformer_blocks.0.attn.{proj}"] = (key, (0, 8 * i, 8))
    ids = [f"flux:double_blocks.0.img_attn.qkv[{part}]" for part in ("q", "k", "v")]  # the reader's canonical ids
    paths = {}
    for name, seed, rank in (("fc", 11, 2), ("fs", 12, 3)):
        # diffusers-style split keys (transformer.transformer_blocks.0.attn.to_q...) onto Forge's fused qkv rows
        sd = synthetic.make_flux_state_dict([(i, (8, 8)) for i in ids], rank, style="diffusers", seed=seed)
        paths[name] = synthetic.save_lora(forge.tmp / f"{name}.safetensors", sd)
        forge.host.add_lora_file(name, paths[name])
    forge.host.networks.list_available_networks()
    pristine = fused.weight.detach().clone()
    adapter = ForgeAdapter()
    args = default_args(content="fc", style="fs", content_weight=1.0, style_weight=1.0)
    from klora_ext.lora_file import read_lora

    deltas = {n: read_lora(paths[n]).layers for n in paths}
    x = torch.randn(4, 8)
    checked = []

    def probe(d: Any) -> None:
        run = adapter.run
        step = d.step
        roles = dict(zip(run.controller.plan.layer_ids, (int(r) for r in run.controller.plan.row(step))))
        want = pristine.clone()
        for i, lid in enumerate(ids):
            name = "fc" if roles[lid] == CONTENT else "fs"
            want[8 * i : 8 * i + 8] += deltas[name][lid].delta()
        module = forge.kmodel.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
        out = torch.nn.functional.linear(x, want, fused.bias)
        assert_close(module(x), out, f"fused qkv step {step}", atol=1e-4)
        modes.add(adapter._targets[ids[0]].mode)
        checked.append(step)

    modes: set[str] = set()
    forge.generate(forge.txt2img(steps=6), [(forge.direct(adapter, args), [])], probe)
    assert checked == list(range(6))
    assert modes == ({"B"} if offloaded else {"A"})
    module = forge.kmodel.get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
    content_merged = pristine.clone()
    for i, lid in enumerate(ids):
        content_merged[8 * i : 8 * i + 8] += deltas["fc"][lid].delta()
    assert_close(module.weight, content_merged, "fused qkv after the run")  # Forge's own merge, our edits undone


# ---------------------------------------------------------------------------------------------------------------
# prompt takeover, text encoders, model swaps, errors
# ---------------------------------------------------------------------------------------------------------------


def test_both_loras_in_prompt_are_taken_over(
    forge: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    p = forge.txt2img(steps=5, prompt_loras=[("content", 0.3), ("style", 0.9), ("other", 0.7)])
    args = default_args()
    adapter = ForgeAdapter()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight, (("other", 0.7),))
    checker.host_states = watch_prepare(forge, monkeypatch)
    notes: list[str] = []
    forge.generate(p, [(forge.direct(adapter, args), [])], lambda d: (checker(d), notes.extend(adapter.run.notes)))
    assert any("style LoRA 'style' is also in the prompt" in n for n in notes)
    assert any("content LoRA 'content' is also in the prompt" in n for n in notes)
    assert len(checker.calls) == 5
    after = forge.engine.forge_objects_after_applying_lora.unet
    assert {k[0] for k in after.lora_patches} >= {forge.files["content"], forge.files["style"]}  # Forge's own, intact


def test_content_in_prompt_at_same_strength_is_reused(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    p = forge.txt2img(steps=4, prompt_loras=[("content", 0.8)])
    forge.generate(forge.txt2img(steps=4, prompt_loras=[("content", 0.8)]), [])
    assert forge.kmodel.lora_loader.merges == 1
    _, checker = checked_run(forge, monkeypatch, p)
    assert forge.kmodel.lora_loader.merges == 1  # same identifier as the prompt's: Forge's merge is reused
    assert len(checker.calls) == 4


@pytest.mark.parametrize("policy", ["both", "content", "style", "none"])
def test_text_encoder_policy_and_cond_cache(forge: World, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    plain = forge.txt2img(steps=3)
    forge.generate(plain, [])
    never_enabled = plain.c.clone()
    computations = forge.host.cond_computations
    te_seen: list[dict[str, torch.Tensor]] = []
    p = forge.txt2img(steps=3)
    args = default_args(te_policy=policy)
    adapter = ForgeAdapter()
    forge.generate(p, [(forge.direct(adapter, args), [])], lambda d: te_seen.append(forge.snapshot()))
    for lid in TE:
        want = forge.pristine[param_key(lid)].clone()
        if policy in ("both", "content"):
            want += args.content_weight * forge.delta("content", lid)
        if policy in ("both", "style"):
            want += args.style_weight * forge.delta("style", lid)
        assert_close(te_seen[-1][param_key(lid)], want, f"{lid} ({policy})")
    if policy == "none":
        assert forge.host.cond_computations == computations  # nothing changed: cached conds are still right
        assert torch.equal(p.c, never_enabled)
    else:
        assert forge.host.cond_computations == computations + 1 and not torch.equal(p.c, never_enabled)
    again = forge.txt2img(steps=3)
    forge.generate(again, [])
    assert torch.equal(again.c, never_enabled)  # the cache was invalidated on the way out
    assert forge.engine.forge_objects_after_applying_lora.clip is forge.engine.forge_objects_original.clip


def test_refiner_swap_disarms_and_restores(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    refiner = make_engine(
        [("input_blocks.1.0.emb_layers.1", (8, 16))], [("text_model.encoder.layers.0.mlp.fc1", (32, 8))]
    )
    refiner_before = {k: v.clone() for k, v in refiner.forge_objects.unet.model.named_parameters()}
    forge.host.refiner = refiner
    p = forge.txt2img(steps=6, refiner_switch_at_call=3)
    adapter = ForgeAdapter()
    args = default_args()
    checker = Checker(forge, adapter, args.content_weight, args.style_weight, skip_after_disarm=True)
    checker.host_states = watch_prepare(forge, monkeypatch)
    base_model = forge.kmodel
    forge.generate(p, [(forge.direct(adapter, args), [])], lambda d: checker(d) if d.step < 3 else None)
    assert adapter.run is None and len(checker.calls) == 3
    first_state = checker.host_states[0]
    live = dict(base_model.named_parameters())
    assert all(torch.equal(live[k], first_state[k]) for k in live)
    assert all(torch.equal(v, refiner_before[k]) for k, v in refiner.forge_objects.unet.model.named_parameters())


def test_lora_for_another_model_is_refused_at_arm(forge: World) -> None:
    from klora_ext import synthetic

    alien = [("unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q", (640, 640))]
    for name, seed in (("alien_c", 5), ("alien_s", 6)):
        sd = synthetic.make_lora_state_dict(alien, 2, style="kohya", seed=seed, arch="sdxl")
        forge.host.add_lora_file(name, synthetic.save_lora(forge.tmp / f"{name}.safetensors", sd))
    forge.host.networks.list_available_networks()
    adapter = ForgeAdapter()
    script = forge.direct(adapter, default_args(content="alien_c", style="alien_s"))
    with pytest.raises(KLoraError, match="Forge patches nothing of .alien_c. in the loaded model"):
        forge.generate(forge.txt2img(steps=4), [(script, [])])
    assert adapter.run is None and forge_module._LIVE.swaps == []


def test_other_extension_replacing_the_patcher_is_detected(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = ForgeAdapter()

    class Rogue:  # runs after K-LoRA and puts a clone of Forge's original patcher back
        def process_before_every_sampling(self, p: Any, **_: Any) -> None:
            fo = p.sd_model.forge_objects
            fo.unet = p.sd_model.forge_objects_after_applying_lora.unet.clone()

    states = watch_prepare(forge, monkeypatch)
    with pytest.raises(KLoraError, match="another extension replaced the UNet patcher"):
        forge.generate(forge.txt2img(steps=4), [(forge.direct(adapter, default_args()), []), (Rogue(), [])])
    assert adapter.run is None
    assert_equal_state(forge.snapshot(), states[-1])


def test_unload_callback_and_restore_are_idempotent(forge: World, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = ForgeAdapter()
    adapter.restore()
    adapter.disarm(None)
    p = forge.txt2img(steps=4)
    checked_run(forge, monkeypatch, p, adapter=adapter)
    adapter.restore()
    adapter.restore()
    assert adapter.run is None and no_hooks(forge)
