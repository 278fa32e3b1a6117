"""The plan preview in the accordion (fake A1111 host): wired to every control the plan depends on and to the steps
slider, scored once per pair (progress shown), redrawn from the cache on every later change, the same plan a
generation uses, and clear messages instead of a picture when the controls are not usable."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")

from klora_ext.args import KLoraArgs  # noqa: E402
from klora_ext.webui.preview import INPUTS, PICK_BOTH  # noqa: E402

pytest_plugins = ["tests.fakes.forge.fixture"]  # the `forge` fixture (fake Forge host)


def _preview_parts(webui, tab="txt2img"):
    import gradio

    by_id = {b.elem_id: b for b in gradio.created if b.elem_id}
    return by_id[f"klora_{tab}_preview"], by_id[f"klora_{tab}_preview_info"]


def _controls(webui):
    script = webui.txt2img_script
    return dict(
        zip(
            [f.name for f in __import__("klora_ext.args", fromlist=["FIELDS"]).FIELDS],
            webui.txt2img_runner.inputs[script.args_from : script.args_to],
        )
    )


def _handler(webui):
    """(fn, inputs, outputs) of the preview's change event on the content picker."""
    controls = _controls(webui)
    events = [e for e in controls["content"].events if e[0] == "change"]
    assert len(events) == 1
    _, fn, inputs, outputs = events[0]
    return fn, inputs, outputs


def _values(webui, **changes):
    controls = _controls(webui)
    values = {name: controls[name].value for name in INPUTS}
    values.update(changes)
    return [values[name] for name in INPUTS] + [changes.get("steps", webui.txt2img_runner.steps.value)]


def test_preview_sits_in_the_accordion_and_listens_to_every_input(webui):
    image, info = _preview_parts(webui)
    assert image.value is None and info.value == PICK_BOTH
    controls = _controls(webui)
    fn, inputs, outputs = _handler(webui)
    assert outputs == [image, info]
    assert inputs == [controls[name] for name in INPUTS] + [webui.txt2img_runner.steps]
    for component in inputs:  # every input redraws, with the same handler and inputs
        assert [(e[1], e[2]) for e in component.events if e[0] == "change"] == [(fn, inputs)]
    _preview_parts(webui, "img2img")  # the img2img tab has its own


def test_nothing_drawn_until_both_loras_are_picked(webui):
    fn, _, _ = _handler(webui)
    assert fn(*_values(webui)) == (None, PICK_BOTH)
    assert fn(*_values(webui, content="subject_v1")) == (None, PICK_BOTH)


def test_preview_scores_once_then_redraws_from_the_cache(webui):
    import gradio

    from klora_ext.webui import run

    fn, _, _ = _handler(webui)
    gradio.Progress.calls.clear()
    first, text = fn(*_values(webui, content="subject_v1", style="painterly"))
    assert first is not None and first.mode == "RGB"
    assert "γ = " in text and "shared layers" in text and "flip" in text
    assert gradio.Progress.calls and all("scoring layer" in desc for _, desc in gradio.Progress.calls)
    assert len(run.score_cache()) == 1
    gradio.Progress.calls.clear()
    again, text2 = fn(*_values(webui, content="subject_v1", style="painterly", alpha=0.5))
    assert gradio.Progress.calls == []  # no scoring: the cached scores were used
    assert len(run.score_cache()) == 1
    assert again.size == first.size and not np.array_equal(np.asarray(again), np.asarray(first))
    assert text2 != text


def test_preview_plan_is_the_plan_a_generation_uses(webui):
    from klora_ext.webui import script

    args = KLoraArgs(enabled=True, content="subject_v1", style="painterly", alpha=2.0, beta=0.2, method="k-lora")
    shown = script._preview({n: getattr(args, n) for n in INPUTS}, 7)
    webui.generate(args.to_dict(), prompt="x", steps=7)
    assert shown.plan.roles.tolist() == script.STATE.last_plan["map"]
    assert shown.plan.gamma == pytest.approx(script.STATE.last_plan["gamma"])


def test_steps_slider_sets_the_preview_rows(webui):
    from klora_ext.webui import script

    values = {"content": "subject_v1", "style": "painterly"}
    assert script._preview(values, 9).plan.roles.shape[0] == 9
    assert script._preview(values, 30.0).plan.roles.shape[0] == 30
    fallback = script._preview(values, None)
    assert fallback.plan.roles.shape[0] == 20 and "steps slider was not found" in fallback.text


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"style": "paintrly"}, "did you mean 'painterly'"),
        ({"style": "subject_v1"}, "the same LoRA"),
        ({"schedule": "s*", "alpha": 0}, "'alpha' must be > 0"),
        ({"gamma_mode": "manual", "gamma": 0}, "'gamma'"),
    ],
)
def test_unusable_controls_say_what_to_change(webui, changes, needle):
    fn, _, _ = _handler(webui)
    image, text = fn(*_values(webui, **{"content": "subject_v1", "style": "painterly", **changes}))
    assert image is None and text.startswith("[K-LoRA]") and needle in text


def test_gallery_map_still_follows_a_generation(webui):
    _, res = webui.generate(
        {"enabled": True, "content": "subject_v1", "style": "painterly", "show_map": True}, prompt="x", steps=5
    )
    assert len(res.images) == 2 and res.images[1].mode == "RGB"
    assert "selection map" in res.infotexts[1]


def test_handler_signature_lets_gradio_inject_progress(webui):
    import inspect

    import gradio

    fn, inputs, _ = _handler(webui)
    params = list(inspect.signature(fn).parameters.values())
    # gradio 3.41 and 4 look for a gr.Progress default among the positional parameters only, after the inputs
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    assert len(params) == len(inputs) + 1 and isinstance(params[-1].default, gradio.Progress)


def test_without_a_steps_slider_the_preview_still_wires(webui):
    import gradio

    from klora_ext.webui import ui

    shown = []
    controls = ui.build(
        webui.Script(),
        False,
        list_loras=lambda: ["subject_v1", "painterly"],
        refresh_loras=list,
        defaults=KLoraArgs(),
        preview=lambda values, steps, progress: shown.append(steps)
        or __import__("types").SimpleNamespace(image=None, text="x"),
        steps=None,
    )
    ((_, fn, inputs, _),) = [e for e in controls[1].events if e[0] == "change"]
    assert isinstance(inputs[-1], gradio.State) and len(inputs) == len(INPUTS) + 1
    assert inputs[-1].events == []  # gradio 3.41's State has no change event
    assert fn(*[c.value for c in inputs]) == (None, "x") and shown == [None]


def _build_tab(webui, version, monkeypatch):
    import gradio

    from klora_ext.webui import ui

    monkeypatch.setattr(gradio, "__version__", version)
    controls = ui.build(
        webui.Script(),
        False,
        list_loras=lambda: ["subject_v1", "painterly"],
        refresh_loras=list,
        defaults=KLoraArgs(),
        preview=lambda values, steps, progress: __import__("types").SimpleNamespace(image=None, text="x"),
        steps=webui.txt2img_runner.steps,
    )
    return dict(zip([f.name for f in __import__("klora_ext.args", fromlist=["FIELDS"]).FIELDS], controls))


def test_gradio3_redraws_once_more_after_each_call(webui, monkeypatch):
    # gradio 3.41's page drops a control's change while its previous call runs (seen on a real A1111: typing a
    # LoRA name left the preview on "LoRA 'k' not found"); a follow-up step re-reads every control when it ends.
    controls = _build_tab(webui, "3.41.2", monkeypatch)
    for name in INPUTS:
        kinds = [(e[0], e[1], e[2], e[3]) for e in controls[name].events if e[0] in ("change", "then")]
        assert [k[0] for k in kinds] == ["change", "then"], name
        assert kinds[0][1:] == kinds[1][1:]  # the same handler, inputs and outputs: current values, same outputs


def test_gradio4_queues_the_last_change_instead(webui, monkeypatch):
    controls = _build_tab(webui, "4.40.0", monkeypatch)
    for name in INPUTS:
        assert [e[0] for e in controls[name].events if e[0] in ("change", "then")] == ["change"], name


@pytest.fixture
def forge_script(forge, monkeypatch):
    """klora_ext.webui.script loaded on the fake Forge (as scripts/klora.py loads it)."""
    import sys

    import klora_ext.webui as glue

    for name in ("klora_ext.webui.script", "klora_ext.webui.a1111", "klora_ext.webui.ui", "klora_ext.webui.api"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for attr in ("script", "a1111", "ui", "xyz", "api"):
        monkeypatch.delitem(glue.__dict__, attr, raising=False)
    import klora_ext.webui.script as script

    return script


def test_forge_preview_maps_the_files_onto_the_loaded_model(forge, forge_script):
    # Forge reads the model from p.sd_model; before any generation there is no p (a real Forge answered
    # "no Forge model is loaded" here): the preview stands the loaded model in for it.
    from klora_ext.webui import run as klrun

    assert type(forge_script.get_adapter()).__name__ == "ForgeAdapter"
    values = {**KLoraArgs().to_dict(), "content": "content", "style": "style"}
    shown = forge_script._preview({k: values[k] for k in INPUTS}, 6)
    assert shown.image is not None, shown.text
    args = KLoraArgs(**{k: values[k] for k in INPUTS}, enabled=True)
    run = klrun.prepare_run(args, forge_script.get_adapter(), forge.txt2img(steps=6), steps=6)
    assert shown.plan.layer_ids == run.session.first_plan.layer_ids  # the layers a generation switches
    assert np.array_equal(shown.plan.roles, run.session.first_plan.roles)
