"""Write two small random SD1.5 LoRAs (kohya keys, fp16) into a WebUI's Lora folder for integration tests.

    python tests/integration/make_random_loras.py --out /path/to/webui/models/Lora

Uses klora_ext.synthetic (any venv with torch + safetensors). Files: klora_it_content.safetensors and
klora_it_style.safetensors (the stems are the names the WebUI lists in /sdapi/v1/loras and uses in <lora:NAME:1>).
Both cover the SD1.5 UNet transformer layers (attention, ff, proj_in/proj_out); content is seed 1 rank 4,
style seed 2 rank 8, alpha = rank. Same arguments → same tensors; the file's sha256 may differ between runs
(safetensors writes the metadata in no fixed order), the WebUI's LoRA shorthash (over the tensor data) does not.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch

from klora_ext import synthetic

FILES = (("klora_it_content", 1, 4), ("klora_it_style", 2, 8))  # (stem, seed, rank)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the WebUI's Lora folder (e.g. <webui>/models/Lora)")
    ap.add_argument("--scale", type=float, default=1.0, help="delta magnitude multiplier")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    layers = synthetic.layer_shapes("sd15", "transformer")
    for stem, seed, rank in FILES:
        sd = synthetic.make_lora_state_dict(
            layers, rank, style="kohya", alpha=float(rank), seed=seed, scale=args.scale
        )
        sd = {k: v.to(torch.float16) for k, v in sd.items()}
        meta = {
            "ss_output_name": stem,
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
            "ss_base_model_version": "sd_v1",
        }
        path = synthetic.save_lora(os.path.join(args.out, stem + ".safetensors"), sd, meta)
        print(f"wrote {path}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
