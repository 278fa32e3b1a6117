"""Opt-in checks against a running AUTOMATIC1111 WebUI (v1.10, started with ``--api``; see README.md here).

    KLORA_WEBUI_URL=http://127.0.0.1:7860 python -m pytest tests/integration/test_a1111_live.py

Environment: ``KLORA_WEBUI_URL`` (required, else skipped), ``KLORA_CONTENT`` / ``KLORA_STYLE`` (LoRA names on the
server; default the two written by make_random_loras.py), ``KLORA_WEBUI_TIMEOUT`` (seconds per request, default
900: CPU servers are slow). Only the standard library talks to the server.
"""

from __future__ import annotations

import json
import os

import klora_live
import pytest
from klora_live import LiveServer, base_payload, klora, png_text

URL = os.environ.get("KLORA_WEBUI_URL", "").rstrip("/")
CONTENT = os.environ.get("KLORA_CONTENT", "klora_it_content")
STYLE = os.environ.get("KLORA_STYLE", "klora_it_style")
TIMEOUT = float(os.environ.get("KLORA_WEBUI_TIMEOUT", "900"))

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not URL, reason="set KLORA_WEBUI_URL to run")]

BASE = base_payload(3, 64)
KLORA = {"enabled": True, "content": CONTENT, "style": STYLE}


SERVER = LiveServer(URL, TIMEOUT, BASE)
_request, txt2img = SERVER.request, SERVER.txt2img
_klora, _png_text = klora, png_text


@pytest.fixture(scope="module", autouse=True)
def _server_has_the_loras():
    names = {x["name"] for x in _request("/sdapi/v1/loras")}
    missing = {CONTENT, STYLE} - names
    if missing:
        pytest.skip(f"the server has no LoRA named {sorted(missing)} (see tests/integration/make_random_loras.py)")


def test_scripts_lists_k_lora():
    scripts = _request("/sdapi/v1/scripts")
    assert "k-lora" in scripts["txt2img"] and "k-lora" in scripts["img2img"]
    info = [s for s in _request("/sdapi/v1/script-info") if s["name"] == "k-lora"]
    assert info and info[0]["is_alwayson"]
    assert _request("/klora/v1/version")["host"] == "a1111"


def test_txt2img_with_k_lora_writes_infotext():
    result = txt2img(**_klora([{**KLORA, "alpha": 1.25}]))
    assert len(result["images"]) == 1
    text = result["parsed_info"]["infotexts"][0]
    assert "K-LoRA: v1" in text and f"K-LoRA content: {CONTENT}" in text and "K-LoRA alpha: 1.25" in text
    assert _png_text(result["images"][0])["parameters"] == text


def test_positional_and_dict_forms_give_the_same_image():
    a = txt2img(**_klora([True, CONTENT, 1.0, STYLE, 1.0, 1.5, 0.5]))
    b = txt2img(**_klora([KLORA]))
    assert a["images"][0] == b["images"][0]


def test_selection_map_returned_when_asked():
    result = txt2img(**_klora([{**KLORA, "show_map": True}]))
    assert len(result["images"]) == 2
    chunks = _png_text(result["images"][1])
    plan = json.loads(chunks["klora_plan"])
    assert plan["steps"] == BASE["steps"] and len(plan["map"]) == BASE["steps"]
    assert _request("/klora/v1/plan/last")["steps"] == BASE["steps"]


def test_invalid_payload_is_refused_with_422_naming_the_field():
    klora_live.check_invalid_payload_refused(SERVER, KLORA, CONTENT)


def test_unknown_lora_stops_the_generation_with_the_message():
    klora_live.check_unknown_lora_stops(SERVER, KLORA)


def test_api_infotext_field_restores_the_k_lora_settings():
    klora_live.check_api_infotext_restores_k_lora(SERVER, KLORA)


def test_xyz_over_alpha_gives_one_image_per_value():
    xyz = next(s for s in _request("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    x_type = choices.index("[K-LoRA] Alpha")
    script_args = [
        x_type,
        "1.0, 2.0",
        [],
        0,
        "",
        [],
        0,
        "",
        [],
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        0,
        True,
    ]
    result = txt2img(script_name="x/y/z plot", script_args=script_args, **_klora([KLORA]))
    infotexts = result["parsed_info"]["infotexts"]
    cells = [t for t in infotexts[1:] if "K-LoRA" in t]
    assert len(result["images"]) == 3 and len(cells) == 2  # the grid, then one image per value
    assert "K-LoRA alpha: 1" in cells[0] and "K-LoRA alpha: 2" in cells[1]


def test_disabled_after_enabled_equals_never_enabled():
    never = txt2img(seed=77)["images"][0]
    txt2img(seed=77, **_klora([KLORA]))
    after = txt2img(seed=77)["images"][0]
    assert never == after
    # also with an unrelated prompt LoRA around the K-LoRA run
    plain = txt2img(seed=78, prompt=f"a photo <lora:{CONTENT}:0.7>")["images"][0]
    txt2img(seed=78, prompt=f"a photo <lora:{CONTENT}:0.7>", **_klora([KLORA]))
    assert txt2img(seed=78, prompt=f"a photo <lora:{CONTENT}:0.7>")["images"][0] == plain
