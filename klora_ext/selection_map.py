"""Render a K-LoRA plan (T steps x L layers of roles) as a picture with Pillow, like the paper's Fig. 6.

Picture: x axis = layers in the given order, y axis = denoising steps (row 0 at the top = first step). Each cell is
coloured by its role: content (orange), style (blue), both (purple), none (grey). Layer groups ("IN4", "MID",
"OUT3" ...) are separated by thin gaps, marked by ticks and labelled under the grid. Under the map a small curve shows
the share of layers that use the content LoRA at each step.

Host-free: numpy and Pillow (every WebUI ships Pillow; the CLI's install line names it). Text uses a real TrueType
font where one is found (``KLORA_FONT``, the WebUI's or the system's DejaVu / Noto / Arial ...), Pillow's own font
otherwise. The cells are exact pixels (no anti-aliasing): ``layout_for`` says where each cell is.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .errors import KLoraError

__all__ = [
    "COLORS",
    "Layout",
    "content_share",
    "find_font",
    "layout_for",
    "map_png_bytes",
    "render_map",
    "save_map_png",
]

# Role codes (same ints as the plan's map).
STYLE, CONTENT, BOTH, NONE = 0, 1, 2, 3
ROLE_NAMES = {CONTENT: "content", STYLE: "style", BOTH: "both", NONE: "none"}

COLORS: dict[int, tuple[int, int, int]] = {
    CONTENT: (0xE8, 0x83, 0x3A),  # orange
    STYLE: (0x3A, 0x7B, 0xD5),  # blue
    BOTH: (0x8E, 0x5B, 0xB5),  # purple
    NONE: (0xC8, 0xC8, 0xC8),  # grey
}
BACKGROUND = (255, 255, 255)
INK = (0x22, 0x22, 0x22)  # text, ticks, frame
MUTED = (0x66, 0x66, 0x66)  # secondary text
LIGHT = (0xDD, 0xDD, 0xDD)  # curve grid lines

MAX_WIDTH = 2400  # image width cap (px)
MAX_GRID_H = 1500  # steps beyond this many px are averaged into rows
_TARGET_GRID_W = 1100  # automatic column width aims at about this grid width
_TARGET_GRID_H = 420
_MAX_CELL_W = 24
_MAX_CELL_H = 16
_MIN_CELL_H = 2
LARGE_LAYERS = 400  # SDXL / Flux layer counts: 2 px columns and larger text

# --------------------------------------------------------------------------------------------------------------------
# Fonts

_FONT_FILES = (
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "LiberationSans-Regular.ttf",
    "Arial.ttf",
    "arial.ttf",
    "segoeui.ttf",
    "Roboto-Regular.ttf",
)
_CJK_FONT_FILES = ("NotoSansCJK-Regular.ttc", "msyh.ttc", "msgothic.ttc", "wqy-microhei.ttc", "Arial Unicode.ttf")
_FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",
    "/usr/share/fonts/truetype/noto",
    "/usr/share/fonts/opentype/noto",
    "/usr/share/fonts/noto-cjk",
    "/usr/share/fonts/truetype/liberation",
    "/usr/share/fonts/truetype/wqy",
    "/Library/Fonts",
    "/System/Library/Fonts/Supplemental",
    os.path.join(os.environ.get("WINDIR", "C:\\Windows"), "Fonts"),
)
_extra_font_dirs: list[str] = []


def add_font_dir(folder: str) -> None:
    """A folder to search for fonts too (the WebUI glue adds the WebUI's own ``modules`` folder: Roboto)."""
    if folder and folder not in _extra_font_dirs:
        _extra_font_dirs.append(folder)
        find_font.cache_clear()


def _needs_cjk(text: str) -> bool:
    return any(ord(ch) >= 0x2E80 for ch in text)


@functools.lru_cache(maxsize=8)
def find_font(cjk: bool = False) -> str | None:
    """Path of the TrueType font to use (``KLORA_FONT`` first), or None for Pillow's built-in font."""
    env = os.environ.get("KLORA_FONT")
    if env and os.path.isfile(env):
        return env
    names = (_CJK_FONT_FILES + _FONT_FILES) if cjk else _FONT_FILES
    for name in names:
        for folder in (*_FONT_DIRS, *_extra_font_dirs):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _pil() -> Any:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        msg = "[K-LoRA] drawing the selection map needs Pillow: python -m pip install pillow"
        raise KLoraError(msg) from None
    return Image, ImageDraw, ImageFont


@functools.lru_cache(maxsize=32)
def _font(size: int, cjk: bool = False) -> Any:
    _, _, image_font = _pil()
    path = find_font(cjk)
    if path is not None:
        try:
            return image_font.truetype(path, size)
        except OSError:
            pass
    try:
        return image_font.load_default(size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return image_font.load_default()


def _font_for(text: str, size: int) -> Any:
    return _font(size, _needs_cjk(text))


def text_size(text: str, size: int) -> tuple[int, int]:
    """(width, height) of ``text`` in px at font ``size`` (height: the font's ascent + descent)."""
    font = _font_for(text, size)
    left, _, right, _ = font.getbbox(text) if text else (0, 0, 0, 0)
    ascent, descent = _metrics(font, size)
    return int(right - min(left, 0)), ascent + descent


def _metrics(font: Any, size: int) -> tuple[int, int]:
    try:
        ascent, descent = font.getmetrics()
        return int(ascent), int(descent)
    except AttributeError:
        return size, size // 4


# --------------------------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Layout:
    """Where everything of a selection map goes; all coordinates are image pixels, (0, 0) at the top-left.

    Layer l occupies columns [col_x0[l], col_x0[l] + col_w) and step t rows [row_y0[t], row_y0[t] + row_h).
    When the layers (or steps) do not fit, several share one pixel column (row): then ``layers_per_px`` > 1
    (``steps_per_px`` > 1), ``col_w`` (``row_h``) is 1 and that column shows the average colour of its layers.
    """

    width: int
    height: int
    grid_x: int
    grid_y: int
    grid_w: int
    grid_h: int
    col_w: int
    row_h: int
    col_x0: tuple[int, ...]
    row_y0: tuple[int, ...]
    layers_per_px: float
    steps_per_px: float
    gaps: bool  # True when one blank pixel column separates consecutive layer groups
    scale: int  # 1, or 2 for large maps (text, ticks and margins doubled)
    font_size: int
    title: tuple[str, int, int] | None
    info: tuple[tuple[str, int, int], ...]
    legend: tuple[tuple[str, int, int, int, int], ...]  # (label, role, swatch x, swatch y, swatch size)
    x_ticks: tuple[int, ...]  # x of the tick marks under the grid (group boundaries, or layer indices)
    x_labels: tuple[tuple[str, int, int], ...]  # (text, x, y) top-left
    y_ticks: tuple[tuple[int, str], ...]  # (y, step number) left of the grid
    curve_box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) of the content-share plot area

    @property
    def downsampled(self) -> bool:
        return self.layers_per_px > 1 or self.steps_per_px > 1

    def cell_center(self, step: int, layer: int) -> tuple[int, int]:
        return self.col_x0[layer] + self.col_w // 2, self.row_y0[step] + self.row_h // 2


def _group_runs(groups: Sequence[str] | None, n: int) -> list[tuple[int, int, str]]:
    """Consecutive runs [start, end) of equal group labels."""
    if not groups:
        return []
    runs: list[tuple[int, int, str]] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or groups[i] != groups[start]:
            runs.append((start, i, str(groups[start])))
            start = i
    return runs


def _tick_interval(count: int, px_per_item: float, min_px: int) -> int:
    """The first of 1, 2, 5, 10, 20, 50 ... that spaces ticks at least ``min_px`` apart."""
    step = 1
    while True:
        for mult in (1, 2, 5):
            if step * mult * px_per_item >= min_px or step * mult >= count:
                return step * mult
        step *= 10


def _bin_of(n: int, n_px: int) -> np.ndarray:
    """Pixel index (0..n_px-1) of each of n items spread evenly over n_px pixels."""
    return (np.arange(n) * n_px) // n


def layout_for(
    n_steps: int,
    n_layers: int,
    *,
    groups: Sequence[str] | None = None,
    title: str = "",
    info_lines: Sequence[str] = (),
    legend_roles: Sequence[int] = (CONTENT, STYLE),
    first_step: int = 0,
    curve: bool = True,
    max_width: int = MAX_WIDTH,
    scale: int | None = None,
) -> Layout:
    """The layout ``render_map`` uses for a T x L map with these labels."""
    if n_steps < 1 or n_layers < 1:
        raise KLoraError(f"[K-LoRA] selection map needs at least one step and one layer, got {n_steps}x{n_layers}")
    if groups is not None and len(groups) != n_layers:
        raise KLoraError(f"[K-LoRA] selection map has {n_layers} layer columns but {len(groups)} group labels")
    if scale is not None and scale not in (1, 2, 3):
        raise KLoraError(f"[K-LoRA] selection map scale must be 1, 2 or 3, got {scale}")
    s = scale or (2 if n_layers >= LARGE_LAYERS else 1)
    fs = 12 * s
    margin = 12 * s
    tick = 4 * s
    runs = _group_runs(groups, n_layers)
    n_gaps = max(len(runs) - 1, 0)

    # Left of the grid: the vertical "step" label and the step numbers.
    number_w = max(text_size(str(first_step + n_steps - 1), fs)[0], text_size(str(first_step), fs)[0])
    line_h = text_size("Ag", fs)[1]
    grid_x = margin + line_h + 6 * s + number_w + 4 * s + tick + 1
    avail_w = max(max_width - grid_x - margin, 16)

    # Columns: an integer width per layer (2 px at least for large maps) and a 1 px gap between groups.
    min_w = 2 if n_layers >= LARGE_LAYERS else 1
    col_w = min(max((_TARGET_GRID_W * s // 2 if s > 1 else _TARGET_GRID_W) // n_layers, min_w), _MAX_CELL_W)
    while col_w > 1 and n_layers * col_w + n_gaps > avail_w:
        col_w -= 1
    gaps = col_w >= 2 and n_gaps > 0
    if n_layers * col_w + (n_gaps if gaps else 0) <= avail_w:
        starts = np.arange(n_layers) * col_w
        if gaps:
            for gi, (a, b, _) in enumerate(runs):
                starts[a:b] += gi
        grid_w = n_layers * col_w + (n_gaps if gaps else 0)
        layers_per_px = 1.0
    else:
        col_w, grid_w, gaps = 1, avail_w, False
        starts, layers_per_px = _bin_of(n_layers, avail_w), n_layers / avail_w

    # Rows.
    row_h = min(max(_TARGET_GRID_H * (s if s > 1 else 1) // n_steps, _MIN_CELL_H), _MAX_CELL_H * s)
    while row_h > 1 and n_steps * row_h > MAX_GRID_H:
        row_h -= 1
    if n_steps * row_h <= MAX_GRID_H:
        rows, grid_h, steps_per_px = np.arange(n_steps) * row_h, n_steps * row_h, 1.0
    else:
        row_h, grid_h = 1, MAX_GRID_H
        rows, steps_per_px = _bin_of(n_steps, grid_h), n_steps / grid_h

    # Header: title, info lines, legend.
    y = margin
    header_w = 0
    title_item = None
    if title:
        title_item = (title, margin, y)
        tw, th = text_size(title, fs + 4 * s)
        header_w = max(header_w, tw)
        y += th + 4 * s
    info = []
    for line in info_lines:
        info.append((line, margin, y))
        header_w = max(header_w, text_size(line, fs)[0])
        y += line_h + 2 * s
    y += 4 * s
    legend = []
    swatch = 12 * s
    lx = margin
    present = [CONTENT, STYLE] + [r for r in (BOTH, NONE) if r in legend_roles]
    for role in present:
        label = ROLE_NAMES[role]
        legend.append((label, role, lx, y, swatch))
        lx += swatch + 5 * s + text_size(label, fs)[0] + 16 * s
    header_w = max(header_w, lx - margin)
    y += swatch + 10 * s
    grid_y = y + 1

    width = max(grid_x + grid_w + margin, margin + header_w + margin)
    col_x0 = tuple(int(grid_x + v) for v in starts)
    row_y0 = tuple(int(grid_y + v) for v in rows)

    # Under the grid: ticks at group boundaries with the labels centred under the groups (a second row for labels
    # that would overlap, skipped when both rows are taken there), or layer indices without groups.
    below = grid_y + grid_h + 1
    label_top = below + tick + 2 * s
    x_ticks: list[int] = []
    x_labels: list[tuple[str, int, int]] = []
    n_label_rows = 1
    if runs:
        row_end = [-(10**9), -(10**9)]
        for a, b, label in runs:
            x_start, x_end = col_x0[a], col_x0[b - 1] + col_w
            x_ticks.append(x_start - 1 if gaps and a > 0 else x_start)
            w = text_size(label, fs)[0]
            lx = min(max((x_start + x_end) // 2 - w // 2, 0), width - w)
            for r in (0, 1):
                if lx >= row_end[r] + 4 * s:
                    x_labels.append((label, lx, label_top + r * (line_h + 2 * s)))
                    row_end[r] = lx + w
                    n_label_rows = max(n_label_rows, r + 1)
                    break
        x_ticks.append(col_x0[-1] + col_w - 1)
    else:
        interval = _tick_interval(n_layers, grid_w / n_layers, text_size(str(n_layers), fs)[0] + 10 * s)
        for i in range(0, n_layers, interval):
            x = col_x0[i] + col_w // 2
            x_ticks.append(x)
            w = text_size(str(i), fs)[0]
            x_labels.append((str(i), min(max(x - w // 2, 0), width - w), label_top))
    y = label_top + n_label_rows * (line_h + 2 * s) + 2 * s
    x_labels.append(("layer", grid_x + grid_w // 2 - text_size("layer", fs)[0] // 2, y))
    y += line_h + 8 * s

    curve_box = None
    if curve:
        y += line_h + 4 * s  # the curve's title line
        curve_box = (grid_x, y, grid_x + min(grid_w, 600 * s), y + 70 * s)
        y = curve_box[3] + 4 * s + line_h + 2 * s  # step numbers under it
    height = y + margin

    interval = _tick_interval(n_steps, grid_h / n_steps, line_h + 4 * s)
    y_ticks = tuple((row_y0[t] + row_h // 2, str(first_step + t)) for t in range(0, n_steps, interval))
    return Layout(
        width=int(width),
        height=int(height),
        grid_x=int(grid_x),
        grid_y=int(grid_y),
        grid_w=int(grid_w),
        grid_h=int(grid_h),
        col_w=int(col_w),
        row_h=int(row_h),
        col_x0=col_x0,
        row_y0=row_y0,
        layers_per_px=float(layers_per_px),
        steps_per_px=float(steps_per_px),
        gaps=bool(gaps),
        scale=s,
        font_size=fs,
        title=title_item,
        info=tuple(info),
        legend=tuple(legend),
        x_ticks=tuple(x_ticks),
        x_labels=tuple(x_labels),
        y_ticks=y_ticks,
        curve_box=curve_box,
    )


# --------------------------------------------------------------------------------------------------------------------
# Rendering


def _validate(roles: np.ndarray, layer_ids: Sequence[str], groups: Sequence[str] | None) -> np.ndarray:
    arr = np.asarray(roles)
    if arr.ndim != 2:
        raise KLoraError(f"[K-LoRA] selection map roles must be a 2-D (steps x layers) array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise KLoraError(f"[K-LoRA] selection map roles is empty (shape {arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(np.int8)  # True = content, False = style
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise KLoraError("[K-LoRA] selection map roles must be integers (0 style, 1 content, 2 both, 3 none)")
    elif arr.dtype.kind not in "iu":
        raise KLoraError(f"[K-LoRA] selection map roles must be integers, got dtype {arr.dtype}")
    bad = np.setdiff1d(np.unique(arr), [STYLE, CONTENT, BOTH, NONE])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5].tolist())
        raise KLoraError(
            f"[K-LoRA] selection map roles contain unknown value(s) {shown}; "
            "expected 0 (style), 1 (content), 2 (both) or 3 (none)"
        )
    if len(layer_ids) != arr.shape[1]:
        raise KLoraError(f"[K-LoRA] selection map has {arr.shape[1]} layer columns but {len(layer_ids)} layer ids")
    if groups is not None and len(groups) != arr.shape[1]:
        raise KLoraError(f"[K-LoRA] selection map has {arr.shape[1]} layer columns but {len(groups)} group labels")
    return arr.astype(np.int64)


def content_share(roles: np.ndarray) -> np.ndarray:
    """Per step, the share of layers whose content delta is applied (content or both), 0..1."""
    arr = np.asarray(roles)
    return ((arr == CONTENT) | (arr == BOTH)).mean(axis=1)


def _average_bins(values: np.ndarray, bins: np.ndarray, n_px: int, axis: int) -> np.ndarray:
    starts = np.searchsorted(bins, np.arange(n_px))
    sums = np.add.reduceat(values, starts, axis=axis)
    counts = np.diff(np.append(starts, len(bins))).astype(np.float64)
    shape = [1] * values.ndim
    shape[axis] = n_px
    return sums / counts.reshape(shape)


def _grid_pixels(roles: np.ndarray, lay: Layout) -> np.ndarray:
    """The (grid_h, grid_w, 3) uint8 picture of the cells, gaps in background colour."""
    table = np.array([COLORS[STYLE], COLORS[CONTENT], COLORS[BOTH], COLORS[NONE]], dtype=np.float64)
    rgb = table[roles]
    if lay.steps_per_px > 1:
        rgb = _average_bins(rgb, np.asarray(lay.row_y0) - lay.grid_y, lay.grid_h, axis=0)
    else:
        rgb = rgb.repeat(lay.row_h, axis=0)
    grid = np.empty((lay.grid_h, lay.grid_w, 3), dtype=np.float64)
    grid[:] = BACKGROUND
    x0 = np.asarray(lay.col_x0) - lay.grid_x
    if lay.layers_per_px > 1:
        grid[:] = _average_bins(rgb, x0, lay.grid_w, axis=1)
    else:
        for dx in range(lay.col_w):
            grid[:, x0 + dx] = rgb
    return np.clip(np.rint(grid), 0, 255).astype(np.uint8)


def render_map(
    roles: np.ndarray,
    layer_ids: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    title: str = "",
    info_lines: Sequence[str] = (),
    first_step: int = 0,
    curve: bool = True,
    max_width: int = MAX_WIDTH,
    scale: int | None = None,
) -> Any:
    """Draw the selection map of a plan; returns an RGB ``PIL.Image.Image``.

    roles: T x L ints, 1 content, 0 style, 2 both, 3 none (bool is read as content/style); row 0 = first step.
    layer_ids: the L layer ids in column order (only their count is used; pass ``groups`` for readable ticks).
    groups: optional group label per layer ("IN4", "MID", "OUT3" ...): gaps, ticks and labels per group.
    title / info_lines: a larger first line and free text lines above the map (any Unicode the font has).
    first_step: the number printed for row 0 (0 matches the plan JSON's flip_step).
    curve: add the "content share per step" plot under the map.
    scale: 1 or 2 (text, margins); automatic (2 from ``LARGE_LAYERS`` layers on) when None.
    """
    image_mod, draw_mod, _ = _pil()
    arr = _validate(roles, layer_ids, groups)
    lay = layout_for(
        *arr.shape,
        groups=groups,
        title=title,
        info_lines=info_lines,
        legend_roles=np.unique(arr).tolist(),
        first_step=first_step,
        curve=curve,
        max_width=max_width,
        scale=scale,
    )
    s, fs = lay.scale, lay.font_size
    img = image_mod.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = draw_mod.Draw(img)

    def text(xy: tuple[int, int], value: str, fill: tuple[int, int, int], size: int = fs) -> None:
        draw.text(xy, value, fill=fill, font=_font_for(value, size))

    if lay.title is not None:
        value, x, y = lay.title
        text((x, y), value, INK, fs + 4 * s)
    for value, x, y in lay.info:
        text((x, y), value, MUTED)
    line_h = text_size("Ag", fs)[1]
    for label, role, sx, sy, size in lay.legend:
        draw.rectangle((sx, sy, sx + size - 1, sy + size - 1), fill=COLORS[role], outline=INK)
        text((sx + size + 5 * s, sy + (size - line_h) // 2), label, INK)

    img.paste(image_mod.fromarray(_grid_pixels(arr, lay)), (lay.grid_x, lay.grid_y))
    x0, x1 = lay.grid_x - 1, lay.grid_x + lay.grid_w
    y0, y1 = lay.grid_y - 1, lay.grid_y + lay.grid_h
    draw.rectangle((x0, y0, x1, y1), outline=INK)
    tick = 4 * s
    for x in lay.x_ticks:
        draw.line((x, y1 + 1, x, y1 + tick), fill=INK, width=1)
    for value, x, y in lay.x_labels:
        text((x, y), value, INK if (groups is not None or value == "layer") else MUTED)
    for y, value in lay.y_ticks:
        draw.line((x0 - tick, y, x0 - 1, y), fill=INK)
        w = text_size(value, fs)[0]
        text((x0 - tick - 3 * s - w, y - line_h // 2), value, MUTED)
    # vertical "step" axis label
    sw, sh = text_size("step", fs)
    label = image_mod.new("RGB", (sw + 2, sh + 2), BACKGROUND)
    draw_mod.Draw(label).text((1, 1), "step", fill=INK, font=_font_for("step", fs))
    label = label.rotate(90, expand=True)
    img.paste(label, (12 * s, max(lay.grid_y + lay.grid_h // 2 - label.height // 2, lay.grid_y)))

    if lay.curve_box is not None:
        _draw_curve(draw, text, lay, content_share(arr), first_step, line_h)
    return img


def _draw_curve(draw: Any, text: Any, lay: Layout, share: np.ndarray, first_step: int, line_h: int) -> None:
    cx0, cy0, cx1, cy1 = lay.curve_box
    s = lay.scale
    text((cx0, cy0 - line_h - 4 * s), "content share per step (layers using the content LoRA)", INK)
    for frac in (0.0, 0.5, 1.0):
        y = round(cy1 - frac * (cy1 - cy0))
        draw.line((cx0, y, cx1, y), fill=LIGHT)
        label = f"{int(frac * 100)}%"
        w = text_size(label, lay.font_size)[0]
        text((cx0 - 6 * s - w, y - line_h // 2), label, MUTED)
    draw.rectangle((cx0, cy0, cx1, cy1), outline=INK)
    n = len(share)
    xs = [cx0 + (cx1 - cx0) * (t + 0.5) / n for t in range(n)]
    ys = [cy1 - float(v) * (cy1 - cy0) for v in share]
    points = []
    for t in range(n):  # a step function: each step holds its share for its own width
        left = cx0 + (cx1 - cx0) * t / n
        right = cx0 + (cx1 - cx0) * (t + 1) / n
        points += [(left, ys[t]), (right, ys[t])]
    draw.line(points, fill=COLORS[CONTENT], width=2 * s)
    interval = _tick_interval(n, (cx1 - cx0) / n, text_size(str(first_step + n), lay.font_size)[0] + 8 * s)
    for t in range(0, n, interval):
        w = text_size(str(first_step + t), lay.font_size)[0]
        text((round(xs[t]) - w // 2, cy1 + 4 * s), str(first_step + t), MUTED)


def map_png_bytes(
    roles: np.ndarray, layer_ids: Sequence[str], *, text: Mapping[str, str] | None = None, **options: Any
) -> bytes:
    """``render_map`` (same keyword options) encoded as PNG, with text chunks Software, Title, Description (the
    info lines) and ``text``."""
    from PIL import PngImagePlugin

    img = render_map(roles, layer_ids, **options)
    meta = PngImagePlugin.PngInfo()
    entries: dict[str, str] = {"Software": f"sd-webui-k-lora {__version__}"}
    if options.get("title"):
        entries["Title"] = options["title"]
    if options.get("info_lines"):
        entries["Description"] = "\n".join(options["info_lines"])
    entries.update(text or {})
    for key, value in entries.items():
        meta.add_itxt(key, value)  # iTXt: UTF-8 (LoRA names may be non-ASCII)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=meta, optimize=True)
    return buffer.getvalue()


def save_map_png(path: str | os.PathLike[str], roles: np.ndarray, layer_ids: Sequence[str], **options: Any) -> str:
    """Write the map PNG to ``path`` atomically (temp file + rename). Options: those of ``map_png_bytes``."""
    data = map_png_bytes(roles, layer_ids, **options)
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".klora-map-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a saved picture gets the usual mode
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
