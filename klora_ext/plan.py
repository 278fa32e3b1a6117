"""Schedules and plans: which LoRA each switchable layer uses at each step of a sampling pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
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


def reference_scale(steps: int, n_layers: int, alpha: float, beta: float, schedule: str) -> np.ndarray:
    """The reference code's per-call clock: a counter bumped before every K-LoRA layer call,
    scale = alpha * (counter mod N) / N + beta with N = steps * layers; shape (steps, layers), same float ops."""
    total = steps * n_layers
    counter = np.arange(1, total + 1, dtype=np.int64).reshape(steps, n_layers) % total
    value = alpha * counter.astype(np.float64) / total + beta
    return np.mod(value, alpha) if schedule == "s*" else value


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
    ) -> Plan:
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            msg = f"[K-LoRA] steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}"
            raise KLoraError(msg)
        layers = scores.in_scope(args.scope)
        if not layers:
            msg = f"[K-LoRA] the two LoRAs share no layer in scope '{args.scope}'" + (
                " (try scope 'all')" if args.scope == "attention" else ""
            )
            raise KLoraError(msg)
        g = gamma(layers, args.gamma_mode, args.gamma)
        n = len(layers)
        sc = np.array([s.score_content for s in layers], dtype=np.float64)
        ss = np.array([s.score_style for s in layers], dtype=np.float64)
        if args.method == "fixed":
            # Scores ignored: the K-LoRA rule with the score ratio fixed at 1 (content while S(p) <= 1).
            sc, ss, g = np.ones(n), np.ones(n), 1.0
        if args.method in ("k-lora", "fixed"):
            if args.clock == "reference":
                s = reference_scale(steps, n, args.alpha, args.beta, args.schedule)
                with np.errstate(divide="ignore", invalid="ignore"):
                    # Same operations as the reference: (S_c / gamma) / (S_s * scale) > 1, ties go to style.
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
        )

    def held(self, steps: int, row: int = -1) -> Plan:
        """A plan that keeps one row of this plan for a whole pass ("keep final choices" for hires)."""
        roles = np.repeat(self.roles[row : row + 1 if row != -1 else None], steps, axis=0)
        return Plan(**{**self._fields(), "roles": roles})

    def _fields(self) -> dict[str, Any]:
        names = ("layer_ids", "gamma", "alpha", "beta", "method", "schedule", "clock", "scope", "scores")
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
        layers = []
        for i, layer_id in enumerate(self.layer_ids):
            s = by_id.get(layer_id)
            layers.append(
                {
                    "id": layer_id,
                    "score_content": s.score_content if s else None,
                    "score_style": s.score_style if s else None,
                    "flip_step": flips[i] if flips is not None else None,
                }
            )
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
