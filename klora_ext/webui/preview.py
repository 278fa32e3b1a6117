"""The plan preview inside the accordion: the selection map, the content-share curve and a short summary (gamma,
shared layers, when the layers flip) for the current controls, before any generation. No gradio, no modules.*.

Scores come from the same cache as a generation (``run.prepare_run``): a new pair is scored once (with progress
reported), every later change of alpha, beta, schedule, method, scope or steps only rebuilds the plan and redraws.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from klora_ext import keys
from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.log import logger

# The controls the preview depends on (ui.py wires their change events), in this order, then the steps.
INPUTS = (
    "content",
    "style",
    "alpha",
    "beta",
    "gamma_mode",
    "gamma",
    "schedule",
    "clock",
    "scope",
    "k_multiplier",
    "method",
)
PICK_BOTH = "Pick a content LoRA and a style LoRA to preview which one each layer uses at each step."
DEFAULT_STEPS = 20

_score_lock = threading.Lock()  # one pair scored at a time by the preview; a generation never waits for it


@dataclass
class Preview:
    image: Any  # PIL image, or None
    text: str  # markdown summary, or the [K-LoRA] message saying what to change
    plan: Any = None


def summary(plan: Any, n_shared: int, steps_note: str = "") -> str:
    """One or two lines: gamma, shared / switched layers and when they flip."""
    n = len(plan.layer_ids)
    parts = [f"γ = {plan.gamma:.4g}", f"{n_shared} shared layers" + (f", {n} switched" if n != n_shared else "")]
    flips = plan.flip_steps
    if flips is not None:
        flipping = sorted(f for f in flips if f is not None and f > 0)
        at_start = sum(1 for f in flips if f == 0)
        never = sum(1 for f in flips if f is None)
        if flipping:
            half = flipping[(len(flipping) - 1) // 2]
            when = f"{len(flipping)} layers flip content → style between steps {flipping[0]} and {flipping[-1]}"
            parts.append(f"{when} (half of them by step {half})")
        else:
            parts.append("no layer flips")
        if at_start:
            parts.append(f"{at_start} use style from the first step")
        if never:
            parts.append(f"{never} keep content to the end")
    else:
        changes = plan.flips_per_step()
        parts.append(f"not monotone: {sum(changes.values())} role changes over {len(changes)} steps")
    return " · ".join(parts) + (f"  \n{steps_note}" if steps_note else "")


def build(
    values: Mapping[str, Any],
    steps: Any,
    *,
    adapter: Any,
    progress: Callable[[int, int, str], None] | None = None,
    title_names: tuple[str, str] | None = None,
    p: Any = None,
) -> Preview:
    """The preview for the controls' ``values`` (field name -> raw UI value) and the host's steps slider. ``p``
    stands in for a generation's processing object (no generation yet): adapters read the loaded model from
    ``p.sd_model`` (Forge maps the LoRA files onto that model's layers)."""
    from klora_ext.selection_map import render_map
    from klora_ext.webui import run as klrun

    if adapter is None:
        return Preview(None, "[K-LoRA] is off on this WebUI (see the console)")
    if not values.get("content") or not values.get("style"):
        return Preview(None, PICK_BOTH)
    note = ""
    try:
        n_steps = int(float(steps))
    except (TypeError, ValueError, OverflowError):
        n_steps, note = DEFAULT_STEPS, f"(shown for {DEFAULT_STEPS} steps: the steps slider was not found)"
    n_steps = min(max(n_steps, 1), 1000)
    try:
        args = KLoraArgs(**{k: v for k, v in values.items() if k in INPUTS}, enabled=True)
        with _score_lock:
            run = klrun.prepare_run(args, adapter, p, steps=n_steps, seed=0, progress=progress)
        plan = run.session.first_plan
        if plan is None:
            return Preview(None, "[K-LoRA] no plan could be built for these settings")
        n_shared = len(run.session.scores.layers)
        text = summary(plan, n_shared, note)
        content, style = title_names or (run.content.alias, run.style.alias)
        image = render_map(
            plan.roles,
            list(plan.layer_ids),
            groups=[keys.layer_group(i) for i in plan.layer_ids],
            title=f"{content} (content) + {style} (style), {n_steps} steps",
            info_lines=[
                f"{plan.method}  {plan.schedule}  alpha {plan.alpha:g}  beta {plan.beta:g}  gamma {plan.gamma:.4g}"
                f"  clock {plan.clock}  scope {plan.scope}"
            ],
        )
        return Preview(image, text, plan)
    except KLoraError as exc:
        return Preview(None, str(exc))
    except Exception as exc:  # noqa: BLE001 - the preview must never break the tab; say what happened
        logger.error("the plan preview failed (%s)", exc)
        return Preview(None, f"[K-LoRA] the plan preview failed: {exc}")
