"""Host-free per-generation state: which deltas each layer gets, and the per-step change lists hosts apply.

A host adapter asks ``Session`` for the static roles (layers K-LoRA does not switch) once, calls
``PassController.begin_pass`` when a sampling pass starts and ``advance(step)`` from its denoiser callback; it applies
exactly the (layer_id, role) pairs it gets back and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from klora_ext import keys
from klora_ext.args import KLoraArgs
from klora_ext.plan import BOTH, CONTENT, NONE, STYLE, Plan, switched_ids
from klora_ext.scoring import PairScores

Change = tuple[str, int]


def static_role(layer_id: str, in_content: bool, in_style: bool, args: KLoraArgs) -> int:
    """Role of a layer the plan does not switch (patched by one LoRA only, a text-encoder layer, or out of scope)."""
    own = BOTH if in_content and in_style else CONTENT if in_content else STYLE
    if args.method == "content-only":
        return CONTENT if in_content else NONE
    if args.method == "style-only":
        return STYLE if in_style else NONE
    if args.method == "merge":
        return own
    if keys.is_text_encoder(layer_id):  # CLIP and T5 alike
        policy = args.te_policy
        if policy == "both":
            return own
        if policy == "content":
            return CONTENT if in_content else NONE
        if policy == "style":
            return STYLE if in_style else NONE
        return NONE
    if args.scope == "attention" and not keys.is_attention(layer_id):
        return NONE  # the reference code loads only the attention projections of either file
    if in_content and in_style:
        return NONE  # shared but not switchable: only reachable for non-UNet components; apply neither
    return own


@dataclass
class Session:
    """Everything about one generation that does not depend on the host."""

    args: KLoraArgs
    scores: PairScores
    seed: int = 0
    plans: dict[tuple, Plan] = field(default_factory=dict)
    first_plan: Plan | None = None

    def static_roles(self, content_layers: Iterable[str], style_layers: Iterable[str]) -> dict[str, int]:
        content_set, style_set = set(content_layers), set(style_layers)
        switched = set(self.plan_layer_ids())
        return {
            layer_id: static_role(layer_id, layer_id in content_set, layer_id in style_set, self.args)
            for layer_id in sorted(content_set | style_set, key=keys.forward_order_key)
            if layer_id not in switched
        }

    def plan_layer_ids(self) -> tuple[str, ...]:
        return switched_ids(self.scores, self.args)

    def plan_for_pass(
        self, steps: int, *, kind: str = "first", denoise: float | None = None, counter_start: int = 0
    ) -> Plan:
        """kind: "first" (txt2img), "img2img" (first pass from an init image) or "hires" (a later pass).
        counter_start: the authors' call counter before this pass (used by the ``reference-literal`` clock only)."""
        policy = self.args.hires if kind in ("hires", "img2img") else "restart"
        if policy == "keep" and kind == "hires" and self.first_plan is not None:
            key = ("keep", steps)
            if key not in self.plans:
                self.plans[key] = self.first_plan.held(steps)
            return self.plans[key]
        window = (0.0, 1.0)
        if policy == "continue" and denoise is not None and 0.0 < denoise < 1.0:
            window = (1.0 - denoise, denoise)  # the pass starts that far into the noise schedule
        key: tuple = ("build", steps, window)
        if self.args.clock == "reference-literal":
            key += (counter_start,)  # their counter runs on from pass to pass: each pass has its own plan
        if key not in self.plans:
            self.plans[key] = Plan.build(
                self.scores, self.args, steps, seed=self.seed, window=window, counter_start=counter_start
            )
        plan = self.plans[key]
        if kind != "hires" and self.first_plan is None:
            self.first_plan = plan
        return plan


class PassController:
    """Tracks the roles currently applied and turns "we are at step t" into the changes to make now."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.plan: Plan | None = None
        self.applied: np.ndarray | None = None
        self.last_step: int | None = None
        self.passes = 0
        self.calls = 0  # K-LoRA layer calls so far in this run, as the authors' never-reset counter sees them

    def begin_pass(self, steps: int, *, kind: str = "first", denoise: float | None = None) -> list[Change]:
        """Start a pass; returns the changes that bring the plan's layers to their step-0 roles (relative to what
        this controller applied before; all plan layers on the first pass)."""
        self.plan = self.session.plan_for_pass(steps, kind=kind, denoise=denoise, counter_start=self.calls)
        self.calls += self.plan.steps * len(self.plan.layer_ids)
        self.passes += 1
        self.last_step = None
        return self.advance(0)

    def advance(self, step: int) -> list[Change]:
        """Changes needed to be at ``step``; [] when nothing changes (repeat calls in one step are free)."""
        plan = self.plan
        if plan is None:
            return []
        step = min(max(int(step), 0), plan.steps - 1)  # overshooting samplers stay on the last row
        if step == self.last_step:
            return []
        row = plan.row(step)
        if self.applied is None:
            indices = np.arange(len(row))
        elif self.last_step is not None and step == self.last_step + 1:
            # the common case: precomputed list, touches only the layers flipping now
            indices = plan.changes(step)
        else:
            indices = np.flatnonzero(row != self.applied)
        self.last_step = step
        if self.applied is None:
            self.applied = row.copy()
        else:
            self.applied[indices] = row[indices]
        ids = plan.layer_ids
        return [(ids[i], int(row[i])) for i in indices]

    def applied_roles(self) -> dict[str, int]:
        if self.plan is None or self.applied is None:
            return {}
        return dict(zip(self.plan.layer_ids, (int(r) for r in self.applied)))


__all__ = ["BOTH", "CONTENT", "NONE", "STYLE", "Change", "PassController", "Session", "static_role"]
