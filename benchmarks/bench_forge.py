"""Forge benchmark: K-LoRA's cost against plain LoRA use, on a real server or with the fake host on this machine.

Against a running Forge (``--api``), same server, same run:

    python benchmarks/bench_forge.py --url http://127.0.0.1:7860 --content SUBJECT --style STYLE \
        --steps 20 --size 1024 --repeat 3

  * plain: both LoRAs in the prompt (``<lora:content:wc> <lora:style:ws>``), no K-LoRA;
  * K-LoRA (first): a pair the server has not scored yet (a fresh K multiplier that rounds to the same K);
  * K-LoRA (cached): the same request again (scores cached, Forge's merge of the content LoRA cached).
  Each configuration gets one warm-up request (Forge re-merges when the LoRA set changes); medians are reported and
  the ratio cached / plain is printed (target: <= 1.05 with the weights on the GPU).

No server (``--micro``): the fake Forge host of the tests (real torch layers shaped like an SD1.5/SDXL UNet, Forge's
patcher/LoraLoader semantics) on this machine. It times K-LoRA's per-step work (the corrections of the layers that
flip, applied at the denoiser callback) against what peers do per switch: a full re-merge of every LoRA layer
(``refresh`` with changed identifiers), and reports the per-step overhead.

    python benchmarks/bench_forge.py --micro --arch sd15 --scope transformer --steps 30
    python benchmarks/bench_forge.py --micro --arch sdxl --dtype float16      # ~5 GB RAM

Memory (``--memory``): peak RAM (and VRAM on CUDA) of one K-LoRA generation against one plain generation with both
LoRAs in the prompt, same fake host, same layers; each in its own process so the peaks do not mix. Printed side by
side with the ratio (goal: K-LoRA <= 1.05 x plain, i.e. no weight copy beside Forge's own backup).

    python benchmarks/bench_forge.py --memory --arch sdxl --scope attention --dtype float16   # SDXL-sized, ~4 GB

Server memory (``--url ... --memory``): peak RSS (VmHWM, reset per request through /proc/PID/clear_refs; and the
GPU memory nvidia-smi reports when there is a GPU) of the server process during a K-LoRA generation and a plain
two-LoRA generation of the same pair, same server, one run; each kind measured right after the other kind (Forge
re-merges on every change of its LoRA set) and repeated (merge cached), medians over ``--repeat`` rounds, ratio
printed. Run it on the machine the server runs on (it reads /proc of the server; start_server.sh's pid file).

    python benchmarks/bench_forge.py --url http://127.0.0.1:7861 --memory --size 512 --steps 8 --repeat 2

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# server mode
# ---------------------------------------------------------------------------------------------------------------


def _post(url: str, payload: dict[str, Any], timeout: float) -> tuple[float, dict[str, Any]]:
    req = urllib.request.Request(
        url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.loads(resp.read().decode())
    return time.perf_counter() - start, body


def bench_server(a: argparse.Namespace) -> None:
    url = a.url.rstrip("/")
    with urllib.request.urlopen(url + "/klora/v1/version", timeout=60) as resp:
        version = json.loads(resp.read().decode())
    print(f"server {url}: K-LoRA {version.get('version')} host={version.get('host')}")
    base = {
        "prompt": a.prompt,
        "negative_prompt": "",
        "steps": a.steps,
        "width": a.size,
        "height": a.size,
        "seed": 1234,
        "sampler_name": a.sampler,
        "cfg_scale": 5,
    }
    plain = {**base, "prompt": f"{a.prompt} <lora:{a.content}:{a.wc:g}> <lora:{a.style}:{a.ws:g}>"}
    klora_args = {"enabled": True, "content": a.content, "style": a.style}
    klora_args.update(content_weight=a.wc, style_weight=a.ws)

    def klora(k: float) -> dict[str, Any]:
        return {**base, "alwayson_scripts": {"K-LoRA": {"args": [{**klora_args, "k_multiplier": k}]}}}

    results: dict[str, list[float]] = {}
    _post(url, plain, a.timeout)  # warm-up: Forge merges both LoRAs once
    results["plain (both LoRAs in the prompt)"] = [_post(url, plain, a.timeout)[0] for _ in range(a.repeat)]
    first = []
    for _ in range(a.repeat):
        fresh = 1.0 + random.random() * 1e-6  # a new score-cache key, the same K
        seconds, body = _post(url, klora(fresh), a.timeout)
        info = json.loads(body.get("info") or "{}").get("infotexts", [""])[0]
        if "K-LoRA: v1" not in info or "K-LoRA skipped" in info:
            print(f"warning: K-LoRA did not run: {info[-300:]}")
        first.append(seconds)
    results["K-LoRA (first: scores computed)"] = first
    _post(url, klora(1.0), a.timeout)  # warm-up: scores for k=1.0 cached, content merge cached
    results["K-LoRA (cached)"] = [_post(url, klora(1.0), a.timeout)[0] for _ in range(a.repeat)]
    print(f"\n{a.steps} steps, {a.size}x{a.size}, {a.sampler}, {a.repeat} runs each (median):")
    for name, times in results.items():
        print(f"  {name:36s} {statistics.median(times):8.2f} s   {' '.join(f'{t:.2f}' for t in times)}")
    ratio = statistics.median(results["K-LoRA (cached)"]) / statistics.median(
        results["plain (both LoRAs in the prompt)"]
    )
    print(f"\nK-LoRA cached / plain: {ratio:.3f}  ({(ratio - 1) * 100:+.1f} %)  target <= 1.05")


# ---------------------------------------------------------------------------------------------------------------
# micro mode (fake host)
# ---------------------------------------------------------------------------------------------------------------


class _Driver:
    """The adapter_base call sequence (what the shared Script does)."""

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


def bench_micro(a: argparse.Namespace) -> None:
    import torch

    from klora_ext import synthetic
    from klora_ext.args import KLoraArgs
    from tests.fakes.forge.host import FakeForge, ScriptRunner, StableDiffusionProcessingTxt2Img, make_engine

    torch.set_num_threads(max(1, a.threads))
    dtype = getattr(torch, a.dtype)
    layers = synthetic.layer_shapes(a.arch, a.scope)
    unet = [(lid.split(":", 1)[1], shape) for lid, shape in layers]
    print(
        f"fake Forge host: {a.arch} {a.scope}: {len(layers)} layers, "
        f"{sum(torch.Size(s).numel() for _, s in layers) / 1e6:.0f} M params, {a.dtype}, device {a.device}"
    )
    engine = make_engine(unet, [("text_model.encoder.layers.0.mlp.fc1", (8, 8))])
    model = engine.forge_objects.unet.model
    model.to(device=a.device, dtype=dtype)
    for patcher in (engine.forge_objects.unet, engine.forge_objects_original.unet):
        patcher.load_device = torch.device(a.device)
    host = FakeForge(engine)
    host.install(lambda mapping, key, value: mapping.__setitem__(key, value))
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["KLORA_CACHE_PATH"] = str(Path(tmp) / "scores.json")
        rng = random.Random(0)
        for name, seed, rank in (("content", 1, a.rank_content), ("style", 2, a.rank_style)):
            # per-layer ranks around the given one: real pairs flip layer by layer, not all at one step
            ranks = {lid: rng.choice((rank // 4, rank // 2, rank, rank * 2)) or 1 for lid, _ in layers}
            # kohya keys in compvis naming (what SDXL files use; Forge's key map reads them for any UNet)
            sd = synthetic.make_lora_state_dict(layers, ranks, seed=seed, alpha=None, arch="sdxl", dtype=torch.float16)
            host.add_lora_file(name, synthetic.save_lora(Path(tmp) / f"{name}.safetensors", sd))
        host.networks.list_available_networks()

        from klora_ext.webui.forge import ForgeAdapter

        adapter = ForgeAdapter()
        args = KLoraArgs(enabled=True, content="content", style="style")
        timings: list[float] = []
        flips: list[int] = []
        original = adapter.on_denoiser

        def timed(params: Any) -> None:
            before = dict(adapter._applied)
            sync(a.device)
            start = time.perf_counter()
            original(params)
            sync(a.device)
            timings.append(time.perf_counter() - start)
            flips.append(sum(1 for k, v in adapter._applied.items() if before.get(k) != v))

        host.callbacks.setdefault("cfg_denoiser", []).append(timed)
        for run in range(2):  # run 0 includes scoring and Forge's first merge; run 1 is the cached pair
            timings.clear()
            flips.clear()
            p = StableDiffusionProcessingTxt2Img(steps=a.steps, scripts=ScriptRunner([(_Driver(adapter, args), [])]))
            start = time.perf_counter()
            host.process_images(p)
            total = time.perf_counter() - start
            label = "first (scores computed, Forge merges the content LoRA)" if run == 0 else "cached pair"
            print(f"\ngeneration {run + 1}, {label}: {total:.2f} s end to end on the fake host")
        steps_with_flips = sum(1 for t in flips[1:] if t)
        print(
            f"K-LoRA per pass ({a.steps} steps): first call (all layers brought to step 0) {timings[0] * 1e3:.1f} ms, "
            f"per-step sum {sum(timings[1:]) * 1e3:.1f} ms, max step {max(timings[1:]) * 1e3:.2f} ms, "
            f"{sum(flips[1:])} layer switches over {steps_with_flips} steps"
        )

        # peers: a full re-merge of every LoRA layer per switch (restore all + merge all), here both LoRAs
        unet_patcher = engine.forge_objects_after_applying_lora.unet.clone()
        for name in ("content", "style"):
            patches, _ = host.modules["backend.patcher.lora"].load_lora(
                host.networks.load_lora_state_dict(host.disk[name].filename),
                host.modules["backend.patcher.lora"].model_lora_keys_unet(model, {}),
            )
            unet_patcher.add_patches(filename=name, patches=patches, strength_patch=1.0)
        merges = []
        for _ in range(3):
            sync(a.device)
            start = time.perf_counter()
            unet_patcher.lora_loader.refresh(unet_patcher.lora_patches, force_refresh=True)
            sync(a.device)
            merges.append(time.perf_counter() - start)
        full = statistics.median(merges)
        ours = sum(timings)
        print(f"full re-merge of all {len(layers)} layers (both LoRAs): {full * 1e3:.0f} ms each")
        print(
            f"per pass: K-LoRA {ours * 1e3:.0f} ms vs a re-merge per switching step "
            f"{full * steps_with_flips * 1e3:.0f} ms ({steps_with_flips} x): "
            f"{full * steps_with_flips / max(ours, 1e-9):.1f}x less work"
        )


# ---------------------------------------------------------------------------------------------------------------
# memory mode (fake host, one process per configuration)
# ---------------------------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakRSS:
    """Peak resident memory while active: the kernel's high-water mark, reset at the start where Linux allows it
    (/proc/self/clear_refs), else a 1 ms sampler."""

    def __enter__(self) -> _PeakRSS:
        import threading

        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def mem_child(a: argparse.Namespace) -> None:
    """One generation (``--mem-child plain`` or ``klora``) on a fresh fake host; prints one JSON line."""
    import gc

    import torch

    from klora_ext import synthetic
    from klora_ext.args import KLoraArgs
    from tests.fakes.forge.host import FakeForge, ScriptRunner, StableDiffusionProcessingTxt2Img, make_engine

    torch.set_num_threads(max(1, a.threads))
    dtype = getattr(torch, a.dtype)
    layers = synthetic.layer_shapes(a.arch, a.scope)
    engine = make_engine([(lid.split(":", 1)[1], shape) for lid, shape in layers], [("text_model.x.fc1", (8, 8))])
    model = engine.forge_objects.unet.model
    model.to(device=a.device, dtype=dtype)
    for patcher in (engine.forge_objects.unet, engine.forge_objects_original.unet):
        patcher.load_device = torch.device(a.device)
    host = FakeForge(engine)
    host.install(lambda mapping, key, value: mapping.__setitem__(key, value))
    cuda = a.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["KLORA_CACHE_PATH"] = str(Path(tmp) / "scores.json")
        for name, seed, rank in (("content", 1, a.rank_content), ("style", 2, a.rank_style)):
            sd = synthetic.make_lora_state_dict(layers, rank, seed=seed, alpha=None, arch="sdxl", dtype=torch.float16)
            host.add_lora_file(name, synthetic.save_lora(Path(tmp) / f"{name}.safetensors", sd))
            del sd
        host.networks.list_available_networks()
        from klora_ext.webui.forge import ForgeAdapter

        if a.mem_child == "klora":
            args = KLoraArgs(enabled=True, content="content", style="style", content_weight=a.wc, style_weight=a.ws)
            runner = ScriptRunner([(_Driver(ForgeAdapter(), args), [])])
            loras: list[tuple[str, float]] = []
        else:
            runner, loras = None, [("content", a.wc), ("style", a.ws)]
        gc.collect()
        base = _rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_base = torch.cuda.memory_allocated()
        with _PeakRSS() as peak:
            p = StableDiffusionProcessingTxt2Img(steps=a.steps, scripts=runner)
            p.prompt_loras = list(loras)
            host.process_images(p)
        out = {"config": a.mem_child, "base": base, "peak": peak.peak}
        if cuda:
            out.update(cuda_base=cuda_base, cuda_peak=torch.cuda.max_memory_allocated())
        print(json.dumps(out))


def bench_memory(a: argparse.Namespace) -> None:
    import os
    import subprocess

    import torch

    from klora_ext import synthetic

    layers = synthetic.layer_shapes(a.arch, a.scope)
    itemsize = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    size = sum(torch.Size(s).numel() for _, s in layers) * itemsize
    print(
        f"fake Forge host: {a.arch} {a.scope}: {len(layers)} layers, {size / 2**30:.2f} GiB of weights ({a.dtype}), "
        f"device {a.device}; both LoRAs patch every layer (ranks {a.rank_content}/{a.rank_style}), {a.steps} steps"
    )
    results = {}
    for config in ("plain", "klora"):
        cmd = [sys.executable, __file__, "--mem-child", config]
        for flag in ("arch", "scope", "dtype", "device", "threads", "steps", "rank_content", "rank_style", "wc", "ws"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        # A fixed mmap threshold: glibc then returns every freed tensor to the OS at once, so RSS follows the live
        # tensors (with its default, freed memory stays resident and later tensors reuse it unseen).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 2**30
    plain, ours = results["plain"], results["klora"]
    print(f"{'':28}{'plain 2 LoRAs':>16}{'K-LoRA':>12}{'ratio':>8}")
    pk, kk = plain["peak"], ours["peak"]
    print(f"{'peak RSS (GiB)':28}{pk / gib:16.3f}{kk / gib:12.3f}{kk / pk:8.3f}")
    grow_p, grow_k = plain["peak"] - plain["base"], ours["peak"] - ours["base"]
    print(f"{'  above the loaded model':28}{grow_p / gib:16.3f}{grow_k / gib:12.3f}{grow_k / max(grow_p, 1):8.3f}")
    if "cuda_peak" in plain:
        cp, ck = plain["cuda_peak"], ours["cuda_peak"]
        print(f"{'peak VRAM allocated (GiB)':28}{cp / gib:16.3f}{ck / gib:12.3f}{ck / cp:8.3f}")


# ---------------------------------------------------------------------------------------------------------------
# server memory mode: the server process's own peaks, K-LoRA vs plain, same server, one run
# ---------------------------------------------------------------------------------------------------------------


def _group_pids(leader: int) -> list[int]:
    """The server's processes: its process group (start_server.sh starts it with setsid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == leader or int(entry.name) == leader:  # fields[2]: pgrp
            pids.append(int(entry.name))
    return pids or [leader]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _gpu_used(pids: list[int]) -> int | None:
    """MiB of GPU memory the server's processes hold (nvidia-smi), None without a GPU."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            used += int(parts[1])
    return used


class _ServerPeak:
    """Peak RSS of the server's processes during one request: the kernel's high-water mark (VmHWM) reset before it
    (/proc/PID/clear_refs = 5), with a 20 ms RSS sampler as a floor; the GPU's use sampled the same way."""

    def __init__(self, leader: int) -> None:
        self.pids = _group_pids(leader)

    def __enter__(self) -> _ServerPeak:
        import threading

        self.reset = True
        for pid in self.pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.reset = False
        self.idle = sum(_status_kb(pid, "VmRSS") for pid in self.pids) * 1024
        self.sampled = self.idle
        self.gpu = _gpu_used(self.pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.sampled = max(self.sampled, sum(_status_kb(pid, "VmRSS") for pid in self.pids) * 1024)
            if self.gpu is not None:
                self.gpu = max(self.gpu, _gpu_used(self.pids) or 0)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        hwm = sum(_status_kb(pid, "VmHWM") for pid in self.pids) * 1024
        self.peak = max(hwm if self.reset else 0, self.sampled)


def bench_server_memory(a: argparse.Namespace) -> None:
    """Peak RSS (and GPU memory) of the server during a plain two-LoRA generation and a K-LoRA generation of the
    same pair, alternated so each measured request follows the other kind (Forge re-merges its LoRAs on every
    change of the LoRA set, so every measured request includes that merge), plus a repeat of each (merge cached)."""
    url = a.url.rstrip("/")
    leader = a.pid or int(Path("/tmp/klora-server.pid").read_text().strip())
    with urllib.request.urlopen(url + "/klora/v1/version", timeout=60) as resp:
        version = json.loads(resp.read().decode())
    base = {
        "prompt": a.prompt,
        "negative_prompt": "",
        "steps": a.steps,
        "width": a.size,
        "height": a.size,
        "seed": 1234,
        "sampler_name": a.sampler,
        "cfg_scale": 5,
        "override_settings": {"live_previews_enable": False},
    }
    plain = {**base, "prompt": f"{a.prompt} <lora:{a.content}:{a.wc:g}> <lora:{a.style}:{a.ws:g}>"}
    klora_args = {
        "enabled": True,
        "content": a.content,
        "style": a.style,
        "content_weight": a.wc,
        "style_weight": a.ws,
    }
    klora = {**base, "alwayson_scripts": {"K-LoRA": {"args": [klora_args]}}}
    print(
        f"server {url} (pid {leader}, processes {_group_pids(leader)}): K-LoRA {version.get('version')} "
        f"host={version.get('host')}; {a.steps} steps {a.size}x{a.size}; content '{a.content}' x{a.wc:g}, style "
        f"'{a.style}' x{a.ws:g}"
    )
    _post(url, klora, a.timeout)  # warm-up: scores computed and cached, so no scoring inside a measured request
    _post(url, plain, a.timeout)
    rows: dict[str, list[tuple[int, int, int | None]]] = {}
    sampled_only = False
    for rnd in range(a.repeat):
        for name, payload in (("K-LoRA", klora), ("plain", plain)):
            for phase in ("after the other", "repeated"):
                with _ServerPeak(leader) as peak:
                    _, body = _post(url, payload, a.timeout)
                if name == "K-LoRA":
                    info = json.loads(body.get("info") or "{}").get("infotexts", [""])[0]
                    if "K-LoRA: v1" not in info or "K-LoRA skipped" in info:
                        print(f"warning: K-LoRA did not run (round {rnd}): {info[-300:]}")
                rows.setdefault(f"{name} ({phase})", []).append((peak.idle, peak.peak, peak.gpu))
                sampled_only = sampled_only or not peak.reset
    if sampled_only:
        print("note: /proc/PID/clear_refs was not writable: peaks are from a 20 ms RSS sampler")
    gib = 2**30
    print(f"\n{'request':32}{'idle RSS GiB':>14}{'peak RSS GiB':>14}{'above idle':>12}{'GPU MiB':>10}")
    med: dict[str, tuple[float, float, float | None]] = {}
    for name, vals in rows.items():
        idle = statistics.median(v[0] for v in vals)
        peak = statistics.median(v[1] for v in vals)
        gpus = [v[2] for v in vals if v[2] is not None]
        gpu = statistics.median(gpus) if gpus else None
        med[name] = (idle, peak, gpu)
        gpu_s = f"{gpu:10.0f}" if gpu is not None else f"{'-':>10}"
        print(f"{name:32}{idle / gib:14.3f}{peak / gib:14.3f}{(peak - idle) / gib:12.3f}{gpu_s}")
    for phase in ("after the other", "repeated"):
        k, p = med[f"K-LoRA ({phase})"], med[f"plain ({phase})"]
        line = f"K-LoRA / plain peak RSS ({phase}): {k[1] / p[1]:.3f}"
        if k[2] is not None and p[2]:
            line += f"; GPU {k[2] / p[2]:.3f}"
        print(line + "  (target <= 1.05)")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running Forge with --api")
    ap.add_argument("--content", default="klora_it_content")
    ap.add_argument("--style", default="klora_it_style")
    ap.add_argument("--wc", type=float, default=1.0)
    ap.add_argument("--ws", type=float, default=1.0)
    ap.add_argument("--prompt", default="a photo")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--micro", action="store_true", help="no server: the fake host on this machine")
    ap.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    ap.add_argument("--scope", default="transformer", choices=("attention", "transformer", "all"))
    ap.add_argument("--rank-content", type=int, default=16)
    ap.add_argument("--rank-style", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory", action="store_true", help="no server: peak RAM/VRAM, K-LoRA vs plain (fake host)")
    ap.add_argument("--mem-child", choices=("plain", "klora"), help=argparse.SUPPRESS)
    ap.add_argument("--pid", type=int, help="server process (default: /tmp/klora-server.pid of start_server.sh)")
    a = ap.parse_args()
    if a.mem_child:
        mem_child(a)
    elif a.memory and a.url:
        bench_server_memory(a)
    elif a.memory:
        bench_memory(a)
    elif a.micro:
        bench_micro(a)
    elif a.url:
        bench_server(a)
    else:
        ap.error("give --url (a running Forge) or --micro")


if __name__ == "__main__":
    main()
