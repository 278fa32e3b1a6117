"""Opt-in live check (issue 7) on a real Forge: the plan is built on the patches Forge's own loader makes, and the CLI
(host-free reader) gives the same plan for the same two files.

    KLORA_FORGE_URL=http://127.0.0.1:7861 KLORA_LORA_DIR=/work/webui/models/Lora \\
        python -m pytest -q tests/integration/test_forge_host_parity_live.py

Per pair: ``python -m klora_ext plan`` on the two files (``--json``) against ``/klora/v1/plan/last`` after a
K-LoRA txt2img with the same arguments: same layer ids in the same order, same flip steps, scores and gamma equal
to float tolerance; and the plan's layers are exactly the UNet parameters Forge's loader patches in both files
(test-only probe extension, ``/klora-probe/v1/host-layers``). Environment: ``KLORA_FORGE_URL`` (required),
``KLORA_LORA_DIR`` (the server's LoRA folder on this machine, required: the CLI reads the files there; the LoHa and
LoKr files of test_a1111_host_parity_live.py are written into it when missing), ``KLORA_CONTENT``/``KLORA_STYLE``
(default the make_random_loras.py pair), ``KLORA_FORGE_TIMEOUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from klora_live import LiveServer, base_payload, klora

URL = os.environ.get("KLORA_FORGE_URL", "").rstrip("/")
LORA_DIR = os.environ.get("KLORA_LORA_DIR", "")
CONTENT = os.environ.get("KLORA_CONTENT", "klora_it_content")
STYLE = os.environ.get("KLORA_STYLE", "klora_it_style")
TIMEOUT = float(os.environ.get("KLORA_FORGE_TIMEOUT", "900"))
REPO = Path(__file__).resolve().parents[2]
STEPS = 6

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL or not LORA_DIR, reason="set KLORA_FORGE_URL and KLORA_LORA_DIR to run"),
]

SERVER = LiveServer(URL, TIMEOUT, base_payload(STEPS, 64))
OPTIONS = {"alpha": 1.5, "beta": 0.5, "schedule": "linear", "clock": "step", "scope": "all", "k_multiplier": 1.0}
CLI_OPTIONS = ["--alpha", "1.5", "--beta", "0.5", "--schedule", "linear", "--clock", "step", "--scope", "all"]
LYCORIS = (("klora_it_parity_loha", "loha", 3, 4), ("klora_it_parity_lokr", "lokr", 4, 4))  # stem, kind, seed, rank


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
    if SERVER.request("/klora/v1/version").get("host") != "forge":
        pytest.skip(f"the server at {URL} is not a Forge K-LoRA supports")
    _write_lycoris_files()
    names = {x["name"] for x in SERVER.request("/sdapi/v1/loras")}
    if not {CONTENT, STYLE, *(s for s, *_ in LYCORIS)} <= names:
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


def _forge_unet_targets(name: str) -> set[str]:
    answer = SERVER.request(f"/klora-probe/v1/host-layers?name={name}")
    assert answer.get("host") == "forge", answer
    return set(answer["unet"])


@pytest.mark.parametrize(
    ("content", "style"),
    [(CONTENT, STYLE), (LYCORIS[0][0], STYLE), (LYCORIS[1][0], STYLE), (LYCORIS[0][0], LYCORIS[1][0])],
    ids=["lora+lora", "loha+lora", "lokr+lora", "loha+lokr"],
)
def test_cli_plan_equals_the_forge_servers_plan(content, style, tmp_path):
    cli = _cli_plan(content, style, tmp_path)
    server = _server_plan(content, style)
    cli_ids = [x["id"] for x in cli["layers"]]
    assert [x["id"] for x in server["layers"]] == cli_ids
    assert [x["flip_step"] for x in server["layers"]] == [x["flip_step"] for x in cli["layers"]]
    for a, b in zip(server["layers"], cli["layers"]):
        for key in ("score_content", "score_style"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["id"], key)
    assert server["gamma"] == pytest.approx(cli["gamma"], rel=1e-4)
    # the plan's layers are the UNet weights Forge's own loader patches in both files
    shared = _forge_unet_targets(content) & _forge_unet_targets(style)
    assert {f"diffusion_model.{i.split(':', 1)[1]}.weight" for i in cli_ids} == shared
