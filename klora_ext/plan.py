"""Schedules and plans: which LoRA each switchable layer uses at each step of a sampling pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klora_ext import reference as ref_mod
from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.reference import REFERENCE_CLOCKS, ReferenceScores
from klora_ext.scoring import LayerScore, PairScores, gamma

STYLE, CONTENT, BOTH, NONE = 0, 1, 2, 3
ROLE_NAMES = {STYLE: "style", CONTENT: "content", BOTH: "both", NONE: "none"}
RANDOM_P_CONTENT = 1.0 / 3.0  # paper Sec. 4.3 "random selection" ablation

MAX_STEPS = 10_000


def scale(progress: np.ndarray, alpha: float, beta: float, schedule: str) -> np.ndarray:
    """S(p) = alpha*p + beta (paper Eq. 7); ``s*`` wraps it modulo alpha (supplement Sec. D, reference code)."""
    value = alpha * np.asarray(progress, dtype=np.float64) + beta
    if schedule == "s*":
        return np.mod(value, alpha)
    if schedule != "linear":
        msg = f"[K-LoRA] unknown schedule {schedule!r}"
        raise KLoraError(msg)
    return value


def reference_scale(
    steps: int, n_layers: int, alpha: float, beta: float, schedule: str, n_total: int | None = None, start: int = 0
) -> np.ndarray:
    """The reference code's per-call clock: a counter bumped before every K-LoRA layer call,
    scale = alpha * (counter mod N) / N + beta with N = steps * layers unless given; shape (steps, layers)."""
    total = n_total or steps * n_layers
    return np.asarray(ref_mod.counter_scales(steps, n_layers, alpha, beta, schedule, total, start), dtype=np.float64)


def switched_ids(scores: PairScores, args: KLoraArgs) -> tuple[str, ...]:
    """The layers a plan switches: the authors' set (their call order) for a reference clock when the scores carry
    the reference numbers, else the shared layers in ``args.scope``."""
    if args.clock in REFERENCE_CLOCKS and scores.reference is not None:
        return scores.reference.layer_ids
    return tuple(s.id for s in scores.in_scope(args.scope))


def step_progress(steps: int, window: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """p for each step of a pass: start + span * t / T (t = 0 .. T-1). A continued pass (hires, img2img) starts
    where its denoising strength puts it on the full schedule."""
    start, span = window
    return start + span * np.arange(steps, dtype=np.float64) / steps


@dataclass(frozen=True, eq=False)
class Plan:
    layer_ids: tuple[str, ...]
    roles: np.ndarray  # (T, L) int8 of STYLE/CONTENT/BOTH/NONE
    gamma: float = 1.0
    alpha: float = 1.5
    beta: float = 0.5
    method: str = "k-lora"
    schedule: str = "linear"
    clock: str = "step"
    scope: str = "all"
    scores: tuple[LayerScore, ...] = ()
    # Reference clocks: the counter's period N and its value before the first call of this pass; whether the
    # authors' own numbers (raw scores, their gamma) were used; notes on where their code would differ or stop.
    counter_n: int = 0
    counter_start: int = 0
    exact: bool = False
    reference: ReferenceScores | None = None
    notes: tuple[str, ...] = ()
    _changes: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        roles = np.asarray(self.roles, dtype=np.int8)
        if roles.ndim != 2 or roles.shape[1] != len(self.layer_ids) or roles.shape[0] < 1:
            msg = f"[K-LoRA] plan roles must be steps x {len(self.layer_ids)} layers, got shape {roles.shape}"
            raise KLoraError(msg)
        roles.setflags(write=False)
        object.__setattr__(self, "roles", roles)
        # Change lists are what hosts consume per step: computed once here, O(1) lookups later.
        changes = [np.arange(roles.shape[1])]
        changes += [np.flatnonzero(roles[t] != roles[t - 1]) for t in range(1, roles.shape[0])]
        object.__setattr__(self, "_changes", changes)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        scores: PairScores,
        args: KLoraArgs,
        steps: int,
        *,
        seed: int = 0,
        window: tuple[float, float] = (0.0, 1.0),
        counter_start: int = 0,
    ) -> Plan:
        """``counter_start``: for the ``reference-literal`` clock, the authors' call counter before this pass (their
        counter is never reset: image i of a run starts at i x steps x layers)."""
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            msg = f"[K-LoRA] steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}"
            raise KLoraError(msg)
        reference_clock = args.clock in REFERENCE_CLOCKS
        ref = scores.reference if reference_clock else None
        notes: list[str] = []
        if ref is not None:
            by_id = scores.by_id()
            layers = tuple(by_id[i] for i in ref.layer_ids)
            notes += ref.notes
            if args.scope != "attention":
                notes.append("the reference clocks switch the authors' layers; scope is not used")
            if args.k_multiplier != 1.0:
                notes.append("the reference clocks use the authors' K = r_c * r_s; the K multiplier is not used")
        else:
            layers = scores.in_scope(args.scope)
            if reference_clock:
                notes.append(
                    "approximate: the authors' clock on this project's scores and gamma (the scores carry no "
                    "reference numbers; compute them with compute_scores(..., reference=True))"
                )
        if not layers:
            msg = f"[K-LoRA] the two LoRAs share no layer in scope '{args.scope}'" + (
                " (try scope 'all')" if args.scope == "attention" else ""
            )
            raise KLoraError(msg)
        n = len(layers)
        counter_n, start = 0, 0
        if reference_clock:
            if args.clock == "reference-literal":
                arch = ref.arch if ref is not None else ("flux" if layers[0].id.startswith("flux:") else "sd")
                counter_n, start = ref_mod.literal_n(arch), int(counter_start)
            else:
                counter_n = steps * n
        exact = False
        if args.method == "k-lora" and ref is not None:
            g = gamma(layers, args.gamma_mode, args.gamma, reference=ref)
            s = ref_mod.counter_scales(steps, n, args.alpha, args.beta, args.schedule, counter_n, start)
            content = ref_mod.decide(ref.top_content, ref.top_style, ref.dtype_content, ref.dtype_style, g, s)
            roles = np.where(content, CONTENT, STYLE)
            exact = True
        else:
            g = gamma(layers, args.gamma_mode, args.gamma)
            sc = np.array([s.score_content for s in layers], dtype=np.float64)
            ss = np.array([s.score_style for s in layers], dtype=np.float64)
            if args.method == "fixed":
                # Scores ignored: the K-LoRA rule with the score ratio fixed at 1 (content while S(p) <= 1).
                sc, ss, g = np.ones(n), np.ones(n), 1.0
            if args.method in ("k-lora", "fixed"):
                if reference_clock:
                    s = reference_scale(steps, n, args.alpha, args.beta, args.schedule, counter_n, start)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        # The reference's operations: (S_c / gamma) / (S_s * scale) > 1, ties go to style.
                        content = ((sc / g)[None, :] / (ss[None, :] * s)) > 1
                else:
                    s = scale(step_progress(steps, window), args.alpha, args.beta, args.schedule)
                    content = sc[None, :] >= g * s[:, None] * ss[None, :]
                roles = np.where(content, CONTENT, STYLE)
            elif args.method == "random":
                rng = np.random.default_rng(seed)
                roles = np.where(rng.random((steps, n)) < RANDOM_P_CONTENT, CONTENT, STYLE)
            else:
                fill = {"content-only": CONTENT, "style-only": STYLE, "merge": BOTH}[args.method]
                roles = np.full((steps, n), fill)
        return cls(
            layer_ids=tuple(s.id for s in layers),
            roles=roles,
            gamma=g,
            alpha=args.alpha,
            beta=args.beta,
            method=args.method,
            schedule=args.schedule,
            clock=args.clock,
            scope=args.scope,
            scores=tuple(layers),
            counter_n=counter_n,
            counter_start=start,
            exact=exact,
            reference=ref,
            notes=tuple(notes),
        )

    def held(self, steps: int, row: int = -1) -> Plan:
        """A plan that keeps one row of this plan for a whole pass ("keep final choices" for hires)."""
        roles = np.repeat(self.roles[row : row + 1 if row != -1 else None], steps, axis=0)
        return Plan(**{**self._fields(), "roles": roles})

    def _fields(self) -> dict[str, Any]:
        names = ("layer_ids", "gamma", "alpha", "beta", "method", "schedule", "clock", "scope", "scores")
        names += ("counter_n", "counter_start", "exact", "reference", "notes")
        return {name: getattr(self, name) for name in names}

    # ---- queries ------------------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return int(self.roles.shape[0])

    def _row(self, step: int) -> int:
        return min(max(int(step), 0), self.steps - 1)  # samplers may overshoot by one step (e.g. DPM2 variants)

    def role(self, step: int, layer: int) -> int:
        return int(self.roles[self._row(step), layer])

    def row(self, step: int) -> np.ndarray:
        return self.roles[self._row(step)]

    def changes(self, step: int) -> np.ndarray:
        """Layer indices whose role at ``step`` differs from ``step - 1`` (step 0: every layer)."""
        return self._changes[self._row(step)]

    @property
    def is_monotone(self) -> bool:
        """Each layer switches at most once, content -> style (true for the linear schedule, step clock)."""
        r = self.roles
        only_cs = bool(np.isin(r, (CONTENT, STYLE)).all())
        return only_cs and bool((np.diff(r.astype(np.int16), axis=0) <= 0).all())

    @property
    def flip_steps(self) -> list[int | None] | None:
        """First step at which each layer uses style (None: never); None for non-monotone plans."""
        if not self.is_monotone:
            return None
        is_style = self.roles == STYLE
        first = is_style.argmax(axis=0)
        return [int(f) if is_style[:, i].any() else None for i, f in enumerate(first)]

    def flips_per_step(self) -> dict[int, int]:
        """step -> number of layers changing role at that step (step 0 excluded)."""
        return {t: len(c) for t, c in enumerate(self._changes) if t > 0 and len(c)}

    def content_fraction(self) -> np.ndarray:
        return (self.roles == CONTENT).mean(axis=1)

    def to_json(self) -> dict[str, Any]:
        """KLORA_SPEC Sec. 6 format (plus method/schedule/clock/scope)."""
        flips = self.flip_steps
        by_id = {s.id: s for s in self.scores}
        ref = self.reference
        raw = {i: (c, s) for i, c, s in zip(ref.layer_ids, ref.top_content, ref.top_style)} if ref else {}
        layers = []
        for i, layer_id in enumerate(self.layer_ids):
            s = by_id.get(layer_id)
            entry = {
                "id": layer_id,
                "score_content": s.score_content if s else None,
                "score_style": s.score_style if s else None,
                "flip_step": flips[i] if flips is not None else None,
            }
            if layer_id in raw:
                entry["raw_content"], entry["raw_style"] = raw[layer_id]
            layers.append(entry)
        extra: dict[str, Any] = {}
        if self.clock in REFERENCE_CLOCKS:
            extra["reference"] = {
                "exact": self.exact,
                "counter_n": self.counter_n,
                "counter_start": self.counter_start,
                "notes": list(self.notes),
            }
        return {
            "version": 1,
            "steps": self.steps,
            "gamma": self.gamma,
            "alpha": self.alpha,
            "beta": self.beta,
            "method": self.method,
            "schedule": self.schedule,
            "clock": self.clock,
            "scope": self.scope,
            "monotone": self.is_monotone,
            "layers": layers,
            "map": self.roles.tolist(),
            **extra,
        }


def reconstruct(plan_steps: int, initial: Sequence[int], changes: Sequence[Sequence[tuple[int, int]]]) -> np.ndarray:
    """Rebuild a T x L map from a first row and per-step (layer, role) change lists (used by tests and hosts' logs)."""
    current = np.array(initial, dtype=np.int8)
    out = np.empty((plan_steps, len(current)), dtype=np.int8)
    for t in range(plan_steps):
        for layer, role in changes[t]:
            current[layer] = role
        out[t] = current
    return out
