"""The real Script through a fake A1111 generation: weights at every step, re-merges, passes, restore."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_weights

from klora_ext.args import KLoraArgs
from klora_ext.plan import Plan

PROMPT = "a photo <lora:other:0.6>"
OTHER = (("other", 0.6),)


def _args(**kw):
    base = {"enabled": True, "content": "subject_v1", "style": "painterly", "content_weight": 0.8, "style_weight": 1.3}
    base.update(kw)
    return base


def _side_names(webui):
    import networks

    return [n.name for n in networks.loaded_networks if n.name.startswith("k-lora")]


def _check_pass(webui, expect, records, args, plan, *, prompt=OTHER, previous_row=None):
    """Weights at every UNet forward of one pass, and that a forward re-merges exactly the layers that changed."""
    flips_seen = set()
    for k, rec in enumerate(records):
        step = rec["call"] * rec["steps"] // rec["total"]
        roles = expect.roles(args, plan, step)
        want = expect.weights(roles, prompt=prompt, wc=args.content_weight, ws=args.style_weight)
        assert_weights(rec["weights"], want, where=f"pass {rec['pass']} call {rec['call']} (step {step})")
        if k == 0 and previous_row is None:
            continue  # the first forward of a generation re-merges everything (the loaded list changed)
        prev_step = records[k - 1]["call"] * records[k - 1]["steps"] // records[k - 1]["total"] if k else None
        before = plan.row(prev_step) if k else previous_row
        changed = {expect.a1111_name(plan.layer_ids[i]) for i in (plan.row(step) != before).nonzero()[0]}
        assert set(rec["merged"]) == changed, f"call {rec['call']}: re-merged {sorted(rec['merged'])}"
        for name in changed:
            calls = sum(1 for _, layer in rec["calc"] if layer == name)
            assert calls == expect.contributors(name, roles, prompt)
        assert len(rec["calc"]) == sum(expect.contributors(n, roles, prompt) for n in changed)
        if changed:
            flips_seen.add(step)
    return flips_seen


def test_weights_follow_the_plan_at_every_step(webui, expect):
    p, res = webui.generate(_args(), prompt=PROMPT, steps=8, seed=5)
    assert len(res.images) == 1 and not res.comments
    args = KLoraArgs(**_args())
    plan = Plan.build(expect.scores(), args, 8)
    records = webui.records
    assert len(records) == 8
    flips = _check_pass(webui, expect, records, args, plan)
    assert len(flips) >= 2, "the test LoRAs should switch layers at several steps"
    # step 0 re-merged every patched layer (and nothing but layers); TE layers were merged for the conds
    assert set(expect.deltas["content"]) - set(records[0]["merged"]) <= {
        n for n in expect.deltas["content"] if n.startswith("transformer_")
    }
    # text-encoder policy "both": the conds saw content and style TE deltas at their strengths
    roles = expect.roles(args, plan, 0)
    want = expect.weights(roles, prompt=OTHER, wc=0.8, ws=1.3)
    conds = p.conds_used[0]
    assert conds and all(torch.allclose(conds[n], want[n], rtol=0, atol=1e-6) for n in conds)


def test_untouched_layers_and_entries_after_success(webui, expect):
    import networks

    webui.generate(_args(), prompt=PROMPT, steps=6)
    assert webui.adapter.run is None
    assert _side_names(webui) == []
    assert [n.name for n in networks.loaded_networks] == ["other"]  # the prompt LoRA stays, as the builtin leaves it
    # Next forward with the same prompt LoRA: exactly base + other.
    webui.settle()
    assert_weights(webui.model.weights(), expect.weights({}, prompt=OTHER), where="after")


def _plain(webui, **kw):
    p, res = webui.generate(None, prompt="a photo", steps=6, seed=9, **kw)
    return [img.tensor for img in res.images], webui.records


def _assert_pristine_run(webui, records):
    """Every UNet forward of the run saw pristine weights; so does the next forward of every layer (text-encoder
    layers are not run when the conds come from the cache, and the builtin restores a stale layer before using it)."""
    for rec in records:
        for name, want in webui.pristine.items():
            if name.startswith("diffusion_model_"):
                assert torch.equal(rec["weights"][name], want), f"{name} not restored at call {rec['call']}"
    webui.settle()
    now = webui.model.weights()
    for name, want in webui.pristine.items():
        assert torch.equal(now[name], want), f"{name} not restored"


def _assert_clean_now(webui):
    """Eager restore (stale state cleaned, script unloaded): every weight is pristine right now."""
    now = webui.model.weights()
    for name, want in webui.pristine.items():
        assert torch.equal(now[name], want), f"{name} still modified"


def test_disabled_after_enabled_equals_never_enabled(webui):
    never, _ = _plain(webui)
    webui.generate(_args(), prompt=PROMPT, steps=6, seed=9)
    after, records = _plain(webui)
    assert all(torch.equal(a, b) for a, b in zip(never, after))
    _assert_pristine_run(webui, records)


def test_plain_functional_run_after_k_lora_equals_never_enabled(webui):
    # With lora_functional on and no LoRA loaded, the builtin never looks at a layer's merge state, so a lazily
    # marked layer would keep K-LoRA's delta: the restore must be eager in that mode.
    from modules import shared

    never, _ = _plain(webui)
    webui.generate(_args(), prompt=PROMPT, steps=6, seed=9)
    shared.opts.lora_functional = True
    try:
        after, _ = _plain(webui)
    finally:
        shared.opts.lora_functional = False
    assert all(torch.equal(a, b) for a, b in zip(never, after))
    _assert_clean_now(webui)


def test_restore_after_exception_mid_sampling(webui):
    never, _ = _plain(webui)
    p = webui.make_p(_args(), prompt=PROMPT, steps=6, seed=9)
    p.fail_at = (1, 3)
    with pytest.raises(RuntimeError, match="out of memory"):
        webui.run(p)
    assert webui.adapter.run is not None  # postprocess was skipped: the state is stale
    assert _side_names(webui)
    webui.module.Script().process(webui.make_p(None))  # process() of the next generation cleans up first
    assert webui.adapter.run is None and _side_names(webui) == []
    _assert_clean_now(webui)
    after, records = _plain(webui)
    assert all(torch.equal(a, b) for a, b in zip(never, after))
    _assert_pristine_run(webui, records)


def test_restore_after_interrupt(webui):
    from modules import processing, shared

    never, _ = _plain(webui)

    def interrupt(p, den):
        if den.step == 2:
            shared.state.interrupt()

    processing.unet_forward_hooks.append(interrupt)
    p, res = webui.generate(_args(), prompt=PROMPT, steps=6, seed=9)
    processing.unet_forward_hooks.remove(interrupt)
    assert len(webui.records) == 3  # sampling stopped; postprocess still ran
    assert webui.adapter.run is None and _side_names(webui) == []
    after, records = _plain(webui)
    assert all(torch.equal(a, b) for a, b in zip(never, after))
    _assert_pristine_run(webui, records)


def test_script_unload_restores(webui):
    from modules import script_callbacks

    p = webui.make_p(_args(), prompt=PROMPT, steps=6)
    p.fail_at = (1, 2)
    with pytest.raises(RuntimeError):
        webui.run(p)
    script_callbacks.script_unloaded_callback()
    assert webui.adapter.run is None and _side_names(webui) == []
    _assert_clean_now(webui)
    webui.generate(None, prompt="a photo", steps=2)
    _assert_pristine_run(webui, webui.records)


@pytest.mark.parametrize("policy", ["restart", "continue", "keep"])
def test_hires_second_pass(webui, expect, policy):
    p, res = webui.generate(
        _args(hires=policy), prompt=PROMPT, steps=6, enable_hr=True, hr_second_pass_steps=8, denoising_strength=0.5
    )
    assert len(res.images) == 1
    args = KLoraArgs(**_args(hires=policy))
    scores = expect.scores()
    first_plan = Plan.build(scores, args, 6)
    first = [r for r in webui.records if not r["hires"]]
    hires = [r for r in webui.records if r["hires"]]
    hr_steps = int(0.5 * 8) + 1
    assert len(first) == 6 and len(hires) == hr_steps and hires[0]["call"] == 0
    _check_pass(webui, expect, first, args, first_plan)
    if policy == "restart":
        hr_plan = Plan.build(scores, args, hr_steps)
    elif policy == "continue":
        hr_plan = Plan.build(scores, args, hr_steps, window=(0.5, 0.5))
    else:
        hr_plan = first_plan.held(hr_steps)
    # a new pass only re-merges the layers whose role differs from the end of the first pass
    _check_pass(webui, expect, hires, args, hr_plan, previous_row=first_plan.row(5))
    assert f"K-LoRA hires: {policy}" in res.infotexts[0] or policy == "restart"


def test_batch_count_restarts_each_iteration(webui, expect):
    p, res = webui.generate(_args(), prompt=PROMPT, steps=5, n_iter=3, seed=3)
    assert len(res.images) == 3
    args = KLoraArgs(**_args())
    plan = Plan.build(expect.scores(), args, 5)
    passes = [[r for r in webui.records if r["pass"] == n] for n in (1, 2, 3)]
    assert [len(x) for x in passes] == [5, 5, 5]
    _check_pass(webui, expect, passes[0], args, plan)
    for later in passes[1:]:
        _check_pass(webui, expect, later, args, plan, previous_row=plan.row(4))


def test_second_order_sampler_counts_steps_not_calls(webui, expect):
    webui.generate(_args(), prompt=PROMPT, steps=5, sampler_name="Heun")
    args = KLoraArgs(**_args())
    plan = Plan.build(expect.scores(), args, 5)
    assert len(webui.records) == 9  # 2 calls per step, 1 on the last
    assert [r["call"] * r["steps"] // r["total"] for r in webui.records] == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    _check_pass(webui, expect, webui.records, args, plan)


def test_v16_callback_params_without_denoiser(webui, expect):
    from modules import processing

    processing.LEGACY_PARAMS = True
    try:
        webui.generate(_args(), prompt=PROMPT, steps=6)
    finally:
        processing.LEGACY_PARAMS = False
    args = KLoraArgs(**_args())
    _check_pass(webui, expect, webui.records, args, Plan.build(expect.scores(), args, 6))


def test_img2img_progress_by_denoising_strength(webui, expect):
    p, res = webui.generate(_args(hires="continue"), prompt=PROMPT, steps=10, denoising_strength=0.4, img2img=True)
    args = KLoraArgs(**_args(hires="continue"))
    steps = int(0.4 * 10) + 1
    assert len(webui.records) == steps
    plan = Plan.build(expect.scores(), args, steps, window=(0.6, 0.4))
    _check_pass(webui, expect, webui.records, args, plan)


def test_functional_mode_matches_merge_mode(webui):
    from modules import shared

    _, merged = webui.generate(_args(), prompt=PROMPT, steps=6, seed=4)
    shared.opts.lora_functional = True
    try:
        _, functional = webui.generate(_args(), prompt=PROMPT, steps=6, seed=4)
        _, functional_merge = webui.generate(_args(method="merge"), prompt=PROMPT, steps=6, seed=4)
    finally:
        shared.opts.lora_functional = False
    a, b, c = merged.images[0].tensor, functional.images[0].tensor, functional_merge.images[0].tensor
    assert torch.allclose(a, b, rtol=0, atol=1e-7)  # float32 rounding of y + branch vs merged weight
    assert (a - c).abs().max() > 1e-5  # and the comparison would notice wrong roles
    # and the functional path leaves the stored weights untouched
    assert all(
        torch.equal(webui.records[-1]["weights"][n], w)
        for n, w in webui.pristine.items()
        if n.startswith("diffusion_model_")
    )


def test_prompt_copy_of_content_lora_is_not_applied_twice(webui, expect):
    import networks

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("K-LoRA").addHandler(handler)
    try:
        _, res = webui.generate(_args(), prompt="a photo <lora:subject:0.5> <lora:other:0.6>", steps=6)
    finally:
        logging.getLogger("K-LoRA").removeHandler(handler)
    assert any("also K-LoRA's content LoRA" in line and "not applied twice" in line for line in seen)
    assert "[K-LoRA] 'subject" in res.comments and "not applied twice" in res.comments  # shown under the gallery
    args = KLoraArgs(**_args())
    plan = Plan.build(expect.scores(), args, 6)
    _check_pass(webui, expect, webui.records, args, plan, prompt=OTHER)  # no extra 0.5 x content anywhere
    assert "subject_v1" not in [n.name for n in networks.loaded_networks]


def test_callback_ignores_other_generations(webui):
    from modules import script_callbacks

    p = webui.make_p(_args(), prompt=PROMPT, steps=6)
    p.fail_at = (1, 0)
    with pytest.raises(RuntimeError):
        webui.run(p)
    adapter = webui.adapter
    applied = adapter.stats["apply_calls"]

    class Den:
        step, steps, total_steps = 3, 6, 6
        p = object()

    params = script_callbacks.CFGDenoiserParams(None, None, None, 0, 6, None, None, Den())
    script_callbacks.cfg_denoiser_callback(params)
    assert adapter.stats["apply_calls"] == applied


def test_switch_failure_during_sampling_is_reported_and_restored(webui, monkeypatch):
    adapter = webui.adapter

    def broken(changes):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter, "apply_changes", broken)
    p, res = webui.generate(_args(), prompt="a photo", steps=4)
    assert "K-LoRA skipped" in res.infotexts[0] and "boom" in res.infotexts[0]
    assert adapter.run is None and _side_names(webui) == []
    webui.generate(None, prompt="a photo", steps=2)
    _assert_pristine_run(webui, webui.records)


def test_text_encoder_conds_are_not_reused_across_runs(webui):
    from modules import processing

    _, first = webui.generate(None, prompt="same prompt", steps=2)
    calls = webui.model.te_calls
    p, _ = webui.generate(_args(), prompt="same prompt", steps=2)
    assert webui.model.te_calls == calls + 2  # c and uc with K-LoRA's TE deltas: own conds, not the cached plain ones
    assert processing.StableDiffusionProcessing.cached_c[1] is not p.conds_used[0]  # the shared cache stays plain
    p2, _ = webui.generate(None, prompt="same prompt", steps=2)
    conds = p2.conds_used[0]
    assert all(torch.equal(conds[n], webui.pristine[n]) for n in conds)


def test_te_policy_none_keeps_cond_cache(webui):
    webui.generate(None, prompt="same prompt", steps=2)
    calls = webui.model.te_calls
    webui.generate(_args(te_policy="none"), prompt="same prompt", steps=2)
    assert webui.model.te_calls == calls  # no TE delta: the cached plain conds are right


def test_show_map_adds_an_image_and_plan(webui):
    from klora_ext.webui import script

    _, res = webui.generate(_args(show_map=True), prompt=PROMPT, steps=6, enable_hr=True, denoising_strength=0.5)
    assert len(res.images) == 3 and len(res.infotexts) == 3  # the image, first-pass map, hires map
    for image in res.images[1:]:
        assert image.mode == "RGB" and image.width > 100 and "klora_plan" in image.info  # a PIL image (Pillow)
    assert "selection map" in res.infotexts[1] and "hires" in res.infotexts[2]
    assert script.STATE.last_plan["steps"] == 6 and len(script.STATE.last_plan["map"]) == 6
    _, res = webui.generate(_args(), prompt=PROMPT, steps=6)
    assert len(res.images) == 1


def test_model_weights_fp16(tmp_path, fake_a1111):
    import fakehost

    host = fakehost.FakeHost(tmp_path, dtype=torch.float16)
    p, res = host.generate(_args(), prompt=PROMPT, steps=4)
    assert len(res.images) == 1 and not res.comments
    p, res = host.generate(None, prompt="a photo", steps=2)
    _assert_pristine_run(host, host.records)


def test_plan_notes_reach_the_gallery(webui):
    import fakehost
    import networks

    # a style with the content's keys (the authors' gamma needs equal key counts), then the reference clock with a
    # scope it ignores: the plan says so, and the user sees it under the image
    specs = [(i, s) for i, s in fakehost.layer_specs() if i.startswith(("unet:", "te1:"))]
    fakehost.write_lora(webui.lora_dir / "twin.safetensors", specs, rank=3, alpha=1.5, seed=44)
    networks.list_available_networks()
    _, res = webui.generate(_args(style="twin", clock="reference", scope="all"), prompt=PROMPT, steps=4)
    assert len(res.images) == 1
    assert "[K-LoRA] the reference clocks switch the authors' layers; scope is not used" in res.comments
    _, res = webui.generate(_args(style="twin", clock="reference", scope="attention"), prompt=PROMPT, steps=4)
    assert len(res.images) == 1 and "scope is not used" not in res.comments
