"""Command line: see a K-LoRA plan without any WebUI.

python -m klora_ext plan CONTENT.safetensors STYLE.safetensors --steps 30 --out map.png --json plan.json
python -m klora_ext demo
python -m klora_ext inspect LORA.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from klora_ext import __version__, keys
from klora_ext.args import CLOCKS, METHODS, SCHEDULES, SCOPES, KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.lora_file import LoraFile, read_lora
from klora_ext.plan import Plan
from klora_ext.reference import REFERENCE_CLOCKS
from klora_ext.scoring import compute_scores


class ProgressBar:
    """A one-line progress bar on stderr (only when it is a terminal, or always with force=True)."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self.enabled = stream.isatty()
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, _layer: str) -> None:
        if not self.enabled or total <= 0:
            return
        filled = int(self.width * done / total)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} layers")
        if done >= total:
            self.stream.write(f" ({time.perf_counter() - self.started:.1f} s)\n")
        self.stream.flush()


def _gamma_option(text: str) -> tuple[str, float]:
    if text in ("auto-mean", "auto-sum"):
        return text, 1.0
    try:
        value = float(text)
    except ValueError:
        msg = f"--gamma takes auto-mean, auto-sum or a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return "manual", value


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--gamma", type=_gamma_option, default=("auto-mean", 1.0), help="auto-mean | auto-sum | N")
    parser.add_argument("--schedule", choices=SCHEDULES, default="linear")
    parser.add_argument("--clock", choices=CLOCKS, default="step")
    parser.add_argument("--scope", choices=SCOPES, default="all")
    parser.add_argument("--method", choices=METHODS, default="k-lora")
    parser.add_argument("--k-mult", type=float, default=1.0, help="multiplier on K = rank_c * rank_s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' method")
    parser.add_argument("--device", default="cpu", help="where scores are computed: cpu, cuda, cuda:1 ...")
    parser.add_argument("--out", type=Path, help="write the selection map PNG here")
    parser.add_argument("--json", type=Path, help="write scores, gamma, flip steps and the map as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m klora_ext", description="K-LoRA plans without a WebUI")
    parser.add_argument("--version", action="version", version=f"sd-webui-k-lora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="score a content/style pair and show which LoRA each layer uses per step")
    plan.add_argument("content", type=Path)
    plan.add_argument("style", type=Path)
    _add_plan_options(plan)
    demo = sub.add_parser("demo", help="make two small synthetic LoRAs and run `plan` on them")
    demo.add_argument("--dir", type=Path, help="where to write the demo files (default: a temporary folder)")
    _add_plan_options(demo)
    inspect = sub.add_parser("inspect", help="list what a LoRA file contains, as K-LoRA reads it")
    inspect.add_argument("file", type=Path)
    return parser


def args_from_cli(ns: argparse.Namespace, content: str, style: str) -> KLoraArgs:
    gamma_mode, gamma_value = ns.gamma
    return KLoraArgs(
        enabled=True,
        content=content,
        style=style,
        alpha=ns.alpha,
        beta=ns.beta,
        gamma_mode=gamma_mode,
        gamma=gamma_value,
        schedule=ns.schedule,
        clock=ns.clock,
        scope=ns.scope,
        k_multiplier=ns.k_mult,
        method=ns.method,
    )


def summarize(content: LoraFile, style: LoraFile, plan: Plan, n_shared: int, out: TextIO) -> None:
    c_only = len(set(content.layers) - set(style.layers))
    s_only = len(set(style.layers) - set(content.layers))
    print(f"content: {content.name} ({content.arch}, {len(content.layers)} layers)", file=out)
    print(f"style:   {style.name} ({style.arch}, {len(style.layers)} layers)", file=out)
    for lora in (content, style):
        if lora.unknown_keys:
            print(f"  note: {lora.name}: {lora.describe_unknown()}", file=out)
        for line in reader_notes(lora):
            print(f"  note: {lora.name}: {line}", file=out)
    print(
        f"shared layers: {n_shared} ({len(plan.layer_ids)} switched in scope '{plan.scope}'); "
        f"content-only: {c_only}; style-only: {s_only}",
        file=out,
    )
    print(
        f"method {plan.method}, schedule {plan.schedule}, clock {plan.clock}, alpha {plan.alpha:g}, "
        f"beta {plan.beta:g}, gamma {plan.gamma:.6g}, steps {plan.steps}",
        file=out,
    )
    if plan.clock in REFERENCE_CLOCKS:
        if plan.exact and plan.reference is not None and not plan.reference.notes:
            what = "the authors' selection, call for call"
        elif plan.exact:
            what = "the authors' rule and numbers, on files their code would not read as is (see notes)"
        else:
            what = "approximate (not the authors' numbers)"
        print(
            f"reference mode: {what}; counter period N = {plan.counter_n} calls, "
            f"{len(plan.layer_ids)} layer calls per step, counter starts at {plan.counter_start}",
            file=out,
        )
        for note in plan.notes:
            print(f"  note: {note}", file=out)
    frac = plan.content_fraction()
    print(f"content share: step 0 {frac[0]:.0%}, last step {frac[-1]:.0%}", file=out)
    flips = plan.flip_steps
    if flips is not None:
        never = sum(1 for f in flips if f is None)
        at_start = sum(1 for f in flips if f == 0)
        by_step = Counter(f for f in flips if f)
        print(f"style from the first step: {at_start} layers; content to the end: {never} layers", file=out)
        if by_step:
            pairs = [f"{step}:{by_step[step]}" for step in sorted(by_step)]
            print("layers switching content -> style, by step (step:count):", file=out)
            for start in range(0, len(pairs), 12):
                print("  " + "  ".join(pairs[start : start + 12]), file=out)
    else:
        changes = plan.flips_per_step()
        total = sum(changes.values())
        print(f"not monotone: {total} role changes over {len(changes)} steps", file=out)


def render(plan: Plan, title: str, path: Path) -> None:
    from klora_ext.selection_map import save_map_png

    info = [
        f"{plan.method}  {plan.schedule}  clock={plan.clock}  scope={plan.scope}",
        f"alpha={plan.alpha:g} beta={plan.beta:g} gamma={plan.gamma:.4g} "
        f"steps={plan.steps} layers={len(plan.layer_ids)}",
    ]
    save_map_png(
        path,
        plan.roles,
        list(plan.layer_ids),
        groups=[keys.layer_group(i) for i in plan.layer_ids],
        title=title,
        info_lines=info,
    )


def run_plan(ns: argparse.Namespace, content_path: Path, style_path: Path, out: TextIO) -> Plan:
    content = read_lora(content_path)
    style = read_lora(style_path)
    args = args_from_cli(ns, content.name, style.name)
    scores = compute_scores(
        content,
        style,
        k_multiplier=args.k_multiplier,
        device=ns.device,
        progress=ProgressBar("scoring"),
        reference=args.clock in REFERENCE_CLOCKS,
    )
    plan = Plan.build(scores, args, ns.steps, seed=ns.seed)
    summarize(content, style, plan, len(scores.layers), out)
    if ns.out:
        render(plan, f"K-LoRA: {content.name} (content) + {style.name} (style)", ns.out)
        print(f"selection map: {ns.out}", file=out)
    if ns.json:
        data = plan.to_json()
        data["content"] = {"name": content.name, "sha256": content.sha256}
        data["style"] = {"name": style.name, "sha256": style.sha256}
        ns.json.write_text(plan_json_text(data), encoding="utf-8")
        print(f"plan JSON: {ns.json}", file=out)
    return plan


def plan_json_text(data: dict) -> str:
    """JSON with one layer and one map row per line: diffable and still readable for 1000+ layers."""
    parts = []
    for key, value in data.items():
        if key in ("layers", "map") and value:
            rows = ",\n    ".join(json.dumps(row, separators=(",", ":")) for row in value)
            parts.append(f'  "{key}": [\n    {rows}\n  ]')
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def run_demo(ns: argparse.Namespace, out: TextIO) -> Plan:
    from klora_ext import synthetic

    folder = ns.dir or Path(tempfile.mkdtemp(prefix="klora-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    content_path, style_path = synthetic.write_demo_pair(folder)
    print(f"demo LoRAs (synthetic SD1.5-shaped): {content_path}, {style_path}", file=out)
    if ns.out is None:
        ns.out = folder / "selection_map.png"
    if ns.json is None:
        ns.json = folder / "plan.json"
    return run_plan(ns, content_path, style_path, out)


def reader_notes(lora: LoraFile) -> list[str]:
    """What the host-free reader could not do exactly for this file (DoRA without a base weight, static layers)."""
    notes = []
    dora = lora.dora_layers
    if dora:
        notes.append(
            f"{len(dora)} DoRA layers scored with the plain LoRA delta dW (no base weight here; the hosts apply "
            "(W+dW)*m/||W+dW|| - W)"
        )
    if lora.static_layers:
        kinds = Counter(layer.kind for layer in lora.static_layers.values())
        what = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        notes.append(f"{len(lora.static_layers)} static layers ({what}) applied as they are, never switched")
    return notes


def run_inspect(path: Path, out: TextIO) -> None:
    lora = read_lora(path)
    kinds = Counter(f"{layer.kind}+dora" if layer.is_dora else layer.kind for layer in lora.layers.values())
    ranks = Counter(layer.rank for layer in lora.layers.values())
    groups = Counter(keys.layer_group(i) for i in lora.layers)
    print(f"{lora.name}: arch {lora.arch}, {len(lora.layers)} layers, sha256 {lora.sha256[:12]}", file=out)
    print(f"  kinds: {dict(kinds)}; ranks: {dict(sorted(ranks.items()))}", file=out)
    print(f"  groups: {', '.join(f'{g} {n}' for g, n in groups.items())}", file=out)
    attn = sum(1 for i in lora.layers if keys.is_attention(i))
    print(f"  attention projections: {attn}", file=out)
    for line in reader_notes(lora):
        print(f"  {line}", file=out)
    for host, support in lora.host_support.items():
        if support.refused:
            state = f"applies nothing ({support.note})"
        elif support.ignored:
            state = f"applies {len(support.applied)} layers; {support.note}"
        else:
            state = f"applies all {len(support.applied)} layers"
        print(f"  {host}: {state}", file=out)
    if lora.unknown_keys:
        print(f"  {lora.describe_unknown()}", file=out)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "plan":
            run_plan(ns, ns.content, ns.style, out)
        elif ns.command == "demo":
            run_demo(ns, out)
        else:
            run_inspect(ns.file, out)
    except KLoraError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
