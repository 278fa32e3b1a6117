"""Core benchmark: cold scoring vs the bare products, peak memory, cached scores, per-step plan cost, naive approach.

    python benchmarks/bench_core.py                  # SD1.5 and SDXL shaped pairs, CPU (~2 min on 2 cores)
    python benchmarks/bench_core.py --device cuda    # on a GPU
    python benchmarks/bench_core.py --case sdxl --repeat 5

Cold scoring (what the user waits for on a new pair: hash both files, read them, score every shared layer; a fresh
score cache each time, files in the page cache) is timed ``--repeat`` times, alternating with the bare products: a
plain ``up @ down`` of every shared layer of both files in fp32 (the compute bound: the products scoring cannot
avoid). Medians of the same run give the ratio; each case ends with the line
``<case>: cold scoring T s, bare products (compute bound) T0 s, ratio R``. Peak memory: the resident-set high-water
mark (reset through /proc/self/clear_refs; CUDA: max_memory_allocated) above what the parsed files already hold, for
scoring and for the bare products. The plan built from the scores is compared with the plan from the previous
implementation's dense scores (full fp32 delta, abs, top-k) on the same pair.

The naive approach is what the authors' reference code does: on every K-LoRA layer call of every step it recomputes
up@down for both LoRAs and both top-k sums. It is timed for one step and multiplied by the step count; on the CPU
one step of an SDXL pair takes minutes, so ``--naive-stride 8`` (the CPU default) times every 8th layer and scales
the time by the element count of all layers over the timed ones.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
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
from klora_ext.scoring import BLOCK_ELEMS_CPU, BLOCK_ELEMS_CUDA, compute_scores, top_k  # noqa: E402

CASES = {
    # name: (arch, scope of generated layers, rank content, rank style)
    "sd15": ("sd15", "transformer", 8, 16),
    "sd15-locon": ("sd15", "all", 8, 16),
    "sdxl": ("sdxl", "transformer", 32, 64),
}


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakExtra:
    """Peak memory above the level at entry: RSS high-water mark (reset via /proc/self/clear_refs) or CUDA's."""

    def __init__(self, device: str) -> None:
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> PeakExtra:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self.base = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.mib = _status_mib("VmHWM") - self.base


def bare_products_seconds(content, style, device: str) -> float:
    """The compute bound: up @ down of every shared layer of both files, fp32, nothing else (LoRA factors only)."""
    pairs = []
    for layer_id in content.layers:
        if layer_id in style.layers:
            for layer in (content.layers[layer_id], style.layers[layer_id]):
                up, down = layer.factors["up"], layer.factors["down"]
                pairs.append((up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)))
    sync(device)
    started = time.perf_counter()
    for up, down in pairs:
        up.to(device=device, dtype=torch.float32) @ down.to(device=device, dtype=torch.float32)
    sync(device)
    return time.perf_counter() - started


def dense_scores(content, style, device: str):
    """The previous implementation: per layer the full fp32 delta, abs, exact top-k, sum (scoring.layer_score)."""
    from klora_ext.scoring import LayerScore, PairScores, layer_score

    rows = []
    for s in compute_order(content, style):
        lc, ls = content.layers[s], style.layers[s]
        k = top_k(lc.rank, ls.rank, math.prod(lc.shape))
        (tc, ac), (ts, as_) = layer_score(lc.delta(device=device), k), layer_score(ls.delta(device=device), k)
        rows.append(LayerScore(s, tc, ts, ac, as_, lc.rank, ls.rank, k))
    return PairScores(layers=tuple(rows))


def compute_order(content, style) -> list[str]:
    from klora_ext import keys

    return sorted(set(content.layers) & set(style.layers), key=keys.forward_order_key)


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


def naive_step_seconds(content, style, device: str, stride: int = 1) -> float:
    """One denoising step of the reference approach: per layer, both products and both top-k sums. ``stride`` > 1:
    every stride-th layer, scaled by element counts (all layers / timed layers)."""
    every = [i for i in content.layers if i in style.layers]
    shared = every[::stride]
    scale = sum(math.prod(content.layers[i].shape) for i in every) / sum(
        math.prod(content.layers[i].shape) for i in shared
    )
    sync(device)
    started = time.perf_counter()
    for layer_id in shared:
        lc, ls = content.layers[layer_id], style.layers[layer_id]
        k = top_k(lc.rank, ls.rank, math.prod(lc.shape))
        for layer in (lc, ls):
            d = layer.delta(device=device)  # up @ down, as the reference does on every call
            torch.topk(d.abs().flatten(), k).values.sum()
    sync(device)
    return (time.perf_counter() - started) * scale


def note(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_case(name: str, steps: int, device: str, repeat: int, naive_stride: int) -> dict:
    arch, scope, rc, rs = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        c_path, s_path = write_pair(folder, arch, scope, rc, rs)
        size_mib = (c_path.stat().st_size + s_path.stat().st_size) / 2**20
        gc.collect()
        rss_before = peak_rss_mib()

        colds, bares = [], []
        scores = None
        for rep in range(repeat):
            cache = ScoreCache(folder / f"scores{rep}.json")  # fresh: hashes, reads and scores the pair again
            sync(device)
            t0 = time.perf_counter()
            scores, hit = cache.get_or_compute(c_path, s_path, device=device)
            sync(device)
            colds.append(time.perf_counter() - t0)
            note(f"{name}: cold scoring round {rep + 1}: {colds[-1]:.2f} s")
            if hit:
                raise RuntimeError("expected a cold cache")
            if rep == 0:
                rss_after = peak_rss_mib()
                content, style = read_lora(c_path), read_lora(s_path)
            bares.append(bare_products_seconds(content, style, device))
            note(f"{name}: bare products round {rep + 1}: {bares[-1]:.2f} s")
        cold = statistics.median(colds)
        bare = statistics.median(bares)

        t0 = time.perf_counter()
        _, hit_mem = cache.get_or_compute(c_path, s_path, device=device)
        cached_mem = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, hit_disk = ScoreCache(folder / f"scores{repeat - 1}.json").get_or_compute(c_path, s_path, device=device)
        cached_disk = time.perf_counter() - t0
        if not (hit_mem and hit_disk):
            raise RuntimeError("score cache did not hit")

        # peak memory above the parsed files, in a child whose malloc maps every block freshly (see memory_child)
        mem = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--mem-child", str(c_path), str(s_path), "--device", device],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        block_mib = (BLOCK_ELEMS_CUDA if device.startswith("cuda") else BLOCK_ELEMS_CPU) * 4 / 2**20
        largest_mib = max(math.prod(lay.shape) for lay in content.layers.values()) * 4 / 2**20

        # scoring alone (files already parsed), to separate hash + read from the math
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

        note(f"{name}: math only {score_only:.2f} s; timing the naive reference step")
        naive_one = naive_step_seconds(content, style, device, naive_stride)
        dense_plan = Plan.build(dense_scores(content, style, device), args, steps)
        plan_same = dense_plan.layer_ids == plan.layer_ids and bool((dense_plan.roles == plan.roles).all())
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
        "score_cold_all_s": colds,
        "bare_s": bare,
        "bare_all_s": bares,
        "ratio": cold / bare,
        "ratio_math_only": score_only / bare,
        "score_peak_extra_MiB": round(mem["score"], 1),
        "bare_peak_extra_MiB": round(mem["bare"], 1),
        "block_MiB": block_mib,
        "largest_layer_MiB": round(largest_mib, 1),
        "plan_same_as_dense": plan_same,
        "threads": torch.get_num_threads(),
        "score_math_only_s": score_only,
        "cached_memory_s": cached_mem,
        "cached_disk_s": cached_disk,
        "peak_rss_growth_MiB": round(rss_after - rss_before, 1),
        "plan_build_s": build,
        "per_step_lookup_us": per_step * 1e6,
        "naive_per_step_s": naive_one,
        "naive_stride": naive_stride,
        "naive_total_s": naive_total,
        "ours_total_cold_s": ours_total_cold,
        "ours_total_cached_s": ours_total_cached,
        "ratio_naive_over_cold": naive_total / ours_total_cold,
        "ratio_naive_over_cached": naive_total / ours_total_cached,
    }


def print_row(r: dict, steps: int) -> None:
    def fmt(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(
        f"\n== {r['case']} on {r['device']} ({r['threads']} torch threads): {r['shared_layers']} shared layers "
        f"({r['plan_layers']} switched), files {r['files_MiB']} MiB, {steps} steps"
    )
    print(
        f"  cold scoring (hash + read + score), median of [{fmt(r['score_cold_all_s'])}] s: "
        f"{r['score_cold_s']:.2f} s; "
        f"scoring math only (files parsed) {r['score_math_only_s']:.2f} s"
    )
    print(f"  bare products (up @ down of every shared layer, both files), median of [{fmt(r['bare_all_s'])}] s")
    print(
        f"  peak extra memory above the parsed files: scoring {r['score_peak_extra_MiB']} MiB "
        f"(block {r['block_MiB']:.0f} MiB, largest layer's fp32 delta {r['largest_layer_MiB']} MiB); "
        f"bare products {r['bare_peak_extra_MiB']} MiB; process peak RSS growth over the first cold run "
        f"{r['peak_rss_growth_MiB']} MiB"
    )
    print(f"  plan identical to the plan from dense (previous implementation) scores: {r['plan_same_as_dense']}")
    print(f"  cached scores: memory {r['cached_memory_s'] * 1e3:.2f} ms, disk {r['cached_disk_s'] * 1e3:.2f} ms")
    print(f"  plan build {r['plan_build_s'] * 1e3:.2f} ms; per-step lookup {r['per_step_lookup_us']:.1f} us")
    est = f" (every {r['naive_stride']}th layer timed, scaled)" if r["naive_stride"] > 1 else ""
    print(f"  naive reference: {r['naive_per_step_s']:.3f} s per step{est} -> {r['naive_total_s']:.2f} s per image")
    print(
        f"  ratio naive / K-LoRA (cold): {r['ratio_naive_over_cold']:.1f}x; "
        f"(cached): {r['ratio_naive_over_cached']:.0f}x"
    )
    print(
        f"  math-only / bare products: {r['ratio_math_only']:.2f}\n"
        f"{r['case']}: cold scoring {r['score_cold_s']:.2f} s, bare products (compute bound) {r['bare_s']:.2f} s, "
        f"ratio {r['ratio']:.2f}"
    )


def memory_child(c_path: str, s_path: str, device: str) -> None:
    """Peak memory of scoring and of the bare products above the parsed files. Run with a fixed glibc mmap threshold
    (MALLOC_MMAP_THRESHOLD_): freed blocks are unmapped, so the resident high-water mark shows the live peak instead
    of reusing memory earlier steps left resident (timings are taken in the other process)."""
    content, style = read_lora(c_path), read_lora(s_path)
    with PeakExtra(device) as score_mem:
        compute_scores(content, style, device=device)
    with PeakExtra(device) as bare_mem:
        bare_products_seconds(content, style, device)
    print(json.dumps({"score": score_mem.mib, "bare": bare_mem.mib}))


def machine(device: str) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = f"CPU: {cpu}, {os.cpu_count()} logical cores"
    if device.startswith("cuda") and torch.cuda.is_available():
        out += f"; GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return out


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="cold scoring / bare product rounds (medians)")
    parser.add_argument("--cases", default="sd15,sdxl", help="cases for --case all (comma-separated)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per case (used by the parent)")
    parser.add_argument("--naive-stride", type=int, default=None, help="time every n-th layer (default: cpu 8)")
    parser.add_argument("--mem-child", nargs=2, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.mem_child:
        memory_child(*ns.mem_child, ns.device)
        return
    stride = ns.naive_stride or (1 if ns.device.startswith("cuda") else 8)
    if ns.case != "all":
        row = run_case(ns.case, ns.steps, ns.device, ns.repeat, stride)
        print(json.dumps(row) if ns.json else "", end="\n" if ns.json else "")
        if not ns.json:
            print_row(row, ns.steps)
        return
    print(f"{machine(ns.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average at start {load()}; each case in a fresh process (peak memory)")
    for case in ns.cases.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--steps", str(ns.steps), "--device", ns.device]
        out = subprocess.run(
            [*cmd, "--repeat", str(ns.repeat), "--naive-stride", str(stride), "--json"],
            check=True,
            stdout=subprocess.PIPE,  # progress goes to stderr, live
            text=True,
        )
        print_row(json.loads(out.stdout.strip().splitlines()[-1]), ns.steps)
    print(f"\nload average at end {load()}")


if __name__ == "__main__":
    main()
