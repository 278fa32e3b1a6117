"""The live tier shared by the Forge continuations (Forge Neo, Forge Classic, reForge): one class of checks, bound to
a server by a subclass in ``test_<host>_live.py`` (this module has no tests of its own).

Each check compares what the real server returns with what the same server computes without K-LoRA (pixels, not
PNG bytes, where the prompts differ): exact restore, single-LoRA methods equal to the plain LoRA, XYZ over alpha,
422 for bad payloads, the selection map.
"""

from __future__ import annotations

import json
import os
import random
from typing import ClassVar

import klora_live
import numpy as np
import pytest
from klora_live import LiveServer, base_payload, decode, klora, png_text

CONTENT = os.environ.get("KLORA_CONTENT", "klora_it_content")
STYLE = os.environ.get("KLORA_STYLE", "klora_it_style")
KLORA = {"enabled": True, "content": CONTENT, "style": STYLE}


class LiveTier:
    """Subclass with ``URL`` (may be empty: skipped), ``HOST`` (the adapter name ``/klora/v1/version`` must report),
    ``STEPS``, ``SIZE``, ``TIMEOUT`` and ``HIRES_EXTRA`` (fields the host's hires API path needs)."""

    URL = ""
    HOST = ""
    STEPS = 4
    SIZE = 64
    TIMEOUT = 900.0
    HIRES_EXTRA: ClassVar[dict] = {}

    @pytest.fixture(scope="class")
    @classmethod
    def server(cls):
        if not cls.URL:
            pytest.skip("no server URL set")
        server = LiveServer(cls.URL, cls.TIMEOUT, base_payload(cls.STEPS, cls.SIZE))
        version = server.request("/klora/v1/version")
        if version.get("host") != cls.HOST:
            pytest.fail(f"K-LoRA on {cls.URL} uses adapter {version.get('host')!r}, not {cls.HOST!r}: {version}")
        names = {x["name"] for x in server.request("/sdapi/v1/loras")}
        missing = {CONTENT, STYLE} - names
        if missing:
            pytest.skip(f"the server has no LoRA named {sorted(missing)} (see tests/integration/make_random_loras.py)")
        return server

    @pytest.fixture(scope="class")
    @classmethod
    def never_enabled(cls, server):
        """Images made before any K-LoRA generation on this server (module order: this runs first)."""
        return {
            "plain": decode(server.txt2img(seed=90)["images"][0]),
            "prompt_lora": decode(server.txt2img(seed=91, prompt=f"a photo <lora:{STYLE}:0.7>")["images"][0]),
        }

    def test_adapter_is_active_and_script_listed(self, server, never_enabled):
        assert server.request("/klora/v1/version")["disabled_reason"] is None
        scripts = server.request("/sdapi/v1/scripts")
        assert "k-lora" in scripts["txt2img"] and "k-lora" in scripts["img2img"]
        info = [s for s in server.request("/sdapi/v1/script-info") if s["name"] == "k-lora"]
        assert info and info[0]["is_alwayson"] and len(info[0]["args"]) == 17

    def test_k_lora_changes_the_image_and_writes_infotext(self, server):
        plain = server.txt2img(seed=11)["images"][0]
        result = server.txt2img(seed=11, **klora([{**KLORA, "alpha": 1.25}]))
        params = result["parsed_info"].get("extra_generation_params", {})
        assert len(result["images"]) == 1, params
        assert not np.array_equal(decode(result["images"][0]), decode(plain))
        text = result["parsed_info"]["infotexts"][0]
        assert "K-LoRA: v1" in text and f"K-LoRA content: {CONTENT}" in text and "K-LoRA alpha: 1.25" in text
        assert "K-LoRA skipped" not in text and "K-LoRA error" not in text
        assert png_text(result["images"][0])["parameters"] == text

    def test_selection_map_returned_when_asked(self, server):
        result = server.txt2img(**klora([{**KLORA, "show_map": True}]))
        assert len(result["images"]) == 2, result["parsed_info"].get("extra_generation_params")
        plan = json.loads(png_text(result["images"][1])["klora_plan"])
        assert plan["steps"] == self.STEPS and len(plan["map"]) == self.STEPS
        last = server.request("/klora/v1/plan/last")
        assert last["steps"] == self.STEPS and last["layers"]

    @pytest.mark.parametrize(("method", "lora"), [("content-only", CONTENT), ("style-only", STYLE)])
    def test_single_lora_method_is_pixel_identical_to_the_plain_lora(self, server, method, lora):
        # the host's own prompt LoRA at weight 1 is the independent computation of "only this LoRA"
        plain = server.txt2img(seed=8, prompt=f"a photo <lora:{lora}:1>")["images"][0]
        ours = server.txt2img(seed=8, **klora([{**KLORA, "method": method}]))
        assert len(ours["images"]) == 1, ours["parsed_info"].get("extra_generation_params")
        assert np.array_equal(decode(ours["images"][0]), decode(plain))

    def test_positional_and_dict_forms_give_the_same_image(self, server):
        a = server.txt2img(**klora([True, CONTENT, 1.0, STYLE, 1.0, 1.5, 0.5]))
        b = server.txt2img(**klora([KLORA]))
        assert a["images"][0] == b["images"][0]

    def test_cached_scores_give_the_same_image(self, server):
        fresh = {**KLORA, "k_multiplier": 1.0 + random.random() * 1e-6}  # scored now, then from the cache
        first = server.txt2img(seed=5, **klora([fresh]))["images"][0]
        assert server.txt2img(seed=5, **klora([fresh]))["images"][0] == first

    def test_hires_pass_runs_with_k_lora_and_restores(self, server):
        hires = {
            "enable_hr": True,
            "hr_scale": 1.5,
            "hr_second_pass_steps": self.STEPS,
            "denoising_strength": 0.5,
            "hr_upscaler": "Latent",
            **self.HIRES_EXTRA,
        }
        plain = server.txt2img(seed=21, **hires)["images"][0]
        result = server.txt2img(seed=21, **hires, **klora([{**KLORA, "hires": "continue"}]))
        assert len(result["images"]) == 1, result["parsed_info"].get("extra_generation_params")
        assert not np.array_equal(decode(result["images"][0]), decode(plain))
        assert "K-LoRA skipped" not in result["parsed_info"]["infotexts"][0]
        assert server.txt2img(seed=21, **hires)["images"][0] == plain  # exact restore after a two-pass run

    @pytest.mark.parametrize("side", ["style", "content"])
    def test_prompt_copy_is_taken_over(self, server, side):
        name, seed = (STYLE, 31) if side == "style" else (CONTENT, 32)
        a = server.txt2img(seed=seed, prompt=f"a photo <lora:{name}:0.6>", **klora([KLORA]))
        b = server.txt2img(seed=seed, **klora([KLORA]))
        assert len(a["images"]) == 1, a["parsed_info"].get("extra_generation_params")
        assert np.array_equal(decode(a["images"][0]), decode(b["images"][0]))

    def test_images_are_not_flat(self, server):
        # the pixel-equality checks prove nothing on black (NaN) or flat images
        plain = decode(server.txt2img(seed=12)["images"][0]).astype(np.float64)
        ours = decode(server.txt2img(seed=12, **klora([KLORA]))["images"][0]).astype(np.float64)
        assert plain.std() > 1 and ours.std() > 1, (plain.std(), ours.std())

    def test_invalid_payload_is_refused_with_422_naming_the_field(self, server):
        klora_live.check_invalid_payload_refused(server, KLORA, CONTENT)

    def test_unknown_lora_stops_the_generation_with_the_message(self, server):
        klora_live.check_unknown_lora_stops(server, KLORA)

    def test_xyz_over_alpha_gives_one_image_per_value(self, server):
        xyz = next(
            s for s in server.request("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"]
        )
        x_type = xyz["args"][0]["choices"].index("[K-LoRA] Alpha")
        no_y_z = [0, "", [], 0, "", []]
        script_args = [x_type, "1.0, 2.0", [], *no_y_z, True, True, False, False, False, False, False, 0, True]
        result = server.txt2img(script_name="x/y/z plot", script_args=script_args, **klora([KLORA]))
        cells = [t for t in result["parsed_info"]["infotexts"][1:] if "K-LoRA" in t]
        assert len(result["images"]) == 3 and len(cells) == 2  # the grid, then one image per value
        assert "K-LoRA alpha: 1" in cells[0] and "K-LoRA alpha: 2" in cells[1]
        assert not np.array_equal(decode(result["images"][1]), decode(result["images"][2]))

    def test_plain_generation_afterwards_equals_never_enabled(self, server, never_enabled):
        server.txt2img(seed=90, **klora([KLORA]))
        assert np.array_equal(decode(server.txt2img(seed=90)["images"][0]), never_enabled["plain"])
        prompt = f"a photo <lora:{STYLE}:0.7>"
        server.txt2img(seed=91, prompt=prompt, **klora([KLORA]))
        after = decode(server.txt2img(seed=91, prompt=prompt)["images"][0])
        assert np.array_equal(after, never_enabled["prompt_lora"])
