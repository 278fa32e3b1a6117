"""Render a K-LoRA plan (T steps x L layers of roles) as a picture, like the paper's Fig. 6.

Host-free: numpy + the stdlib only. Text comes from a built-in 5x7 bitmap font (with two descender rows) and the
PNG is written by `klora_ext.png`, so the map can be produced by the CLI without Pillow.

Picture: x axis = layers in the given order, y axis = denoising steps (row 0 at the top = first step). Each cell is
coloured by its role: content (orange), style (blue), both (purple), none (grey). Layer groups ("IN4", "MID",
"OUT3" ...) are separated by thin gaps and labelled under the grid.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .errors import KLoraError
from .png import encode_png

__all__ = [
    "COLORS",
    "GLYPH_H",
    "GLYPH_W",
    "Layout",
    "draw_text",
    "layout_for",
    "map_png_bytes",
    "render_map",
    "save_map_png",
    "text_mask",
    "text_size",
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
MUTED = (0x66, 0x66, 0x66)  # secondary text (info lines, tick labels)
LEADER = (0xAA, 0xAA, 0xAA)  # leader lines to second-row group labels

MAX_WIDTH = 2000  # image width cap (px)
MAX_GRID_H = 1500  # steps beyond this many px are averaged into rows
_TARGET_GRID_W = 1200  # automatic column width aims at about this grid width
_TARGET_GRID_H = 480
_MAX_CELL_W = 24
_MAX_CELL_H = 16

# --------------------------------------------------------------------------------------------------------------------
# Bitmap font. Each glyph: rows of 5 pixels ('#' on), top to bottom; rows 0-6 sit above the baseline, rows 7-8 are
# for descenders (g, j, p, q, y, comma ...). Glyphs given with 7 rows are padded with blank descender rows.
GLYPH_W, GLYPH_H = 5, 9
_ADVANCE = GLYPH_W + 1  # one blank column between characters
_LINE_GAP = 2

_FONT_DATA: dict[str, str] = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... ..... #####",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "{": "...#. ..#.. ..#.. .#... ..#.. ..#.. ...#.",
    "}": ".#... ..#.. ..#.. ...#. ..#.. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "\\": "..... #.... .#... ..#.. ...#. ....# .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    '"': ".#.#. .#.#. .#.#. ..... ..... ..... .....",
    "`": ".#... ..#.. ..... ..... ..... ..... .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "~": "..... ..... .#... #.#.# ...#. ..... .....",
    "^": "..#.. .#.#. #...# ..... ..... ..... .....",
    "@": ".###. #...# #.### #.#.# #.### #.... .####",
    "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",
    "$": "..#.. .#### #.#.. .###. ..#.# ####. ..#..",
    "α": "..... ..... .##.# #..#. #..#. #..#. .##.#",
    "β": ".##.. #..#. #..#. ###.. #...# #...# ####. #.... #....",
    "γ": "..... ..... #...# #...# .#.#. .#.#. ..#.. ..#.. ..#..",
    "τ": "..... ..... ##### ..#.. ..#.. ..#.. ...##",
    "≥": ".#... ..#.. ...#. ..#.. .#... ..... #####",
    "≤": "...#. ..#.. .#... ..#.. ...#. ..... #####",
    "×": "..... #...# .#.#. ..#.. .#.#. #...# .....",
    "·": "..... ..... ..... .##.. .##.. ..... .....",
    "→": "..... ..#.. ...#. ##### ...#. ..#.. .....",
    "…": "..... ..... ..... ..... ..... ..... #.#.#",
}
# Characters drawn with another glyph.
_ALIASES = {"–": "-", "—": "-", "−": "-", "’": "'", "‘": "'", "“": '"', "”": '"', "\t": " "}
_FALLBACK = "?"


def _build_font() -> dict[str, np.ndarray]:
    font: dict[str, np.ndarray] = {}
    for ch, spec in _FONT_DATA.items():
        rows = spec.split()
        if len(rows) not in (7, 8, 9) or any(len(r) != GLYPH_W for r in rows):  # static data: a coding error
            raise RuntimeError(f"bad glyph {ch!r} in the built-in font")
        rows += ["....."] * (GLYPH_H - len(rows))
        font[ch] = np.array([[c == "#" for c in r] for r in rows], dtype=bool)
    return font


FONT: dict[str, np.ndarray] = _build_font()


def _glyph(ch: str) -> np.ndarray:
    ch = _ALIASES.get(ch, ch)
    g = FONT.get(ch)
    if g is None:
        g = FONT.get(ch.upper(), FONT[_FALLBACK]) if len(ch.upper()) == 1 else FONT[_FALLBACK]
    return g


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn at `scale` (lines split at '\\n')."""
    lines = text.split("\n")
    w = max((len(line) * _ADVANCE - 1 if line else 0) for line in lines)
    h = len(lines) * (GLYPH_H + _LINE_GAP) - _LINE_GAP
    return max(w, 0) * scale, h * scale


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """Boolean (height, width) mask of `text`; True where ink goes."""
    if scale < 1:
        raise KLoraError(f"[K-LoRA] text scale must be >= 1, got {scale}")
    w, h = text_size(text, 1)
    mask = np.zeros((h, max(w, 0)), dtype=bool)
    for li, line in enumerate(text.split("\n")):
        y = li * (GLYPH_H + _LINE_GAP)
        for ci, ch in enumerate(line):
            x = ci * _ADVANCE
            mask[y : y + GLYPH_H, x : x + GLYPH_W] |= _glyph(ch)
    if scale > 1:
        mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
    return mask


def _blit(img: np.ndarray, x: int, y: int, mask: np.ndarray, color: Sequence[int]) -> None:
    """Paint `color` where `mask` is True, with the mask's top-left at (x, y); clipped to the image."""
    h, w = img.shape[:2]
    mh, mw = mask.shape
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + mw, w), min(y + mh, h)
    if x0 >= x1 or y0 >= y1:
        return
    sub = mask[y0 - y : y1 - y, x0 - x : x1 - x]
    img[y0:y1, x0:x1][sub] = np.asarray(color, dtype=np.uint8)


def draw_text(
    img: np.ndarray,
    x: int,
    y: int,
    text: str,
    color: Sequence[int] = INK,
    scale: int = 1,
    *,
    vertical: bool = False,
) -> tuple[int, int]:
    """Draw `text` with its top-left corner at (x, y) in place; returns the (width, height) of the drawn box.

    `vertical=True` rotates the text 90 degrees counter-clockwise (reads bottom to top, for a y-axis label).
    Anything outside the image is clipped. Unknown characters are drawn as '?' (lower-case letters without a glyph
    fall back to their upper-case form).
    """
    mask = text_mask(text, scale)
    if vertical:
        mask = np.rot90(mask)
    _blit(img, int(x), int(y), mask, color)
    return mask.shape[1], mask.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# Layout

AUTO_TEXT_SCALE_W = 900  # grids at least this wide get double-size text: galleries show wide images shrunk
_MARGIN = 10
_TICK = 4  # tick length at text scale 1
_FRAME = 1  # frame line around the grid, drawn outside it


@dataclass(frozen=True)
class Layout:
    """Where everything of a selection map goes; all coordinates are image pixels, (0, 0) at the top-left.

    Layer l occupies columns [col_x0[l], col_x0[l] + col_w) and step t rows [row_y0[t], row_y0[t] + row_h).
    When the layers (or steps) do not fit, several share one pixel column (row): then `layers_per_px` > 1
    (`steps_per_px` > 1), `col_w` (`row_h`) is 1 and that column shows the average colour of its layers.
    Text items are (text, x, y) of the text's top-left corner.
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
    text_scale: int
    title: tuple[str, int, int] | None
    title_scale: int
    info: tuple[tuple[str, int, int], ...]
    legend: tuple[tuple[str, int, int, int, int], ...]  # (label, role, swatch x, swatch y, swatch size)
    x_ticks: tuple[int, ...]  # x of the tick marks under the grid (group starts, or layer indices)
    x_labels: tuple[tuple[str, int, int], ...]
    group_marks: tuple[int, ...]  # x of the short marks above the grid at each group boundary
    leaders: tuple[tuple[int, int, int], ...]  # (x, y0, y1) thin lines from the grid to second-row labels
    y_ticks: tuple[tuple[int, str], ...]  # (y, step number) of the step ticks left of the grid
    y_label_x: int  # right edge of the step numbers
    step_label: tuple[int, int]  # top-left of the vertical "step" axis label
    layer_label: tuple[int, int]  # top-left of the "layer" axis label

    @property
    def downsampled(self) -> bool:
        return self.layers_per_px > 1 or self.steps_per_px > 1

    def cell_center(self, step: int, layer: int) -> tuple[int, int]:
        """(x, y) of the pixel at the centre of cell (step, layer)."""
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


def _tick_interval(count: int, px_per_item: float, min_px: int, max_ticks: int) -> int:
    """The first of 1, 5, 10, 25, 50, 100, 250, 500, 1000 ... that spaces ticks >= min_px apart, <= max_ticks."""
    candidates = [1, 5, 10]
    mult = 10
    while candidates[-1] < count:
        candidates += [mult * 5 // 2, mult * 5, mult * 10]
        mult *= 10
    for c in candidates:
        if c * px_per_item >= min_px and count / c <= max_ticks:
            return c
    return candidates[-1]


def _bin_of(n: int, n_px: int) -> np.ndarray:
    """Pixel index (0..n_px-1) of each of n items when n > n_px items are spread evenly over n_px pixels."""
    return (np.arange(n) * n_px) // n


def _columns(
    n_layers: int, runs: list[tuple[int, int, str]], cell: int | None, avail_w: int
) -> tuple[np.ndarray, int, int, float, bool]:
    """(x offset of each layer, column width, grid width, layers per px, gaps) for the available width."""
    # An integer width per layer plus a 1 px gap between groups; if even 1 px per layer does not fit, layers are
    # spread over the available pixels (several per column, averaged) and the gaps are dropped.
    n_gaps = max(len(runs) - 1, 0)
    col_w = cell if cell is not None else min(max((_TARGET_GRID_W - n_gaps) // n_layers, 1), _MAX_CELL_W)
    while col_w > 1 and n_layers * col_w + n_gaps > avail_w:
        col_w -= 1
    if n_layers * col_w + n_gaps <= avail_w:
        starts = np.arange(n_layers) * col_w
        for gi, (a, b, _) in enumerate(runs):
            starts[a:b] += gi
        return starts, col_w, n_layers * col_w + n_gaps, 1.0, n_gaps > 0
    return _bin_of(n_layers, avail_w), 1, avail_w, n_layers / avail_w, False


def _legend_items(present: Sequence[int]) -> list[tuple[str, int]]:
    items = [(ROLE_NAMES[CONTENT], CONTENT), (ROLE_NAMES[STYLE], STYLE)]
    items += [(ROLE_NAMES[r], r) for r in (BOTH, NONE) if r in present]
    return items


def layout_for(
    n_steps: int,
    n_layers: int,
    *,
    groups: Sequence[str] | None = None,
    title: str = "",
    info_lines: Sequence[str] = (),
    cell: int | None = None,
    row_height: int | None = None,
    first_step: int = 0,
    text_scale: int | None = None,
    legend_roles: Sequence[int] = (CONTENT, STYLE),
    max_width: int = MAX_WIDTH,
) -> Layout:
    """Compute the layout `render_map` uses for a T x L map with these labels (see `render_map`).

    `legend_roles`: the role values present; "both" / "none" get a legend entry only when present.
    """
    if n_steps < 1 or n_layers < 1:
        raise KLoraError(f"[K-LoRA] selection map needs at least one step and one layer, got {n_steps}x{n_layers}")
    if cell is not None and cell < 1:
        raise KLoraError(f"[K-LoRA] selection map cell width must be >= 1 px, got {cell}")
    if row_height is not None and row_height < 1:
        raise KLoraError(f"[K-LoRA] selection map row height must be >= 1 px, got {row_height}")
    if text_scale is not None and not 1 <= text_scale <= 4:
        raise KLoraError(f"[K-LoRA] selection map text scale must be 1-4, got {text_scale}")
    if groups is not None and len(groups) != n_layers:
        raise KLoraError(f"[K-LoRA] selection map has {n_layers} layer columns but {len(groups)} group labels")
    runs = _group_runs(groups, n_layers)
    step_numbers = [str(first_step), str(first_step + n_steps - 1)]
    right = _MARGIN + _FRAME

    def left_edge(s: int) -> int:
        # vertical "step" label, gap, right-aligned step numbers, gap, tick, frame
        number_w = max(text_size(n, s)[0] for n in step_numbers)
        return _MARGIN + GLYPH_H * s + 6 * s + number_w + 3 * s + _TICK * s + _FRAME

    s = text_scale or 1
    grid_x = left_edge(s)
    starts, col_w, grid_w, layers_per_px, gaps = _columns(n_layers, runs, cell, max(max_width - grid_x - right, 16))
    if text_scale is None and grid_w >= AUTO_TEXT_SCALE_W:
        s = 2
        grid_x = left_edge(s)
        starts, col_w, grid_w, layers_per_px, gaps = _columns(
            n_layers, runs, cell, max(max_width - grid_x - right, 16)
        )
    tick = _TICK * s
    line_h = (GLYPH_H + 4) * s  # pitch of text lines

    # Rows: an integer height per step; steps are averaged into pixel rows only beyond MAX_GRID_H.
    row_h = row_height if row_height is not None else min(max(_TARGET_GRID_H // n_steps, 1), _MAX_CELL_H)
    while row_h > 1 and n_steps * row_h > MAX_GRID_H:
        row_h -= 1
    if n_steps * row_h <= MAX_GRID_H:
        rows, grid_h, steps_per_px = np.arange(n_steps) * row_h, n_steps * row_h, 1.0
    else:
        row_h, grid_h = 1, MAX_GRID_H
        rows, steps_per_px = _bin_of(n_steps, grid_h), n_steps / grid_h

    # Header: title (larger), info lines, legend.
    y = _MARGIN
    header_w = 0
    title_scale = s + 1
    title_item = None
    if title:
        title_item = (title, _MARGIN, y)
        tw, th = text_size(title, title_scale)
        header_w = max(header_w, tw)
        y += th + 2 * s
    info = []
    for line in info_lines:
        info.append((line, _MARGIN, y))
        header_w = max(header_w, text_size(line, s)[0])
        y += line_h
    y += 2 * s
    legend: list[tuple[str, int, int, int, int]] = []
    swatch = 10 * s
    lx = _MARGIN
    for label, role in _legend_items(legend_roles):
        legend.append((label, role, lx, y, swatch))
        lx += swatch + 4 * s + text_size(label, s)[0] + 14 * s
    header_w = max(header_w, lx - 14 * s - _MARGIN)
    y += swatch + 10 * s
    grid_y = y + _FRAME

    plot_w = grid_x + grid_w + right
    width = min(max(plot_w, _MARGIN + header_w + _MARGIN), max(max_width, plot_w))
    col_x0 = tuple(int(grid_x + v) for v in starts)
    row_y0 = tuple(int(grid_y + v) for v in rows)

    # Under the grid: ticks and labels.
    below = grid_y + grid_h + _FRAME
    label_top = below + tick + 2 * s
    x_ticks: list[int] = []
    x_labels: list[tuple[str, int, int]] = []
    group_marks: list[int] = []
    leaders: list[tuple[int, int, int]] = []
    upper: list[tuple[int, int]] = []
    lower: list[tuple[int, int]] = []
    n_rows = 1
    if runs:
        # A tick at each group start (in the gap when there is one) and the label centred under the group; a label
        # that would overlap its neighbour goes to a second row, and is skipped when both rows are taken there.
        row_end = [-(10**9), -(10**9)]
        for a, b, label in runs:
            x_start, x_end = col_x0[a], col_x0[b - 1] + col_w
            edge = x_start - 1 if gaps and a > 0 else x_start
            x_ticks.append(edge)
            if a > 0:
                group_marks.append(edge)
            w = text_size(label, s)[0]
            lx = min(max((x_start + x_end) // 2 - w // 2, 0), width - w)
            for r in (0, 1):
                if lx >= row_end[r] + 3 * s:
                    x_labels.append((label, lx, label_top + r * line_h))
                    row_end[r] = lx + w
                    n_rows = max(n_rows, r + 1)
                    if r == 1:
                        lower.append((lx + w // 2, label_top + line_h))
                    else:
                        upper.append((lx - 2 * s, lx + w + 2 * s))
                    break
        x_ticks.append(min(col_x0[-1] + col_w, width - 1))  # close the last group
        # A thin leader from the grid down to each second-row label, where it does not cross a first-row label.
        for cx, ly in lower:
            if not any(a <= cx <= b for a, b in upper):
                leaders.append((cx, below + tick, ly - 2 * s))
    else:
        number_w = text_size(str(n_layers), s)[0]
        interval = _tick_interval(n_layers, grid_w / n_layers, number_w + 8 * s, 20)
        for i in range(0, n_layers, interval):
            x = col_x0[i] + col_w // 2
            x_ticks.append(x)
            w = text_size(str(i), s)[0]
            x_labels.append((str(i), min(max(x - w // 2, 0), width - w), label_top))
    layer_w = text_size("layer", s)[0]
    layer_label = (grid_x + grid_w // 2 - layer_w // 2, label_top + n_rows * line_h + 2 * s)
    height = layer_label[1] + GLYPH_H * s + _MARGIN

    # Left of the grid: step ticks every 1, 5, 10, 25 ... steps, numbers right-aligned, the vertical axis label.
    interval = _tick_interval(n_steps, grid_h / n_steps, (GLYPH_H + 5) * s, 16)
    y_ticks = tuple((row_y0[t] + row_h // 2, str(first_step + t)) for t in range(0, n_steps, interval))
    step_w = text_size("step", s)[0]
    step_label = (_MARGIN, max(grid_y + grid_h // 2 - step_w // 2, grid_y - 4 * s))

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
        text_scale=s,
        title=title_item,
        title_scale=title_scale,
        info=tuple(info),
        legend=tuple(legend),
        x_ticks=tuple(x_ticks),
        x_labels=tuple(x_labels),
        group_marks=tuple(group_marks),
        leaders=tuple(leaders),
        y_ticks=y_ticks,
        y_label_x=grid_x - _FRAME - tick - 3 * s,
        step_label=step_label,
        layer_label=layer_label,
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


def _average_bins(values: np.ndarray, bins: np.ndarray, n_px: int, axis: int) -> np.ndarray:
    """Mean of `values` over the items that fall into each pixel bin along `axis`."""
    starts = np.searchsorted(bins, np.arange(n_px))
    sums = np.add.reduceat(values, starts, axis=axis)
    counts = np.diff(np.append(starts, len(bins))).astype(np.float64)
    shape = [1] * values.ndim
    shape[axis] = n_px
    return sums / counts.reshape(shape)


def _grid_pixels(roles: np.ndarray, lay: Layout) -> np.ndarray:
    """The (grid_h, grid_w, 3) uint8 picture of the cells, gaps in background colour."""
    table = np.array([COLORS[STYLE], COLORS[CONTENT], COLORS[BOTH], COLORS[NONE]], dtype=np.float64)
    rgb = table[roles]  # (T, L, 3)
    n_steps, n_layers = roles.shape
    # Rows: repeat each step row_h times, or average steps into pixel rows.
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
    cell: int | None = None,
    row_height: int | None = None,
    first_step: int = 0,
    text_scale: int | None = None,
    max_width: int = MAX_WIDTH,
) -> np.ndarray:
    """Draw the selection map of a plan and return it as an (H, W, 3) uint8 RGB image.

    roles: T x L ints, 1 content, 0 style, 2 both, 3 none (bool is read as content/style); row 0 = first step.
    layer_ids: the L layer ids, in the order of the columns (only their count is used: the picture has no room
        for ids; pass `groups` for readable ticks).
    groups: optional group label per layer ("IN4", "MID", "OUT3" ...): separators, ticks and labels per group.
    title / info_lines: a large first line and free text lines above the map (e.g. "gamma=1.23 alpha=1.5").
    cell / row_height: column width / row height in px (automatic when None; the width shrinks to fit
        `max_width`, and beyond 1 px per layer several layers share a column, shown as their average colour).
    first_step: the number printed for row 0 (0 matches the plan JSON's flip_step).
    text_scale: 1 or 2 (... 4) times the 5x7 font; automatic (2 for wide maps) when None.
    """
    arr = _validate(roles, layer_ids, groups)
    n_steps, n_layers = arr.shape
    lay = layout_for(
        n_steps,
        n_layers,
        groups=groups,
        title=title,
        info_lines=info_lines,
        cell=cell,
        row_height=row_height,
        first_step=first_step,
        text_scale=text_scale,
        legend_roles=np.unique(arr).tolist(),
        max_width=max_width,
    )
    s = lay.text_scale
    img = np.empty((lay.height, lay.width, 3), dtype=np.uint8)
    img[:] = BACKGROUND

    if lay.title is not None:
        text, x, y = lay.title
        draw_text(img, x, y, text, INK, lay.title_scale)
    for text, x, y in lay.info:
        draw_text(img, x, y, text, MUTED, s)
    for label, role, sx, sy, size in lay.legend:
        img[sy : sy + size, sx : sx + size] = INK  # dark border keeps light swatches (grey "none") visible
        img[sy + s : sy + size - s, sx + s : sx + size - s] = COLORS[role]
        draw_text(img, sx + size + 4 * s, sy + (size - 7 * s) // 2, label, INK, s)

    # Grid, frame, marks.
    img[lay.grid_y : lay.grid_y + lay.grid_h, lay.grid_x : lay.grid_x + lay.grid_w] = _grid_pixels(arr, lay)
    x0, x1 = lay.grid_x - _FRAME, lay.grid_x + lay.grid_w
    y0, y1 = lay.grid_y - _FRAME, lay.grid_y + lay.grid_h
    img[[y0, y1], x0 : x1 + 1] = INK
    img[y0 : y1 + 1, [x0, x1]] = INK
    tick = _TICK * s
    for x in lay.x_ticks:
        img[y1 + 1 : y1 + 1 + tick, x] = INK
    for x in lay.group_marks:
        img[max(y0 - tick, 0) : y0, x] = INK
    for x, ya, yb in lay.leaders:
        img[ya:yb, x] = LEADER
    for text, x, y in lay.x_labels:
        draw_text(img, x, y, text, INK if groups is not None else MUTED, s)
    for y, text in lay.y_ticks:
        img[y, x0 - tick : x0] = INK
        w = text_size(text, s)[0]
        draw_text(img, lay.y_label_x - w, y - (7 * s) // 2, text, MUTED, s)  # digit middle on the tick
    draw_text(img, *lay.step_label, "step", INK, s, vertical=True)
    draw_text(img, *lay.layer_label, "layer", INK, s)
    return img


def map_png_bytes(
    roles: np.ndarray, layer_ids: Sequence[str], *, text: Mapping[str, str] | None = None, **options: Any
) -> bytes:
    """`render_map` (same keyword options) encoded as PNG. tEXt chunks: Software, Title, Description (the info
    lines), plus `text`."""
    img = render_map(roles, layer_ids, **options)
    meta: dict[str, str] = {"Software": f"sd-webui-k-lora {__version__}"}
    if options.get("title"):
        meta["Title"] = options["title"]
    if options.get("info_lines"):
        meta["Description"] = "\n".join(options["info_lines"])
    meta.update(text or {})
    return encode_png(img, text=meta)


def save_map_png(path: str | os.PathLike[str], roles: np.ndarray, layer_ids: Sequence[str], **options: Any) -> str:
    """Write the map PNG to `path` (atomically: temp file + rename, so a viewer never sees half a file).
    Options: those of `map_png_bytes`."""
    data = map_png_bytes(roles, layer_ids, **options)
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".klora-map-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
