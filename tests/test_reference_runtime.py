"""Reference clocks beyond the plan itself: the exact float path, the score cache, and the run's pass controller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klora_ext import synthetic
from klora_ext.args import KLoraArgs
from klora_ext.cache import ScoreCache
from klora_ext.lora_file import read_lora
from klora_ext.plan import Plan
from klora_ext.reference import decide
from klora_ext.runtime import PassController, Session
from klora_ext.scoring import PairScores


def _literal(top_c, top_s, dtype_c, dtype_s, gamma, scales) -> np.ndarray:
    """Their get_klora_weight comparison with 0-dim tensors and Python scalars, cell by cell."""
    out = np.zeros((len(scales), len(top_c)), dtype=bool)
    for t, row in enumerate(scales):
        for i, scale in enumerate(row):
            c = torch.tensor(top_c[i], dtype=dtype_c) / gamma
            s = torch.tensor(top_s[i], dtype=dtype_s) * scale
            out[t, i] = bool(c / s > 1)
    return out


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_decide_matches_torch_on_near_ties(dtypes) -> None:
    # Values placed within a few float32 ulps of the boundary, where any difference in rounding shows.
    rng = np.random.default_rng(5)
    n_layers, steps = 200, 40
    dc, ds = dtypes
    top_s = torch.tensor(rng.uniform(0.5, 50.0, n_layers)).to(ds)
    scales = rng.uniform(0.5, 2.0, (steps, n_layers))
    gamma = float(rng.uniform(0.3, 3.0))
    middle = scales[steps // 2]
    wiggle = 1 + rng.integers(-4, 5, n_layers) * 2.0**-24
    top_c = (top_s.double() * torch.tensor(middle * gamma * wiggle)).to(dc)
    names = (str(dc).removeprefix("torch."), str(ds).removeprefix("torch."))
    scales[steps // 2 + 1] = middle  # exact-tie candidates twice
    c_list, s_list = [float(x) for x in top_c], [float(x) for x in top_s]
    got = decide(c_list, s_list, [names[0]] * n_layers, [names[1]] * n_layers, gamma, scales.tolist())
    want = _literal(c_list, s_list, dc, ds, gamma, scales.tolist())
    assert np.array_equal(got, want)
    assert 0 < want[steps // 2].sum() < n_layers  # the probe really sits on the boundary


@pytest.fixture
def tiny_files(tmp_path):
    layers = synthetic.layer_shapes("tiny", "all")
    c = synthetic.save_lora(tmp_path / "c.safetensors", synthetic.make_lora_state_dict(layers, 2, alpha=2.0, seed=1))
    s = synthetic.save_lora(tmp_path / "s.safetensors", synthetic.make_lora_state_dict(layers, 3, alpha=1.0, seed=2))
    return c, s


def test_cache_keeps_reference_numbers_apart_and_round_trips_them(tiny_files, tmp_path) -> None:
    c, s = tiny_files
    path = tmp_path / "cache.json"
    plain, _ = ScoreCache(path).get_or_compute(c, s)
    assert plain.reference is None
    fresh, hit = ScoreCache(path).get_or_compute(c, s, reference=True)
    assert not hit and fresh.reference is not None
    cached, hit = ScoreCache(path).get_or_compute(c, s, reference=True)  # from disk, new process-like cache
    assert hit and cached.reference == fresh.reference
    args = KLoraArgs(clock="reference", scope="attention")
    assert np.array_equal(Plan.build(cached, args, 20).roles, Plan.build(fresh, args, 20).roles)
    assert PairScores.from_json(fresh.to_json()).reference == fresh.reference


def test_session_switches_the_plan_layers_and_the_literal_counter_runs_on(tiny_files) -> None:
    from klora_ext.scoring import compute_scores

    content, style = read_lora(tiny_files[0]), read_lora(tiny_files[1])
    scores = compute_scores(content, style, reference=True)
    args = KLoraArgs(clock="reference-literal", scope="all", schedule="s*", beta=1.275)
    session = Session(args, scores)
    controller = PassController(session)
    controller.begin_pass(30)
    first = controller.plan
    assert session.plan_layer_ids() == first.layer_ids == scores.reference.layer_ids
    controller.begin_pass(30)
    second = controller.plan
    n = len(first.layer_ids)
    assert (first.counter_start, second.counter_start) == (0, 30 * n)
    assert np.array_equal(second.roles, Plan.build(scores, args, 30, counter_start=30 * n).roles)
    # the per-image clock repeats itself from image to image
    session = Session(args.replace(clock="reference"), scores)
    controller = PassController(session)
    controller.begin_pass(30)
    a = controller.plan
    controller.begin_pass(30)
    assert controller.plan is a
