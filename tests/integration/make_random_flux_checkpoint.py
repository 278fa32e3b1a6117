"""Write a random-weight, reduced-depth Flux-dev checkpoint (.safetensors) that Forge loads as one file.

Run with the Forge venv, after patch_forge_for_reduced_flux.py has patched the Forge test copy (without the patch
Forge builds 19 + 38 blocks and 24 T5 layers whatever the file holds):

    /work/forge-venv/bin/python tests/integration/make_random_flux_checkpoint.py --forge-dir /work/forge \
        --out /work/forge/models/Stable-diffusion/random-flux.safetensors

Every component is built by Forge's own classes from Forge's own configs (the Forge tree is only read):
``backend.nn.flux.IntegratedFluxTransformer2DModel`` with the Flux-dev widths of huggingface_guess' detection
(hidden 3072, 24 heads, mlp ratio 4, context 4096, vector 768, guidance embedding) but ``--double`` double and
``--single`` single blocks (default 1 + 1, instead of 19 + 38); ``backend.nn.clip.IntegratedCLIP`` around transformers'
CLIPTextModel from ``backend/huggingface/black-forest-labs/FLUX.1-dev/text_encoder/config.json`` (full CLIP-L);
``backend.nn.t5.IntegratedT5`` from ``text_encoder_2/config.json`` with ``--t5-layers`` layers (default 2: Forge
refuses a T5 state dict with 16 keys or fewer, one layer has 10); ``backend.nn.vae.IntegratedAutoencoderKL`` from
``vae/config.json`` (the full Flux VAE). Keys carry the prefixes Forge's ``split_state_dict`` sorts by
(``model.diffusion_model.``, ``text_encoders.clip_l.``, ``text_encoders.t5xxl.``, ``vae.``).

Weights: every matrix/conv/embedding ~ N(0, 1/fan_in), norm weights/scales 1, biases N(0, 0.02²) from one seeded
generator, so LoRA deltas (same magnitude) visibly change the image and the same seed gives the same file. Built and
saved in bfloat16 (default), one component at a time: 1 + 1 blocks are ~1.25 G values, a 2.5 GB file, ~5 GB peak RAM.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys

import torch

REPO = os.path.join("backend", "huggingface", "black-forest-labs", "FLUX.1-dev")
# huggingface_guess/detection.py's Flux entry (what Forge builds), minus the depths
FLUX_DEV = {
    "in_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}


def _randomise(model: torch.nn.Module, g: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with fresh values (Forge's T5 norms start as torch.empty, so nothing is kept)."""
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.dim() == 0:
            out[name] = t.detach().clone()
            continue
        leaf = name.rsplit(".", 1)[-1]
        if t.dim() >= 2:
            v = torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:]))
        elif leaf == "scale" or (leaf == "weight" and ("norm" in name or "ln_" in name)):
            v = torch.ones(t.shape)
        else:
            v = torch.randn(t.shape, generator=g) * 0.02
        out[name] = v.to(dtype).contiguous()
    return out


def build(forge_dir: str, double: int, single: int, t5_layers: int, seed: int, dtype: torch.dtype) -> dict:
    # backend.args parses sys.argv at import; memory_management needs --always-cpu on a machine without CUDA
    sys.argv = [sys.argv[0], "--always-cpu"]
    sys.path[:0] = [forge_dir, os.path.join(forge_dir, "packages_3rdparty")]  # Forge's paths.py adds the 2nd (gguf)
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    repo = os.path.join(forge_dir, REPO)
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of the big parts
    try:
        parts = [
            ("model.diffusion_model.", lambda: IntegratedFluxTransformer2DModel(
                **FLUX_DEV, depth=double, depth_single_blocks=single)),
            ("text_encoders.clip_l.", lambda: IntegratedCLIP(
                CLIPTextModel, CLIPTextConfig.from_pretrained(os.path.join(repo, "text_encoder")),
                add_text_projection=True)),
            ("text_encoders.t5xxl.", lambda: IntegratedT5(_t5_config(repo, t5_layers))),
            ("vae.", lambda: IntegratedAutoencoderKL.from_config(
                IntegratedAutoencoderKL.load_config(os.path.join(repo, "vae")))),
        ]  # fmt: skip
        for prefix, make in parts:
            model = make()
            for k, v in _randomise(model, g, dtype).items():
                sd[prefix + k] = v
            n = sum(p.numel() for p in model.parameters())
            print(f"{prefix:24s} {type(model).__name__}: {n / 1e6:.1f} M values", flush=True)
            del model
            gc.collect()
    finally:
        torch.set_default_dtype(torch.float32)
    return sd


def _t5_config(repo: str, layers: int) -> dict:
    with open(os.path.join(repo, "text_encoder_2", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["num_layers"] = layers
    return config


def check_detection(forge_dir: str, sd: dict[str, torch.Tensor], double: int, single: int) -> None:
    """Ask the Forge copy's own huggingface_guess what it will build (depths come out right only when patched)."""
    sys.path.insert(0, os.path.join(forge_dir, "repositories", "huggingface_guess"))
    import huggingface_guess

    guess = huggingface_guess.guess(sd)
    cfg = guess.unet_config
    got = (cfg.get("depth"), cfg.get("depth_single_blocks"))
    print(f"Forge's huggingface_guess: {type(guess).__name__} ({guess.huggingface_repo}), depths {got}")
    if got != (double, single):
        print(f"WARNING: Forge would build depths {got}, not {(double, single)}: run patch_forge_for_reduced_flux.py")


def main() -> None:
    ap = argparse.ArgumentParser(description="random-weight reduced-depth Flux checkpoint for Forge integration tests")
    ap.add_argument("--forge-dir", required=True, help="Forge checkout (backend/, repositories/huggingface_guess)")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks [1] (Flux: 19)")
    ap.add_argument("--single", type=int, default=1, help="single-stream blocks [1] (Flux: 38)")
    ap.add_argument("--t5-layers", type=int, default=2, help="T5 encoder layers [2] (T5-XXL: 24; Forge's minimum: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp16", action="store_true", help="float16 instead of bfloat16")
    args = ap.parse_args()
    if min(args.double, args.single) < 1 or args.t5_layers < 2:
        raise SystemExit("need at least 1 double block, 1 single block and 2 T5 layers")

    from safetensors.torch import save_file

    forge_dir = os.path.abspath(args.forge_dir)
    sd = build(forge_dir, args.double, args.single, args.t5_layers, args.seed,
               torch.float16 if args.fp16 else torch.bfloat16)  # fmt: skip
    check_detection(forge_dir, sd, args.double, args.single)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(sd, args.out, metadata={"format": "pt", "note": "random weights, reduced depth, integration tests only"})
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n / 1e6:.1f} M values")


if __name__ == "__main__":
    main()
