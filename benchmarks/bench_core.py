"""Core benchmark: scoring time and peak memory, cold vs cached, per-step plan cost, and the naive reference approach.

    python benchmarks/bench_core.py                  # SD1.5 and SDXL shaped pairs, CPU
    python benchmarks/bench_core.py --device cuda    # on a GPU
    python benchmarks/bench_core.py --case sd15 --steps 30

The naive approach is what the authors' reference code does: on every K-LoRA layer call of every step it recomputes
up@down for both LoRAs and both top-k sums. It is timed for one full step here and multiplied by the step count.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klora_ext import synthetic  # noqa: E402
from klora_ext.args import KLoraArgs  # noqa: E402
from klora_ext.cache import ScoreCache  # noqa: E402
from klora_ext.lora_file import read_lora  # noqa: E402
from klora_ext.plan import Plan  # noqa: E402
from klora_ext.runtime import PassController, Session  # noqa: E402
from klora_ext.scoring import compute_scores, top_k  # noqa: E402

CASES = {
    # name: (arch, scope of generated layers, rank content, rank style)
    "sd15": ("sd15", "transformer", 8, 16),
    "sd15-locon": ("sd15", "all", 8, 16),
    "sdxl": ("sdxl", "transformer", 32, 64),
}


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_pair(folder: Path, arch: str, scope: str, rc: int, rs: int) -> tuple[Path, Path]:
    layers = synthetic.layer_shapes(arch, scope)
    content = folder / f"{arch}_content_r{rc}.safetensors"
    style = folder / f"{arch}_style_r{rs}.safetensors"
    synthetic.save_lora(content, synthetic.make_lora_state_dict(layers, rc, seed=1, dtype=torch.float16, arch=arch))
    synthetic.save_lora(style, synthetic.make_lora_state_dict(layers, rs, seed=2, dtype=torch.float16, arch=arch))
    return content, style


def naive_step_seconds(content, style, device: str) -> float:
    """One denoising step of the reference approach: per layer, both products and both top-k sums."""
    shared = [i for i in content.layers if i in style.layers]
    sync(device)
    started = time.perf_counter()
    for layer_id in shared:
        lc, ls = content.layers[layer_id], style.layers[layer_id]
        k = top_k(lc.rank, ls.rank, math.prod(lc.shape))
        for layer in (lc, ls):
            d = layer.delta(device=device)  # up @ down, as the reference does on every call
            torch.topk(d.abs().flatten(), k).values.sum()
    sync(device)
    return time.perf_counter() - started


def run_case(name: str, steps: int, device: str) -> dict:
    arch, scope, rc, rs = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        c_path, s_path = write_pair(folder, arch, scope, rc, rs)
        size_mib = (c_path.stat().st_size + s_path.stat().st_size) / 2**20
        gc.collect()
        rss_before = peak_rss_mib()

        cache = ScoreCache(folder / "scores.json")
        sync(device)
        t0 = time.perf_counter()
        scores, hit = cache.get_or_compute(c_path, s_path, device=device)
        sync(device)
        cold = time.perf_counter() - t0
        if hit:
            raise RuntimeError("expected a cold cache")
        rss_after = peak_rss_mib()

        t0 = time.perf_counter()
        _, hit_mem = cache.get_or_compute(c_path, s_path, device=device)
        cached_mem = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, hit_disk = ScoreCache(folder / "scores.json").get_or_compute(c_path, s_path, device=device)
        cached_disk = time.perf_counter() - t0
        if not (hit_mem and hit_disk):
            raise RuntimeError("score cache did not hit")

        # scoring alone (files already parsed), to separate parse cost from math
        content, style = read_lora(c_path), read_lora(s_path)
        sync(device)
        t0 = time.perf_counter()
        compute_scores(content, style, device=device)
        sync(device)
        score_only = time.perf_counter() - t0

        # per-step cost of K-LoRA at run time: plan lookup + change list
        args = KLoraArgs(enabled=True, content="c", style="s")
        t0 = time.perf_counter()
        plan = Plan.build(scores, args, steps)
        build = time.perf_counter() - t0
        ctl = PassController(Session(args, scores))
        reps = 200
        t0 = time.perf_counter()
        flips = 0
        for _ in range(reps):
            ctl.applied = None
            flips = len(ctl.begin_pass(steps))
            for step in range(1, steps):
                flips += len(ctl.advance(step))
                ctl.advance(step)  # the second CFG/2nd-order call of the same step
        per_step = (time.perf_counter() - t0) / (reps * steps)

        naive_one = naive_step_seconds(content, style, device)
    naive_total = naive_one * steps
    ours_total_cold = cold + build + per_step * steps
    ours_total_cached = cached_mem + build + per_step * steps
    return {
        "case": name,
        "device": device,
        "shared_layers": len(scores.layers),
        "plan_layers": len(plan.layer_ids),
        "files_MiB": round(size_mib, 1),
        "score_cold_s": cold,
        "score_math_only_s": score_only,
        "cached_memory_s": cached_mem,
        "cached_disk_s": cached_disk,
        "peak_rss_growth_MiB": round(rss_after - rss_before, 1),
        "plan_build_s": build,
        "per_step_lookup_us": per_step * 1e6,
        "naive_per_step_s": naive_one,
        "naive_total_s": naive_total,
        "ours_total_cold_s": ours_total_cold,
        "ours_total_cached_s": ours_total_cached,
        "ratio_naive_over_cold": naive_total / ours_total_cold,
        "ratio_naive_over_cached": naive_total / ours_total_cached,
    }


def print_row(r: dict, steps: int) -> None:
    print(
        f"\n== {r['case']} on {r['device']}: {r['shared_layers']} shared layers ({r['plan_layers']} switched), "
        f"files {r['files_MiB']} MiB, {steps} steps"
    )
    print(
        f"  scoring, cold (hash + parse + top-k): {r['score_cold_s']:.3f} s "
        f"(top-k math only {r['score_math_only_s']:.3f} s)"
    )
    print(f"  scoring, cached: memory {r['cached_memory_s'] * 1e3:.2f} ms, disk {r['cached_disk_s'] * 1e3:.2f} ms")
    print(f"  peak RSS growth while scoring: {r['peak_rss_growth_MiB']} MiB")
    print(f"  plan build {r['plan_build_s'] * 1e3:.2f} ms; per-step lookup {r['per_step_lookup_us']:.1f} us")
    print(f"  naive reference: {r['naive_per_step_s']:.3f} s per step -> {r['naive_total_s']:.2f} s per image")
    print(
        f"  ratio naive / K-LoRA (cold): {r['ratio_naive_over_cold']:.1f}x; "
        f"(cached): {r['ratio_naive_over_cached']:.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line per case (used by the parent)")
    ns = parser.parse_args()
    if ns.case != "all":
        row = run_case(ns.case, ns.steps, ns.device)
        print(json.dumps(row) if ns.json else "", end="\n" if ns.json else "")
        if not ns.json:
            print_row(row, ns.steps)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; each case in a fresh process (peak memory)")
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--case", case, "--steps", str(ns.steps), "--device", ns.device, "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        print_row(json.loads(out.stdout.strip().splitlines()[-1]), ns.steps)


if __name__ == "__main__":
    main()
