"""Opt-in live check (issue 7): inside a real A1111 the plan is built on the builtin Lora's own layers, and the CLI
(host-free reader) gives the same plan for the same two files.

    KLORA_WEBUI_URL=http://127.0.0.1:7860 KLORA_LORA_DIR=/work/webui/models/Lora \\
        python -m pytest -q tests/integration/test_a1111_host_parity_live.py

Per pair: ``python -m klora_ext plan`` on the two files (``--json``) against ``/klora/v1/plan/last`` after a
K-LoRA txt2img with the same arguments: same layer ids in the same order, same flip steps, scores equal to float
tolerance; and the plan's layers are exactly the UNet modules the host's own loader patches in both files (test-only
probe extension, ``/klora-probe/v1/host-layers``). Environment: ``KLORA_WEBUI_URL`` (required), ``KLORA_LORA_DIR``
(the server's LoRA folder on this machine, required: the CLI reads the files there; LoHa and LoKr files of the
SD1.5 transformer layers are written into it when missing), ``KLORA_CONTENT``/``KLORA_STYLE`` (default the
make_random_loras.py pair), ``KLORA_PARITY_PAIRS`` (see below), ``KLORA_WEBUI_TIMEOUT``. SDXL, e.g.:
``KLORA_LORA_DIR=/work/webui/models/Lora-sdxl KLORA_CONTENT=klora_xl_content KLORA_STYLE=klora_xl_style
KLORA_PARITY_PAIRS=klora_xl_content:klora_xl_style,klora_xl_content:klora_xl_style_diffusers``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from klora_live import LiveServer, base_payload, klora

URL = os.environ.get("KLORA_WEBUI_URL", "").rstrip("/")
LORA_DIR = os.environ.get("KLORA_LORA_DIR", "")
CONTENT = os.environ.get("KLORA_CONTENT", "klora_it_content")
STYLE = os.environ.get("KLORA_STYLE", "klora_it_style")
TIMEOUT = float(os.environ.get("KLORA_WEBUI_TIMEOUT", "900"))
REPO = Path(__file__).resolve().parents[2]
STEPS = 6

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL or not LORA_DIR, reason="set KLORA_WEBUI_URL and KLORA_LORA_DIR to run"),
]

SERVER = LiveServer(URL, TIMEOUT, base_payload(STEPS, 64))
# Every plan option given explicitly, the same on both sides.
OPTIONS = {"alpha": 1.5, "beta": 0.5, "schedule": "linear", "clock": "step", "scope": "all", "k_multiplier": 1.0}
CLI_OPTIONS = ["--alpha", "1.5", "--beta", "0.5", "--schedule", "linear", "--clock", "step", "--scope", "all"]
LYCORIS = (("klora_it_parity_loha", "loha", 3, 4), ("klora_it_parity_lokr", "lokr", 4, 4))  # stem, kind, seed, rank
# KLORA_PARITY_PAIRS="content:style,content:style" (names on the server) replaces the default pairs (e.g. SDXL files);
# the LyCORIS files (SD1.5 shapes) are then neither written nor used.
PAIRS_ENV = os.environ.get("KLORA_PARITY_PAIRS", "")
PAIRS = (
    [tuple(pair.split(":", 1)) for pair in PAIRS_ENV.split(",") if pair]
    if PAIRS_ENV
    else [(CONTENT, STYLE), (LYCORIS[0][0], STYLE), (LYCORIS[1][0], STYLE), (LYCORIS[0][0], LYCORIS[1][0])]
)


def _write_lycoris_files() -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from klora_ext import synthetic

    layers = synthetic.layer_shapes("sd15", "transformer")
    for stem, kind, seed, rank in LYCORIS:
        path = Path(LORA_DIR) / f"{stem}.safetensors"
        if path.exists():
            continue
        sd = synthetic.make_lora_state_dict(layers, rank, style="kohya", kind=kind, alpha=float(rank), seed=seed)
        synthetic.save_lora(path, {k: v.to(torch.float16) for k, v in sd.items()}, {"ss_output_name": stem})


@pytest.fixture(scope="module", autouse=True)
def _files():
    if not PAIRS_ENV:
        _write_lycoris_files()
    names = {x["name"] for x in SERVER.request("/sdapi/v1/loras")}
    if not {CONTENT, STYLE} <= names:
        SERVER.request("/sdapi/v1/refresh-loras", {})
        names = {x["name"] for x in SERVER.request("/sdapi/v1/loras")}
    missing = {CONTENT, STYLE} - names
    if missing:
        pytest.skip(f"the server has no LoRA named {sorted(missing)} (see tests/integration/make_random_loras.py)")


def _cli_plan(content: str, style: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{content}-{style}.json"
    cmd = [sys.executable, "-m", "klora_ext", "plan", f"{LORA_DIR}/{content}.safetensors"]
    cmd += [f"{LORA_DIR}/{style}.safetensors", "--steps", str(STEPS), "--json", str(out), *CLI_OPTIONS]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=900)
    return json.loads(out.read_text())


def _server_plan(content: str, style: str) -> dict:
    result = SERVER.txt2img(**klora([{"enabled": True, "content": content, "style": style, **OPTIONS}]))
    assert len(result["images"]) == 1, result.get("info")
    assert "K-LoRA: v1" in result["parsed_info"]["infotexts"][0]
    return SERVER.request("/klora/v1/plan/last")


def _host_unet_modules(name: str) -> set[str]:
    return set(SERVER.request(f"/klora-probe/v1/host-layers?name={name}")["unet"])


@pytest.mark.parametrize(("content", "style"), PAIRS, ids=[f"{c}+{s}" for c, s in PAIRS])
def test_cli_plan_equals_the_servers_plan(content, style, tmp_path):
    cli = _cli_plan(content, style, tmp_path)
    server = _server_plan(content, style)
    cli_ids = [x["id"] for x in cli["layers"]]
    assert [x["id"] for x in server["layers"]] == cli_ids
    assert [x["flip_step"] for x in server["layers"]] == [x["flip_step"] for x in cli["layers"]]
    # both sides multiply the same factors in fp32 (the host's own module tensors / the file's), streamed
    rel = 1e-4
    for a, b in zip(server["layers"], cli["layers"]):
        for key in ("score_content", "score_style"):
            assert a[key] == pytest.approx(b[key], rel=rel), (a["id"], key)
    assert server["gamma"] == pytest.approx(cli["gamma"], rel=rel)
    # the plan's layers are the UNet modules the builtin patches in both files (its names: . -> _)
    shared = _host_unet_modules(content) & _host_unet_modules(style)
    assert {"diffusion_model_" + i.split(":", 1)[1].replace(".", "_") for i in cli_ids} == shared


def test_keys_the_host_does_not_apply_are_left_out_and_noted(tmp_path):
    """A copy of the content file plus two sd-scripts T5 keys (A1111 has no T5): same plan as the plain content
    file, and the server log (``KLORA_SERVER_LOG``, default /tmp/klora-server.log, when readable) names them."""
    import torch
    from safetensors.torch import load_file

    from klora_ext import synthetic

    stem = "klora_it_parity_extra"
    sd = load_file(f"{LORA_DIR}/{CONTENT}.safetensors")
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    sd[f"{t5}.lora_down.weight"] = torch.ones(2, 8, dtype=torch.float16)
    sd[f"{t5}.lora_up.weight"] = torch.ones(8, 2, dtype=torch.float16)
    synthetic.save_lora(Path(LORA_DIR) / f"{stem}.safetensors", sd, {"ss_output_name": stem})
    plain = _server_plan(CONTENT, STYLE)
    extra = _server_plan(stem, STYLE)
    assert [(x["id"], x["flip_step"]) for x in extra["layers"]] == [(x["id"], x["flip_step"]) for x in plain["layers"]]
    log = Path(os.environ.get("KLORA_SERVER_LOG", "/tmp/klora-server.log"))
    if log.is_file():
        text = log.read_text(errors="replace")
        assert f"A1111 leaves out 2 keys of '{stem}'" in text and f"e.g. {t5}.lora_down.weight" in text
