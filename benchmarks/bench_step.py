"""Per-step overhead: K-LoRA with a cached pair against plain two-LoRA use, on SDXL-sized real torch layers.

    python benchmarks/bench_step.py                      # CPU: SDXL attention layers, bf16, a few tokens per layer
    python benchmarks/bench_step.py --device cuda        # GPU: SDXL transformer layers, fp16, 1024x1024 token counts

The fake Forge host of the tests (tests/fakes/forge: Forge's patcher/LoraLoader semantics, real nn.Linear layers of
SDXL's shapes) runs two generations of the same pair, alternated and repeated: plain (both LoRAs in the prompt,
merged once by the host) and K-LoRA with its scores cached (the host merges the content LoRA; K-LoRA switches the
layers of its plan at the denoiser callback). Each denoising step runs the step's real work on every patched layer
(``F.linear`` of a token batch with the layer's current weight: CFG batch 2, per-layer token counts of a 1024x1024
SDXL image scaled by ``--token-scale``) plus, for K-LoRA, its callback. Per-step medians and means are
printed; the last line, ``per-step: K-LoRA cached T1 ms, plain two-LoRA T0 ms, ratio R``, uses the means (every
step counted, the steps where layers switch included). Figures, never asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Driver:
    """The call sequence of the shared Script around one generation (process, activation, sampling, postprocess)."""

    def __init__(self, adapter: Any, args: Any) -> None:
        self.adapter, self.args = adapter, args

    def process(self, p: Any) -> None:
        from klora_ext.webui.run import prepare_run

        self.adapter.disarm(None)
        self.adapter.arm(p, prepare_run(self.args, self.adapter, p, steps=p.steps, seed=p.seed))

    def after_extra_networks_activate(self, p: Any, **_: Any) -> None:
        self.adapter.on_networks_activated(p)

    def process_before_every_sampling(self, p: Any, **_: Any) -> None:
        self.adapter.before_sampling(p, hires=bool(p.is_hr_pass))

    def postprocess(self, p: Any, processed: Any) -> None:
        self.adapter.disarm(p)


def tokens_for(width: int, base: int) -> int:
    # SDXL at 1024x1024: 4096 latent tokens in the 640-wide blocks, 1024 in the 1280-wide ones
    return max(1, base // 4 if width >= 1280 else base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scope", default=None, help="attention | transformer (default: transformer on CUDA)")
    ap.add_argument("--dtype", default=None, help="default: float16 on CUDA, bfloat16 on CPU")
    ap.add_argument("--token-scale", type=float, default=None, help="default 1 on CUDA, 1/256 on CPU")
    ap.add_argument("--arch", default="sdxl", choices=("sdxl", "sd15"), help="sd15: a quick smoke run")
    ap.add_argument("--layer-stride", type=int, default=None, help="every n-th layer (default: 1 on CUDA, 4 on CPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rank-content", type=int, default=32)
    ap.add_argument("--rank-style", type=int, default=64)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    scope = a.scope or ("transformer" if cuda else "attention")
    dtype = getattr(torch, a.dtype or ("float16" if cuda else "bfloat16"))
    scale = a.token_scale if a.token_scale is not None else (1.0 if cuda else 1 / 256)
    base_tokens = max(1, round(4096 * scale))

    from klora_ext import synthetic
    from klora_ext.args import KLoraArgs
    from klora_ext.webui.forge import ForgeAdapter
    from tests.fakes.forge.host import FakeForge, ScriptRunner, StableDiffusionProcessingTxt2Img, make_engine

    # the CPU default keeps every 4th layer (real SDXL shapes, ~1/4 of the memory): the full set needs ~6.5 GB there
    stride = a.layer_stride or (1 if cuda else 4)
    layers = synthetic.layer_shapes(a.arch, scope)[::stride]
    engine = make_engine([(lid.split(":", 1)[1], shape) for lid, shape in layers], [("text_model.x.fc1", (8, 8))])
    model = engine.forge_objects.unet.model
    model.to(device=a.device, dtype=dtype)
    for patcher in (engine.forge_objects.unet, engine.forge_objects_original.unet):
        patcher.load_device = torch.device(a.device)
    host = FakeForge(engine)
    host.install(lambda mapping, key, value: mapping.__setitem__(key, value))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {
        id(m): torch.randn(2, tokens_for(m.in_features, base_tokens), m.in_features, device=a.device, dtype=dtype)
        for m in linears
    }
    params = sum(m.weight.numel() for m in linears)
    print(
        f"fake Forge host, {a.arch} {scope} layers{f' (every {stride}th)' if stride > 1 else ''}: "
        f"{len(linears)} nn.Linear, {params / 1e6:.0f} M params, {dtype}, "
        f"{a.device}; step work: F.linear of a CFG batch of 2 x {base_tokens} (640-wide) / "
        f"{tokens_for(1280, base_tokens)} (1280-wide) tokens per layer; {a.steps} steps; ranks "
        f"{a.rank_content}/{a.rank_style}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    adapter = ForgeAdapter()
    state: dict[str, Any] = {"klora": False, "t0": 0.0, "steps": []}

    def step_start(params_: Any) -> None:
        sync(a.device)
        state["t0"] = time.perf_counter()
        if state["klora"]:
            adapter.on_denoiser(params_)

    def step_work(_denoiser: Any) -> None:
        with torch.no_grad():
            for m in linears:
                F.linear(inputs[id(m)], m.weight, m.bias)
        sync(a.device)
        state["steps"].append(time.perf_counter() - state["t0"])

    host.callbacks.setdefault("cfg_denoiser", []).append(step_start)
    host.probes.append(step_work)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KLORA_CACHE_PATH"] = str(Path(tmp) / "scores.json")
        rng = random.Random(0)
        for name, seed, rank in (("content", 1, a.rank_content), ("style", 2, a.rank_style)):
            # per-layer ranks around the given one: real pairs flip layer by layer, not all at one step
            ranks = {lid: rng.choice((rank // 4, rank // 2, rank, rank * 2)) or 1 for lid, _ in layers}
            sd = synthetic.make_lora_state_dict(layers, ranks, seed=seed, alpha=None, arch="sdxl", dtype=torch.float16)
            host.add_lora_file(name, synthetic.save_lora(Path(tmp) / f"{name}.safetensors", sd))
            del sd
        host.networks.list_available_networks()
        args = KLoraArgs(enabled=True, content="content", style="style")

        def generate(klora: bool) -> list[float]:
            state["klora"], state["steps"] = klora, []
            runner = ScriptRunner([(_Driver(adapter, args), [])]) if klora else None
            p = StableDiffusionProcessingTxt2Img(steps=a.steps, scripts=runner)
            p.prompt_loras = [] if klora else [("content", 1.0), ("style", 1.0)]
            started = time.perf_counter()
            host.process_images(p)
            state["total"] = time.perf_counter() - started
            return list(state["steps"])

        first = generate(True)  # scores the pair, caches them; the host merges the content LoRA
        print(f"K-LoRA first generation (scoring + merge): {state['total']:.2f} s end to end")
        generate(False)  # warm-up: the host merges both LoRAs
        plain, ours = [], []
        for _ in range(a.repeat):
            ours += generate(True)[1:]  # the first call brings every layer to step 0 (once per pass)
            plain += generate(False)[1:]
    k_med, p_med = statistics.median(ours) * 1e3, statistics.median(plain) * 1e3
    k_ms, p_ms = statistics.fmean(ours) * 1e3, statistics.fmean(plain) * 1e3
    print(f"K-LoRA first call of a pass (all layers to step 0): {first[0] * 1e3:.1f} ms")
    print(f"K-LoRA cached steps: median {k_med:.2f} ms, max {max(ours) * 1e3:.2f} ms over {len(ours)} steps")
    print(f"plain two-LoRA steps: median {p_med:.2f} ms, max {max(plain) * 1e3:.2f} ms over {len(plain)} steps")
    print(f"median step ratio {k_med / p_med:.3f}; mean (switching steps included) below")
    print(f"per-step: K-LoRA cached {k_ms:.2f} ms, plain two-LoRA {p_ms:.2f} ms, ratio {k_ms / p_ms:.3f}")


if __name__ == "__main__":
    main()
