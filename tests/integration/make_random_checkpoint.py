"""Write a random-weight SD1.5 checkpoint (.safetensors) for integration tests against a real WebUI.

Run with the WebUI's venv; the model is built by the WebUI's own ``ldm`` classes from its ``configs/v1-inference.yaml``
(the WebUI tree is only read, never changed):

    /path/to/webui-venv/bin/python make_random_checkpoint.py --webui-dir /path/to/webui \
        --out /path/to/webui/models/Stable-diffusion/random-sd15.safetensors

The CLIP text encoder is built from ``config.json`` of ``openai/clip-vit-large-patch14`` in the Hugging Face cache
(see make_offline_clip_tokenizer.py); no weights are downloaded. Layers that LDM initialises to zero (UNet output
convs, resblock out convs, transformer ``proj_out``) get small random values so that LoRA deltas on attention layers
change the sampled image. Same seed → same file content.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def build_state_dict(webui_dir: str, seed: int, zero_std: float) -> dict[str, torch.Tensor]:
    sys.path.insert(0, os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai"))
    import ldm.modules.encoders.modules as encoders
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    class _ConfigOnlyCLIPTextModel(CLIPTextModel):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):  # random init from config.json only
            return cls(CLIPTextConfig.from_pretrained(name))

    encoders.CLIPTextModel = _ConfigOnlyCLIPTextModel
    config = OmegaConf.load(os.path.join(webui_dir, "configs", "v1-inference.yaml"))
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * zero_std)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description="random-weight SD1.5 checkpoint for WebUI integration tests")
    ap.add_argument("--webui-dir", required=True, help="AUTOMATIC1111 WebUI checkout (with repositories/)")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-std", type=float, default=0.02, help="std for layers LDM initialises to zero")
    ap.add_argument("--fp32", action="store_true", help="keep float32 (default: float16)")
    args = ap.parse_args()

    from safetensors.torch import save_file

    sd = build_state_dict(os.path.abspath(args.webui_dir), args.seed, args.zero_std)
    if not args.fp32:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(sd, args.out, metadata={"format": "pt", "note": "random weights, integration tests only"})
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n / 1e6:.1f} M values")


if __name__ == "__main__":
    main()
