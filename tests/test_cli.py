from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klora_ext import synthetic
from klora_ext.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    layers = synthetic.layer_shapes("tiny", "all")
    c = synthetic.save_lora(folder / "dog.safetensors", synthetic.make_lora_state_dict(layers, 2, alpha=2.0, seed=1))
    s = synthetic.save_lora(folder / "ink.safetensors", synthetic.make_lora_state_dict(layers, 3, alpha=1.0, seed=2))
    return Path(c), Path(s)


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out=out), out.getvalue()


def test_plan_writes_map_and_spec_json(tiny_pair, tmp_path: Path) -> None:
    png, js = tmp_path / "map.png", tmp_path / "plan.json"
    code, text = run(["plan", *map(str, tiny_pair), "--steps", "12", "--out", str(png), "--json", str(js)])
    assert code == 0
    data = json.loads(js.read_text())
    n_layers = len(synthetic.layer_shapes("tiny", "all"))
    assert data["version"] == 1 and data["steps"] == 12
    assert len(data["map"]) == 12 and all(len(row) == n_layers for row in data["map"])
    assert len(data["layers"]) == n_layers
    # flip steps agree with the map: first row index where the column is 0 (style)
    m = np.array(data["map"])
    for i, layer in enumerate(data["layers"]):
        col = m[:, i]
        expected = int(np.argmax(col == 0)) if (col == 0).any() else None
        assert layer["flip_step"] == expected
    from PIL import Image

    with Image.open(png) as picture:
        image = np.asarray(picture.convert("RGB"))
    assert image.ndim == 3 and image.shape[2] == 3
    assert f"shared layers: {n_layers}" in text
    assert "gamma" in text


def test_plan_options_reach_the_plan(tiny_pair, tmp_path: Path) -> None:
    js = tmp_path / "p.json"
    code, _ = run(
        ["plan", *map(str, tiny_pair), "--steps", "4", "--method", "merge", "--gamma", "2.5", "--json", str(js)]
    )
    data = json.loads(js.read_text())
    assert code == 0 and data["gamma"] == 2.5 and data["method"] == "merge"
    assert {v for row in data["map"] for v in row} == {2}
    code, _ = run(["plan", *map(str, tiny_pair), "--scope", "attention", "--clock", "reference", "--json", str(js)])
    data = json.loads(js.read_text())
    assert all(".attn" in layer["id"] for layer in data["layers"]) and data["clock"] == "reference"


def test_errors_exit_2_with_message(tiny_pair, tmp_path: Path, capsys) -> None:
    code, _ = run(["plan", str(tmp_path / "missing.safetensors"), str(tiny_pair[1])])
    assert code == 2
    assert "[K-LoRA] LoRA file not found" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    code, _ = run(["plan", str(junk), str(tiny_pair[1])])
    assert code == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_inspect(tiny_pair) -> None:
    code, text = run(["inspect", str(tiny_pair[0])])
    assert code == 0 and "dog: arch sd15" in text and "attention projections: 24" in text
    n = len(synthetic.layer_shapes("tiny", "all"))
    assert f"a1111: applies all {n} layers" in text and f"forge: applies all {n} layers" in text


def test_inspect_and_plan_notes_for_flux_dora_static(tmp_path: Path) -> None:
    import torch

    shapes = synthetic.flux_layer_shapes(double=1, single=1, hidden=8)
    sd = synthetic.make_flux_state_dict(shapes, 2, style="diffusers", alpha=1.0, seed=1)
    first = "transformer.transformer_blocks.0.attn.to_q"
    sd[f"{first}.dora_scale"] = torch.ones(8, 1)
    sd["transformer.proj_out.diff_b"] = torch.ones(16)
    style = synthetic.save_lora(tmp_path / "style.safetensors", sd)
    content = synthetic.save_lora(
        tmp_path / "content.safetensors", synthetic.make_flux_state_dict(shapes, 2, style="kohya", seed=2)
    )
    code, text = run(["inspect", style])
    assert code == 0 and "arch flux" in text
    assert "1 DoRA layers scored with the plain LoRA delta" in text
    assert "1 static layers (bias 1)" in text
    assert "a1111: applies nothing (A1111 has no Flux models)" in text
    code, text = run(["plan", content, style, "--steps", "6"])
    assert code == 0
    assert f"shared layers: {len(shapes)}" in text  # kohya (fused) and diffusers (split) files share every slice
    assert "note: style: 1 DoRA layers scored with the plain LoRA delta dW" in text


def test_demo_runs_as_a_newcomer_would(tmp_path: Path) -> None:
    # exactly the README command (minus the install), in a fresh interpreter from the checkout
    proc = subprocess.run(
        [sys.executable, "-m", "klora_ext", "demo", "--dir", str(tmp_path), "--steps", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "selection map:" in proc.stdout
    assert (tmp_path / "selection_map.png").exists() and (tmp_path / "plan.json").exists()
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["monotone"] is True and len(data["map"]) == 10
