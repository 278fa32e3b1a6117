"""Top-K scores per shared layer and the balance factor gamma (paper Eq. 5, 9; reference code's average ratio)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from klora_ext import keys
from klora_ext.errors import KLoraError
from klora_ext.log import logger

if TYPE_CHECKING:
    from klora_ext.lora_file import LoraFile, LoraLayer
    from klora_ext.reference import ReferenceScores

# Bump when the numbers a cache entry holds would change for the same files.
SCORE_VERSION = 1

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LayerScore:
    id: str
    score_content: float  # S_c: sum of the K largest |dW_c| (per unit strength, alpha/rank applied)
    score_style: float
    sum_abs_content: float  # sum |dW_c| over the whole layer (for gamma)
    sum_abs_style: float
    rank_content: int
    rank_style: int
    k: int


@dataclass(frozen=True)
class PairScores:
    layers: tuple[LayerScore, ...]  # shared layers, in forward order
    content_only: tuple[str, ...] = ()
    style_only: tuple[str, ...] = ()
    k_multiplier: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    # The authors' numbers for the reference clocks (compute_scores(..., reference=True)); None otherwise.
    reference: ReferenceScores | None = None

    def by_id(self) -> dict[str, LayerScore]:
        return {s.id: s for s in self.layers}

    def in_scope(self, scope: str) -> tuple[LayerScore, ...]:
        """Layers K-LoRA switches: UNet/Flux layers both LoRAs patch; `attention` keeps only to_q/k/v/out.0."""
        switchable = [s for s in self.layers if not s.id.startswith(("te1:", "te2:", "t5:"))]
        if scope == "attention":
            switchable = [s for s in switchable if keys.is_attention(s.id)]
        return tuple(switchable)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCORE_VERSION,
            "k_multiplier": self.k_multiplier,
            "layers": [asdict(s) for s in self.layers],
            "content_only": list(self.content_only),
            "style_only": list(self.style_only),
            "meta": self.meta,
            "reference": self.reference.to_json() if self.reference is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairScores:
        return cls(
            layers=tuple(LayerScore(**d) for d in data["layers"]),
            content_only=tuple(data.get("content_only", ())),
            style_only=tuple(data.get("style_only", ())),
            k_multiplier=float(data.get("k_multiplier", 1.0)),
            meta=dict(data.get("meta", {})),
            reference=_reference_from_json(data.get("reference")),
        )


def _reference_from_json(data: dict[str, Any] | None) -> ReferenceScores | None:
    if not data:
        return None
    from klora_ext.reference import ReferenceScores

    return ReferenceScores.from_json(data)


def top_k(rank_content: int, rank_style: int, numel: int, k_multiplier: float = 1.0) -> int:
    """K = r_c * r_s (paper Sec. 3.2) times the user's multiplier, clamped to [1, numel]."""
    k = round(rank_content * rank_style * k_multiplier)
    return max(1, min(int(k), numel))


def top_k_sum(values: torch.Tensor, k: int) -> float:
    """Exact sum of the k largest entries of a 1-D tensor.

    A strided sample's k-th largest value t has at least k entries >= t in the full tensor, so the k largest all
    lie in {x >= t}: top-k then runs on that small subset (about 8x faster than a full top-k on 10M entries).
    """
    n = values.numel()
    stride = min(64, n // (8 * k))
    if stride > 1:
        threshold = torch.topk(values[::stride], k, sorted=False).values.min()
        subset = values[values >= threshold]
        if subset.numel() >= k:  # fewer only with NaNs; the caller reports those
            values = subset
    return float(torch.topk(values, k, sorted=False).values.double().sum())


def layer_score(delta: torch.Tensor, k: int) -> tuple[float, float]:
    """(sum of the k largest |delta|, sum |delta|)."""
    flat = delta.detach().reshape(-1).abs()
    return top_k_sum(flat, k), float(flat.sum())


# ---- streamed scoring ------------------------------------------------------------------------------------------
# A layer's delta is produced in row blocks of a few MiB; each block is made absolute in place, summed,
# and reduced to tile maxima (16 rows x 1 column). Only tiles whose maximum beats a running threshold t (the k-th
# largest value of some k elements already seen) are kept as top-k candidates, so no full-size delta or abs copy is
# ever allocated and the selection is exact (see _Selector).
# 8 MiB of fp32 per block: big enough that torch's intra-op thread barriers (several per block) cost little even
# when the cores are shared (128K-element blocks with 2 threads ran 10-30x slower under load), far below a big layer
BLOCK_ELEMS_CPU = 1 << 21
BLOCK_ELEMS_CUDA = 1 << 24  # few launches per layer; 64 MiB per block
TILE_ROWS = 16
_GPU_MIN_FREE = 512 * 2**20  # free memory needed to score on the GPU: a few blocks plus one layer's factors
_HOST_NUMPY = True  # CPU fp32 blocks: block passes in numpy (_host_block) by default; False: the torch path CUDA uses
# Layers of at least this many elements may take either CPU path, whichever is faster now (_CpuPathChooser); below
# it the per-op overhead dominates and the numpy path (no thread-pool barrier) is always used.
ADAPT_MIN_ELEMS = 1 << 18
_ADAPT_MAX_INTERVAL = 64  # layers between tries of the other path at most: a load that comes and goes is followed
ADAPT = True  # False: always the default path above (fixed results whatever the machine's load)
_MERGE_SLACK = 1 << 12  # pending candidates beyond k before they are merged down to k


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _product_rows(a: torch.Tensor, b: torch.Tensor) -> Callable[[int, int, torch.Tensor], None]:
    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        torch.matmul(a[start:stop], b, out=out)

    return fill


def _half_factors(wa: torch.Tensor, wb: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A @ B == one LoHa/LoKr half flattened to (out, -1); the CP form folds t into B."""
    if t is None:
        return _mat(wa), _mat(wb)
    # t (R, R', kh, kw), wa (R, out), wb (R', in): half[o, n, k, l] = sum_i wa[i, o] * sum_j t[i, j, k, l] wb[j, n]
    return _mat(wa).t(), torch.einsum("ijkl,jn->inkl", t, _mat(wb)).reshape(t.shape[0], -1)


def _convert(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype, numpy_path: bool) -> torch.Tensor:
    on_host = t.device.type == "cpu" and torch.device(device).type == "cpu"
    if numpy_path and on_host and dtype == torch.float32 and t.dtype in (torch.float16, torch.float32, torch.float64):
        # numpy converts on this thread; torch's .to would use its thread pool (see _host_block)
        return torch.from_numpy(t.detach().numpy().astype(np.float32))
    return t.to(device=device, dtype=dtype)


def _row_source(layer: LoraLayer, device: str | torch.device, dtype: torch.dtype, numpy_path: bool = True):
    """(rows, cols, fill) where fill(start, stop, out) writes rows [start, stop) of the unscaled delta, flattened to
    (out, in*kh*kw), into ``out``. Factor-sized intermediates only (never delta-sized)."""
    f = {name: _convert(t, device, dtype, numpy_path) for name, t in layer.factors.items()}
    rows, cols = layer.shape[0], math.prod(layer.shape[1:])
    if layer.kind in ("lora", "locon"):
        up, down = _mat(f["up"]), _mat(f["down"])
        if "mid" in f:  # CP: delta[i, j, k, l] = sum_n up[i, n] * sum_m mid[n, m, k, l] down[m, j]
            down = torch.einsum("nmkl,mj->njkl", f["mid"], down).reshape(up.shape[1], -1)
        return rows, cols, _product_rows(up, down)
    if layer.kind == "loha":
        a1, b1 = _half_factors(f["hada_w1_a"], f["hada_w1_b"], f.get("hada_t1"))
        a2, b2 = _half_factors(f["hada_w2_a"], f["hada_w2_b"], f.get("hada_t2"))

        def fill_loha(start: int, stop: int, out: torch.Tensor) -> None:
            torch.matmul(a1[start:stop], b1, out=out)
            out.mul_(a2[start:stop] @ b2)

        return rows, cols, fill_loha
    if layer.kind == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else _mat(f["lokr_w1_a"]) @ _mat(f["lokr_w1_b"])
        if "lokr_w2" in f:
            w2 = _mat(f["lokr_w2"])
        else:
            a2, b2 = _half_factors(f["lokr_w2_a"], f["lokr_w2_b"], f.get("lokr_t2"))
            w2 = a2 @ b2
        b = w2.shape[0]

        def fill_lokr(start: int, stop: int, out: torch.Tensor) -> None:
            # kron rows: delta[i1*b + i2, j1*D + j2] = w1[i1, j1] * w2[i2, j2] (the same single product as torch.kron)
            index = torch.arange(start, stop, device=w1.device)
            lhs = w1[index // b].unsqueeze(2)
            torch.mul(lhs, w2[index % b].unsqueeze(1), out=out.view(stop - start, w1.shape[1], w2.shape[1]))

        return rows, cols, fill_lokr
    if layer.kind not in ("full", "norm", "bias"):
        raise KLoraError(f"[K-LoRA] layer {layer.id}: cannot score a {layer.kind!r} layer")
    diff = _mat(f["diff"])

    def fill_full(start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(diff[start:stop])

    return rows, cols, fill_full


def _row_blocks(rows: int, cols: int, block_elems: int) -> list[tuple[int, int]]:
    """Row ranges: full blocks of a multiple of TILE_ROWS rows, then at most one shorter multiple, then < 16 rows."""
    step = max(TILE_ROWS, block_elems // max(cols, 1) // TILE_ROWS * TILE_ROWS)
    out, start = [], 0
    while rows - start >= TILE_ROWS:
        stop = start + min(step, (rows - start) // TILE_ROWS * TILE_ROWS)
        out.append((start, stop))
        start = stop
    if start < rows:
        out.append((start, rows))
    return out


def _first_threshold(tile_max: torch.Tensor, k: int) -> float:
    """A threshold t with at least k tile maxima >= t (so at least k elements >= t), close to the k-th largest.

    An exact top-k over all tile maxima costs as much as the product of a small layer. A strided sample's j-th
    largest, with j chosen so that about 1.5 k maxima of the whole are expected above it, is used instead when a
    count confirms that at least k are >= it; otherwise (skewed data) the exact k-th largest.
    """
    n = tile_max.numel()
    stride = n // (4 * k) | 1  # odd: does not keep hitting the same columns of a row-major grid
    if stride > 1:
        sample = tile_max[::stride]
        j = min(sample.numel(), -(-3 * k // (2 * stride)))
        t = torch.topk(sample, j, sorted=False).values.min()
        if int((tile_max >= t).sum()) >= k:
            return float(t)
    # k tiles whose maxima are >= the k-th largest maximum: at least k elements >= it
    return float(torch.topk(tile_max, k, sorted=False).values.min())


def _first_threshold_np(tile_max: np.ndarray, k: int) -> float:
    """_first_threshold on a numpy array (the CPU path)."""
    n = tile_max.size
    stride = n // (4 * k) | 1
    if stride > 1:
        sample = tile_max[::stride]
        j = min(sample.size, -(-3 * k // (2 * stride)))
        t = float(np.partition(sample, sample.size - j)[sample.size - j])
        if np.count_nonzero(tile_max >= t) >= k:
            return t
    return float(np.partition(tile_max, n - k)[n - k])


class _Selector:
    """Exact sum of the k largest of a stream of non-negative blocks, keeping only candidates above a threshold.

    Invariant: ``t`` is None (no threshold yet) or at least k elements seen are >= t, and every element seen that
    is > t is among the candidates. The k largest are then the candidates > t plus, if fewer than k, copies of t.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.t: float | None = None
        self.parts: list[torch.Tensor] = []
        self.pending = 0

    def add(self, block: torch.Tensor, tile_max: torch.Tensor, tiles: torch.Tensor, last: bool = False) -> None:
        """block: absolute values; tile_max (S, C): the maximum of each tile tiles[s, :, c]. ``last``: no block
        follows (the early merge, which only helps later blocks, is left to ``total``)."""
        first = self.t is None
        if first:
            if tile_max.numel() < self.k:
                self._push(block.reshape(-1).clone())
                return
            self.t = _first_threshold(tile_max.reshape(-1), self.k)
        if not float(tile_max.max()) > self.t:
            return
        s, c = torch.nonzero(tile_max > self.t, as_tuple=True)
        self._push(tiles[s, :, c].reshape(-1), merge=first and not last)

    def _push(self, values: torch.Tensor, *, merge: bool = False) -> None:
        self.parts.append(values)
        self.pending += values.numel()
        # merge early: a higher threshold means fewer tiles hit in later blocks
        if merge or self.pending > self.k + _MERGE_SLACK:
            self._merge()

    def _candidates(self) -> torch.Tensor:
        pool = torch.cat(self.parts) if len(self.parts) != 1 else self.parts[0]
        return pool if self.t is None else pool[pool > self.t]

    def _merge(self) -> None:
        pool = self._candidates()
        if pool.numel() > self.k:
            pool = torch.topk(pool, self.k, sorted=False).values
            self.t = float(pool.min())  # >= the old t: every value in the pool was above it
        self.parts, self.pending = [pool], pool.numel()

    def total(self, scale: float = 1.0) -> float:
        """The sum, in fp64, of the k largest values each multiplied by ``scale`` in the stream's own dtype."""
        pool = self._candidates() if self.parts else torch.empty(0)
        if pool.numel() >= self.k:
            pool = torch.topk(pool, self.k, sorted=False).values
        if scale != 1.0:
            pool = pool * scale
        out = float(pool.double().sum())
        if pool.numel() < self.k:
            # fewer candidates than k above t: the rest of the k largest all equal t (t is set: k <= elements seen)
            t = torch.tensor(self.t if self.t is not None else 0.0, dtype=pool.dtype) * scale
            out += (self.k - pool.numel()) * float(t)
        return out


class _HostSelector(_Selector):
    """_Selector on numpy arrays (the CPU path): the same invariant and exact result, no torch op at all."""

    def add(  # type: ignore[override]
        self, block: np.ndarray, tile_max: np.ndarray, tiles: np.ndarray, last: bool = False
    ) -> None:
        first = self.t is None
        if first:
            if tile_max.size < self.k:
                self._push(block.reshape(-1).copy())
                return
            self.t = _first_threshold_np(tile_max.reshape(-1), self.k)
        if not tile_max.max() > self.t:
            return
        s, c = np.nonzero(tile_max > self.t)
        values = tiles[s, :, c].reshape(-1)
        self._push(values[values > self.t], merge=first and not last)  # values <= t are never needed

    def _push(self, values: np.ndarray, *, merge: bool = False) -> None:  # type: ignore[override]
        self.parts.append(values)
        self.pending += values.size
        if merge or self.pending > self.k + _MERGE_SLACK:
            self._merge()

    def _candidates(self) -> np.ndarray:  # type: ignore[override]
        pool = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
        return pool if self.t is None else pool[pool > self.t]

    def _merge(self) -> None:
        pool = self._candidates()
        if pool.size > self.k:
            pool = np.partition(pool, pool.size - self.k)[pool.size - self.k :]
            self.t = float(pool.min())  # >= the old t: every value in the pool was above it
        self.parts, self.pending = [pool], pool.size

    def total(self, scale: float = 1.0) -> float:
        pool = self._candidates() if self.parts else np.empty(0, np.float32)
        if pool.size >= self.k:
            pool = np.partition(pool, pool.size - self.k)[pool.size - self.k :]
        dtype = pool.dtype.type
        if scale != 1.0:
            pool = pool * dtype(scale)  # in the stream's dtype, like the torch path
        out = float(pool.astype(np.float64).sum())
        if pool.size < self.k:
            out += (self.k - pool.size) * float(dtype(self.t if self.t is not None else 0.0) * dtype(scale))
        return out


def stream_layer_score(
    layer: LoraLayer,
    k: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    apply_scale: bool = True,
    block_elems: int | None = None,
    path: str | None = None,
    stats: list[float] | None = None,
) -> tuple[float, float]:
    """(sum of the k largest |delta|, sum |delta|) of one layer without allocating its full delta.

    The delta is built in row blocks of about ``block_elems`` elements (default: BLOCK_ELEMS_CPU / _CUDA) in
    ``dtype`` (None: the file's own factor dtype). The layer's scale (alpha/rank or ``scale`` key) is applied to the
    few selected values and to the sum, not to every element: |x * s| rounds like |x| * |s|, so the top-k values are
    the same numbers as those of the scaled dense delta. ``apply_scale=False`` scores the raw factor product.
    Non-finite input gives a non-finite result (the caller reports it). ``path`` ("numpy" / "torch"): the CPU fp32
    block passes (default: ``_HOST_NUMPY``); the selected values are the same on both, sums differ only by fp32
    summation order. ``stats``: the seconds spent outside the products are appended to it.
    """
    started = time.perf_counter()
    in_fill = 0.0
    dtype = dtype or next(iter(layer.factors.values())).dtype
    scale = abs(layer.scale) if apply_scale else 1.0
    with torch.no_grad():
        numpy_path = _HOST_NUMPY if path is None else path == "numpy"
        rows, cols, fill = _row_source(layer, device, dtype, numpy_path)
        numel = rows * cols
        k = max(1, min(int(k), numel))
        if block_elems is None:
            block_elems = BLOCK_ELEMS_CUDA if torch.device(device).type == "cuda" else BLOCK_ELEMS_CPU
        ranges = _row_blocks(rows, cols, block_elems)
        buf = torch.empty((ranges[0][1] - ranges[0][0]) * cols, device=device, dtype=dtype)
        # k close to numel: select the (numel - k) smallest instead and subtract them from the total (bounded memory)
        complement = 2 * k > numel
        host = numpy_path and torch.device(device).type == "cpu" and dtype == torch.float32
        n_select = numel - k if complement else k
        select = (_HostSelector if host else _Selector)(n_select) if n_select > 0 else None
        sums: list[Any] = []  # fp32 sums per block: floats (numpy path) or 0-d tensors
        for index, (start, stop) in enumerate(ranges):
            last = index == len(ranges) - 1
            n_rows = stop - start
            block = buf[: n_rows * cols].view(n_rows, cols)
            t0 = time.perf_counter()
            fill(start, stop, block)
            in_fill += time.perf_counter() - t0
            if host:
                sums.append(_host_block(block.numpy(), select, complement, last))
                continue
            block.abs_()
            sums.append(block.sum(dtype=torch.float32))  # fp32 per block (a double sum would copy it), fp64 across
            if select is None:
                continue
            g = TILE_ROWS if n_rows % TILE_ROWS == 0 else n_rows
            tiles = block.view(n_rows // g, g, cols)
            if complement:
                neg = tiles.neg()  # the largest of -|x| are the smallest |x|
                select.add(neg, neg.amax(1), neg, last=last)
            else:
                select.add(block, tiles.amax(1), tiles, last=last)
        total = math.fsum(sums) if host else float(torch.stack(sums).double().sum())
        if select is None:
            top = total * scale
        elif complement:
            top = (total + select.total()) * scale  # total - (sum of the numel - k smallest)
        else:
            top = select.total(scale)
    if stats is not None:
        stats.append(time.perf_counter() - started - in_fill)
    return top, total * scale


def _host_block(block: np.ndarray, select: _HostSelector | None, complement: bool, last: bool = False) -> float:
    """One CPU block: |.| in place, its fp32 sum, tile maxima and candidates, all in numpy on the calling thread.

    numpy runs these passes single-threaded: no thread-pool barriers, which cost torch ~2 ms each when the cores are
    shared (several per block: SDXL scoring went from ~5 s to ~45 s under load), and no change to torch's
    process-wide thread count. The product itself (``fill``) stays a torch matmul on torch's threads.
    """
    np.abs(block, out=block)
    total = float(block.sum(dtype=np.float32))
    if select is not None:
        n_rows, cols = block.shape
        g = TILE_ROWS if n_rows % TILE_ROWS == 0 else n_rows
        if complement:
            neg = np.negative(block)  # the largest of -|x| are the smallest |x|
            tiles = neg.reshape(n_rows // g, g, cols)
            select.add(neg, tiles.max(axis=1), tiles, last=last)
        else:
            tiles = block.reshape(n_rows // g, g, cols)
            select.add(block, tiles.max(axis=1), tiles, last=last)
    return total


def compute_scores(
    content: LoraFile,
    style: LoraFile,
    *,
    k_multiplier: float = 1.0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    reference: bool = False,
) -> PairScores:
    """Score every layer both files patch. One layer's dense deltas exist at a time (bounded memory); fp32 math.
    ``reference``: also compute the authors' numbers for the reference clocks (PairScores.reference)."""
    shared = sorted(set(content.layers) & set(style.layers), key=keys.forward_order_key)
    if not shared:
        msg = (
            f"[K-LoRA] '{content.name}' and '{style.name}' patch no common layer (detected: {content.arch}, "
            f"{style.arch}): K-LoRA needs two LoRAs that train the same layers of the same base model"
        )
        raise KLoraError(msg)
    jobs = []
    for layer_id in shared:
        lc, ls = content.layers[layer_id], style.layers[layer_id]
        if tuple(lc.shape) != tuple(ls.shape):
            msg = (
                f"[K-LoRA] layer {layer_id}: '{content.name}' has shape {tuple(lc.shape)} but '{style.name}' "
                f"has {tuple(ls.shape)}; the two LoRAs were trained for different models"
            )
            raise KLoraError(msg)
        jobs.append((layer_id, top_k(lc.rank, ls.rank, math.prod(lc.shape), k_multiplier)))
    results = _score_jobs(content, style, jobs, pick_score_device(device), progress)
    scores = [
        LayerScore(layer_id, sc, ss, ac, as_, content.layers[layer_id].rank, style.layers[layer_id].rank, k)
        for (layer_id, k), (sc, ac, ss, as_) in zip(jobs, results)
    ]
    if progress is not None:
        progress(len(shared), len(shared), "")
    _check_not_all_zero(content, [s.sum_abs_content for s in scores])
    _check_not_all_zero(style, [s.sum_abs_style for s in scores])
    pair = PairScores(
        layers=tuple(scores),
        content_only=tuple(sorted(set(content.layers) - set(style.layers), key=keys.forward_order_key)),
        style_only=tuple(sorted(set(style.layers) - set(content.layers), key=keys.forward_order_key)),
        k_multiplier=k_multiplier,
        meta={"content": content.name, "style": style.name},
    )
    if reference:
        from klora_ext.reference import reference_scores

        pair = replace(pair, reference=reference_scores(content, style, device))
    return pair


def pick_score_device(device: str | torch.device | None) -> str:
    """Where to score: the host's compute device when it is a CUDA device with room for a few blocks, else the CPU.
    Only one layer's factors and a block or two are ever on the device, never a whole LoRA."""
    dev = torch.device(device or "cpu")
    if dev.type != "cuda":
        return str(dev)
    if not torch.cuda.is_available():
        logger.info("no CUDA device available: scoring on the CPU")
        return "cpu"
    try:
        free, _total = torch.cuda.mem_get_info(dev)
    except RuntimeError as exc:
        logger.info("cannot query free memory on %s (%s): scoring on the CPU", dev, exc)
        return "cpu"
    if free < _GPU_MIN_FREE:
        logger.info("only %d MiB free on %s: scoring on the CPU", free >> 20, dev)
        return "cpu"
    return str(dev)


def _offset(progress: ProgressFn | None, start: int, total: int) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda i, _n, layer_id: progress(start + i, total, layer_id)


def _score_jobs(
    content: LoraFile,
    style: LoraFile,
    jobs: list[tuple[str, int]],
    device: str,
    progress: ProgressFn | None,
) -> list[tuple[float, float, float, float]]:
    """(S_c, sum|dW_c|, S_s, sum|dW_s|) per (layer id, K), in order, one layer at a time on the calling thread.

    On the CPU the products use torch's own intra-op threads as configured; the thread count is never changed (it
    is process-wide, and a generation may be running in another thread). The element passes take the faster CPU
    path of the moment (_CpuPathChooser). On CUDA, running out of memory sends the remaining layers to the CPU.
    """
    out: list[tuple[float, float, float, float]] = []
    chooser = _CpuPathChooser() if ADAPT and torch.device(device).type == "cpu" else None
    for index, (layer_id, k) in enumerate(jobs):
        if progress is not None:
            progress(index, len(jobs), layer_id)
        try:
            sc, ac = _checked_score(content, layer_id, k, device, chooser)
            ss, as_ = _checked_score(style, layer_id, k, device, chooser)
        except torch.cuda.OutOfMemoryError:
            logger.warning("out of memory on %s at layer %s: scoring the rest on the CPU", device, layer_id)
            torch.cuda.empty_cache()
            return out + _score_jobs(content, style, jobs[index:], "cpu", _offset(progress, index, len(jobs)))
        out.append((sc, ac, ss, as_))
    return out


class _CpuPathChooser:
    """Which CPU path runs the element passes (|.|, sum, tile maxima, candidates) of the big layers faster right now:
    torch's ops (each on torch's intra-op threads: the fastest on an otherwise idle machine, about 1.2x the bare
    products on SDXL) or numpy's (one thread, no thread-pool barrier: several times faster when other processes hold
    the cores, where every torch op waits for its slowest thread). Measured on the layers being scored (seconds per
    element outside the products; each path's first layer is not counted: thread pools start and buffers are first
    touched there); the path not in use is tried again after 8, 16, 32, 64, 64, ... layers."""

    def __init__(self) -> None:
        self.cost: dict[str, float | None] = {"torch": None, "numpy": None}
        self.seen = {"torch": 0, "numpy": 0}
        self.current = "torch"
        self.interval = 8
        self.count = 0
        self.next_try = 0

    def pick(self, numel: int) -> str | None:
        if numel < ADAPT_MIN_ELEMS:
            return None  # the default path
        other = "numpy" if self.current == "torch" else "torch"
        if self.cost[self.current] is not None and (self.cost[other] is None or self.count >= self.next_try):
            return other
        return self.current

    def record(self, path: str | None, numel: int, seconds: float) -> None:
        if path is None:
            return
        self.seen[path] += 1
        if self.seen[path] == 1:
            return  # warm-up
        cost = seconds / numel
        old = self.cost[path]
        self.cost[path] = cost if old is None else (old + cost) / 2
        self.count += 1
        if path == self.current:
            return
        if cost < self.cost[self.current]:
            self.current, self.interval = path, 8
        else:
            self.interval = min(2 * self.interval, _ADAPT_MAX_INTERVAL)
        self.next_try = self.count + self.interval


def _checked_score(
    lora: LoraFile, layer_id: str, k: int, device: str | torch.device, chooser: _CpuPathChooser | None = None
) -> tuple[float, float]:
    layer = lora.layers[layer_id]
    if chooser is None:
        top, total = stream_layer_score(layer, k, device=device)
    else:
        numel = math.prod(layer.shape)
        path, stats = chooser.pick(numel), []
        top, total = stream_layer_score(layer, k, device=device, path=path, stats=stats)
        chooser.record(path, numel, stats[0])
    # a non-finite sum means a NaN/Inf element (or an overflowing product): cheaper than a separate isfinite pass
    if not (math.isfinite(total) and math.isfinite(top)):
        msg = f"[K-LoRA] '{lora.name}' has NaN/Inf weights at layer {layer_id}; the file is damaged"
        raise KLoraError(msg)
    return top, total


def _check_not_all_zero(lora: LoraFile, sums: Iterable[float]) -> None:
    if not any(s > 0 for s in sums):
        msg = f"[K-LoRA] '{lora.name}' is all zeros on the layers it shares with the other LoRA; nothing to fuse"
        raise KLoraError(msg)


def gamma(
    layers: Iterable[LayerScore], mode: str, manual: float | None = None, reference: ReferenceScores | None = None
) -> float:
    """Balance between LoRAs of different origin.

    * ``auto-sum`` (paper Eq. 9): sum over layers of sum|dW_c| divided by the same for style.
    * ``auto-mean`` (the code's rule): mean of the per-layer ratios, then the mean again without the ratios that are
      at least 3x the first mean (outliers). Default mode: over ``layers`` (the layers in scope), leaving out layers
      where either delta is all zero. With ``reference`` (the reference clocks): the authors' own number, over every
      (down, up) key pair of both files (FF and text encoder included, a zero content pair counting as 0).
    * ``manual``: the user's number.
    """
    layers = list(layers)
    if mode == "auto-mean" and reference is not None:
        return reference.require_gamma()
    if mode == "manual":
        if manual is None or not manual > 0:
            msg = f"[K-LoRA] manual gamma must be > 0, got {manual!r}"
            raise KLoraError(msg)
        return float(manual)
    usable = [s for s in layers if s.sum_abs_content > 0 and s.sum_abs_style > 0]
    if not usable:
        msg = "[K-LoRA] no layer in scope where both LoRAs are non-zero; cannot compute gamma (use a manual gamma)"
        raise KLoraError(msg)
    if mode == "auto-sum":
        return math.fsum(s.sum_abs_content for s in usable) / math.fsum(s.sum_abs_style for s in usable)
    if mode == "auto-mean":
        ratios = [s.sum_abs_content / s.sum_abs_style for s in usable]
        first = math.fsum(ratios) / len(ratios)
        kept = [r for r in ratios if r < 3 * first]
        return math.fsum(kept) / len(kept)
    msg = f"[K-LoRA] unknown gamma mode {mode!r}"
    raise KLoraError(msg)
