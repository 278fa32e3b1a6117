"""Scores, gamma and decisions against independent brute-force computations on small random LoRAs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klora_ext import synthetic
from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.lora_file import parse_state_dict, read_lora
from klora_ext.plan import CONTENT, STYLE, Plan
from klora_ext.scoring import compute_scores, top_k, top_k_sum

TINY_ALL = synthetic.layer_shapes("tiny", "all")
TINY_ATTN = synthetic.layer_shapes("tiny", "attention")


def dense_delta(sd: dict[str, torch.Tensor], layer_id: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """The delta written out from the raw factors with float64 numpy, independently of lora_file."""
    m = synthetic.module_key(layer_id, "kohya", "sd15")

    def t(name: str) -> np.ndarray:
        return sd[f"{m}.{name}"].double().numpy()

    if kind == "lora":
        down, up = t("lora_down.weight"), t("lora_up.weight")
        r = down.shape[0]
        d = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    elif kind == "loha":
        r = t("hada_w1_b").shape[0]
        d = (t("hada_w1_a") @ t("hada_w1_b")) * (t("hada_w2_a") @ t("hada_w2_b"))
    else:
        w1 = t("lokr_w1")
        if f"{m}.lokr_w2_a" in sd:
            r = t("lokr_w2_b").shape[0]
            w2 = t("lokr_w2_a") @ t("lokr_w2_b")
        else:
            r, w2 = None, t("lokr_w2").reshape(t("lokr_w2").shape[0], -1)
        d = np.kron(w1, w2)
    alpha_key = f"{m}.alpha"
    if alpha_key in sd and (kind != "lokr" or r is not None):
        d = d * (float(sd[alpha_key]) / r)
    return d.reshape(shape)


def brute_scores(sd_c, sd_s, layers, kind_c, kind_s, rank_c, rank_s, k_mult=1.0):
    """(id, S_c, S_s, sum|dW_c|, sum|dW_s|) per layer with numpy sorting for the top-k."""
    out = []
    for layer_id, shape in layers:
        dc = np.abs(dense_delta(sd_c, layer_id, shape, kind_c)).ravel()
        ds = np.abs(dense_delta(sd_s, layer_id, shape, kind_s)).ravel()
        k = max(1, min(round(rank_c * rank_s * k_mult), dc.size))
        out.append((layer_id, np.sort(dc)[-k:].sum(), np.sort(ds)[-k:].sum(), dc.sum(), ds.sum()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("kind_c", "kind_s", "layers"),
    [
        ("lora", "lora", TINY_ALL),  # includes LoCon convs (3x3, 1x1)
        ("loha", "lora", TINY_ATTN),
        ("lora", "lokr", TINY_ALL),
        ("lokr", "loha", TINY_ATTN),
    ],
)
def test_scores_match_brute_force(dtype, kind_c, kind_s, layers) -> None:
    rank_c, rank_s = 2, 3
    sd_c = synthetic.make_lora_state_dict(layers, rank_c, kind=kind_c, alpha=1.0, seed=1, dtype=dtype)
    sd_s = synthetic.make_lora_state_dict(layers, rank_s, kind=kind_s, alpha=2.0, seed=2, dtype=dtype, scale=3.0)
    content, style = parse_state_dict(sd_c, name="c"), parse_state_dict(sd_s, name="s")
    scores = compute_scores(content, style, k_multiplier=1.5)
    by_id = scores.by_id()
    assert set(by_id) == {lid for lid, _ in layers}
    for layer_id, shape in layers:
        got = by_id[layer_id]
        # K from the ranks the file's factors declare (LoKr/LoHa ranks come from their own factor shapes)
        k = max(1, min(round(got.rank_content * got.rank_style * 1.5), math.prod(shape)))
        assert got.k == k
        dc = np.abs(dense_delta(sd_c, layer_id, shape, kind_c)).ravel()
        ds = np.abs(dense_delta(sd_s, layer_id, shape, kind_s)).ravel()
        assert got.score_content == pytest.approx(np.sort(dc)[-k:].sum(), rel=1e-5)
        assert got.score_style == pytest.approx(np.sort(ds)[-k:].sum(), rel=1e-5)
        assert got.sum_abs_content == pytest.approx(dc.sum(), rel=1e-5)
        assert got.sum_abs_style == pytest.approx(ds.sum(), rel=1e-5)


def test_decisions_match_brute_force_end_to_end(tmp_path: Path) -> None:
    # Files on disk -> read -> scores -> plan, against numpy top-k, gamma and the paper's rule written out here.
    layers = TINY_ATTN
    sd_c = synthetic.make_lora_state_dict(layers, 4, alpha=4.0, seed=11)
    sd_s = synthetic.make_lora_state_dict(layers, 2, alpha=1.0, seed=12, scale=0.1)
    synthetic.save_lora(tmp_path / "c.safetensors", sd_c)
    synthetic.save_lora(tmp_path / "s.safetensors", sd_s)
    content, style = read_lora(tmp_path / "c.safetensors"), read_lora(tmp_path / "s.safetensors")
    steps = 20
    plan = Plan.build(compute_scores(content, style), KLoraArgs(), steps)
    rows = brute_scores(sd_c, sd_s, layers, "lora", "lora", 4, 2)
    ratios = [ac / as_ for _, _, _, ac, as_ in rows]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    g = sum(kept) / len(kept)
    assert plan.gamma == pytest.approx(g, rel=1e-6)
    expected = np.array(
        [
            [CONTENT if sc >= g * (1.5 * t / steps + 0.5) * ss else STYLE for _, sc, ss, _, _ in rows]
            for t in range(steps)
        ]
    )
    assert plan.layer_ids == tuple(lid for lid, _ in layers)
    # away from exact ties (probability ~0 with random weights) the decisions must be identical
    assert np.array_equal(plan.roles, expected)
    assert 0 < (plan.roles == CONTENT).mean() < 1  # the example actually exercises both choices


def test_key_style_parity_gives_identical_plans() -> None:
    layers = synthetic.layer_shapes("tiny", "all")
    plans = []
    for style_name in ("kohya", "diffusers", "peft"):
        sd_c = synthetic.make_lora_state_dict(layers, 2, style=style_name, alpha=2.0, seed=5)
        sd_s = synthetic.make_lora_state_dict(layers, 3, style=style_name, alpha=1.0, seed=6)
        scores = compute_scores(parse_state_dict(sd_c, name="c"), parse_state_dict(sd_s, name="s"))
        plans.append(Plan.build(scores, KLoraArgs(), 25))
    for other in plans[1:]:
        assert other.layer_ids == plans[0].layer_ids
        assert np.array_equal(other.roles, plans[0].roles)
        assert other.gamma == plans[0].gamma
        assert [s.score_content for s in other.scores] == [s.score_content for s in plans[0].scores]


def test_uniform_rescale_of_a_file_leaves_the_plan_unchanged() -> None:
    layers = TINY_ATTN
    sd_c = synthetic.make_lora_state_dict(layers, 2, seed=21)
    sd_s = synthetic.make_lora_state_dict(layers, 2, seed=22)
    scaled = {k: v * 4.0 if k.endswith("lora_up.weight") else v for k, v in sd_s.items()}
    base = Plan.build(compute_scores(parse_state_dict(sd_c), parse_state_dict(sd_s)), KLoraArgs(), 30)
    other = Plan.build(compute_scores(parse_state_dict(sd_c), parse_state_dict(scaled)), KLoraArgs(), 30)
    assert np.array_equal(base.roles, other.roles)
    assert other.gamma == pytest.approx(base.gamma / 4.0)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 40_000),
    k=st.integers(1, 600),
    levels=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_top_k_sum_is_exact_including_ties(n: int, k: int, levels: int, seed: int) -> None:
    # few distinct levels -> many ties around the threshold
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (n,), generator=gen).float() * 0.37
    k = min(k, n)
    assert top_k_sum(values, k) == pytest.approx(float(np.sort(values.double().numpy())[-k:].sum()), rel=1e-12)


def test_top_k_sum_large_structured_tensor() -> None:
    delta = (torch.randn(300, 4) @ torch.randn(4, 500)).abs().reshape(-1)  # rank-4 product, 150k entries
    expected = float(np.sort(delta.double().numpy())[-64:].sum())
    assert top_k_sum(delta, 64) == pytest.approx(expected, rel=1e-12)


def test_top_k_clamps() -> None:
    assert top_k(8, 16, 10_000) == 128
    assert top_k(8, 16, 100) == 100
    assert top_k(1, 1, 100, 0.1) == 1
    assert top_k(4, 4, 1000, 2.5) == 40


# ---- degenerate input ---------------------------------------------------------------------------------------------


def test_no_shared_layers_message() -> None:
    a = parse_state_dict(synthetic.make_lora_state_dict(TINY_ATTN[:2], 2, seed=1), name="dog")
    b = parse_state_dict(synthetic.make_lora_state_dict(TINY_ATTN[4:6], 2, seed=2), name="ink")
    with pytest.raises(KLoraError, match=r"'dog' and 'ink' patch no common layer .*same base model"):
        compute_scores(a, b)


def test_all_zero_lora_message() -> None:
    sd = synthetic.make_lora_state_dict(TINY_ATTN, 2, seed=1)
    zero = {k: torch.zeros_like(v) for k, v in sd.items()}
    with pytest.raises(KLoraError, match=r"'zero' is all zeros"):
        compute_scores(parse_state_dict(sd, name="ok"), parse_state_dict(zero, name="zero"))


def test_nan_weights_message_names_file_and_layer() -> None:
    sd = synthetic.make_lora_state_dict(TINY_ATTN, 2, seed=1)
    bad = dict(sd)
    key = next(k for k in bad if k.endswith("lora_up.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(KLoraError, match=r"(NaN|nan|Inf).*"):
        compute_scores(parse_state_dict(sd, name="ok"), parse_state_dict(bad, name="broken"))


def test_mismatched_shapes_name_the_layer() -> None:
    small = [(lid, (shape[0], shape[1] // 2) + shape[2:]) for lid, shape in TINY_ATTN]
    a = parse_state_dict(synthetic.make_lora_state_dict(TINY_ATTN, 2, seed=1), name="sd15lora")
    b = parse_state_dict(synthetic.make_lora_state_dict(small, 2, seed=2), name="otherlora")
    with pytest.raises(KLoraError, match=r"layer unet:.*'sd15lora' has shape .* but 'otherlora' has"):
        compute_scores(a, b)


def test_scores_on_cuda_match_cpu_when_available() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sd_c = synthetic.make_lora_state_dict(TINY_ALL, 2, seed=1)
    sd_s = synthetic.make_lora_state_dict(TINY_ALL, 3, seed=2)
    a, b = parse_state_dict(sd_c), parse_state_dict(sd_s)
    cpu, gpu = compute_scores(a, b), compute_scores(a, b, device="cuda")
    for x, y in zip(cpu.layers, gpu.layers):
        assert x.score_content == pytest.approx(y.score_content, rel=1e-5)
        assert x.score_style == pytest.approx(y.score_style, rel=1e-5)


def test_reference_clock_matches_a_per_call_simulation_of_the_authors_code() -> None:
    """Simulate the reference implementation call by call (written from KLORA_SPEC §3, independently of plan.py):
    a global counter bumped before every K-LoRA layer call, scale = alpha * (counter % N) / N + beta with
    N = steps * layers, S_c / gamma vs S_s * scale on raw up@down products, content iff the ratio is > 1."""
    layers = TINY_ATTN  # the reference only patches attention projections
    sd_c = synthetic.make_lora_state_dict(layers, 4, seed=31)  # no alpha keys: raw up@down, like the reference
    sd_s = synthetic.make_lora_state_dict(layers, 2, seed=32, scale=0.8)
    steps, alpha, beta = 12, 1.5, 0.5
    products = {}
    for layer_id, _shape in layers:
        m = synthetic.module_key(layer_id, "kohya", "sd15")
        pc = (sd_c[f"{m}.lora_up.weight"] @ sd_c[f"{m}.lora_down.weight"]).double().abs().flatten()
        ps = (sd_s[f"{m}.lora_up.weight"] @ sd_s[f"{m}.lora_down.weight"]).double().abs().flatten()
        products[layer_id] = (pc, ps)
    ratios = [float(pc.sum() / ps.sum()) for pc, ps in products.values()]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    g = sum(kept) / len(kept)
    n_calls = steps * len(layers)
    counter = 0
    expected = []
    for _step in range(steps):
        row = []
        for layer_id, _shape in layers:  # forward order
            counter += 1
            scale = alpha * (counter % n_calls) / n_calls + beta
            pc, ps = products[layer_id]
            k = 4 * 2
            top_c = float(torch.topk(pc, k).values.sum())
            top_s = float(torch.topk(ps, k).values.sum())
            row.append(CONTENT if (top_c / g) / (top_s * scale) > 1 else STYLE)
        expected.append(row)
    args = KLoraArgs(clock="reference", scope="attention", gamma_mode="auto-mean")
    plan = Plan.build(compute_scores(parse_state_dict(sd_c), parse_state_dict(sd_s)), args, steps)
    assert plan.layer_ids == tuple(lid for lid, _ in layers)
    assert plan.gamma == pytest.approx(g, rel=1e-6)  # our per-layer sums are fp32
    assert plan.roles.tolist() == expected
    assert 0 < (plan.roles == CONTENT).mean() < 1
