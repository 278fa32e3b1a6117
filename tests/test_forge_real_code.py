"""Opt-in: K-LoRA's Forge host-layer builder run against REAL Forge code (``backend/patcher/lora.py``,
``packages_3rdparty/comfyui_lora_collection``) on a real Forge Flux module (``backend/nn/flux.py``) at a tiny width.
No server, no WebUI: Forge's own loader and key map on Forge's own model class.

    KLORA_FORGE_CODE=1 KLORA_FORGE_DIR=/work/forge KLORA_FORGE_VENV=/work/forge-venv \
        python -m pytest -q tests/test_forge_real_code.py

The check runs in a subprocess with Forge's venv (Forge's imports need its packages), so Forge's modules never mix
with the fakes of the other tests. Nothing of Forge is in this repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import pytest
except ImportError:  # the check itself runs in Forge's venv, which has no pytest
    pytest = None

FORGE = Path(os.environ.get("KLORA_FORGE_DIR", "/work/forge"))
PYTHON = Path(os.environ.get("KLORA_FORGE_VENV", "/work/forge-venv")) / "bin" / "python"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest and pytest.mark.skipif(
    not os.environ.get("KLORA_FORGE_CODE") or not (FORGE / "backend" / "patcher" / "lora.py").exists(),
    reason="set KLORA_FORGE_CODE=1 (and KLORA_FORGE_DIR / KLORA_FORGE_VENV) to run against Forge's own code",
)

STYLES = ("kohya", "bfl", "diffusers", "onetrainer", "lycoris")


def _check() -> None:
    """Runs inside Forge's venv; prints one JSON line per file style and per mixed pair."""
    import tempfile
    import types

    sys.path[:0] = [str(FORGE), str(FORGE / "packages_3rdparty"), str(ROOT)]
    os.chdir(FORGE)
    sys.argv = [sys.argv[0], "--always-cpu"]
    import torch
    from backend.nn.flux import IntegratedFluxTransformer2DModel  # type: ignore[import-not-found]
    from backend.patcher import lora as forge_lora  # type: ignore[import-not-found]
    from safetensors.torch import load_file

    networks = types.ModuleType("networks")
    networks.load_lora_state_dict = load_file  # what sd_forge_lora's lru-cached loader returns
    sys.modules["networks"] = networks
    from klora_ext import keys, synthetic
    from klora_ext.lora_file import read_lora
    from klora_ext.scoring import compute_scores
    from klora_ext.webui.forge import build_host_lora

    h = 32
    dm = IntegratedFluxTransformer2DModel(
        in_channels=4,
        vec_in_dim=10,
        context_in_dim=12,
        hidden_size=h,
        mlp_ratio=4.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[4, 6, 6],
        theta=10000,
        qkv_bias=True,
        guidance_embed=False,
    )
    dm.config = {"depth": 1, "depth_single_blocks": 1, "hidden_size": h}  # what Forge's loader sets
    model = torch.nn.Module()
    model.diffusion_model = dm
    model.config = types.SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev")
    params = dict(model.named_parameters())
    ids = []
    for layer_id, _ in synthetic.flux_layer_shapes(1, 1, 8):
        if layer_id.startswith("flux:guidance_in"):
            continue
        base, part = keys.split_slice(layer_id)
        weight = params[f"diffusion_model.{base.split(':', 1)[1]}.weight"].shape
        shape = (h, h) if part in ("q", "k", "v") else (4 * h, h) if part == "mlp" else tuple(weight)
        ids.append((layer_id, shape))
    tmp = tempfile.mkdtemp()
    hosts = {}
    for style in STYLES:
        path = synthetic.save_lora(
            f"{tmp}/{style}.safetensors", synthetic.make_flux_state_dict(ids, 4, style=style, seed=3, alpha=2.0)
        )
        host = build_host_lora(str(path), style, "", model, None)
        cli = read_lora(str(path))
        patches, rest = forge_lora.load_lora(load_file(path), forge_lora.model_lora_keys_unet(model, {}))
        targets = {(k, None) if isinstance(k, str) else (k[0], tuple(k[1]) if k[1] else None) for k in patches}
        ours = {(w.key, w.offset) for w in host.where.values()}
        covered = all(t in ours or (t[1] is None and any(k == t[0] for k, _ in ours)) for t in targets)
        agree = set(host.lora.layers) == set(cli.layers) and all(
            host.lora.layers[i].rank == cli.layers[i].rank
            and bool(torch.allclose(host.lora.layers[i].delta(), cli.layers[i].delta(), atol=1e-5))
            for i in host.lora.layers
        )
        hosts[style] = host
        row = {"style": style, "ids": sorted(host.lora.layers), "want": sorted(i for i, _ in ids), "rest": len(rest)}
        row.update(covered=covered, cli_agrees=agree, notes=host.notes)
        print(json.dumps(row))
    for c, s in (("kohya", "diffusers"), ("bfl", "onetrainer"), ("lycoris", "kohya")):
        print(json.dumps({"pair": [c, s], "shared": len(compute_scores(hosts[c].lora, hosts[s].lora).layers)}))


def test_forge_patches_every_flux_style_onto_the_same_layers() -> None:
    done = subprocess.run([str(PYTHON), __file__], capture_output=True, text=True, timeout=600, cwd=FORGE, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    styles = [r for r in rows if "style" in r]
    assert [r["style"] for r in styles] == list(STYLES)
    for r in styles:
        assert r["ids"] == r["want"], r["style"]  # Forge maps every style onto the same targets
        assert r["rest"] == 0 and r["notes"] == [], r["style"]
        assert r["covered"], r["style"]  # every patch Forge makes is one of our layers (or a fused one split)
        assert r["cli_agrees"], r["style"]  # the host-free reader gives the same layers, ranks and deltas
    pairs = [r for r in rows if "pair" in r]
    assert len(pairs) == 3 and all(r["shared"] == len(styles[0]["want"]) for r in pairs)


SD15_UNET = {  # huggingface_guess's config of an SD1.5 checkpoint (what Forge builds its UNet from)
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
}


def _check_sd15() -> None:
    """Forge's SD1.5 UNet class on the meta device (names and shapes only): which SD1.5 key styles Forge applies."""
    import tempfile
    import types

    sys.path[:0] = [str(FORGE), str(FORGE / "packages_3rdparty"), str(ROOT)]
    os.chdir(FORGE)
    sys.argv = [sys.argv[0], "--always-cpu"]
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel  # type: ignore[import-not-found]
    from safetensors.torch import load_file

    networks = types.ModuleType("networks")
    networks.load_lora_state_dict = load_file
    sys.modules["networks"] = networks
    from klora_ext import synthetic
    from klora_ext.errors import KLoraError
    from klora_ext.lora_file import read_lora
    from klora_ext.webui.forge import build_host_lora

    with torch.device("meta"):
        unet = IntegratedUNet2DConditionModel.from_config(SD15_UNET)  # how Forge builds it
    model = torch.nn.Module()
    model.diffusion_model = unet
    model.config = types.SimpleNamespace(huggingface_repo="runwayml/stable-diffusion-v1-5")
    layers = synthetic.layer_shapes("sd15", "all")
    tmp = tempfile.mkdtemp()
    for style in ("kohya", "diffusers", "peft"):
        sd = synthetic.make_lora_state_dict(layers, 2, style=style, seed=1, alpha=2.0, arch="sd15")
        path = synthetic.save_lora(f"{tmp}/{style}.safetensors", sd)
        row: dict = {"style": style, "cli": sorted(read_lora(str(path)).layers)}
        try:
            row["ids"] = sorted(build_host_lora(str(path), style, "", model, None).lora.layers)
        except KLoraError as exc:
            row["refused"] = str(exc)
        print(json.dumps(row))


def test_forge_sd15_key_styles() -> None:
    """kohya (compvis or diffusers module names) -> exactly the reader's layers; the diffusers/PEFT key style this
    project writes (``unet.<diffusers path>.to_q.lora_A``, no ``processor``) matches nothing in Forge's key map, so
    Forge applies none of it and K-LoRA refuses it with that reason."""
    done = subprocess.run(
        [str(PYTHON), __file__, "sd15"], capture_output=True, text=True, timeout=600, cwd=FORGE, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["style"]: r for r in (json.loads(x) for x in done.stdout.splitlines() if x.startswith("{"))}
    assert rows["kohya"]["ids"] == rows["kohya"]["cli"] and len(rows["kohya"]["ids"]) > 200
    for style in ("diffusers", "peft"):
        assert "Forge does not load" in rows[style].get("refused", ""), rows[style]


if __name__ == "__main__":
    _check_sd15() if sys.argv[1:] == ["sd15"] else _check()
