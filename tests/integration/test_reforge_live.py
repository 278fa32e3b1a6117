"""Opt-in live tier against a running reForge (``Panchovix/stable-diffusion-webui-reForge`` ``main``: the 2025
ComfyUI-style ``ldm_patched`` ModelPatcher, gradio 3.41; started with ``--api``).

    KLORA_REFORGE_URL=http://127.0.0.1:7864 python -m pytest -q tests/integration/test_reforge_live.py

Environment: ``KLORA_REFORGE_URL`` (required, else skipped), ``KLORA_CONTENT`` / ``KLORA_STYLE``,
``KLORA_REFORGE_STEPS`` (4), ``KLORA_REFORGE_SIZE`` (64), ``KLORA_REFORGE_TIMEOUT`` (900). K-LoRA runs there through
its ldm_patched adapter, so the version endpoint must report ``ldm_patched``. The checks are in forks_live.py; only
the X/Y/Z one is rewritten here: reForge's ``scripts/xyz_grid.py`` takes 21 arguments (it adds "Draw individual
labels", "Skip final grid generation" and "Items per grid" after "Draw legend"), not A1111's 18, so the script's
arguments are built from the labels ``/sdapi/v1/script-info`` reports. With a content LoRA that has text-encoder
layers (e.g. ``KLORA_CONTENT=klora_it_content_te``) the prompt-copy checks cover stripping the copy from the CLIP
patcher as well as from the UNet patcher.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from forks_live import KLORA, LiveTier
from klora_live import decode, klora

pytestmark = [pytest.mark.integration]

# X/Y/Z arguments after the nine axis fields, set by label (every other one keeps the default the server reports)
XYZ_OPTIONS = {"Draw legend": True, "Include Sub Images": True, "Use text inputs instead of dropdowns": True}


def xyz_script_args(server, x_label: str, x_values: str) -> list:
    """Positional X/Y/Z plot arguments (txt2img) for one X axis, in the layout this server's script declares."""
    xyz = next(s for s in server.request("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"])
    args = xyz["args"]
    labels = [a.get("label") for a in args]
    assert labels[:9] == [f"{a} {k}" for a in "XYZ" for k in ("type", "values", "values")], labels
    missing = set(XYZ_OPTIONS) - set(labels)
    assert not missing, f"the X/Y/Z script has no option {sorted(missing)}: {labels}"
    out = [args[0]["choices"].index(x_label), x_values, [], 0, "", [], 0, "", []]
    for a in args[9:]:
        value = XYZ_OPTIONS.get(a.get("label"), a.get("value"))
        out.append(False if value is None else value)
    return out


class TestReForgeLive(LiveTier):
    URL = os.environ.get("KLORA_REFORGE_URL", "").rstrip("/")
    HOST = "ldm_patched"
    STEPS = int(os.environ.get("KLORA_REFORGE_STEPS", "4"))
    SIZE = int(os.environ.get("KLORA_REFORGE_SIZE", "64"))
    TIMEOUT = float(os.environ.get("KLORA_REFORGE_TIMEOUT", "900"))

    def test_xyz_over_alpha_gives_one_image_per_value(self, server):
        script_args = xyz_script_args(server, "[K-LoRA] Alpha", "1.0, 2.0")
        result = server.txt2img(script_name="x/y/z plot", script_args=script_args, **klora([KLORA]))
        cells = [t for t in result["parsed_info"]["infotexts"][1:] if "K-LoRA" in t]
        assert len(result["images"]) == 3 and len(cells) == 2  # the grid, then one image per value
        assert "K-LoRA alpha: 1" in cells[0] and "K-LoRA alpha: 2" in cells[1]
        assert not np.array_equal(decode(result["images"][1]), decode(result["images"][2]))
