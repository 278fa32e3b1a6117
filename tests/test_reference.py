"""Reference mode against a per-call simulation of the authors' code (HVision-NKU/K-LoRA klora.py, utils.py,
inference_sd.py, inference_flux.py), written from reading that code, not from klora_ext.plan / klora_ext.reference.

The simulation loads the files the way their ``get_lora_weights`` does (safetensors, sorted keys), computes their
average ratio, wraps the layers their loaders wrap, and runs a forward that calls the modules in the model's execution
order, bumping one global counter per K-LoRA call and deciding each call with their ``get_klora_weight`` arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from klora_ext import keys
from klora_ext.__main__ import main as cli_main
from klora_ext.args import KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.lora_file import read_lora
from klora_ext.plan import CONTENT, STYLE, Plan
from klora_ext.scoring import compute_scores

# ---- SDXL-shaped files in the authors' key style (diffusers 0.24 trainer: "unet.unet." prefix) -------------------

# (diffusers transformer path, width) in UNet execution order: down_blocks.1 (2 attentions x 2 blocks), down_blocks.2
# (2 x 10), mid_block (1 x 10), up_blocks.0 (3 x 10), up_blocks.1 (3 x 2) = 70 blocks x 2 attentions x 4 = 560 layers.
_SDXL_LEVELS = (("down_blocks.1", 2, 2, 8), ("down_blocks.2", 2, 10, 16), ("mid_block", 1, 10, 16))
_SDXL_LEVELS += (("up_blocks.0", 3, 10, 16), ("up_blocks.1", 3, 2, 8))
CTX = 12  # cross-attention context width (2048 in SDXL)
PROJS = ("to_q", "to_k", "to_v", "to_out.0")


def sdxl_blocks() -> list[tuple[str, int]]:
    return [
        (f"{level}.attentions.{a}.transformer_blocks.{t}", width)
        for level, n_att, n_tb, width in _SDXL_LEVELS
        for a in range(n_att)
        for t in range(n_tb)
    ]


def sdxl_attention_calls() -> list[tuple[str, int, int]]:
    """(module path, out, in) of every attention projection, in the order a UNet forward calls them."""
    out = []
    for block, width in sdxl_blocks():
        for attn, kv in (("attn1", width), ("attn2", CTX)):
            for proj in PROJS:
                fan_in = kv if proj in ("to_k", "to_v") else width
                out.append((f"{block}.{attn}.{proj}", width, fan_in))
    return out


def _factor(gen: torch.Generator, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * scale


def sdxl_state_dict(seed: int, rank: int, *, dtype=torch.float32, te_scale=1.0, ff_scale=1.0) -> dict:
    """Attention (560), FF (first 10 blocks) and both text encoders, with alpha keys of non-uniform value."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (path, fan_out, fan_in) in enumerate(sdxl_attention_calls()):
        key = f"unet.unet.{path}"
        sd[f"{key}.lora.down.weight"] = _factor(gen, (rank, fan_in))
        sd[f"{key}.lora.up.weight"] = _factor(gen, (fan_out, rank), 0.1)
        if i % 3 == 0:
            sd[f"{key}.alpha"] = torch.tensor(float(1 + i % 7))
    for block, width in sdxl_blocks()[:10]:
        for name, (o, n) in (("ff.net.0.proj", (8 * width, width)), ("ff.net.2", (width, 4 * width))):
            key = f"unet.unet.{block}.{name}"
            sd[f"{key}.lora.down.weight"] = _factor(gen, (rank, n))
            sd[f"{key}.lora.up.weight"] = _factor(gen, (o, rank), 0.1 * ff_scale)
    for te, layers, width in (("text_encoder", 12, 6), ("text_encoder_2", 32, 10)):
        for i in range(layers):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                key = f"{te}.text_model.encoder.layers.{i}.self_attn.{proj}.lora_linear_layer"
                sd[f"{key}.down.weight"] = _factor(gen, (rank, width))
                sd[f"{key}.up.weight"] = _factor(gen, (width, rank), 0.1 * te_scale)
    return {k: v.to(dtype) if v.dim() else v for k, v in sd.items()}


# ---- the authors' code, simulated --------------------------------------------------------------------------------


def load_like_authors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118


def authors_average_ratio(content: dict, style: dict) -> float:
    """get_ratio_between_content_and_style: non-alpha keys in their order, two at a time as (down, up)."""
    assert len(content) == len(style)
    names_c = [n for n in content if "alpha" not in n]
    names_s = [n for n in style if "alpha" not in n]
    results = []
    for i in range(0, len(names_c), 2):
        pc = content[names_c[i + 1]].to(torch.float32) @ content[names_c[i]].to(torch.float32)
        ps = style[names_s[i + 1]].to(torch.float32) @ style[names_s[i]].to(torch.float32)
        results.append(torch.abs(pc).sum().item() / torch.abs(ps).sum().item())
    average = sum(results) / len(results)
    results = [r for r in results if r < 3 * average]
    return sum(results) / len(results) if results else float("inf")


class AuthorsKLoraLayer:
    """KLoRALinearLayer's selection: topk sums of |up @ down| in the weights' dtype, the clock, the comparison."""

    def __init__(self, c_up, c_down, s_up, s_down, gamma, alpha, beta, n_total, pattern):
        self.w = (c_up, c_down, s_up, s_down)
        self.gamma, self.alpha, self.beta, self.n_total, self.pattern = gamma, alpha, beta, n_total, pattern
        self._sums = None

    def sums(self):
        # Recomputed on every call in their code; the result never changes, so it is kept after the first call.
        if self._sums is None:
            c_up, c_down, s_up, s_down = self.w
            k = c_up.shape[1] * s_up.shape[1]
            top1 = torch.topk(torch.abs(c_up @ c_down).flatten(), k)[0].sum()
            top2 = torch.topk(torch.abs(s_up @ s_down).flatten(), k)[0].sum()
            self._sums = (top1, top2)
        return self._sums

    def uses_content(self, count: int) -> bool:
        time_ratio = count % self.n_total
        top1, top2 = self.sums()
        scale = self.alpha * time_ratio / self.n_total + self.beta
        if self.pattern == "s*":
            scale = scale % self.alpha
        return bool((top1 / self.gamma) / (top2 * scale) > 1)


class AuthorsRun:
    """A pipeline with K-LoRA layers at some module paths; ``image`` runs a forward per step over ``executed``."""

    def __init__(self, wrapped: dict[str, AuthorsKLoraLayer], executed: list[str]) -> None:
        self.wrapped, self.executed = wrapped, executed
        self.count = 0  # their glo_count: module-global, never reset

    def image(self, steps: int) -> list[dict[str, bool]]:
        rows = []
        for _ in range(steps):
            row = {}
            for path in self.executed:
                layer = self.wrapped.get(path)
                if layer is not None:
                    self.count += 1
                    row[path] = layer.uses_content(self.count)
            rows.append(row)
        return rows


def authors_sd_run(content_path, style_path, alpha, beta, n_total, pattern) -> AuthorsRun:
    """insert_sd_klora_to_unet: every attention processor's to_q/to_k/to_v/to_out.0 gets a K-LoRA layer."""
    c, s = load_like_authors(content_path), load_like_authors(style_path)
    gamma = authors_average_ratio(c, s)
    wrapped = {}
    for path, _, _ in sdxl_attention_calls():
        key = "unet.unet." + path
        w = [t[key + part] for t in (c, s) for part in (".lora.up.weight", ".lora.down.weight")]
        wrapped[path] = AuthorsKLoraLayer(*w, gamma, alpha, beta, n_total, pattern)
    return AuthorsRun(wrapped, [p for p, _, _ in sdxl_attention_calls()])


# ---- comparing ---------------------------------------------------------------------------------------------------


def module_of(lora, layer_id: str) -> str:
    """The file's module path of a layer (from its down key), e.g. 'down_blocks.1...attn1.to_q'."""
    key = next(k for k in lora.layers[layer_id].source_keys if k.endswith((".lora.down.weight", ".lora_A.weight")))
    for prefix in ("unet.unet.", "transformer."):
        key = key.removeprefix(prefix)
    for suffix in (".lora.down.weight", ".lora_A.weight"):
        key = key.removesuffix(suffix)
    return key


def assert_same_cells(plan: Plan, content, expected: list[dict[str, bool]]) -> None:
    names = [module_of(content, i) for i in plan.layer_ids]
    assert names == list(expected[0]), "plan layers are not the authors' calls in their order"
    want = np.array([[CONTENT if row[n] else STYLE for n in names] for row in expected])
    assert plan.roles.shape == want.shape
    bad = np.argwhere(plan.roles != want)
    assert bad.size == 0, f"{len(bad)} cells differ, first (step, layer) {bad[0].tolist()}"


def write_pair(tmp_path: Path, sd_c: dict, sd_s: dict):
    pc, ps = tmp_path / "content.safetensors", tmp_path / "style.safetensors"
    save_file(sd_c, str(pc))
    save_file(sd_s, str(ps))
    return pc, ps


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """fp32 SDXL-shaped pair with FF, TE, alpha keys, one all-zero content layer and an outlier TE pair."""
    folder = tmp_path_factory.mktemp("sdxl")
    sd_c = sdxl_state_dict(1, 4, ff_scale=3.0)
    sd_s = sdxl_state_dict(2, 2)
    zero = sdxl_attention_calls()[7][0]  # attn2.to_out.0 of the first block
    sd_c[f"unet.unet.{zero}.lora.up.weight"].zero_()
    sd_c["text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_linear_layer.up.weight"] *= 400.0
    pc, ps = write_pair(folder, sd_c, sd_s)
    content, style = read_lora(pc), read_lora(ps)
    return pc, ps, content, style, compute_scores(content, style, reference=True)


def test_authors_key_style_is_read(sdxl_pair) -> None:
    _, _, content, _, _ = sdxl_pair
    assert content.arch == "sdxl" and not content.unknown_keys
    assert not [i for i in content.layers if i.startswith("other:")]
    attention = [i for i in content.layers if keys.is_attention(i)]
    assert len(attention) == 560
    assert sum(i.startswith("te1:") for i in content.layers) == 48
    assert sum(i.startswith("te2:") for i in content.layers) == 128
    assert "unet:input_blocks.4.1.transformer_blocks.0.attn1.to_q" in content.layers


@pytest.mark.parametrize(
    ("steps", "schedule", "beta"),
    [(12, "linear", 0.5), (12, "s*", 1.275), (50, "s*", 1.275), (7, "linear", 0.5)],
)
def test_sdxl_reference_clock_cell_for_cell(sdxl_pair, steps, schedule, beta) -> None:
    pc, ps, content, _, scores = sdxl_pair
    args = KLoraArgs(clock="reference", scope="attention", schedule=schedule, beta=beta)
    plan = Plan.build(scores, args, steps)
    sim = authors_sd_run(pc, ps, 1.5, beta, steps * 560, schedule)
    assert plan.exact and plan.counter_n == steps * 560
    assert plan.gamma == sim.wrapped[next(iter(sim.wrapped))].gamma  # bit for bit
    assert_same_cells(plan, content, sim.image(steps))
    assert 0.05 < (plan.roles == CONTENT).mean() < 0.95


def test_sdxl_literal_counter_runs_on_between_images(sdxl_pair) -> None:
    # Their N = 28000 is one 50-step image of 560 calls; at 30 steps the second image starts at 16800 of 28000.
    pc, ps, content, _, scores = sdxl_pair
    args = KLoraArgs(clock="reference-literal", scope="attention", schedule="s*", beta=1.275)
    sim = authors_sd_run(pc, ps, 1.5, 1.275, 28000, "s*")
    first, second = sim.image(30), sim.image(30)
    assert_same_cells(Plan.build(scores, args, 30), content, first)
    later = Plan.build(scores, args, 30, counter_start=30 * 560)
    assert later.counter_n == 28000 and later.counter_start == 16800
    assert_same_cells(later, content, second)
    assert not np.array_equal(Plan.build(scores, args, 30).roles, later.roles)
    # At their 50 steps the literal clock and the per-image clock are the same thing.
    fifty = Plan.build(scores, args, 50)
    assert np.array_equal(fifty.roles, Plan.build(scores, args.replace(clock="reference"), 50).roles)


def test_gamma_is_over_every_pair_of_the_file(sdxl_pair) -> None:
    # Hand check of the rule on the same numbers: FF and TE pairs in, the zero content layer as 0, the TE outlier out.
    pc, ps, _, _, scores = sdxl_pair
    c, s = load_like_authors(pc), load_like_authors(ps)
    ratios = []
    for name in sorted(k for k in c if k.endswith(("down.weight",))):
        up = name.replace("down.weight", "up.weight")
        rc = (c[up] @ c[name]).abs().sum().item()
        rs = (s[up] @ s[name]).abs().sum().item()
        ratios.append(rc / rs)
    assert len(ratios) == 560 + 20 + 176 == scores.reference.pairs
    assert 0.0 in ratios
    mean = sum(ratios) / len(ratios)
    assert max(ratios) >= 3 * mean  # the boosted TE pair is an outlier
    kept = [r for r in ratios if r < 3 * mean]
    assert scores.reference.gamma == pytest.approx(sum(kept) / len(kept), rel=1e-12)
    attention_only = [r for r, n in zip(ratios, sorted(k for k in c if k.endswith("down.weight"))) if ".attn" in n]
    assert abs(scores.reference.gamma - sum(attention_only) / len(attention_only)) > 0.01


def test_zero_content_layer_always_style(sdxl_pair) -> None:
    _, _, content, _, scores = sdxl_pair
    plan = Plan.build(scores, KLoraArgs(clock="reference", scope="attention"), 12)
    zero = next(i for i in plan.layer_ids if module_of(content, i) == sdxl_attention_calls()[7][0])
    assert (plan.roles[:, plan.layer_ids.index(zero)] == STYLE).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_cell_for_cell(tmp_path, dtype) -> None:
    sd_c, sd_s = sdxl_state_dict(5, 4, dtype=dtype), sdxl_state_dict(6, 3, dtype=dtype)
    pc, ps = write_pair(tmp_path, sd_c, sd_s)
    content, style = read_lora(pc), read_lora(ps)
    scores = compute_scores(content, style, reference=True)
    assert set(scores.reference.dtype_content) == {str(dtype).removeprefix("torch.")}
    plan = Plan.build(scores, KLoraArgs(clock="reference", scope="attention"), 9)
    assert_same_cells(plan, content, authors_sd_run(pc, ps, 1.5, 0.5, 9 * 560, "linear").image(9))


def test_exact_ties_fall_to_style_as_in_their_code(tmp_path) -> None:
    # Same factors, different alpha: the raw products tie exactly (gamma = 1), so the calls where scale == 1 give
    # ratio 1 -> not > 1 -> style. N = 3 x 560 makes counter N/3 land on scale 1.5/3 + 0.5 = 1 exactly.
    sd_c = sdxl_state_dict(9, 4)
    sd_s = {k: v.clone() for k, v in sd_c.items()}
    for k in sd_s:
        if k.endswith(".alpha"):
            sd_s[k] = sd_s[k] * 0.3 + 0.7
    pc, ps = write_pair(tmp_path, sd_c, sd_s)
    content, style = read_lora(pc), read_lora(ps)
    scores = compute_scores(content, style, reference=True)
    assert scores.reference.gamma == 1.0
    plan = Plan.build(scores, KLoraArgs(clock="reference", scope="attention"), 3)
    sim = authors_sd_run(pc, ps, 1.5, 0.5, 3 * 560, "linear")
    assert_same_cells(plan, content, sim.image(3))
    tie_step, tie_layer = divmod(560 - 1, 560)  # counter 560 = N/3
    assert plan.roles[tie_step, tie_layer] == STYLE and plan.roles[tie_step, tie_layer - 1] == CONTENT


def test_zero_style_layer_gives_a_clear_message(tmp_path) -> None:
    sd_c, sd_s = sdxl_state_dict(3, 2), sdxl_state_dict(4, 2)
    sd_s["text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer.up.weight"].zero_()
    pc, ps = write_pair(tmp_path, sd_c, sd_s)
    scores = compute_scores(read_lora(pc), read_lora(ps), reference=True)
    with pytest.raises(KLoraError, match=r"\[K-LoRA\] reference gamma: style LoRA 'style' is all zeros at .*k_proj"):
        Plan.build(scores, KLoraArgs(clock="reference", scope="attention"), 10)
    manual = Plan.build(scores, KLoraArgs(clock="reference", gamma_mode="manual", gamma=2.0), 10)
    assert manual.exact and manual.gamma == 2.0


# ---- Flux in the authors' format (494 layers, diffusers names, PEFT lora_A/lora_B) ---------------------------------

H = 8
_DOUBLE = {
    "attn.to_q": (H, H),
    "attn.to_k": (H, H),
    "attn.to_v": (H, H),
    "attn.add_q_proj": (H, H),
    "attn.add_k_proj": (H, H),
    "attn.add_v_proj": (H, H),
    "attn.to_out.0": (H, H),
    "attn.to_add_out": (H, H),
    "norm1.linear": (6 * H, H),
    "norm1_context.linear": (6 * H, H),
    "ff.net.0.proj": (4 * H, H),
    "ff.net.2": (H, 4 * H),
    "ff_context.net.0.proj": (4 * H, H),
    "ff_context.net.2": (H, 4 * H),
}
_SINGLE = {
    "attn.to_q": (H, H),
    "attn.to_k": (H, H),
    "attn.to_v": (H, H),
    "proj_mlp": (4 * H, H),
    "proj_out": (H, 5 * H),
    "norm.linear": (3 * H, H),
}


def flux_state_dict(seed: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for blocks, n, table in (("transformer_blocks", 19, _DOUBLE), ("single_transformer_blocks", 38, _SINGLE)):
        for i in range(n):
            for name, (o, fan_in) in table.items():
                key = f"transformer.{blocks}.{i}.{name}"
                sd[f"{key}.lora_A.weight"] = _factor(gen, (rank, fan_in)).to(torch.bfloat16)
                sd[f"{key}.lora_B.weight"] = _factor(gen, (o, rank), 0.1).to(torch.bfloat16)
    return sd


def authors_flux_run(content_path, style_path, alpha, beta) -> AuthorsRun:
    """insert_community_flux_lora_to_unet (494-layer branch) as read: where each new K-LoRA module ends up, and
    the diffusers Flux forward, which decides which of them ever run."""
    c, s = load_like_authors(content_path), load_like_authors(style_path)
    gamma = authors_average_ratio(c, s)
    assert len(c) // 2 == 494
    n_total = 11704  # hard-coded in that branch
    wrapped: dict[str, AuthorsKLoraLayer] = {}

    def assign(prefix: str, parent: str, subs: list[str]) -> None:
        # copy_and_assign_klora_weights: setattr(parent, sub, new). With sub "" the parent is the Linear itself,
        # so the new module becomes an attribute named "" of it: the forward keeps calling the plain Linear.
        for sub in subs:
            parts = (".lora_B.weight", ".lora_A.weight")  # (up, down) as their weight_1_a, weight_1_b
            w = [t[f"transformer.{prefix}{sub}{part}"] for t in (c, s) for part in parts]
            at = f"{parent}.{sub}" if sub else f"{parent}.<attribute ''>"
            wrapped[at] = AuthorsKLoraLayer(*w, gamma, alpha, beta, n_total, "s*")

    for i in range(38):
        p = f"single_transformer_blocks.{i}"
        assign(f"{p}.", p, ["proj_mlp", "proj_out"])
        assign(f"{p}.attn.", f"{p}.attn", ["to_q", "to_k", "to_v"])
        assign(f"{p}.norm.", f"{p}.norm", ["linear"])
    for i in range(19):
        p = f"transformer_blocks.{i}"
        subs = ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "to_k", "to_q", "to_v"]
        assign(f"{p}.attn.", f"{p}.attn", subs)
        assign(f"{p}.attn.to_out.0", f"{p}.attn.to_out.0", [""])
        assign(f"{p}.norm1.", f"{p}.norm1", ["linear"])
        assign(f"{p}.norm1.", f"{p}.norm1", ["linear"])  # their "norm1_context" step wraps norm1 again
        assign(f"{p}.ff.net.0.", f"{p}.ff.net.0", ["proj"])
        assign(f"{p}.ff.net.2", f"{p}.ff.net.2", [""])
        assign(f"{p}.ff_context.net.0.", f"{p}.ff_context.net.0", ["proj"])
        assign(f"{p}.ff_context.net.2", f"{p}.ff_context.net.2", [""])
    executed = []
    for i in range(19):  # FluxTransformerBlock: norm1, norm1_context, attention processor, ff, ff_context
        p = f"transformer_blocks.{i}"
        executed += [f"{p}.norm1.linear", f"{p}.norm1_context.linear"]
        executed += [f"{p}.attn.{n}" for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
        executed += [f"{p}.attn.to_out.0", f"{p}.attn.to_add_out"]
        executed += [f"{p}.ff.net.0.proj", f"{p}.ff.net.2", f"{p}.ff_context.net.0.proj", f"{p}.ff_context.net.2"]
    for i in range(38):  # FluxSingleTransformerBlock: norm, proj_mlp, attention (q, k, v), proj_out
        p = f"single_transformer_blocks.{i}"
        executed += [f"{p}.norm.linear", f"{p}.proj_mlp", f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v"]
        executed += [f"{p}.proj_out"]
    return AuthorsRun(wrapped, executed)


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    pc, ps = write_pair(folder, flux_state_dict(11, 4), flux_state_dict(12, 2))
    content, style = read_lora(pc), read_lora(ps)
    return pc, ps, content, style, compute_scores(content, style, reference=True)


def test_flux_authors_format_is_read(flux_pair) -> None:
    _, _, content, _, scores = flux_pair
    assert content.arch == "flux" and len(content.layers) == 494 and not content.unknown_keys
    assert len(scores.reference.layer_ids) == 418


@pytest.mark.parametrize("steps", [28, 5])
def test_flux_reference_cell_for_cell(flux_pair, steps) -> None:
    # The Flux script never passes its pattern: always s*, alpha 1.5, beta 1.5 * 0.85; N = 11704 = 28 x 418.
    pc, ps, content, _, scores = flux_pair
    sim = authors_flux_run(pc, ps, 1.5, 1.5 * 0.85)
    rows = sim.image(steps)
    assert all(len(row) == 418 for row in rows)
    args = KLoraArgs(clock="reference-literal", schedule="s*", beta=1.5 * 0.85, scope="attention")
    plan = Plan.build(scores, args, steps)
    assert plan.counter_n == 11704 and plan.exact
    assert_same_cells(plan, content, rows)
    if steps == 28:  # at their 28 steps the per-image clock is the literal one
        same = Plan.build(scores, args.replace(clock="reference"), 28)
        assert np.array_equal(same.roles, plan.roles)


def test_cli_shows_the_reference_mode(sdxl_pair, flux_pair, capsys) -> None:
    for pc, ps, *_ in (sdxl_pair, flux_pair):
        code = cli_main(["plan", str(pc), str(ps), "--clock", "reference", "--scope", "attention", "--steps", "28"])
        out = capsys.readouterr().out
        assert code == 0
        assert "reference mode: the authors' selection, call for call" in out
    assert "N = 11704 calls, 418 layer calls per step" in out
