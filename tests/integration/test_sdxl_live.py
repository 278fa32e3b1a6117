"""Opt-in SDXL checks against a running A1111 v1.10 or Forge with the reduced random SDXL (see README.md here).

    KLORA_SDXL_URL=http://127.0.0.1:7860 python -m pytest tests/integration/test_sdxl_live.py

The server runs ``random-sdxl.safetensors`` (make_random_sdxl_checkpoint.py) with the LoRAs of
make_random_sdxl_loras.py and the test-only probe extension (probe_extension/, ``/klora-probe/v1/host-layers``: the
layers the HOST's own loader patches for a file). Environment: ``KLORA_SDXL_URL`` (required, else skipped),
``KLORA_SDXL_SIZE`` (default 64), ``KLORA_SDXL_STEPS`` (default 2), ``KLORA_SDXL_TIMEOUT`` (seconds per request,
default 1800). Live previews are off in every payload (SDXL's default preview would try to download a model).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from klora_live import LiveServer, base_payload, decode, klora

URL = os.environ.get("KLORA_SDXL_URL", "").rstrip("/")
SIZE = int(os.environ.get("KLORA_SDXL_SIZE", "64"))
STEPS = int(os.environ.get("KLORA_SDXL_STEPS", "2"))
TIMEOUT = float(os.environ.get("KLORA_SDXL_TIMEOUT", "1800"))
CONTENT, STYLE = "klora_xl_content", "klora_xl_style"
STYLE_DIFFUSERS, STYLE_PEFT = "klora_xl_style_diffusers", "klora_xl_style_peft"

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not URL, reason="set KLORA_SDXL_URL to run")]

BASE = {**base_payload(STEPS, SIZE), "override_settings": {"live_previews_enable": False}}
SERVER = LiveServer(URL, TIMEOUT, BASE)
PAIR = {"enabled": True, "content": CONTENT, "style": STYLE}


def pixels(b64: str) -> np.ndarray:
    return decode(b64)


def host_layers(name: str) -> dict:
    return SERVER.request(f"/klora-probe/v1/host-layers?name={name}")


@pytest.fixture(scope="module", autouse=True)
def never_enabled() -> dict:
    """Checks the server, then the plain images of seeds 90/91 BEFORE any K-LoRA generation on this server run."""
    version = SERVER.request("/klora/v1/version")
    if version.get("host") not in ("a1111", "forge") or version.get("disabled_reason"):
        pytest.skip(f"K-LoRA is not active at {URL}: {version}")
    names = {x["name"] for x in SERVER.request("/sdapi/v1/loras")}
    missing = {CONTENT, STYLE, STYLE_DIFFUSERS, STYLE_PEFT} - names
    if missing:
        pytest.skip(f"the server has no LoRA named {sorted(missing)} (see make_random_sdxl_loras.py)")
    model = SERVER.request("/sdapi/v1/options").get("sd_model_checkpoint", "")
    if "sdxl" not in model.lower():
        pytest.skip(f"the loaded checkpoint {model!r} is not the random SDXL one")
    return {
        "host": version["host"],
        "plain": pixels(SERVER.txt2img(seed=90)["images"][0]),
        "prompt_lora": pixels(SERVER.txt2img(seed=91, prompt=f"a photo <lora:{STYLE}:0.7>")["images"][0]),
    }


def test_probe_sees_the_host_patch_each_file():
    content, style = host_layers(CONTENT), host_layers(STYLE)
    assert content["unet"] and content["te"], content  # UNet + both text encoders
    assert style["unet"] and not style["te"]
    # the diffusers-path copy of the style file patches exactly the same host modules
    assert host_layers(STYLE_DIFFUSERS)["unet"] == style["unet"]


def test_plan_layer_count_equals_the_hosts_shared_patched_layers():
    result = SERVER.txt2img(seed=5, **klora([PAIR]))
    assert len(result["images"]) == 1, result["parsed_info"].get("extra_generation_params")
    plan = SERVER.request("/klora/v1/plan/last")
    shared = set(host_layers(CONTENT)["unet"]) & set(host_layers(STYLE)["unet"])
    assert len(plan["layers"]) == len(shared)


def test_mixed_format_pair_gives_the_same_image_as_the_same_format_pair():
    same = SERVER.txt2img(seed=6, **klora([PAIR]))
    n_same = len(SERVER.request("/klora/v1/plan/last")["layers"])
    mixed = SERVER.txt2img(seed=6, **klora([{**PAIR, "style": STYLE_DIFFUSERS}]))
    info = mixed["parsed_info"]
    assert len(mixed["images"]) == 1, info.get("extra_generation_params")
    assert len(SERVER.request("/klora/v1/plan/last")["layers"]) == n_same
    assert np.array_equal(pixels(mixed["images"][0]), pixels(same["images"][0]))


def test_peft_style_file_is_scored_on_what_the_host_applies(never_enabled):
    host = set(host_layers(STYLE_PEFT)["unet"])
    result = SERVER.txt2img(seed=7, **klora([{**PAIR, "style": STYLE_PEFT}]))
    params = result["parsed_info"].get("extra_generation_params", {})
    shared = host & set(host_layers(CONTENT)["unet"])
    # the host's own verdict: does the file in the prompt change the image at all? (Forge's loader maps some PEFT
    # keys, which the probe lists, but then drops the whole file for > 12 unmatched keys)
    applied = not np.array_equal(
        pixels(SERVER.txt2img(seed=90, prompt=f"a photo <lora:{STYLE_PEFT}:1>")["images"][0]), never_enabled["plain"]
    )
    if not shared or not applied:
        # the host applies nothing of it in common with the content file (A1111 v1.10 maps no PEFT key):
        # K-LoRA must say so instead of switching layers the host never patches
        assert result["images"] == [] or "K-LoRA error" in params or "K-LoRA skipped" in str(params), params
        return
    assert len(result["images"]) == 1, params
    assert len(SERVER.request("/klora/v1/plan/last")["layers"]) == len(shared)


@pytest.mark.parametrize(("method", "lora"), [("content-only", CONTENT), ("style-only", STYLE)])
def test_single_lora_method_is_pixel_identical_to_the_plain_lora(method, lora, never_enabled):
    plain = SERVER.txt2img(seed=90, prompt=f"a photo <lora:{lora}:1>")["images"][0]
    # the LoRA must visibly change this seed's image, else the equality below would prove nothing
    assert not np.array_equal(pixels(plain), never_enabled["plain"])
    ours = SERVER.txt2img(seed=90, **klora([{**PAIR, "method": method}]))
    assert len(ours["images"]) == 1, ours["parsed_info"].get("extra_generation_params")
    assert np.array_equal(pixels(ours["images"][0]), pixels(plain))


def test_plain_generation_afterwards_equals_never_enabled(never_enabled):
    SERVER.txt2img(seed=90, **klora([PAIR]))
    assert np.array_equal(pixels(SERVER.txt2img(seed=90)["images"][0]), never_enabled["plain"])
    prompt = f"a photo <lora:{STYLE}:0.7>"
    SERVER.txt2img(seed=91, prompt=prompt, **klora([PAIR]))
    assert np.array_equal(pixels(SERVER.txt2img(seed=91, prompt=prompt)["images"][0]), never_enabled["prompt_lora"])
