"""K-LoRA overhead in AUTOMATIC1111: a live server when there is one, else a CPU microbenchmark of the adapter.

    KLORA_WEBUI_URL=http://127.0.0.1:7860 python benchmarks/bench_a1111.py --steps 20 --size 512 --repeat 3
    python benchmarks/bench_a1111.py --steps 20           # no server: the fake host, CPU, SD1.5 attention layers

Server mode (same server, same run, same seed): seconds per generation for (1) both LoRAs in the prompt, (2) K-LoRA
cold (score cache cleared through POST /klora/v1/cache/clear first), (3) K-LoRA with the pair cached; prints the
cached/plain ratio, the per-step overhead and the one-time scoring cost. LoRA names: --content/--style (default the
integration-test LoRAs).

Fake-host mode: the real Script and A1111 adapter on the fake builtin Lora (tests/fakes/a1111) with real-size SD1.5
attention layers on the CPU: time in the denoiser callback per step (K-LoRA's bookkeeping), time to re-merge the
layers that flip at a step, and a full re-merge of every patched layer (what a global invalidation costs per step).
``--scoring``: the fake host again, scoring cost of the host's own layer set (issue 7: ``Network.modules`` of the
builtin's loader, plain LoRA from the host modules' factors, LoHa through the module's calc_updown) next to the
host-free reader (what the CLI does), for a LoRA+LoRA and a LoHa+LoRA pair on real-size SD1.5 attention layers.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- server mode ----------------------------------------------------------------------------------------------------
def _post(url: str, path: str, payload: dict | None, timeout: float) -> dict:
    data = json.dumps(payload or {}).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def bench_server(url: str, args: argparse.Namespace) -> None:
    base = {
        "prompt": "a photo",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": 42,
        "sampler_name": "Euler",
        "cfg_scale": 5,
    }
    plain = {**base, "prompt": f"a photo <lora:{args.content}:1> <lora:{args.style}:1>"}
    klora = {
        **base,
        "alwayson_scripts": {"K-LoRA": {"args": [{"enabled": True, "content": args.content, "style": args.style}]}},
    }

    def timed(payload: dict) -> float:
        start = time.perf_counter()
        result = _post(url, "/sdapi/v1/txt2img", payload, args.timeout)
        elapsed = time.perf_counter() - start
        info = json.loads(result.get("info") or "{}")
        if not result.get("images"):
            raise SystemExit(f"generation failed: {info.get('comments') or info}")
        return elapsed

    timed(plain)  # warm-up: loads the LoRAs, makes the builtin's backups
    plain_times, cold_times, cached_times = [], [], []
    for _ in range(args.repeat):
        plain_times.append(timed(plain))
        try:
            _post(url, "/klora/v1/cache/clear", None, args.timeout)
        except OSError as exc:
            print(f"(could not clear the score cache: {exc}; 'cold' may be cached)")
        cold_times.append(timed(klora))
        cached_times.append(timed(klora))
    p, c, k = (statistics.median(x) for x in (plain_times, cold_times, cached_times))
    print(f"server {url}: {args.steps} steps, {args.size}x{args.size}, median of {args.repeat}")
    print(f"  plain two-LoRA prompt : {p:8.3f} s")
    print(f"  K-LoRA, cold          : {c:8.3f} s   (one-time scoring cost ~ {c - k:.3f} s)")
    print(f"  K-LoRA, cached pair   : {k:8.3f} s")
    print(f"  cached / plain        : {k / p:8.4f}   overhead {100 * (k / p - 1):+.2f} %  target <= +5 %")
    print(f"  per-step overhead     : {1000 * (k - p) / args.steps:+8.2f} ms")


# ---- fake-host mode -------------------------------------------------------------------------------------------------
def bench_fake(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fakes" / "a1111"))
    os.environ.setdefault("KLORA_CACHE_PATH", os.path.join(tempfile.mkdtemp(), "scores.json"))
    import fakehost
    import networks
    import torch
    from modules import processing

    from klora_ext import synthetic
    from klora_ext.webui import script

    layers = synthetic.layer_shapes("sd15", "attention")
    host = fakehost.FakeHost(tempfile.mkdtemp(), model_layers=layers)
    processing.unet_forward_hooks[:] = []  # no weight snapshots: time only
    callback_time: list[float] = []
    forward_time: list[tuple[int, float, int]] = []
    real_callback = script.on_cfg_denoiser
    real_forward = host.model.unet_forward

    def timed_callback(params):
        start = time.perf_counter()
        real_callback(params)
        callback_time.append(time.perf_counter() - start)

    def timed_forward(x):
        merges = len(networks.merge_log)
        start = time.perf_counter()
        out = real_forward(x)
        forward_time.append((len(forward_time), time.perf_counter() - start, len(networks.merge_log) - merges))
        return out

    from modules import script_callbacks

    script_callbacks.callback_map["cfg_denoiser"] = [("bench", timed_callback)]
    host.model.unet_forward = timed_forward
    payload = {"enabled": True, "content": "subject_v1", "style": "painterly"}
    prompt = "a photo <lora:other:0.6>"
    host.generate(payload, prompt=prompt, steps=args.steps)  # cold: scores the pair
    for _ in range(args.repeat):
        callback_time.clear()
        forward_time.clear()
        networks.merge_log.clear()
        host.generate(payload, prompt=prompt, steps=args.steps)
    baseline = min(t for _, t, n in forward_time if n == 0) if any(n == 0 for _, _, n in forward_time) else 0.0
    flips = [(i, t - baseline, n) for i, t, n in forward_time[1:]]  # step 0 re-merges everything: counted below
    per_step_merge = statistics.mean(t for _, t, _ in flips)
    worst = max(flips, key=lambda x: x[1])
    for layer in host.model.unet_layers:  # what a global invalidation (loractl-style) costs at a changing step
        layer.network_current_names = (("bench", None, None, None),)
    start = time.perf_counter()
    real_forward(torch.zeros(1))
    full = time.perf_counter() - start - baseline
    n_layers = len(host.model.unet_layers)
    params = sum(layer.weight.numel() for layer in host.model.unet_layers)
    print(
        f"fake host (CPU, torch {torch.__version__}): SD1.5 attention layers, {n_layers} layers, "
        f"{params / 1e6:.1f} M params, fp32, {args.steps} steps, prompt LoRA + K-LoRA pair"
    )
    print(f"  K-LoRA callback per step (bookkeeping)  : {1e6 * statistics.mean(callback_time):9.1f} us")
    print(
        f"  re-merge of flipping layers, mean/step  : {1e3 * per_step_merge:9.2f} ms "
        f"(worst step {worst[0]}: {1e3 * worst[1]:.2f} ms, {worst[2]} layers)"
    )
    print(f"  layers re-merged per pass (after step 0): {sum(n for _, _, n in flips):9d}")
    print(f"  full re-merge of all layers (one step)  : {1e3 * full:9.2f} ms")
    print(f"  flip handling / full re-merge per step  : {per_step_merge / full:9.4f}")


def bench_scoring(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fakes" / "a1111"))
    os.environ.setdefault("KLORA_CACHE_PATH", os.path.join(tempfile.mkdtemp(), "scores.json"))
    import fakehost
    import networks
    import torch

    from klora_ext import synthetic
    from klora_ext.lora_file import read_lora
    from klora_ext.scoring import compute_scores
    from klora_ext.webui.a1111 import A1111Adapter

    layers = synthetic.layer_shapes("sd15", "attention")
    host = fakehost.FakeHost(tempfile.mkdtemp(), model_layers=layers)
    files = {}
    for stem, kind, seed, rank in (("b_lora", "lora", 1, 8), ("b_loha", "loha", 2, 8), ("b_style", "lora", 3, 16)):
        sd = synthetic.make_lora_state_dict(layers, rank, kind=kind, alpha=float(rank), seed=seed, arch="sdxl")
        files[stem] = synthetic.save_lora(host.lora_dir / f"{stem}.safetensors", sd)
    networks.list_available_networks()
    adapter = A1111Adapter()
    params = sum(math.prod(shape) for _, shape in layers)
    print(
        f"scoring (fake host, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads): SD1.5 attention "
        f"layers, {len(layers)} layers, {params / 1e6:.1f} M params per file; best of {args.repeat}"
    )
    for content in ("b_lora", "b_loha"):
        reader, hosted = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            compute_scores(read_lora(files[content]), read_lora(files["b_style"]))
            reader.append(time.perf_counter() - start)
            adapter.drop_caches()  # the builtin's load_network each time too
            start = time.perf_counter()
            pair = adapter.host_layers(None, adapter.resolve(content), adapter.resolve("b_style"))
            compute_scores(*pair.load())
            hosted.append(time.perf_counter() - start)
        print(
            f"  {content[2:]:>4}+lora  reader (CLI) {min(reader):7.2f} s   host layers {min(hosted):7.2f} s   "
            f"host/reader {min(hosted) / min(reader):5.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("KLORA_WEBUI_URL", ""))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--content", default=os.environ.get("KLORA_CONTENT", "klora_it_content"))
    ap.add_argument("--style", default=os.environ.get("KLORA_STYLE", "klora_it_style"))
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--scoring", action="store_true", help="host layer set vs reader scoring cost (fake host)")
    args = ap.parse_args()
    if args.scoring:
        bench_scoring(args)
    elif args.url:
        bench_server(args.url.rstrip("/"), args)
    else:
        bench_fake(args)


if __name__ == "__main__":
    main()
