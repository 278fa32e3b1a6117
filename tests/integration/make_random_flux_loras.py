"""Write small random Flux LoRAs for the reduced-depth checkpoint of make_random_flux_checkpoint.py.

    python tests/integration/make_random_flux_loras.py --ckpt <models>/Stable-diffusion/random-flux.safetensors \
        --out <forge>/models/Lora-flux

Any venv with torch + safetensors (uses klora_ext.synthetic). The layers are the canonical Flux ids of
``synthetic.flux_layer_shapes`` (every linear of each double and single block: mod/modulation, q/k/v (slices of the
fused qkv / linear1), proj, mlp, linear2) for the blocks the checkpoint has, at its hidden size. Files (stem = the
name the WebUI lists), alpha = rank, fp16:

- ``klora_flux_content``: kohya/sd-scripts keys, fused (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
  ``lora_unet_single_blocks_0_linear1…``: the slices' downs stacked, ups block-diagonal, as sd-scripts' converter
  writes them), rank 4 per slice, seed 21.
- ``klora_flux_content_diffusers``: the same per-slice weights in diffusers/PEFT keys, split
  (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, ``…add_k_proj…``, ``…single_transformer_blocks.0.
  proj_mlp…``): Forge maps each onto its row slice of the fused weight.
- ``klora_flux_style`` (kohya, fused) and ``klora_flux_style_diffusers`` (diffusers, split): rank 8, seed 22.

Same arguments -> same tensors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch

from klora_ext import synthetic

CONTENT, STYLE = ("klora_flux_content", 21, 4), ("klora_flux_style", 22, 8)  # (stem, seed, rank)
PREFIX = "model.diffusion_model."


def blocks_in(ckpt: str) -> tuple[int, int, int]:
    """(double blocks, single blocks, hidden size) of a Flux checkpoint, from its keys."""
    from safetensors import safe_open

    with safe_open(ckpt, framework="pt") as f:
        names = list(f.keys())
        if PREFIX + "img_in.weight" not in names:
            raise SystemExit(f"{ckpt} is not a Flux checkpoint with {PREFIX} keys (no {PREFIX}img_in.weight)")
        hidden = f.get_slice(PREFIX + "img_in.weight").get_shape()[0]

    def count(kind: str) -> int:
        found = {int(m.group(1)) for k in names if (m := re.match(re.escape(PREFIX + kind) + r"\.(\d+)\.", k))}
        return len(found)

    return count("double_blocks"), count("single_blocks"), hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="the reduced Flux checkpoint (its keys pick the blocks)")
    ap.add_argument("--out", required=True, help="LoRA folder for the Flux server")
    args = ap.parse_args()
    double, single, hidden = blocks_in(args.ckpt)
    layers = synthetic.flux_layer_shapes(double, single, hidden, globals_=False)
    os.makedirs(args.out, exist_ok=True)

    def write(stem: str, style: str, seed: int, rank: int) -> None:
        sd = synthetic.make_flux_state_dict(layers, rank, style=style, alpha=float(rank), seed=seed)
        sd = {k: v.to(torch.float16) for k, v in sd.items()}
        meta = {"ss_base_model_version": "flux1", "ss_output_name": stem, "ss_network_dim": str(rank)}
        path = synthetic.save_lora(os.path.join(args.out, stem + ".safetensors"), sd, meta)
        print(f"wrote {path}: {len(sd)} tensors ({style})")

    for stem, seed, rank in (CONTENT, STYLE):
        write(stem, "kohya", seed, rank)
        write(stem + "_diffusers", "diffusers", seed, rank)
    print(f"{len(layers)} canonical layers: {double} double + {single} single blocks at hidden size {hidden}")


if __name__ == "__main__":
    main()
