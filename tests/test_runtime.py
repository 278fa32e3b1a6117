from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klora_ext.args import KLoraArgs
from klora_ext.plan import BOTH, CONTENT, NONE, STYLE, Plan
from klora_ext.runtime import PassController, Session, static_role
from klora_ext.scoring import LayerScore, PairScores

Q = "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_q"
K = "unet:input_blocks.1.1.transformer_blocks.0.attn1.to_k"
FF = "unet:input_blocks.1.1.transformer_blocks.0.ff.net.2"
TE = "te1:text_model.encoder.layers.0.self_attn.q_proj"


def scores_for(sc: list[float], ids: list[str] | None = None) -> PairScores:
    ids = ids or [f"unet:output_blocks.{i}.1.transformer_blocks.0.attn2.to_v" for i in range(len(sc))]
    return PairScores(layers=tuple(LayerScore(i, s, 1.0, 1.0, 1.0, 4, 4, 16) for i, s in zip(ids, sc)))


def manual(**kw) -> KLoraArgs:
    return KLoraArgs(gamma_mode="manual", gamma=1.0, **kw)


def test_controller_returns_only_flipping_layers_and_is_idempotent_per_step() -> None:
    # S(p) for T=10: .5 + .15 t. S_c = .8 flips at t=2 (S=.8 tie -> content, t=3 -> .95 style); 1.1 flips at t=5
    session = Session(manual(), scores_for([0.8, 1.1, 10.0]))
    ctl = PassController(session)
    first = ctl.begin_pass(10)
    assert sorted(first) == sorted((lid, CONTENT) for lid in session.plan_layer_ids())
    seen = {}
    for t in range(1, 10):
        changes = ctl.advance(t)
        assert ctl.advance(t) == []  # second call in the same step (CFG halves, 2nd-order samplers)
        for lid, role in changes:
            seen.setdefault(lid, []).append((t, role))
    ids = session.plan_layer_ids()
    assert seen == {ids[0]: [(3, STYLE)], ids[1]: [(5, STYLE)]}


def test_controller_jumps_and_overshoot() -> None:
    session = Session(manual(), scores_for([0.8, 1.1]))
    ctl = PassController(session)
    ctl.begin_pass(10)
    # jump straight to step 7: both flipped since step 0
    assert sorted(r for _, r in ctl.advance(7)) == [STYLE, STYLE]
    assert ctl.advance(12) == []  # past the end: stays on the last row, nothing new
    assert ctl.advance(9) == []


def test_new_pass_reverts_only_what_differs() -> None:
    session = Session(manual(hires="restart"), scores_for([0.8, 100.0]))
    ctl = PassController(session)
    ctl.begin_pass(10)
    for t in range(10):
        ctl.advance(t)
    assert ctl.applied.tolist() == [STYLE, CONTENT]
    # hires pass restarts the schedule: only layer 0 has to go back to content
    assert ctl.begin_pass(4, kind="hires", denoise=0.5) == [(session.plan_layer_ids()[0], CONTENT)]


def test_hires_policies() -> None:
    scores = scores_for([0.8, 1.1, 10.0])
    restart = Session(manual(hires="restart"), scores)
    cont = Session(manual(hires="continue"), scores)
    keep = Session(manual(hires="keep"), scores)
    for session in (restart, cont, keep):
        session.plan_for_pass(10)
    assert np.array_equal(
        restart.plan_for_pass(6, kind="hires", denoise=0.5).roles, Plan.build(scores, manual(), 6).roles
    )
    expected_cont = Plan.build(scores, manual(), 6, window=(0.5, 0.5)).roles
    assert np.array_equal(cont.plan_for_pass(6, kind="hires", denoise=0.5).roles, expected_cont)
    kept = keep.plan_for_pass(6, kind="hires", denoise=0.5)
    assert (kept.roles == keep.first_plan.roles[-1]).all() and kept.steps == 6


def test_img2img_continue_uses_denoising_strength() -> None:
    scores = scores_for([0.8])
    session = Session(manual(hires="continue"), scores)
    plan = session.plan_for_pass(4, kind="img2img", denoise=0.25)
    # p = .75 + .25 t / 4 -> S >= 1.625 > .8: style throughout
    assert (plan.roles == STYLE).all()
    restart = Session(manual(hires="restart"), scores).plan_for_pass(4, kind="img2img", denoise=0.25)
    assert restart.roles[0, 0] == CONTENT


@settings(max_examples=40, deadline=None)
@given(
    sc=st.lists(st.floats(0.01, 5.0), min_size=1, max_size=10),
    steps=st.integers(1, 30),
    schedule=st.sampled_from(["linear", "s*"]),
    method=st.sampled_from(["k-lora", "random"]),
    calls=st.lists(st.integers(0, 3), min_size=1, max_size=40),
)
def test_applied_roles_always_equal_the_plan_row(sc, steps, schedule, method, calls) -> None:
    session = Session(
        KLoraArgs(schedule=schedule, method=method, beta=1.3 if schedule == "s*" else 0.5), scores_for(sc)
    )
    ctl = PassController(session)
    changes = ctl.begin_pass(steps)
    state = dict(changes)
    t = 0
    for repeat in calls:  # a sampler calls the denoiser 1..n times per step, sometimes skipping
        t += 1 if repeat else 2
        for _ in range(max(repeat, 1)):
            for lid, role in ctl.advance(t):
                state[lid] = role
        plan = ctl.plan
        expected = dict(zip(plan.layer_ids, plan.row(t).tolist()))
        assert state == expected


@pytest.mark.parametrize(
    ("layer", "in_c", "in_s", "kw", "role"),
    [
        (Q, True, False, {}, CONTENT),
        (Q, False, True, {}, STYLE),
        (FF, True, False, {"scope": "attention"}, NONE),
        (FF, True, False, {}, CONTENT),
        (TE, True, True, {}, BOTH),
        (TE, True, True, {"te_policy": "content"}, CONTENT),
        (TE, False, True, {"te_policy": "content"}, NONE),
        (TE, True, True, {"te_policy": "none"}, NONE),
        # T5 (Flux) is a text encoder like CLIP: the policy applies, it is never "shared but out of scope"
        ("t5:encoder.block.0.layer.0.SelfAttention.q", True, True, {}, BOTH),
        ("t5:encoder.block.0.layer.0.SelfAttention.q", True, True, {"te_policy": "style"}, STYLE),
        (TE, True, True, {"method": "content-only"}, CONTENT),
        (Q, False, True, {"method": "content-only"}, NONE),
        (FF, True, True, {"method": "merge", "scope": "attention"}, BOTH),
    ],
)
def test_static_roles(layer, in_c, in_s, kw, role) -> None:
    assert static_role(layer, in_c, in_s, KLoraArgs(**kw)) == role


def test_session_static_roles_exclude_switched_layers() -> None:
    session = Session(KLoraArgs(), scores_for([1.0, 1.0], ids=[Q, K]))
    roles = session.static_roles([Q, K, FF, TE], [Q, K, TE])
    assert roles == {TE: BOTH, FF: CONTENT}
