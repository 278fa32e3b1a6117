"""What a user touches in the fake A1111: accordion, API args, errors, XYZ axes, infotext, endpoints."""

from __future__ import annotations

import shutil
import sys
import types

import pytest
import torch

from klora_ext.args import FIELDS, KLoraArgs
from klora_ext.errors import KLoraError

GOOD = {"enabled": True, "content": "subject_v1", "style": "painterly"}


def _stopped(webui, res, text):
    from modules import shared

    assert res.images == [], "a stopped generation makes no image"
    assert shared.state.interrupted
    assert text in res.comments and res.comments.startswith("[K-LoRA]")
    assert text in res.extra_generation_params["K-LoRA error"]  # the API's info JSON has no comments
    assert webui.adapter is None or webui.adapter.run is None


# ---- UI -------------------------------------------------------------------------------------------------------------
def test_ui_components_in_fields_order_with_prefixed_ids(webui):
    from modules.ui_components import InputAccordion

    controls = webui.txt2img_runner.inputs[webui.txt2img_script.args_from : webui.txt2img_script.args_to]
    assert len(controls) == len(FIELDS)
    assert isinstance(controls[0], InputAccordion)
    for control, field in zip(controls, FIELDS):
        assert control.elem_id.startswith(f"klora_txt2img_{field.name}")
        assert type(control.value) is type(field.default) or field.kind == "float"
    img = webui.img2img_runner.inputs[webui.img2img_script.args_from]
    assert img.elem_id.startswith("klora_img2img_")
    # LoRA pickers are filled from the WebUI's list; refresh rescans
    assert controls[1].choices == ["", "other", "painterly", "subject_v1"]  # "" first: empty on a fresh page
    shutil.copy(webui.paths["other"], webui.lora_dir / "late.safetensors")
    refresh = next(b for b in __import__("gradio").created if (b.elem_id or "") == "klora_txt2img_refresh")
    _, fn, _, outputs = refresh.events[0]
    updates = fn()
    assert all("late" in u["choices"] for u in updates) and outputs == [controls[1], controls[3]]


def test_settings_defaults_feed_the_ui(webui):
    from modules import shared

    shared.opts.klora_alpha = 2.25
    shared.opts.klora_show_map = True
    script = webui.Script()
    runner = __import__("modules.scripts", fromlist=["ScriptRunner"]).ScriptRunner()
    controls = runner.add_script(script)
    assert controls[5].value == 2.25 and controls[-1].value is True
    assert {
        "klora_alpha",
        "klora_beta",
        "klora_show_map",
        "klora_save_map",
        "klora_cache_size",
        "klora_on_error",
    } <= set(shared.opts.data_labels)


def test_ui_without_input_accordion(webui, monkeypatch):
    import modules.ui_components as components

    monkeypatch.delattr(components, "InputAccordion")
    runner = __import__("modules.scripts", fromlist=["ScriptRunner"]).ScriptRunner()
    controls = runner.add_script(webui.Script())
    assert controls[0].elem_id == "klora_txt2img_enabled" and controls[0].value is False


# ---- API arguments --------------------------------------------------------------------------------------------------
def test_api_positional_and_dict_forms_agree(webui):
    positional = [True, "subject_v1", 0.9, "painterly", 1.1, 1.2, 0.4]
    named = {
        "enabled": True,
        "content": "subject_v1",
        "content_weight": 0.9,
        "style": "painterly",
        "style_weight": 1.1,
        "alpha": 1.2,
        "beta": 0.4,
    }
    _, a = webui.generate(positional, prompt="x", steps=5, seed=2)
    _, b = webui.generate(named, prompt="x", steps=5, seed=2)
    assert torch.equal(a.images[0].tensor, b.images[0].tensor)
    assert a.infotexts[0] == b.infotexts[0] and "K-LoRA alpha: 1.2" in a.infotexts[0]
    # strings as JSON clients send them are coerced; aliases accepted
    _, c = webui.generate(
        {**named, "alpha": "1.2", "scope": "all shared layers", "enabled": "true"}, prompt="x", steps=5, seed=2
    )
    assert torch.equal(a.images[0].tensor, c.images[0].tensor)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({**GOOD, "alpha": "fast"}, "'alpha'"),
        ({**GOOD, "colour": 1}, "'colour'"),
        ({**GOOD, "method": "best"}, "'method'"),
        ([True, "subject_v1", "heavy"], "'content_weight'"),
        ({**GOOD, "beta": 99}, "'beta'"),
    ],
)
def test_invalid_payloads_stop_with_the_field_named(webui, payload, field):
    from modules import errors

    _, res = webui.generate(payload, prompt="x", steps=3)
    _stopped(webui, res, field)
    assert any("KLoraError" in line and field in line for line in errors.reported)


# ---- runtime problems -----------------------------------------------------------------------------------------------
def _corrupt(webui):
    (webui.lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return {**GOOD, "style": "broken"}


def _other_model(webui):
    from klora_ext import synthetic

    sd = synthetic.make_lora_state_dict([("unet:input_blocks.4.1.proj_in", (640, 640))], 2, arch="sdxl")
    synthetic.save_lora(webui.lora_dir / "xl_style.safetensors", sd)
    return {**GOOD, "style": "xl_style"}


def _both_other_model(webui):
    from klora_ext import synthetic

    layers = [("unet:input_blocks.4.1.proj_in", (640, 640)), ("unet:input_blocks.4.1.proj_out", (640, 640))]
    for name, seed in (("xl_subject", 1), ("xl_style", 2)):
        sd = synthetic.make_lora_state_dict(layers, 2, arch="sdxl", seed=seed)
        synthetic.save_lora(webui.lora_dir / f"{name}.safetensors", sd)
    return {"enabled": True, "content": "xl_subject", "style": "xl_style"}


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda w: {**GOOD, "content": "subjekt_v1"}, "did you mean 'subject_v1'"),
        (lambda w: {**GOOD, "style": "subject"}, "same file"),
        (lambda w: {**GOOD, "style": "subject_v1"}, "same LoRA"),
        (lambda w: {**GOOD, "style": ""}, "only one LoRA"),
        (lambda w: {"enabled": True}, "no LoRAs chosen"),
        (_corrupt, "broken"),
        (_other_model, "another base model"),  # the host matches none of its keys to this model
        (_both_other_model, "another base model"),
    ],
)
def test_runtime_problems_stop_by_default_and_continue_on_request(webui, make, text):
    from modules import shared

    payload = make(webui)
    _, res = webui.generate(payload, prompt="a photo", steps=3)
    _stopped(webui, res, text)
    shared.opts.klora_on_error = "continue without K-LoRA"
    _, res = webui.generate(payload, prompt="a photo", steps=3, seed=7)
    assert len(res.images) == 1 and not shared.state.interrupted
    assert "K-LoRA skipped: " in res.infotexts[0] and text.split("'")[0] in res.infotexts[0]
    assert "K-LoRA: v1" not in res.infotexts[0]
    for rec in webui.records:  # generated without K-LoRA
        assert all(torch.equal(rec["weights"][n], w) for n, w in webui.pristine.items())


def _forge_like_networks(monkeypatch):
    """A module named ``networks`` without A1111's merge functions (what Forge has); the fake model keeps its own.
    Set directly (not with monkeypatch, whose undo would put the fake host's module back after the purge)."""
    import sys

    sys.modules["networks"] = types.ModuleType("networks")


def test_disabled_host_says_what_is_supported(fake_a1111, tmp_path, monkeypatch):
    import fakehost

    host = fakehost.FakeHost(tmp_path)
    from klora_ext.webui import script

    _forge_like_networks(monkeypatch)
    script.STATE.detected = False
    script.STATE.adapter = None
    _, res = host.generate(GOOD, prompt="x", steps=2)
    assert res.images == [] and "AUTOMATIC1111 WebUI v1.6-v1.10" in res.comments and "Forge" in res.comments
    _, res = host.generate(None, prompt="x", steps=2)  # disabled K-LoRA: nothing happens
    assert len(res.images) == 1


def test_forge_detected_without_forge_adapter_disables_cleanly(fake_a1111, tmp_path, monkeypatch):
    import importlib.util

    import fakehost

    fakehost.FakeHost(tmp_path)
    from klora_ext.webui import script

    _forge_like_networks(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "modules_forge" else real(name, *a)
    )

    def fail(name, *a, **k):
        if name == "klora_ext.webui.forge":
            raise ImportError("no forge module")
        return __import__("importlib").import_module(name)

    monkeypatch.setattr(script.importlib, "import_module", fail)
    adapter, reason = script.detect_adapter()
    assert adapter is None and "Forge detected" in reason and "K-LoRA is off" in reason


# ---- XYZ ------------------------------------------------------------------------------------------------------------
def _labels():
    import xyz_grid

    return [o.label for o in xyz_grid.axis_options if o.label.startswith("[K-LoRA]")]


def test_xyz_axes_registered_once_and_after_reload(webui):
    import xyz_grid
    from modules import script_callbacks

    expected = [
        "[K-LoRA] Alpha",
        "[K-LoRA] Beta",
        "[K-LoRA] Method",
        "[K-LoRA] Schedule",
        "[K-LoRA] Content LoRA",
        "[K-LoRA] Style LoRA",
        "[K-LoRA] Enabled",
    ]
    assert _labels() == expected
    script_callbacks.before_ui_callback()
    assert _labels() == expected
    xyz_grid.axis_options[:] = xyz_grid.axis_options[:2]  # a UI reload rebuilds the plot module's list
    script_callbacks.before_ui_callback()
    assert _labels() == expected


def test_xyz_cells_get_their_own_values(webui):
    import xyz_grid

    p = webui.make_p(GOOD, prompt="x", steps=6, seed=3)
    cells = xyz_grid.run_axis(p, "[K-LoRA] Alpha", ["0.5", "3"])
    assert not hasattr(p, "_klora_xyz")
    (pa, ra), (pb, rb) = cells
    assert pa._klora_xyz == {"alpha": 0.5, "enabled": True} and pb._klora_xyz["alpha"] == 3.0
    assert "K-LoRA alpha: 0.5" in ra.infotexts[0] and "K-LoRA alpha: 3" in rb.infotexts[0]
    assert not torch.equal(ra.images[0].tensor, rb.images[0].tensor)
    # different alpha -> different plans
    assert len(ra.images) == len(rb.images) == 1


def test_xyz_axis_turns_k_lora_on_unless_enabled_axis_says_no(webui):
    import xyz_grid

    p = webui.make_p({"content": "subject_v1", "style": "painterly"}, prompt="x", steps=4)
    ((_, on),) = xyz_grid.run_axis(p, "[K-LoRA] Beta", ["0.7"])
    assert "K-LoRA beta: 0.7" in on.infotexts[0]
    off = xyz_grid.axis_options[[o.label for o in xyz_grid.axis_options].index("[K-LoRA] Enabled")]
    pc = webui.make_p({"content": "subject_v1", "style": "painterly"}, prompt="x", steps=4)
    off.apply(pc, "False", ["False"])
    xyz_grid.axis_options[[o.label for o in xyz_grid.axis_options].index("[K-LoRA] Beta")].apply(pc, 0.7, [0.7])
    assert pc._klora_xyz == {"enabled": False, "beta": 0.7}


def test_xyz_values_are_validated_before_the_first_cell(webui):
    import xyz_grid

    p = webui.make_p(GOOD, prompt="x", steps=3)
    with pytest.raises(KLoraError, match="'method' must be one of"):
        xyz_grid.run_axis(p, "[K-LoRA] Method", ["k-lora", "best"])
    with pytest.raises(KLoraError, match="did you mean"):
        xyz_grid.run_axis(p, "[K-LoRA] Style LoRA", ["painterly", "paintrly"])
    with pytest.raises(KLoraError, match="'alpha'"):
        xyz_grid.run_axis(p, "[K-LoRA] Alpha", ["1", "-2"])
    assert webui.records == []
    method = next(o for o in xyz_grid.axis_options if o.label == "[K-LoRA] Method")
    assert method.choices() == ["k-lora", "fixed", "random", "content-only", "style-only", "merge"]
    content = next(o for o in xyz_grid.axis_options if o.label == "[K-LoRA] Content LoRA")
    assert "subject_v1" in content.choices()


# ---- infotext -------------------------------------------------------------------------------------------------------
def test_infotext_round_trip_through_paste_and_api(webui):
    from modules.infotext_utils import parse_generation_parameters, paste

    args = KLoraArgs(
        enabled=True,
        content="subject_v1",
        style="painterly",
        content_weight=0.7,
        style_weight=1.25,
        alpha=2.0,
        beta=0.3,
        gamma_mode="manual",
        gamma=1.7,
        schedule="s*",
        clock="reference",
        scope="attention",
        k_multiplier=2.0,
        method="k-lora",
        te_policy="content",
        hires="continue",
    )
    _, res = webui.generate(args.to_dict(), prompt="a, b: c", steps=4)
    params = parse_generation_parameters(res.infotexts[0])
    assert KLoraArgs.from_infotext(params) == args.replace(show_map=False)
    updates = dict(paste(webui.txt2img_runner.infotext_fields, params))
    controls = webui.txt2img_runner.inputs[webui.txt2img_script.args_from : webui.txt2img_script.args_to]
    values = [updates.get(c) if updates.get(c) is not None else c.value for c in controls]
    assert KLoraArgs.from_positional(values) == args.replace(show_map=False)
    # defaults left out of the short infotext are pasted as defaults too
    _, res = webui.generate(GOOD, prompt="x", steps=2)
    params = parse_generation_parameters(res.infotexts[0])
    updates = dict(paste(webui.txt2img_runner.infotext_fields, params))
    assert updates[controls[5]] == 1.5 and updates[controls[0]] is True


def test_pasting_infotext_without_k_lora_turns_it_off(webui):
    from modules.infotext_utils import parse_generation_parameters, paste

    params = parse_generation_parameters("a cat\nNegative prompt: \nSteps: 20, Sampler: Euler, Seed: 1")
    updates = paste(webui.txt2img_runner.infotext_fields, params)
    assert updates[0][1] is False and all(v is None for _, v in updates[1:])


def test_paste_finds_a_renamed_lora_by_its_hash(webui):
    import networks
    from modules.infotext_utils import parse_generation_parameters, paste

    _, res = webui.generate(GOOD, prompt="x", steps=2)
    params = parse_generation_parameters(res.infotexts[0])
    (webui.lora_dir / "painterly.safetensors").rename(webui.lora_dir / "painterly_v2.safetensors")
    networks.list_available_networks()
    networks.available_networks["painterly_v2"].read_hash()
    controls = webui.txt2img_runner.inputs[webui.txt2img_script.args_from : webui.txt2img_script.args_to]
    updates = dict(paste(webui.txt2img_runner.infotext_fields, params))
    assert updates[controls[3]] == "painterly_v2" and updates[controls[1]] == "subject_v1"


def test_skipped_reason_and_hashes_in_infotext(webui):
    from modules.infotext_utils import parse_generation_parameters

    _, res = webui.generate(GOOD, prompt="x", steps=2)
    params = parse_generation_parameters(res.infotexts[0])
    assert params["K-LoRA"] == "v1" and len(params["K-LoRA content hash"]) == 12


# ---- endpoints ------------------------------------------------------------------------------------------------------
class _App:
    def __init__(self):
        self.routes = []

    def add_api_route(self, path, fn, methods):
        self.routes.append(types.SimpleNamespace(path=path, endpoint=fn, methods=methods))


def test_api_endpoints(webui):
    from modules import script_callbacks

    app = _App()
    script_callbacks.app_started_callback(None, app)
    script_callbacks.app_started_callback(None, app)  # idempotent
    routes = {r.path: r.endpoint for r in app.routes}
    assert sorted(routes) == ["/klora/v1/cache/clear", "/klora/v1/plan/last", "/klora/v1/schema", "/klora/v1/version"]
    version = routes["/klora/v1/version"]()
    assert version["host"] == "a1111" and version["infotext_version"] == "v1"
    schema = routes["/klora/v1/schema"]()
    assert [f["name"] for f in schema["fields"]] == [f.name for f in FIELDS]
    assert schema["fields"][5] == {
        "index": 5,
        "name": "alpha",
        "kind": "float",
        "default": 1.5,
        "label": "Alpha (scale slope)",
        "infotext": "K-LoRA alpha",
        "min": 0.0,
        "max": 10.0,
        "min_exclusive": False,
    }
    webui.generate(GOOD, prompt="x", steps=3)
    assert routes["/klora/v1/plan/last"]()["steps"] == 3
    assert routes["/klora/v1/cache/clear"]() == {"cleared": 1}
    assert routes["/klora/v1/cache/clear"]() == {"cleared": 0}


# ---- issue 11: a disabled K-LoRA never gets in the way; send-to, paste, XYZ labels, API answers -----------------
def _plain_image(webui, **kw):
    _, res = webui.generate(None, prompt="x", steps=3, seed=4, **kw)
    return res.images[0].tensor


@pytest.mark.parametrize(
    "payload",
    [
        [False, "", 1.0, "", 1.0, 1.5, 0.5, "auto-mean", None],  # the Gamma box emptied
        [False, "", 1.0, "", 1.0, 1.5, 0.5, "manual", 0],  # a 0 typed there
        {"enabled": False, "alpha": "fast", "beta": 99},  # an old client resending junk
        [False, "subject_v1", "heavy"],
    ],
)
def test_disabled_k_lora_with_invalid_fields_never_blocks(webui, payload):
    from modules import shared

    plain = _plain_image(webui)
    _, res = webui.generate(payload, prompt="x", steps=3, seed=4)
    assert not shared.state.interrupted and len(res.images) == 1
    assert torch.equal(res.images[0].tensor, plain)
    assert not any(k.startswith("K-LoRA") for k in res.extra_generation_params)


def test_gamma_box_only_matters_in_manual_mode(webui):
    from modules import shared

    _, res = webui.generate({**GOOD, "gamma": None}, prompt="x", steps=3)
    assert len(res.images) == 1 and not shared.state.interrupted
    _, res = webui.generate({**GOOD, "gamma_mode": "manual", "gamma": 0}, prompt="x", steps=3)
    _stopped(webui, res, "'gamma'")


def test_disabled_xyz_cell_with_a_bad_ui_value_still_renders(webui):
    import xyz_grid

    p = webui.make_p([True, "subject_v1", 1.0, "painterly", 1.0, 1.5, 0.5, "auto-mean", None], prompt="x", steps=3)
    cells = xyz_grid.run_axis(p, "[K-LoRA] Enabled", ["True", "False"])
    assert [len(res.images) for _, res in cells] == [1, 1]


def _controls(webui, img2img=False):
    runner = webui.img2img_runner if img2img else webui.txt2img_runner
    script = webui.img2img_script if img2img else webui.txt2img_script
    return runner.inputs[script.args_from : script.args_to]


def test_send_to_img2img_carries_every_k_lora_control(webui):
    from modules.infotext_utils import send_to

    chosen = KLoraArgs(
        enabled=True,
        content="subject_v1",
        content_weight=0.7,
        style="painterly",
        style_weight=1.3,
        alpha=2.5,
        beta=0.25,
        gamma_mode="manual",
        gamma=1.75,
        schedule="s*",
        clock="reference",
        scope="attention",
        k_multiplier=2.0,
        method="fixed",
        te_policy="style",
        hires="keep",
        show_map=True,
    )
    for control, value in zip(_controls(webui), chosen.to_positional()):
        control.value = value  # what the user set in txt2img
    runner_t, runner_i = webui.txt2img_runner, webui.img2img_runner
    sent = dict(send_to(runner_t.infotext_fields, runner_i.infotext_fields, runner_t.paste_field_names))
    received = [sent.get(c, c.value) for c in _controls(webui, img2img=True)]
    assert KLoraArgs.from_positional(received) == chosen
    assert all(c in sent for c in _controls(webui, img2img=True))


def _log_lines(monkeypatch):
    from klora_ext.log import logger

    lines: list[str] = []
    monkeypatch.setattr(logger, "warning", lambda msg, *a: lines.append(msg % a if a else msg))
    return lines


@pytest.mark.parametrize(
    "bad", [{"K-LoRA method": "k-lora-v2"}, {"K-LoRA alpha": "99"}, {"K-LoRA gamma mode": "auto-max"}]
)
def test_unparsable_paste_changes_nothing_and_says_why_once(webui, monkeypatch, bad):
    import gradio
    from modules.infotext_utils import paste

    params = {"Prompt": "x", "K-LoRA": "v1", "K-LoRA content": "subject_v1", "K-LoRA style": "painterly", **bad}
    lines = _log_lines(monkeypatch)
    gradio.warnings_shown.clear()
    updates = paste(webui.txt2img_runner.infotext_fields, params)
    assert [v for _, v in updates] == [None] * len(updates)  # Enable not ticked, nothing else touched
    key = next(iter(bad))
    field = next(f.name for f in FIELDS if f.infotext == key)
    assert len(lines) == 1 and f"'{field}'" in lines[0]
    assert len(gradio.warnings_shown) == 1 and f"'{field}'" in gradio.warnings_shown[0]


def test_xyz_cells_carry_their_own_infotext(webui):
    import xyz_grid
    from modules.infotext_utils import parse_generation_parameters

    p = webui.make_p({**GOOD, "alpha": 0.5}, prompt="x", steps=4)
    cells = xyz_grid.run_axis(p, "[K-LoRA] Alpha", ["0.5", "1.5", "0.75"])
    alphas = [parse_generation_parameters(res.infotexts[0]).get("K-LoRA alpha") for _, res in cells]
    assert alphas == ["0.5", None, "0.75"]  # 1.5 is the default: not written, and not the previous cell's
    p = webui.make_p(GOOD, prompt="x", steps=4)
    cells = xyz_grid.run_axis(p, "[K-LoRA] Enabled", ["True", "False"])
    on, off = (parse_generation_parameters(res.infotexts[0]) for _, res in cells)
    assert on["K-LoRA"] == "v1" and not any(k.startswith("K-LoRA") for k in off)
    assert p.extra_generation_params == {}  # the plot's own p is left alone


def test_plan_last_is_cleared_after_a_failed_run(webui, monkeypatch):
    from modules import script_callbacks

    app = _App()
    script_callbacks.app_started_callback(None, app)
    plan_last = next(r.endpoint for r in app.routes if r.path == "/klora/v1/plan/last")

    class HTTPException(Exception):  # noqa: N818 - fastapi's name
        def __init__(self, status_code, detail=None):
            super().__init__(detail)
            self.status_code, self.detail = status_code, detail

    monkeypatch.setitem(sys.modules, "fastapi", types.SimpleNamespace(HTTPException=HTTPException))
    webui.generate(GOOD, prompt="x", steps=3)
    assert plan_last()["steps"] == 3
    webui.generate({**GOOD, "style": "paintrly"}, prompt="x", steps=5)
    with pytest.raises(HTTPException) as failed:
        plan_last()
    assert failed.value.status_code == 404 and "failed" in failed.value.detail and "paintrly" in failed.value.detail
    webui.generate(None, prompt="x", steps=2)  # a generation without K-LoRA does not change it
    with pytest.raises(HTTPException):
        plan_last()
    webui.generate(GOOD, prompt="x", steps=4)
    assert plan_last()["steps"] == 4


def _infotext_body(params: str) -> bytes:
    import json

    return json.dumps({"prompt": "x", "infotext": params}).encode()


def test_api_infotext_with_a_bad_k_lora_value_answers_the_real_reason(webui):
    from klora_ext.webui import api

    good = "a cat\nSteps: 20, Seed: 1, K-LoRA: v1, K-LoRA content: subject_v1, K-LoRA style: painterly"
    assert api.payload_error(_infotext_body(good)) is None
    assert api.payload_error(_infotext_body("a cat\nSteps: 20, Seed: 1, Sampler: Euler")) is None
    error = api.payload_error(_infotext_body(good + ", K-LoRA method: k-lora-v2"))
    assert error is not None and error.startswith("[K-LoRA]") and "'method'" in error and "infotext" in error
    # the same infotext through the WebUI's own mapping never turns K-LoRA on with the LoRAs missing
    from modules.infotext_utils import api_script_args, parse_generation_parameters

    params = parse_generation_parameters(good + ", K-LoRA method: k-lora-v2")
    runner = webui.txt2img_runner
    assert api_script_args(runner.infotext_fields, runner.inputs, params) == {}


def test_fresh_gradio4_page_shows_both_pickers_empty(webui):
    import gradio

    controls = _controls(webui)
    for picker in (controls[1], controls[3]):
        assert gradio.dropdown_shown_value_gradio4(picker) == ""
        assert {"subject_v1", "painterly"} <= set(picker.choices)


def test_no_common_layer_message_does_not_guess_the_base_models(webui):
    only_te = [(i, s) for i, s in __import__("fakehost").layer_specs() if i.startswith("te1:")]
    only_unet = [(i, s) for i, s in __import__("fakehost").layer_specs() if i.startswith("unet:")]
    import fakehost

    fakehost.write_lora(webui.lora_dir / "te_only.safetensors", only_te, seed=5)
    fakehost.write_lora(webui.lora_dir / "unet_only.safetensors", only_unet, seed=6)
    import networks

    networks.list_available_networks()
    _, res = webui.generate({**GOOD, "content": "te_only", "style": "unet_only"}, prompt="x", steps=2)
    message = res.extra_generation_params["K-LoRA error"]
    assert "no common layer" in message and " vs " not in message and "?" not in message.split(":")[0]
