"""Streamed (row-block) scoring against brute force: the full dense delta written out with numpy in float64 from the
raw factors, and torch.topk over the whole fp32 delta. Layers are built directly (no key parsing) for every factor
form; the file-level tests go through parse_state_dict with fp16/bf16 tensors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klora_ext import scoring, synthetic
from klora_ext.errors import KLoraError
from klora_ext.lora_file import LoraFile, LoraLayer, parse_state_dict
from klora_ext.scoring import _row_blocks, _Selector, compute_scores, stream_layer_score, top_k

SMALL_BLOCKS = (16, 100, 1000, 1 << 30)  # one tile-row per block ... the whole layer as one block


@pytest.fixture(autouse=True, params=["numpy", "torch"])
def backend(request, monkeypatch) -> str:
    """Every test on both block paths: numpy (CPU fp32) and torch (what CUDA runs; here on the CPU)."""
    monkeypatch.setattr(scoring, "_HOST_NUMPY", request.param == "numpy")
    return request.param


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().double().numpy()


def _cp_np(t, wa, wb):
    # LyCORIS CP half: t (R, R', kh, kw), wa (R, out), wb (R', in) -> (out, in, kh, kw)
    return np.einsum("ijkl,io,jn->onkl", t, wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1))


def numpy_delta(layer: LoraLayer, *, apply_scale: bool = True) -> np.ndarray:
    """The dense delta in float64, written out from the raw factors without lora_file or scoring code."""
    f = {k: _np(v) for k, v in layer.factors.items()}
    out = layer.shape[0]
    if layer.kind in ("lora", "locon"):
        up = f["up"].reshape(out, -1)
        down = f["down"].reshape(f["down"].shape[0], -1)
        d = np.einsum("on,nmkl,mi->oikl", up, f["mid"], down) if "mid" in f else up @ down
    elif layer.kind == "loha":
        halves = []
        for i in (1, 2):
            wa, wb, t = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"], f.get(f"hada_t{i}")
            halves.append((wa @ wb.reshape(wb.shape[0], -1) if t is None else _cp_np(t, wa, wb)).reshape(out, -1))
        d = halves[0] * halves[1]
    elif layer.kind == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _cp_np(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].reshape(f["lokr_w2_b"].shape[0], -1)
        d = np.kron(w1, w2.reshape(w2.shape[0], -1))
    else:
        d = f["diff"]
    d = d.reshape(out, -1)
    return d * layer.scale if apply_scale else d


def brute(layer: LoraLayer, k: int, **kw) -> tuple[float, float]:
    flat = np.abs(numpy_delta(layer, **kw)).ravel()
    return float(np.sort(flat)[-k:].sum()), float(flat.sum())


def torch_dense(layer: LoraLayer, k: int) -> tuple[float, float]:
    """The previous implementation's path: the full fp32 delta, abs, torch.topk over all of it."""
    flat = layer.delta().reshape(-1).abs()
    return float(torch.topk(flat, k).values.double().sum()), float(flat.double().sum())


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


def make_layer(kind: str, shape, rank: int, *, seed: int = 0, dtype=torch.float32, scale: float = 0.75, **opts):
    out, cin, kern = shape[0], shape[1], tuple(shape[2:])
    fan = cin * math.prod(kern)
    s = iter(range(seed * 10, seed * 10 + 10))
    if kind in ("lora", "locon"):
        if opts.get("cp"):
            f = {
                "up": rnd(next(s), out, rank, 1, 1, dtype=dtype),
                "mid": rnd(next(s), rank, rank, *kern, dtype=dtype),
                "down": rnd(next(s), rank, cin, 1, 1, dtype=dtype),
            }
        else:
            f = {
                "up": rnd(next(s), out, rank, *((1, 1) if kern else ()), dtype=dtype),
                "down": rnd(next(s), rank, cin, *kern, dtype=dtype),
            }
    elif kind == "loha":
        f = {}
        for i in (1, 2):
            if opts.get("cp"):
                f[f"hada_t{i}"] = rnd(next(s), rank, rank, *kern, dtype=dtype)
                f[f"hada_w{i}_a"] = rnd(next(s), rank, out, dtype=dtype)
                f[f"hada_w{i}_b"] = rnd(next(s), rank, cin, dtype=dtype)
            else:
                f[f"hada_w{i}_a"] = rnd(next(s), out, rank, dtype=dtype)
                f[f"hada_w{i}_b"] = rnd(next(s), rank, fan, dtype=dtype)
    elif kind == "lokr":
        a, c = opts["w1"]
        b, d = out // a, cin // c
        f = {}
        if opts.get("w1_factored"):
            f["lokr_w1_a"], f["lokr_w1_b"] = rnd(next(s), a, 2, dtype=dtype), rnd(next(s), 2, c, dtype=dtype)
        else:
            f["lokr_w1"] = rnd(next(s), a, c, dtype=dtype)
        if opts.get("w2_full"):
            f["lokr_w2"] = rnd(next(s), b, d, *kern, dtype=dtype)
        elif opts.get("cp"):
            f["lokr_t2"] = rnd(next(s), rank, rank, *kern, dtype=dtype)
            f["lokr_w2_a"] = rnd(next(s), rank, b, dtype=dtype)
            f["lokr_w2_b"] = rnd(next(s), rank, d, dtype=dtype)
        else:
            f["lokr_w2_a"] = rnd(next(s), b, rank, dtype=dtype)
            f["lokr_w2_b"] = rnd(next(s), rank, d * math.prod(kern), dtype=dtype)
    else:
        f = {"diff": opts["diff"].to(dtype) if "diff" in opts else rnd(next(s), *shape, dtype=dtype)}
    return LoraLayer("unet:test.layer", kind, rank, tuple(shape), scale, (), f)


FORMS = {
    "lora": ("lora", (70, 48), 4, {}),
    "lora-tall": ("lora", (197, 5), 3, {}),  # rows not a multiple of 16
    "locon3x3": ("locon", (37, 6, 3, 3), 4, {}),
    "locon1x1": ("locon", (40, 24, 1, 1), 2, {}),
    "locon-cp": ("locon", (33, 8, 3, 3), 3, {"cp": True}),
    "loha": ("loha", (50, 40), 3, {}),
    "loha-conv": ("loha", (34, 6, 3, 3), 2, {}),
    "loha-cp": ("loha", (36, 7, 3, 3), 3, {"cp": True}),
    "lokr": ("lokr", (60, 48), 3, {"w1": (4, 6)}),
    "lokr-w1ab-w2full": ("lokr", (56, 30), 2, {"w1": (7, 5), "w1_factored": True, "w2_full": True}),
    "lokr-conv-full": ("lokr", (48, 12, 3, 3), 3, {"w1": (3, 4), "w2_full": True}),
    "lokr-cp": ("lokr", (45, 10, 3, 3), 2, {"w1": (5, 2), "cp": True}),
    "full": ("full", (81, 33), 33, {}),
    "full-conv": ("full", (20, 4, 3, 3), 20, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_streamed_scores_match_brute_force(form: str, dtype: torch.dtype) -> None:
    kind, shape, rank, opts = FORMS[form]
    layer = make_layer(kind, shape, rank, seed=len(form), dtype=dtype, **opts)
    numel = math.prod(shape)
    for k in (1, 7, rank * rank, min(300, numel // 3)):
        want_top, want_sum = brute(layer, k)
        dense_top, dense_sum = torch_dense(layer, k)
        for block in SMALL_BLOCKS:
            top, total = stream_layer_score(layer, k, block_elems=block)
            assert top == pytest.approx(want_top, rel=2e-6), (k, block)
            assert total == pytest.approx(want_sum, rel=2e-6), (k, block)
            # against the old fp32 path: same values selected, only summation order differs
            assert top == pytest.approx(dense_top, rel=1e-6), (k, block)
            assert total == pytest.approx(dense_sum, rel=1e-6), (k, block)


@pytest.mark.parametrize("block", SMALL_BLOCKS)
def test_k_close_to_numel_and_complement_path(block: int) -> None:
    layer = make_layer("lora", (45, 13), 3, seed=3)
    numel = 45 * 13
    for k in (numel, numel - 1, numel - 17, numel // 2 + 1, numel // 2, numel // 2 - 1):
        want_top, want_sum = brute(layer, k)
        top, total = stream_layer_score(layer, k, block_elems=block)
        assert top == pytest.approx(want_top, rel=2e-6), k
        assert total == pytest.approx(want_sum, rel=2e-6), k
    # K is clamped to numel like top_k()
    assert stream_layer_score(layer, 10 * numel, block_elems=block)[0] == pytest.approx(brute(layer, numel)[0])


@pytest.mark.parametrize("block", SMALL_BLOCKS)
def test_ties_and_all_zero_rows_are_exact(block: int) -> None:
    # few distinct integer levels: heavy ties at every threshold; sums of small integers are exact in fp32 and fp64
    gen = _g(5)
    diff = torch.randint(-3, 4, (93, 21), generator=gen).float()
    diff[10:40] = 0  # all-zero rows, some spanning whole blocks
    diff[:, 5] = 0
    layer = make_layer("full", diff.shape, 21, scale=1.0, diff=diff)
    flat = np.abs(diff.double().numpy()).ravel()
    for k in (1, 2, 50, 51, 400, 1000, flat.size - 5, flat.size):
        top, total = stream_layer_score(layer, k, block_elems=block)
        assert top == float(np.sort(flat)[-k:].sum()), k
        assert total == float(flat.sum())


def test_all_zero_layer_and_a_single_nonzero() -> None:
    zero = make_layer("full", (64, 64), 1, diff=torch.zeros(64, 64))
    assert stream_layer_score(zero, 100, block_elems=256) == (0.0, 0.0)
    one = torch.zeros(64, 64)
    one[50, 3] = -2.5
    layer = make_layer("full", (64, 64), 1, scale=2.0, diff=one)
    assert stream_layer_score(layer, 100, block_elems=256) == (5.0, 5.0)


def test_raw_product_and_file_dtype_options() -> None:
    layer = make_layer("lora", (66, 40), 4, seed=8, scale=0.3, dtype=torch.float16)
    k = 16
    raw_top, raw_sum = brute(layer, k, apply_scale=False)
    top, total = stream_layer_score(layer, k, apply_scale=False, block_elems=200)
    assert top == pytest.approx(raw_top, rel=2e-6)
    assert total == pytest.approx(raw_sum, rel=2e-6)
    # dtype=None: products in the file's fp16, like a raw `up @ down` in the file dtype
    up, down = layer.factors["up"], layer.factors["down"]
    product = (up @ down).abs().reshape(-1)
    want = float(torch.topk(product, k).values.double().sum())
    top16, total16 = stream_layer_score(layer, k, dtype=None, apply_scale=False, block_elems=200)
    assert top16 == pytest.approx(want, rel=1e-3)
    assert total16 == pytest.approx(float(product.double().sum()), rel=1e-3)


def test_negative_scale_scores_magnitudes() -> None:
    layer = make_layer("lora", (40, 20), 2, seed=4, scale=-1.5)
    want = brute(layer, 9)
    got = stream_layer_score(layer, 9, block_elems=64)
    assert got[0] == pytest.approx(abs(want[0]), rel=2e-6)
    assert got[1] == pytest.approx(abs(want[1]), rel=2e-6)


# ---- the selector and the block split, property-tested ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 120),
    cols=st.integers(1, 40),
    k=st.integers(1, 500),
    levels=st.integers(1, 30),
    block=st.integers(1, 2000),
    seed=st.integers(0, 2**16),
)
def test_selector_exact_on_random_streams_with_ties(rows, cols, k, levels, block, seed) -> None:
    values = (torch.randint(0, levels, (rows, cols), generator=_g(seed)).float() * 0.25).reshape(rows, cols)
    k = min(k, rows * cols)
    layer = make_layer("full", (rows, cols), 1, scale=1.0, diff=values)
    top, total = stream_layer_score(layer, k, block_elems=block)
    flat = values.double().numpy().ravel()
    assert top == float(np.sort(flat)[-k:].sum())
    assert total == float(flat.sum())


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 5000), cols=st.integers(1, 3000), block=st.integers(1, 1 << 20))
def test_row_blocks_cover_rows_in_tile_multiples(rows: int, cols: int, block: int) -> None:
    ranges = _row_blocks(rows, cols, block)
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    first = ranges[0][1] - ranges[0][0]
    for start, stop in ranges:
        n = stop - start
        assert n > 0 and n <= first  # the first block is the buffer size
        assert n % scoring.TILE_ROWS == 0 or (stop == rows and n < scoring.TILE_ROWS)
        assert n * cols <= max(block, scoring.TILE_ROWS * cols)  # bounded: never a whole big layer at once


def test_selector_threshold_is_never_above_the_kth_largest() -> None:
    # the invariant behind the exactness: t, once set, is <= the k-th largest value seen so far
    gen = _g(9)
    sel = _Selector(40)
    seen = []
    for _ in range(30):
        block = torch.rand(32, 7, generator=gen) * torch.rand(1, generator=gen) * 10
        seen.append(block.reshape(-1))
        tiles = block.view(2, 16, 7)
        sel.add(block, tiles.amax(1), tiles)
        if sel.t is not None:
            assert sel.t <= float(torch.topk(torch.cat(seen), 40).values.min())
    assert sel.total() == pytest.approx(float(torch.topk(torch.cat(seen), 40).values.double().sum()), rel=1e-12)


# ---- compute_scores: files, threads, devices, damaged input -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("kind_c", "kind_s"), [("lora", "loha"), ("lokr", "lora")])
def test_file_scores_match_brute_force(dtype, kind_c, kind_s) -> None:
    layers = synthetic.layer_shapes("tiny", "all")
    sd_c = synthetic.make_lora_state_dict(layers, 3, kind=kind_c, alpha=2.0, seed=41, dtype=dtype)
    sd_s = synthetic.make_lora_state_dict(layers, 2, kind=kind_s, alpha=1.0, seed=42, dtype=dtype)
    content, style = parse_state_dict(sd_c, name="c"), parse_state_dict(sd_s, name="s")
    scores = compute_scores(content, style, k_multiplier=2.0)
    assert len(scores.layers) == len(set(content.layers) & set(style.layers)) > 0
    for s in scores.layers:
        assert s.k == top_k(s.rank_content, s.rank_style, content.layers[s.id].numel, 2.0)
        want_c, want_s = brute(content.layers[s.id], s.k), brute(style.layers[s.id], s.k)
        assert s.score_content == pytest.approx(want_c[0], rel=2e-6)
        assert s.sum_abs_content == pytest.approx(want_c[1], rel=2e-6)
        assert s.score_style == pytest.approx(want_s[0], rel=2e-6)
        assert s.sum_abs_style == pytest.approx(want_s[1], rel=2e-6)


def _pair() -> tuple[LoraFile, LoraFile]:
    layers = synthetic.layer_shapes("tiny", "all")
    return (
        parse_state_dict(synthetic.make_lora_state_dict(layers, 3, alpha=2.0, seed=51), name="c"),
        parse_state_dict(synthetic.make_lora_state_dict(layers, 4, alpha=1.0, seed=52), name="s"),
    )


def _big_pair() -> tuple[LoraFile, LoraFile]:
    """Layers big enough (> torch's 32768-element grain) that the block ops really run on several threads."""
    shapes = {
        "unet:big.a": ((640, 640), 8, 4),
        "unet:big.b": ((1280, 320), 4, 16),
        "unet:big.c": ((96, 64, 3, 3), 3, 2),
    }
    files = []
    for name, seed in (("c", 1), ("s", 2)):
        layers = {}
        for i, (layer_id, (shape, rc, rs)) in enumerate(shapes.items()):
            layer = make_layer(
                "lora" if len(shape) == 2 else "locon", shape, rc if name == "c" else rs, seed=seed + 7 * i
            )
            layers[layer_id] = replace_id(layer, layer_id)
        files.append(LoraFile(None, name, "", "sd15", layers))
    return files[0], files[1]


def replace_id(layer: LoraLayer, layer_id: str) -> LoraLayer:
    return LoraLayer(layer_id, layer.kind, layer.rank, layer.shape, layer.scale, layer.source_keys, layer.factors)


def test_scoring_never_changes_torch_threads_and_reports_progress_in_order(monkeypatch) -> None:
    """torch's thread count is process-wide (a generation may run in another thread): scoring uses it as it is."""
    before = torch.get_num_threads()
    try:
        for pair in (_pair(), _big_pair()):
            content, style = pair
            for threads in (1, 2):
                torch.set_num_threads(threads)
                calls = []
                with monkeypatch.context() as m:
                    m.setattr(torch, "set_num_threads", lambda n: pytest.fail(f"scoring set {n} threads"))
                    m.setattr(torch, "set_num_interop_threads", lambda n: pytest.fail("scoring set interop threads"))
                    got = compute_scores(content, style, progress=lambda i, n, lid, c=calls: c.append((i, n, lid)))
                assert torch.get_num_threads() == threads
                n = len(got.layers)
                assert calls == [(i, n, s.id) for i, s in enumerate(got.layers)] + [(n, n, "")]
                for s in got.layers:
                    want_c, want_s = brute(content.layers[s.id], s.k), brute(style.layers[s.id], s.k)
                    assert s.score_content == pytest.approx(want_c[0], rel=2e-6)
                    assert s.sum_abs_content == pytest.approx(want_c[1], rel=2e-6)
                    assert s.score_style == pytest.approx(want_s[0], rel=2e-6)
                    assert s.sum_abs_style == pytest.approx(want_s[1], rel=2e-6)
    finally:
        torch.set_num_threads(before)


def test_an_error_stops_the_run_with_the_layer_named() -> None:
    content, style = _pair()
    layer_id = list(style.layers)[5]
    bad = style.layers[layer_id]
    bad.factors = {**bad.factors, "up": bad.factors["up"].clone()}
    bad.factors["up"].view(-1)[0] = float("nan")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(KLoraError, match=rf"\[K-LoRA\] 's' has NaN/Inf weights at layer {layer_id}"):
            compute_scores(content, style)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("where", ["first", "later"])
def test_nan_and_inf_in_any_block_are_reported(where: str) -> None:
    layer = make_layer("lora", (300, 64), 4, seed=2)
    row = 0 if where == "first" else 290
    nan = make_layer("lora", (300, 64), 4, seed=2)
    nan.factors["up"][row, 1] = float("nan")
    huge = make_layer("lora", (300, 64), 4, seed=2)
    huge.factors["up"][row] = 1e30  # an overflowing product: inf in the delta
    huge.factors["down"][:] = 1e30
    for bad in (nan, huge):
        top, total = stream_layer_score(bad, 16, block_elems=1024)
        assert not (math.isfinite(top) and math.isfinite(total))
        files = [
            LoraFile(None, name, "", "sd15", {"unet:test.layer": lay}) for name, lay in (("ok", layer), ("x", bad))
        ]
        with pytest.raises(KLoraError, match=r"\[K-LoRA\] 'x' has NaN/Inf weights at layer unet:test.layer"):
            compute_scores(*files)


def test_pick_score_device(monkeypatch) -> None:
    assert scoring.pick_score_device("cpu") == "cpu"
    assert scoring.pick_score_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scoring.pick_score_device("cuda") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (100 * 2**20, 8 * 2**30))
    assert scoring.pick_score_device("cuda:0") == "cpu"  # 100 MiB free: not enough room
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (6 * 2**30, 8 * 2**30))
    assert scoring.pick_score_device("cuda:0") == "cuda:0"


def test_out_of_memory_on_the_device_finishes_on_the_cpu(monkeypatch) -> None:
    content, style = _pair()
    expected = compute_scores(content, style)
    real = scoring.stream_layer_score
    seen = []

    def fake(layer, k, *, device="cpu", **kw):
        seen.append(str(device))
        if str(device) == "cuda" and len(seen) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(layer, k, **kw)  # the "GPU" numbers are computed on the CPU here

    monkeypatch.setattr(scoring, "pick_score_device", lambda device: "cuda")
    monkeypatch.setattr(scoring, "stream_layer_score", fake)
    calls = []
    got = compute_scores(content, style, device="cuda", progress=lambda i, n, lid: calls.append(i))
    assert got.layers == expected.layers
    assert seen[:5] == ["cuda"] * 5 and "cpu" in seen
    n = len(expected.layers)
    assert calls == [*range(3), *range(2, n + 1)]  # layer 2 hit the error and was started again on the CPU


def test_scores_on_cuda_match_brute_force_when_available() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for form in ("lora", "loha", "lokr-cp", "locon-cp", "full"):
        kind, shape, rank, opts = FORMS[form]
        layer = make_layer(kind, shape, rank, seed=1, **opts)
        for k in (5, 60):
            want = brute(layer, k)
            got = stream_layer_score(layer, k, device="cuda", block_elems=256)
            assert got[0] == pytest.approx(want[0], rel=1e-5)
            assert got[1] == pytest.approx(want[1], rel=1e-5)


@pytest.mark.parametrize(("kind_c", "kind_s"), [("lora", "lora"), ("loha", "lora"), ("lora", "lokr")])
def test_plans_equal_plans_from_brute_force_scores(kind_c: str, kind_s: str) -> None:
    """The plan (roles of every layer at every step) from streamed scores equals the plan from scores written out
    from the numpy float64 dense deltas, for several schedules, scopes, gamma modes and K multipliers."""
    from klora_ext.args import KLoraArgs
    from klora_ext.plan import Plan
    from klora_ext.scoring import LayerScore, PairScores

    layers = synthetic.layer_shapes("tiny", "all")
    sd_c = synthetic.make_lora_state_dict(layers, 4, kind=kind_c, alpha=2.0, seed=61, dtype=torch.float16)
    sd_s = synthetic.make_lora_state_dict(layers, 8, kind=kind_s, alpha=4.0, seed=62, dtype=torch.float16)
    content, style = parse_state_dict(sd_c, name="c"), parse_state_dict(sd_s, name="s")
    switched = False
    for k_mult in (1.0, 0.5, 3.0):
        got = compute_scores(content, style, k_multiplier=k_mult)
        rows = []
        for s in got.layers:
            lc, ls = content.layers[s.id], style.layers[s.id]
            k = top_k(lc.rank, ls.rank, lc.numel, k_mult)
            (tc, ac), (ts, as_) = brute(lc, k), brute(ls, k)
            rows.append(LayerScore(s.id, tc, ts, ac, as_, lc.rank, ls.rank, k))
        want = PairScores(layers=tuple(rows), k_multiplier=k_mult)
        for args in (
            KLoraArgs(),
            KLoraArgs(scope="attention", gamma_mode="auto-sum"),
            KLoraArgs(schedule="s*", alpha=1.0, beta=0.8),
            KLoraArgs(gamma_mode="manual", gamma=2.0, k_multiplier=0.5),
        ):
            for steps in (1, 20, 50):
                a, b = Plan.build(got, args, steps), Plan.build(want, args, steps)
                assert a.layer_ids == b.layer_ids
                assert np.array_equal(a.roles, b.roles), (k_mult, args, steps)
                assert a.gamma == pytest.approx(b.gamma, rel=1e-6)
                switched = switched or len(np.unique(a.roles)) > 1
    assert switched  # some plans really mix content and style layers


@pytest.mark.parametrize("layout", ["random", "sample-high", "sample-low", "ties"])
def test_first_threshold_has_k_values_at_or_above_it(layout: str) -> None:
    k, n = 50, 5000
    values = torch.rand(n, generator=_g(5))
    stride = n // (4 * k) | 1
    if layout == "sample-high":  # the strided sample holds the only large values: the count check must fall back
        values = torch.zeros(n)
        values[::stride] = torch.arange(1, values[::stride].numel() + 1, dtype=torch.float32)
    elif layout == "sample-low":
        values[::stride] = 0.0
    elif layout == "ties":
        values = torch.full((n,), 0.5)
    kth = float(np.sort(values.numpy())[-k])
    for t in (scoring._first_threshold(values, k), scoring._first_threshold_np(values.numpy(), k)):
        assert int((values >= t).sum()) >= k and t <= kth
        if layout == "sample-high":
            assert t == kth  # the exact k-th largest after the fallback


def test_skewed_columns_are_still_exact() -> None:
    # large values only in the columns a strided sample of tile maxima keeps: the sampled threshold is rejected
    layer = make_layer("full", (64, 900), 1, diff=torch.rand(64, 900, generator=_g(8)) * 1e-3)
    layer.factors["diff"][:, ::3] += 10.0
    for k in (40, 300):
        top, total = stream_layer_score(layer, k)
        want = brute(layer, k)
        assert top == pytest.approx(want[0], rel=1e-6) and total == pytest.approx(want[1], rel=1e-6)


def test_cpu_path_chooser_takes_the_faster_path_and_retries_the_other_less_often() -> None:
    """Hand-worked sequence: torch first (its first layer is warm-up, not counted), numpy tried next (warm-up, then
    counted), the cheaper one kept; a losing try doubles the wait before the next (8, 16, 32, 64, then 64 again);
    layers below ADAPT_MIN_ELEMS always take the default path."""
    chooser = scoring._CpuPathChooser()
    n = scoring.ADAPT_MIN_ELEMS
    assert chooser.pick(n - 1) is None
    picks = []

    def step(cost: dict[str, float]) -> None:
        path = chooser.pick(n)
        picks.append(path)
        chooser.record(path, n, cost[path] * n)

    slow_torch = {"torch": 3.0, "numpy": 1.0}  # others hold the cores: torch's ops wait for their slowest thread
    for _ in range(4):
        step(slow_torch)
    assert picks == ["torch", "torch", "numpy", "numpy"] and chooser.current == "numpy"  # 1st of each: warm-up
    for _ in range(9):
        step(slow_torch)
    assert picks[4:] == ["numpy"] * 8 + ["torch"]  # torch tried again after 8 layers, lost
    assert chooser.current == "numpy" and chooser.interval == 16
    waits = []
    for _ in range(4):
        start = len(picks)
        step(slow_torch)
        while picks[-1] != "torch":
            step(slow_torch)
        waits.append(len(picks) - start - 1)
    assert waits == [16, 32, 64, 64]  # capped: a load that goes away is noticed within 64 layers
    idle = {"torch": 0.5, "numpy": 1.0}  # the load went away: the next try of torch wins and torch is kept
    start = len(picks)
    step(idle)
    while picks[-1] != "torch":
        step(idle)
    assert len(picks) - start - 1 == 64 and chooser.current == "torch" and chooser.interval == 8
    for _ in range(8):
        step(idle)
    assert picks[-8:] == ["torch"] * 8
    step(idle)
    assert picks[-1] == "numpy"  # numpy tried again after 8 layers


def test_adaptive_cpu_paths_give_the_brute_force_scores(monkeypatch) -> None:
    """With the chooser switching paths mid-run (numpy made to look cheap, then torch), every layer's scores still
    equal brute force, and the selected sums equal those of a fixed-path run."""
    if not scoring._HOST_NUMPY:
        pytest.skip("the chooser's default path is numpy")
    content, style = _big_pair()
    fixed_scores = None
    with monkeypatch.context() as m:
        m.setattr(scoring, "ADAPT", False)
        fixed_scores = compute_scores(content, style)
    used: list[str | None] = []
    real = scoring.stream_layer_score

    def spy(layer, k, **kw):
        used.append(kw.get("path"))
        out = real(layer, k, **kw)
        if kw.get("stats") is not None and kw.get("path") == "torch":
            kw["stats"][-1] *= 100  # torch looks slow: the chooser must move to numpy
        return out

    monkeypatch.setattr(scoring, "ADAPT_MIN_ELEMS", 1 << 14)
    monkeypatch.setattr(scoring, "stream_layer_score", spy)
    got = compute_scores(content, style)
    assert "torch" in used and "numpy" in used
    for s, f in zip(got.layers, fixed_scores.layers):
        assert s.id == f.id and s.k == f.k
        assert s.score_content == f.score_content and s.score_style == f.score_style  # the same selected values
        assert s.sum_abs_content == pytest.approx(f.sum_abs_content, rel=1e-6)
        want_c, want_s = brute(content.layers[s.id], s.k), brute(style.layers[s.id], s.k)
        assert s.score_content == pytest.approx(want_c[0], rel=2e-6)
        assert s.score_style == pytest.approx(want_s[0], rel=2e-6)
