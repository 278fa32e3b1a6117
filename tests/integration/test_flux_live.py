"""Opt-in Flux checks against a running Forge with the reduced random Flux (see README.md here, "Flux").

    KLORA_FLUX_URL=http://127.0.0.1:7861 python -m pytest tests/integration/test_flux_live.py

The server is a Forge test copy patched by patch_forge_for_reduced_flux.py, running ``random-flux.safetensors``
(make_random_flux_checkpoint.py) with the LoRAs of make_random_flux_loras.py and the test-only probe extension
(probe_extension/, ``/klora-probe/v1/host-layers``: what Forge's own loader patches for a file, and the row slices
its key map knows for each fused weight). Environment: ``KLORA_FLUX_URL`` (required, else skipped),
``KLORA_FLUX_SIZE`` (default 64), ``KLORA_FLUX_STEPS`` (default 2), ``KLORA_FLUX_TIMEOUT`` (seconds per request,
default 1800), ``KLORA_FLUX_LORA_DIR`` (the server's LoRA folder, readable here: then the host-free CLI's plan of the
pair is compared with the server's). Live previews are off in every payload.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from klora_live import LiveServer, base_payload, decode, klora

URL = os.environ.get("KLORA_FLUX_URL", "").rstrip("/")
SIZE = int(os.environ.get("KLORA_FLUX_SIZE", "64"))
STEPS = int(os.environ.get("KLORA_FLUX_STEPS", "2"))
TIMEOUT = float(os.environ.get("KLORA_FLUX_TIMEOUT", "1800"))
LORA_DIR = os.environ.get("KLORA_FLUX_LORA_DIR", "")
CONTENT, STYLE = "klora_flux_content", "klora_flux_style"  # kohya / sd-scripts keys, fused qkv and linear1
CONTENT_DIFFUSERS, STYLE_DIFFUSERS = CONTENT + "_diffusers", STYLE + "_diffusers"  # diffusers keys, split q/k/v/mlp
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not URL, reason="set KLORA_FLUX_URL to run")]

# Flux-dev takes no real CFG (distilled guidance instead): cfg 1 keeps one model call per step. Scheduler "Simple"
# (what Forge's Flux UI preset picks): with "Automatic", Forge's Euler sampled this Flux at sigma 9999, then 0 (the
# predictor's timestep range, not its sigmas) and every image came back NaN, i.e. black.
BASE = {
    **base_payload(STEPS, SIZE),
    "cfg_scale": 1,
    "scheduler": "Simple",
    "override_settings": {"live_previews_enable": False},
}
SERVER = LiveServer(URL, TIMEOUT, BASE)
MIXED = {"enabled": True, "content": CONTENT, "style": STYLE_DIFFUSERS}
SAME = {"enabled": True, "content": CONTENT, "style": STYLE}


def pixels(b64: str) -> np.ndarray:
    return decode(b64)


def host_layers(name: str) -> dict:
    return SERVER.request(f"/klora-probe/v1/host-layers?name={name}")


_SLICE = re.compile(r"^(.*)\[(\d+):(\d+):(\d+)\]$")


def host_regions(probe: dict) -> dict[str, list[tuple[int, int] | None]]:
    """Per parameter the host patches: the row ranges (start, size) it patches, None for the whole weight."""
    out: dict[str, list[tuple[int, int] | None]] = {}
    for entry in probe["unet"]:
        m = _SLICE.match(entry)
        if m is None:
            out.setdefault(entry, []).append(None)
        else:
            assert m.group(2) == "0", entry  # Forge's Flux slices are row slices
            out.setdefault(m.group(1), []).append((int(m.group(3)), int(m.group(4))))
    return out


def host_shared_layer_count(a: dict, b: dict) -> int:
    """The layers both files patch, counted the host's way: one per parameter both patch, except that a fused weight
    Forge's key map addresses by row slices (Flux qkv, linear1) counts once per slice both files reach (a file
    patching the whole weight reaches every slice)."""
    ra, rb = host_regions(a), host_regions(b)
    count = 0
    for param in ra.keys() & rb.keys():
        slices = {tuple(s) for s in a.get("unet_slices", {}).get(param, []) + b.get("unet_slices", {}).get(param, [])}
        if not slices:
            count += 1
            continue
        for _dim, start, size in slices:

            def reaches(ranges: list, lo: int = start, hi: int = start + size) -> bool:
                return any(r is None or (r[0] < hi and lo < r[0] + r[1]) for r in ranges)

            count += reaches(ra[param]) and reaches(rb[param])
    return count


def generate(**extra) -> tuple[np.ndarray, dict]:
    result = SERVER.txt2img(**extra)
    params = result["parsed_info"].get("extra_generation_params", {})
    assert len(result["images"]) == 1, params
    image = pixels(result["images"][0])
    # a constant image (e.g. NaN latents, cast to 0) would make every pixel comparison below pass vacuously
    assert image.std() > 1.0, f"the server returned a flat image (min {image.min()}, max {image.max()})"
    return image, params


@pytest.fixture(scope="module", autouse=True)
def never_enabled() -> dict:
    """Checks the server, then the plain images of seeds 90/91 BEFORE any K-LoRA generation on this server run."""
    version = SERVER.request("/klora/v1/version")
    if version.get("host") != "forge" or version.get("disabled_reason"):
        pytest.skip(f"K-LoRA is not active on a Forge at {URL}: {version}")
    names = {x["name"] for x in SERVER.request("/sdapi/v1/loras")}
    missing = {CONTENT, STYLE, CONTENT_DIFFUSERS, STYLE_DIFFUSERS} - names
    if missing:
        pytest.skip(f"the server has no LoRA named {sorted(missing)} (see make_random_flux_loras.py)")
    model = SERVER.request("/sdapi/v1/options").get("sd_model_checkpoint", "")
    if "flux" not in model.lower():
        pytest.skip(f"the loaded checkpoint {model!r} is not the random Flux one")
    return {
        "plain": generate(seed=90)[0],
        "prompt_lora": generate(seed=91, prompt=f"a photo <lora:{STYLE_DIFFUSERS}:0.7>")[0],
    }


def test_probe_sees_forge_patch_fused_and_split_files():
    content, style = host_layers(CONTENT), host_layers(STYLE_DIFFUSERS)
    assert content["unet"] and not content["unmatched"], content
    assert style["unet"] and not style["unmatched"], style
    # kohya keys patch whole fused weights; diffusers keys patch row slices of the same weights
    assert not any(_SLICE.match(e) for e in content["unet"]), content["unet"]
    assert any(_SLICE.match(e) for e in style["unet"]), style["unet"]
    assert host_regions(content).keys() == host_regions(style).keys()
    # files of the same layers in the same key style patch the same targets
    assert host_layers(CONTENT_DIFFUSERS)["unet"] == style["unet"]
    assert host_layers(STYLE)["unet"] == content["unet"]
    # Forge's key map slices qkv into q/k/v and linear1 into q/k/v/mlp
    assert sorted(len(v) for v in content["unet_slices"].values()) == sorted(
        len(v) for v in style["unet_slices"].values()
    )
    assert {len(v) for v in content["unet_slices"].values()} == {3, 4}


def test_plain_forge_applies_both_key_styles_alike():
    """Baseline of the host alone: the fused and the split file of the same weights give (near) the same image."""
    fused, _ = generate(seed=4, prompt=f"a photo <lora:{STYLE}:1>")
    split, _ = generate(seed=4, prompt=f"a photo <lora:{STYLE_DIFFUSERS}:1>")
    plain, _ = generate(seed=4)
    diff = np.abs(fused.astype(int) - split.astype(int)).max()
    print(f"fused vs split style LoRA in plain Forge: max pixel difference {diff}")
    assert diff <= 2
    assert not np.array_equal(fused, plain)  # the LoRA changes the image


def test_mixed_format_pair_gives_an_image_and_the_hosts_layer_count():
    image, params = generate(seed=5, **klora([MIXED]))
    assert "K-LoRA error" not in params, params
    plan = SERVER.request("/klora/v1/plan/last")
    expected = host_shared_layer_count(host_layers(CONTENT), host_layers(STYLE_DIFFUSERS))
    print(f"mixed pair: plan {len(plan['layers'])} layers, host shared layers {expected}")
    assert len(plan["layers"]) == expected
    assert not np.array_equal(image, generate(seed=5)[0])


def test_same_format_pair_has_the_hosts_layer_count_and_the_mixed_pairs_plan():
    same_image, _ = generate(seed=6, **klora([SAME]))
    same = SERVER.request("/klora/v1/plan/last")
    assert len(same["layers"]) == host_shared_layer_count(host_layers(CONTENT), host_layers(STYLE))
    mixed_image, _ = generate(seed=6, **klora([MIXED]))
    mixed = SERVER.request("/klora/v1/plan/last")
    # the style file holds the same weights in both key styles: same layers, same switch steps
    flips = {(x["id"], x["flip_step"]) for x in same["layers"]}
    assert {(x["id"], x["flip_step"]) for x in mixed["layers"]} == flips
    diff = np.abs(mixed_image.astype(int) - same_image.astype(int)).max()
    print(f"mixed vs same-format K-LoRA pair: max pixel difference {diff}")
    assert diff <= 2


@pytest.mark.parametrize(("method", "lora"), [("content-only", CONTENT), ("style-only", STYLE_DIFFUSERS)])
def test_single_lora_method_is_pixel_identical_to_the_plain_lora(method, lora):
    plain, _ = generate(seed=8, prompt=f"a photo <lora:{lora}:1>")
    ours, params = generate(seed=8, **klora([{**MIXED, "method": method}]))
    assert "K-LoRA error" not in params, params
    assert np.array_equal(ours, plain)


@pytest.mark.skipif(not LORA_DIR, reason="set KLORA_FLUX_LORA_DIR to compare with the CLI plan")
def test_cli_plan_of_the_files_equals_the_servers_plan(tmp_path):
    generate(seed=9, **klora([MIXED]))
    server = SERVER.request("/klora/v1/plan/last")
    out = tmp_path / "plan.json"
    files = [os.path.join(LORA_DIR, n + ".safetensors") for n in (CONTENT, STYLE_DIFFUSERS)]
    options = ["--steps", str(server["steps"]), "--alpha", str(server["alpha"]), "--beta", str(server["beta"])]
    cmd = [sys.executable, "-m", "klora_ext", "plan", *files, *options, "--json", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    cli = json.loads(out.read_text())
    assert cli["gamma"] == pytest.approx(server["gamma"], rel=1e-4)
    assert [x["id"] for x in cli["layers"]] == [x["id"] for x in server["layers"]]
    assert [x["flip_step"] for x in cli["layers"]] == [x["flip_step"] for x in server["layers"]]
    for a, b in zip(cli["layers"], server["layers"], strict=True):
        assert a["score_content"] == pytest.approx(b["score_content"], rel=1e-4)
        assert a["score_style"] == pytest.approx(b["score_style"], rel=1e-4)


def test_plain_generation_afterwards_equals_never_enabled(never_enabled):
    generate(seed=90, **klora([MIXED]))
    assert np.array_equal(generate(seed=90)[0], never_enabled["plain"])
    prompt = f"a photo <lora:{STYLE_DIFFUSERS}:0.7>"
    generate(seed=91, prompt=prompt, **klora([MIXED]))
    assert np.array_equal(generate(seed=91, prompt=prompt)[0], never_enabled["prompt_lora"])
