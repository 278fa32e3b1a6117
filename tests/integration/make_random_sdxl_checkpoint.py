"""Write a random-weight, reduced-depth SDXL checkpoint (.safetensors) plus its ``.yaml`` beside it.

Run with the A1111 WebUI's venv; the model is built by the WebUI's own ``sgm`` classes (``repositories/
generative-models``) from its ``configs/inference/sd_xl_base.yaml``, with fewer transformer blocks (the WebUI tree is
only read, never changed):

    HF_HUB_OFFLINE=1 /path/to/webui-venv/bin/python make_random_sdxl_checkpoint.py --webui-dir /path/to/webui \
        --out /path/to/webui/models/Stable-diffusion/random-sdxl.safetensors

Shape: SDXL widths everywhere (UNet 320/640/1280, context 2048, adm 2816, CLIP-L + full 32-layer OpenCLIP bigG text
encoder, SDXL VAE); transformer depth per level 0/1/2 and 2 in the middle instead of 0/2/10 and 10. A1111 loads it
with the ``.yaml`` written beside the checkpoint (same stem); Forge's model detection (huggingface_guess) sees
UNet depths [0, 0, 1, 1, 2, 2], which is its ``Segmind_Vega`` entry, an SDXL subclass, so Forge runs it as SDXL.
About 1.6 B values (3.2 GB fp16 file, ~7 GB RAM in fp32 on the server). No weights are downloaded: CLIP-L is built
from ``config.json`` of ``openai/clip-vit-large-patch14`` in the Hugging Face cache (make_offline_clip_tokenizer.py),
OpenCLIP bigG from open_clip's own model config with no pretrained weights (its vision tower is never built).
Zero-initialised layers get std ``--zero-std`` so that LoRA deltas change the image. Same seed -> same tensors.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

DEPTH = [1, 1, 2]  # per level; the first is unused (no attention at level 0), as in SDXL's own yaml
DEPTH_MIDDLE = 2


def reduced_config(webui_dir: str):
    from omegaconf import OmegaConf

    config = OmegaConf.load(
        os.path.join(webui_dir, "repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml")
    )
    unet = config.model.params.network_config.params
    unet.transformer_depth = DEPTH
    unet.transformer_depth_middle = DEPTH_MIDDLE
    unet.spatial_transformer_attn_type = "softmax"  # no xformers on CPU
    unet.use_checkpoint = False
    config.model.params.first_stage_config.params.ddconfig.attn_type = "vanilla"
    return config


def build_state_dict(webui_dir: str, config, seed: int, zero_std: float) -> dict[str, torch.Tensor]:
    sys.path.insert(0, os.path.join(webui_dir, "repositories", "generative-models"))
    import open_clip
    import open_clip.model
    import sgm.modules.encoders.modules as encoders
    from sgm.util import instantiate_from_config
    from transformers import CLIPTextConfig, CLIPTextModel

    class _ConfigOnlyCLIPTextModel(CLIPTextModel):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):  # random init from config.json only
            return cls(CLIPTextConfig.from_pretrained(name))

    def _text_only_open_clip(arch, device=None, pretrained=None, **kwargs):
        # the embedder deletes `visual` right away; skip building ViT-bigG's 1.8 B-value vision tower
        build_vision = open_clip.model._build_vision_tower
        open_clip.model._build_vision_tower = lambda *a, **k: torch.nn.Identity()
        try:
            return open_clip.create_model(arch, pretrained=None, device=device), None, None
        finally:
            open_clip.model._build_vision_tower = build_vision

    encoders.CLIPTextModel = _ConfigOnlyCLIPTextModel
    encoders.open_clip.create_model_and_transforms = _text_only_open_clip
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * zero_std)
    # the denoiser's sigma table is not part of a released SDXL checkpoint
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("denoiser.")}


def main() -> None:
    ap = argparse.ArgumentParser(description="random-weight reduced-depth SDXL checkpoint for WebUI integration tests")
    ap.add_argument("--webui-dir", required=True, help="AUTOMATIC1111 WebUI checkout (with repositories/)")
    ap.add_argument("--out", required=True, help="output .safetensors path (the .yaml goes beside it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-std", type=float, default=0.02, help="std for layers SGM initialises to zero")
    ap.add_argument("--fp32", action="store_true", help="keep float32 (default: float16)")
    args = ap.parse_args()

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    webui_dir = os.path.abspath(args.webui_dir)
    config = reduced_config(webui_dir)
    sd = build_state_dict(webui_dir, config, args.seed, args.zero_std)
    if not args.fp32:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(sd, args.out, metadata={"format": "pt", "note": "random weights, reduced depth, integration tests only"})
    yaml_path = os.path.splitext(args.out)[0] + ".yaml"
    OmegaConf.save(config, yaml_path)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n / 1e6:.1f} M values; config {yaml_path}")


if __name__ == "__main__":
    main()
