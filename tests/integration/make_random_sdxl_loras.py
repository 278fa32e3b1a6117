"""Write small random SDXL LoRAs for the reduced-depth checkpoint of make_random_sdxl_checkpoint.py.

    python tests/integration/make_random_sdxl_loras.py --ckpt <models>/Stable-diffusion/random-sdxl.safetensors \
        --out <webui>/models/Lora-sdxl

Any venv with torch + safetensors (uses klora_ext.synthetic). The layers are the SDXL ids of
``synthetic.layer_shapes("sdxl", "transformer")`` whose weight exists in the checkpoint (so they fit the reduced
depth). Files (stem = the name the WebUI lists):

- ``klora_xl_content``: kohya keys with SGM names (``lora_unet_input_blocks_4_1_…``, what sd-scripts writes for
  SDXL), UNet transformer layers plus both text encoders (``lora_te1_…``, ``lora_te2_…``), rank 4, seed 11.
- ``klora_xl_style``: kohya/SGM keys, UNet transformer layers, rank 8, seed 12.
- ``klora_xl_style_diffusers``: the same tensors as ``klora_xl_style`` under diffusers module paths with kohya's
  prefix and suffixes (``lora_unet_down_blocks_1_attentions_0_…lora_down.weight``): both hosts map these names.
- ``klora_xl_style_peft``: the same tensors under PEFT keys (``unet.down_blocks.1.attentions.0….lora_A.weight``).
  A1111 v1.10 maps none of them; Forge maps only the non-attention ones (its diffusers key map expects
  ``….processor.to_q`` for attention), so the host patches fewer layers than the file names.

alpha = rank in every file, fp16. Same arguments -> same tensors.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch

from klora_ext import synthetic

CONTENT, STYLE = ("klora_xl_content", 11, 4), ("klora_xl_style", 12, 8)  # (stem, seed, rank)


def unet_layers_in(ckpt: str) -> list[synthetic.LayerShape]:
    from safetensors import safe_open

    with safe_open(ckpt, framework="pt") as f:
        present = set(f.keys())
    layers = synthetic.layer_shapes("sdxl", "transformer")
    return [(i, s) for i, s in layers if "model.diffusion_model." + i.split(":", 1)[1] + ".weight" in present]


def te_layers() -> list[synthetic.LayerShape]:
    return [
        ls for ls in synthetic.layer_shapes("sdxl", "transformer", include_te=True) if not ls[0].startswith("unet:")
    ]


def kohya_diffusers_names(sd: dict[str, torch.Tensor], layers: list[synthetic.LayerShape]) -> dict[str, torch.Tensor]:
    """Rename kohya/SGM module names to kohya-prefixed diffusers paths (lora_unet_down_blocks_…)."""
    rename = {}
    for layer_id, _ in layers:
        diffusers = synthetic.module_key(layer_id, "diffusers", "sdxl")  # unet.down_blocks.1.attentions.0....
        assert diffusers.startswith("unet."), diffusers
        rename[synthetic.module_key(layer_id, "kohya", "sdxl")] = "lora_unet_" + diffusers[5:].replace(".", "_")
    out = {}
    for key, value in sd.items():
        module, part = key.split(".", 1)
        out[rename[module] + "." + part] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="the reduced SDXL checkpoint (its keys pick the layers)")
    ap.add_argument("--out", required=True, help="LoRA folder for the SDXL server")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    unet = unet_layers_in(args.ckpt)
    if not unet:
        raise SystemExit(f"no SDXL UNet transformer layer of klora_ext.synthetic found in {args.ckpt}")
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}

    def write(stem: str, sd: dict[str, torch.Tensor], rank: int) -> None:
        sd = {k: v.to(torch.float16) for k, v in sd.items()}
        m = {**meta, "ss_output_name": stem, "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
        path = synthetic.save_lora(os.path.join(args.out, stem + ".safetensors"), sd, m)
        print(f"wrote {path}: {len(sd)} tensors")

    stem, seed, rank = CONTENT
    write(
        stem, synthetic.make_lora_state_dict(unet + te_layers(), rank, alpha=float(rank), seed=seed, arch="sdxl"), rank
    )
    stem, seed, rank = STYLE
    kohya = synthetic.make_lora_state_dict(unet, rank, alpha=float(rank), seed=seed, arch="sdxl")
    write(stem, kohya, rank)
    write(stem + "_diffusers", kohya_diffusers_names(kohya, unet), rank)
    peft = synthetic.make_lora_state_dict(unet, rank, style="peft", alpha=float(rank), seed=seed, arch="sdxl")
    write(stem + "_peft", peft, rank)
    print(f"{len(unet)} UNet layers, {len(te_layers())} text-encoder layers (content only)")


if __name__ == "__main__":
    main()
