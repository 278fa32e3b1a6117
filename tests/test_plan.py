from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.plan import BOTH, CONTENT, STYLE, Plan, reconstruct
from klora_ext.scoring import LayerScore, PairScores, gamma

ATTN = [
    "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_k",
    "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
]
FF = "unet:input_blocks.1.1.transformer_blocks.0.ff.net.2"


def pair(sc, ss, ac=None, as_=None, ids=None) -> PairScores:
    ids = ids or [f"unet:output_blocks.{i}.1.transformer_blocks.0.attn2.to_q" for i in range(len(sc))]
    ac = ac if ac is not None else [1.0] * len(sc)
    as_ = as_ if as_ is not None else [1.0] * len(sc)
    layers = tuple(LayerScore(i, a, b, c, d, 4, 4, 16) for i, a, b, c, d in zip(ids, sc, ss, ac, as_))
    return PairScores(layers=layers)


def manual(**kw) -> KLoraArgs:
    return KLoraArgs(gamma_mode="manual", gamma=1.0, **kw)


# ---- hand-worked cases -------------------------------------------------------------------------------------------


def test_step_clock_hand_worked_including_tie() -> None:
    # T=2: p = 0, 0.5 -> S = 0.5, 1.25 (alpha 1.5, beta 0.5). Layer 0: 0.875 >= 0.5 yes, >= 1.25 no.
    # Layer 1: S_c = 0.5 = 1 * 0.5 * 1 at step 0 -> tie -> content (paper's >=).
    plan = Plan.build(pair([0.875, 0.5], [1.0, 1.0]), manual(), 2)
    assert plan.roles.tolist() == [[CONTENT, CONTENT], [STYLE, STYLE]]
    assert plan.flip_steps == [1, 1]


def test_reference_clock_hand_worked_ties_and_counter_wrap() -> None:
    # L=2, T=2 -> N=4; counter per layer call: 1, 2 | 3, 4 % 4 = 0
    # scale = 1.5 * c / 4 + 0.5 -> 0.875, 1.25 | 1.625, 0.5
    # layer 0 (S_c .875, S_s 1): .875 / .875 = 1 -> not > 1 -> style (ties go to style); 1.625 -> style
    # layer 1 (S_c 1, S_s 1):    1 / 1.25 = .8 -> style;  last call wraps to scale 0.5: 2 > 1 -> content
    plan = Plan.build(pair([0.875, 1.0], [1.0, 1.0]), manual(clock="reference"), 2)
    assert plan.roles.tolist() == [[STYLE, STYLE], [STYLE, CONTENT]]
    assert not plan.is_monotone and plan.flip_steps is None


def test_reference_clock_divides_by_gamma_like_the_code() -> None:
    # gamma 2: S_c / 2 = 1 vs S_s * scale = 1 * 0.875 -> 1.14 > 1 -> content; then 1 / 1.25 -> style
    args = KLoraArgs(gamma_mode="manual", gamma=2.0, clock="reference")
    plan = Plan.build(pair([2.0, 2.0], [1.0, 1.0]), args, 2)
    assert plan.roles.tolist() == [[CONTENT, STYLE], [STYLE, CONTENT]]


def test_s_star_wraps_and_is_not_monotone() -> None:
    # alpha 1.5, beta 1.3: p=0 -> 1.3; p=.5 -> 2.05 mod 1.5 = .55. S_c = S_s = 1: style then content.
    plan = Plan.build(pair([1.0], [1.0]), manual(schedule="s*", beta=1.3), 2)
    assert plan.roles[:, 0].tolist() == [STYLE, CONTENT]
    assert plan.flip_steps is None
    assert plan.changes(1).tolist() == [0]


def test_fixed_ignores_scores() -> None:
    # S(p) = 1.5 t/4 + .5 -> .5, .875, 1.25, 1.625: content while S <= 1, whatever the scores
    plan = Plan.build(pair([100.0, 0.001], [0.001, 100.0]), KLoraArgs(method="fixed"), 4)
    assert plan.roles.tolist() == [[CONTENT, CONTENT]] * 2 + [[STYLE, STYLE]] * 2


def test_constant_methods() -> None:
    scores = pair([1.0, 2.0], [1.0, 1.0])
    assert (Plan.build(scores, KLoraArgs(method="content-only"), 3).roles == CONTENT).all()
    assert (Plan.build(scores, KLoraArgs(method="style-only"), 3).roles == STYLE).all()
    merge = Plan.build(scores, KLoraArgs(method="merge"), 3)
    assert (merge.roles == BOTH).all()
    assert merge.flips_per_step() == {}


def test_random_is_seeded_with_one_third_content() -> None:
    scores = pair([1.0] * 200, [1.0] * 200)
    a = Plan.build(scores, KLoraArgs(method="random"), 150, seed=7)
    b = Plan.build(scores, KLoraArgs(method="random"), 150, seed=7)
    c = Plan.build(scores, KLoraArgs(method="random"), 150, seed=8)
    assert np.array_equal(a.roles, b.roles) and not np.array_equal(a.roles, c.roles)
    # 30000 Bernoulli(1/3) draws: standard deviation of the mean is 0.0027
    assert abs((a.roles == CONTENT).mean() - 1 / 3) < 0.015


def test_attention_scope_filters_layers() -> None:
    scores = pair([1.0] * 5, [1.0] * 5, ids=[*ATTN, FF])
    assert Plan.build(scores, KLoraArgs(scope="attention"), 2).layer_ids == tuple(ATTN)
    assert Plan.build(scores, KLoraArgs(scope="all"), 2).layer_ids == (*ATTN, FF)
    with pytest.raises(KLoraError, match="share no layer in scope 'attention' \\(try scope 'all'\\)"):
        Plan.build(pair([1.0], [1.0], ids=[FF]), KLoraArgs(scope="attention"), 2)


@pytest.mark.parametrize("steps", [0, -1, 10_001, 2.5])
def test_bad_steps(steps: object) -> None:
    with pytest.raises(KLoraError, match="steps must be an integer from 1 to 10000"):
        Plan.build(pair([1.0], [1.0]), KLoraArgs(), steps)  # type: ignore[arg-type]


# ---- gamma --------------------------------------------------------------------------------------------------------


def test_gamma_modes_hand_worked() -> None:
    # per-layer ratios 1, 1, 1, 10: mean 3.25, outliers >= 9.75 dropped -> mean of (1, 1, 1) = 1
    layers = pair([1.0] * 4, [1.0] * 4, ac=[1.0, 2.0, 3.0, 40.0], as_=[1.0, 2.0, 3.0, 4.0]).layers
    assert gamma(layers, "auto-mean") == 1.0
    assert gamma(layers, "auto-sum") == pytest.approx(46.0 / 10.0)
    assert gamma(layers, "manual", 0.7) == 0.7


def test_gamma_skips_zero_layers_and_fails_when_nothing_is_left() -> None:
    layers = pair([1.0] * 2, [1.0] * 2, ac=[2.0, 5.0], as_=[1.0, 0.0]).layers
    assert gamma(layers, "auto-mean") == 2.0
    with pytest.raises(KLoraError, match="cannot compute gamma"):
        gamma(pair([1.0], [1.0], ac=[0.0], as_=[1.0]).layers, "auto-sum")
    with pytest.raises(KLoraError, match="manual gamma must be > 0"):
        gamma(layers, "manual", 0.0)


# ---- brute force vs plan ------------------------------------------------------------------------------------------


def brute_force(sc, ss, ac, as_, args: KLoraArgs, steps: int) -> list[list[int]]:
    """Direct loop over the paper's rule, written independently of klora_ext.plan."""
    if args.gamma_mode == "manual":
        g = args.gamma
    elif args.gamma_mode == "auto-sum":
        g = sum(ac) / sum(as_)
    else:
        ratios = [a / b for a, b in zip(ac, as_)]
        m = sum(ratios) / len(ratios)
        kept = [r for r in ratios if r < 3 * m]
        g = sum(kept) / len(kept)
    out = []
    for t in range(steps):
        p = t / steps
        s = args.alpha * p + args.beta
        if args.schedule == "s*":
            s = s % args.alpha
        out.append([CONTENT if sc[i] >= g * s * ss[i] else STYLE for i in range(len(sc))])
    return out


positive = st.floats(1e-3, 1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(positive, positive, positive, positive), min_size=1, max_size=12),
    alpha=st.floats(0.01, 5.0),
    beta=st.floats(-2.0, 3.0),
    steps=st.integers(1, 40),
    mode=st.sampled_from(["auto-mean", "auto-sum", "manual"]),
    schedule=st.sampled_from(["linear", "s*"]),
)
def test_plan_matches_brute_force(data, alpha, beta, steps, mode, schedule) -> None:
    sc, ss, ac, as_ = (list(x) for x in zip(*data))
    args = KLoraArgs(alpha=alpha, beta=beta, gamma_mode=mode, gamma=1.3, schedule=schedule)
    plan = Plan.build(pair(sc, ss, ac, as_), args, steps)
    expected = np.array(brute_force(sc, ss, ac, as_, args, steps))
    mismatch = plan.roles != expected
    if mismatch.any():
        # only float-rounding ties may differ: check each mismatch is within 1e-12 of the boundary
        g = plan.gamma
        for t, i in zip(*np.nonzero(mismatch)):
            p = t / steps
            sp = alpha * p + beta
            if schedule == "s*":
                sp = sp % alpha
            assert math.isclose(sc[i], g * sp * ss[i], rel_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(positive, positive), min_size=1, max_size=16),
    alpha=st.floats(0.0, 5.0),
    beta=st.floats(-2.0, 3.0),
    steps=st.integers(1, 60),
)
def test_linear_schedule_flips_at_most_once_content_to_style(data, alpha, beta, steps) -> None:
    sc, ss = (list(x) for x in zip(*data))
    plan = Plan.build(pair(sc, ss), KLoraArgs(alpha=alpha, beta=beta), steps)
    assert plan.is_monotone
    flips = plan.flip_steps
    for i in range(len(sc)):
        col = plan.roles[:, i].tolist()
        changes = sum(1 for a, b in itertools.pairwise(col) if a != b)
        assert changes <= 1
        if changes:
            assert col[0] == CONTENT and col[-1] == STYLE
        first_style = next((t for t, r in enumerate(col) if r == STYLE), None)
        assert flips[i] == first_style


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(positive, positive), min_size=1, max_size=16),
    steps=st.integers(1, 40),
    method=st.sampled_from(["k-lora", "random", "fixed"]),
    schedule=st.sampled_from(["linear", "s*"]),
    clock=st.sampled_from(["step", "reference"]),
)
def test_change_lists_reconstruct_the_map(data, steps, method, schedule, clock) -> None:
    sc, ss = (list(x) for x in zip(*data))
    plan = Plan.build(pair(sc, ss), KLoraArgs(method=method, schedule=schedule, clock=clock), steps, seed=3)
    changes = [[(int(i), plan.role(t, int(i))) for i in plan.changes(t)] for t in range(steps)]
    assert np.array_equal(reconstruct(steps, plan.row(0), changes), plan.roles)
    for t in range(1, steps):
        changed = set(plan.changes(t).tolist())
        for i in range(len(sc)):
            assert (plan.roles[t, i] != plan.roles[t - 1, i]) == (i in changed)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(positive, positive, positive, positive), min_size=1, max_size=12),
    exp_c=st.integers(-20, 20),
    exp_s=st.integers(-20, 20),
    mode=st.sampled_from(["auto-mean", "auto-sum"]),
    clock=st.sampled_from(["step", "reference"]),
    steps=st.integers(1, 30),
)
def test_plan_invariant_to_uniform_rescale(data, exp_c, exp_s, mode, clock, steps) -> None:
    # Scaling a LoRA by c scales its S and sum|dW| by |c|; gamma cancels it. Powers of two keep float math exact.
    sc, ss, ac, as_ = (list(x) for x in zip(*data))
    c, s = 2.0**exp_c, 2.0**exp_s
    args = KLoraArgs(gamma_mode=mode, clock=clock)
    base = Plan.build(pair(sc, ss, ac, as_), args, steps)
    scaled = Plan.build(
        pair([x * c for x in sc], [x * s for x in ss], [x * c for x in ac], [x * s for x in as_]), args, steps
    )
    assert np.array_equal(base.roles, scaled.roles)


def test_continue_window_starts_later() -> None:
    scores = pair([0.875], [1.0])
    full = Plan.build(scores, manual(), 10)
    cont = Plan.build(scores, manual(), 5, window=(0.5, 0.5))
    # p = .5 + .5 t / 5: S(p) = 1.25 .. >= .875 -> style from the start; full pass flips at p = .25 (t = 3)
    assert full.flip_steps == [3]
    assert cont.flip_steps == [0]


def test_json_follows_the_spec_format() -> None:
    plan = Plan.build(pair([0.875, 0.5], [1.0, 1.0]), manual(), 2)
    data = plan.to_json()
    assert data["version"] == 1 and data["steps"] == 2 and data["gamma"] == 1.0
    assert (data["alpha"], data["beta"]) == (1.5, 0.5)
    assert data["map"] == [[1, 1], [0, 0]]
    assert [layer["flip_step"] for layer in data["layers"]] == [1, 1]
    assert data["layers"][0]["score_content"] == 0.875


def test_held_plan_repeats_last_row() -> None:
    plan = Plan.build(pair([0.875, 10.0], [1.0, 1.0]), manual(), 4)
    held = plan.held(3)
    assert held.roles.tolist() == [plan.roles[-1].tolist()] * 3
    assert held.changes(1).size == 0


def test_reference_clock_without_reference_numbers_is_flagged_approximate() -> None:
    # Scores without the authors' numbers: their clock on our scores and our in-scope gamma, said in the notes.
    scores = pair(
        [3.0, 1.5, 7.0], [1.0, 1.0, 1.0], ac=[2.0, 1.0, 100.0], as_=[1.0, 1.0, 1.0], ids=[ATTN[0], ATTN[1], FF]
    )
    plan = Plan.build(scores, KLoraArgs(scope="attention", clock="reference", gamma_mode="auto-mean"), 2)
    assert plan.layer_ids == (ATTN[0], ATTN[1]) and plan.gamma == 1.5 and not plan.exact
    assert any("approximate" in n for n in plan.notes)
    # layer a: (3/1.5) / .875 = 2.29 > 1 C; 2 / 1.625 = 1.23 C.  layer b: 1 / 1.25 = .8 S; 1 / .5 = 2 C
    assert plan.roles.tolist() == [[CONTENT, STYLE], [CONTENT, CONTENT]]


def test_literal_clock_uses_the_scripts_constant_and_a_counter_start() -> None:
    # N = 28000 (SD script). Counter 9333: 1.5 * 9333 / 28000 + .5 = .99998 -> 1 / .99998 > 1 content;
    # 9334, 9335, 9336: scale > 1 -> style.
    plan = Plan.build(pair([1.0, 1.0], [1.0, 1.0]), manual(clock="reference-literal"), 2, counter_start=9332)
    assert plan.counter_n == 28000 and plan.counter_start == 9332
    assert plan.roles.tolist() == [[CONTENT, STYLE], [STYLE, STYLE]]


def _kohya_pair(content: dict[str, tuple[list, list]], style: dict[str, tuple[list, list]]):
    from klora_ext import synthetic
    from klora_ext.lora_file import parse_state_dict
    from klora_ext.scoring import compute_scores

    def sd(spec):
        out = {}
        for layer_id, (up, down) in spec.items():
            m = synthetic.module_key(layer_id, "kohya", "sd15")
            out[f"{m}.lora_up.weight"] = torch.tensor(up, dtype=torch.float32)
            out[f"{m}.lora_down.weight"] = torch.tensor(down, dtype=torch.float32)
        return out

    a = parse_state_dict(sd(content), name="c", arch="sd15")
    b = parse_state_dict(sd(style), name="s", arch="sd15")
    return compute_scores(a, b, reference=True)


def test_reference_gamma_counts_ff_pairs_like_the_authors_code() -> None:
    # sum|up @ down| per pair: content 4, 1, 40 (FF); style 4, 4, 4 -> ratios 1, .25, 10 in whatever key order:
    # mean 11.25 / 3 = 3.75, none >= 11.25 -> gamma 3.75. Over the attention layers only it would be 0.625.
    ones = ([[1.0], [1.0]], [[1.0, 1.0]])
    scores = _kohya_pair(
        {ATTN[0]: ones, ATTN[1]: ([[1.0], [0.0]], [[1.0, 0.0]]), FF: ([[10.0], [10.0]], [[1.0, 1.0]])},
        {ATTN[0]: ones, ATTN[1]: ones, FF: ones},
    )
    assert scores.reference.gamma == 3.75 and scores.reference.pairs == 3
    assert scores.reference.layer_ids == (ATTN[0], ATTN[1])  # FF counts in gamma but is not switched
    plan = Plan.build(scores, KLoraArgs(clock="reference", scope="attention"), 3)
    assert plan.exact and plan.gamma == 3.75
    # raw top-1 sums are 1 everywhere: (1 / 3.75) / (1 * scale) > 1 needs scale < .267; scale >= beta = .5
    assert (plan.roles == STYLE).all()
    default = Plan.build(scores, KLoraArgs(scope="attention"), 3)
    assert default.gamma == pytest.approx(0.625)
