"""Selection map rendering: cell colours at the positions the layout exposes, size caps, legend, labels, errors."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from klora_ext.errors import KLoraError
from klora_ext.png import decode_png, read_png_text
from klora_ext.selection_map import (
    BACKGROUND,
    BOTH,
    COLORS,
    CONTENT,
    FONT,
    GLYPH_H,
    GLYPH_W,
    MAX_WIDTH,
    NONE,
    STYLE,
    Layout,
    draw_text,
    layout_for,
    map_png_bytes,
    render_map,
    save_map_png,
    text_mask,
    text_size,
)

SMALL = np.array(
    [
        [CONTENT, CONTENT, BOTH, NONE, CONTENT],
        [CONTENT, STYLE, BOTH, NONE, CONTENT],
        [STYLE, STYLE, STYLE, CONTENT, NONE],
    ],
    dtype=np.int8,
)
SMALL_GROUPS = ["IN4", "IN4", "MID", "OUT0", "OUT0"]


def ids(n: int) -> list[str]:
    return [f"unet:layer{i}" for i in range(n)]


def monotone(steps: int, layers: int, seed: int = 0) -> np.ndarray:
    flips = np.random.default_rng(seed).integers(0, steps + 2, size=layers)
    return (np.arange(steps)[:, None] < flips[None, :]).astype(np.int8)


def layout_of(roles: np.ndarray, **kw: object) -> Layout:
    """The layout render_map uses for these roles (legend entries depend on the roles present)."""
    return layout_for(*roles.shape, legend_roles=np.unique(roles).tolist(), **kw)  # type: ignore[arg-type]


def assert_cells(img: np.ndarray, lay: Layout, roles: np.ndarray) -> None:
    """Every pixel of every cell has its role's colour (exact: no downsampling)."""
    assert not lay.downsampled
    for t in range(roles.shape[0]):
        for i in range(roles.shape[1]):
            x0, y0 = lay.col_x0[i], lay.row_y0[t]
            cell = img[y0 : y0 + lay.row_h, x0 : x0 + lay.col_w]
            assert (cell == COLORS[int(roles[t, i])]).all(), (t, i)
            cx, cy = lay.cell_center(t, i)
            assert tuple(img[cy, cx]) == COLORS[int(roles[t, i])]


# ---------------------------------------------------------------------------------------------------------------
# font


def test_font_glyphs_are_well_formed() -> None:
    for ch, glyph in FONT.items():
        assert glyph.shape == (GLYPH_H, GLYPH_W), ch
        if ch != " ":
            assert glyph.any(), ch
    needed = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,:-_=()/%+<>≥γαβ "
    assert set(needed) <= set(FONT)


def test_text_size_and_mask_agree() -> None:
    for text, scale in [("a", 1), ("gamma=1.23", 1), ("OUT11", 2), ("two\nlines!", 3), ("", 1)]:
        mask = text_mask(text, scale)
        assert mask.shape[::-1] == text_size(text, scale)
    assert text_size("abc") == (3 * 6 - 1, GLYPH_H)
    assert text_size("abc", 2) == (2 * (3 * 6 - 1), 2 * GLYPH_H)


def test_draw_text_paints_inside_its_box_only() -> None:
    img = np.zeros((40, 120, 3), dtype=np.uint8)
    w, h = draw_text(img, 5, 7, "K-LoRA 1.5", (200, 10, 20))
    assert (w, h) == text_size("K-LoRA 1.5")
    painted = (img == (200, 10, 20)).all(axis=2)
    ys, xs = np.nonzero(painted)
    assert painted.any()
    assert xs.min() >= 5
    assert xs.max() < 5 + w
    assert ys.min() >= 7
    assert ys.max() < 7 + h
    assert (img[~painted] == 0).all()


def test_draw_text_scale_and_vertical() -> None:
    img = np.zeros((60, 60, 3), dtype=np.uint8)
    w, h = draw_text(img, 2, 2, "step", (255, 255, 255), 2, vertical=True)
    assert (w, h) == text_size("step", 2)[::-1]
    assert img.any()


def test_draw_text_clips_and_falls_back() -> None:
    img = np.zeros((10, 10, 3), dtype=np.uint8)
    draw_text(img, -20, -3, "clipped text", (1, 2, 3))
    draw_text(img, 8, 8, "XYZ", (1, 2, 3))
    draw_text(img, 100, 100, "off", (1, 2, 3))
    # characters without a glyph draw as '?', lower-case ones as their capital form
    np.testing.assert_array_equal(text_mask("\u2603"), text_mask("?"))
    np.testing.assert_array_equal(text_mask("–"), text_mask("-"))
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        text_mask("x", 0)


# ---------------------------------------------------------------------------------------------------------------
# cells


def test_small_map_cell_colours() -> None:
    img = render_map(SMALL, ids(5))
    assert img.dtype == np.uint8
    assert img.ndim == 3
    assert img.shape[2] == 3
    lay = layout_of(SMALL)
    assert img.shape[:2] == (lay.height, lay.width)
    assert lay.col_w >= 1
    assert lay.row_h >= 1
    assert_cells(img, lay, SMALL)
    # row 0 (first step) is at the top, layers left to right
    assert lay.row_y0 == tuple(sorted(lay.row_y0))
    assert lay.col_x0 == tuple(sorted(lay.col_x0))


def test_small_map_with_groups_has_gap_separators() -> None:
    img = render_map(SMALL, ids(5), groups=SMALL_GROUPS, title="t", info_lines=["gamma=1.23 alpha=1.5 beta=0.5"])
    lay = layout_of(SMALL, groups=SMALL_GROUPS, title="t", info_lines=["gamma=1.23 alpha=1.5 beta=0.5"])
    assert_cells(img, lay, SMALL)
    assert lay.gaps
    # one blank column between groups (between layer 1|2 and 2|3), none inside a group (0|1, 3|4)
    assert lay.col_x0[2] - (lay.col_x0[1] + lay.col_w) == 1
    assert lay.col_x0[3] - (lay.col_x0[2] + lay.col_w) == 1
    assert lay.col_x0[1] == lay.col_x0[0] + lay.col_w
    assert lay.col_x0[4] == lay.col_x0[3] + lay.col_w
    gap_x = lay.col_x0[2] - 1
    assert (img[lay.grid_y : lay.grid_y + lay.grid_h, gap_x] == BACKGROUND).all()
    assert [label for label, _, _ in lay.x_labels] == ["IN4", "MID", "OUT0"]


@pytest.mark.parametrize("cell", [1, 3, 9])
def test_explicit_cell_width_and_row_height(cell: int) -> None:
    roles = monotone(12, 20, seed=cell)
    img = render_map(roles, ids(20), cell=cell, row_height=cell + 1)
    lay = layout_of(roles, cell=cell, row_height=cell + 1)
    assert lay.col_w == cell
    assert lay.row_h == cell + 1
    assert_cells(img, lay, roles)


def test_bool_roles_read_as_content_and_style() -> None:
    roles = np.array([[True, False], [False, False]])
    img = render_map(roles, ids(2))
    lay = layout_of(roles.astype(int))
    assert_cells(img, lay, roles.astype(int))


def test_one_by_one() -> None:
    img = render_map(np.array([[CONTENT]]), ["unet:a"], groups=["MID"])
    lay = layout_of(np.array([[CONTENT]]), groups=["MID"])
    assert_cells(img, lay, np.array([[CONTENT]]))


# ---------------------------------------------------------------------------------------------------------------
# size


def test_large_map_fits_the_cap_at_one_pixel_per_layer() -> None:
    steps, layers = 150, 1500
    roles = monotone(steps, layers, seed=1)
    groups = [f"IN{i // 100}" for i in range(layers)]
    img = render_map(roles, ids(layers), groups=groups, title="large")
    lay = layout_of(roles, groups=groups, title="large")
    assert img.shape[1] <= MAX_WIDTH
    assert img.shape[0] <= 1200
    assert lay.col_w == 1
    assert not lay.downsampled
    rng = np.random.default_rng(0)
    for t, i in zip(rng.integers(0, steps, 200), rng.integers(0, layers, 200), strict=True):
        x, y = lay.cell_center(int(t), int(i))
        assert tuple(img[y, x]) == COLORS[int(roles[t, i])]


@pytest.mark.parametrize("layers", [1, 16, 140, 560, 1800, 1999, 2000, 2600, 5000])
def test_width_cap_for_any_layer_count(layers: int) -> None:
    lay = layout_for(30, layers, groups=[f"G{i // 37}" for i in range(layers)])
    assert lay.width <= MAX_WIDTH
    assert lay.grid_x + lay.grid_w < lay.width
    assert len(lay.col_x0) == layers
    assert all(lay.grid_x <= x < lay.grid_x + lay.grid_w for x in lay.col_x0)


def test_many_layers_are_averaged_into_columns() -> None:
    steps, layers = 6, 4000
    roles = np.full((steps, layers), STYLE, dtype=np.int8)
    roles[:, : layers // 2] = CONTENT
    roles[:, layers // 2 :: 2] = CONTENT  # right half: 50 % content per column
    img = render_map(roles, ids(layers))
    lay = layout_of(roles)
    assert img.shape[1] <= MAX_WIDTH
    assert lay.layers_per_px > 1
    assert lay.col_w == 1
    x_left, y = lay.cell_center(0, 10)
    assert tuple(img[y, x_left]) == COLORS[CONTENT]
    x_right, _ = lay.cell_center(0, layers - 10)
    mixed = img[y, x_right].astype(int)
    expect = (np.array(COLORS[CONTENT]) + np.array(COLORS[STYLE])) / 2
    assert np.abs(mixed - expect).max() <= 1


def test_many_steps_are_averaged_into_rows() -> None:
    roles = np.zeros((3100, 3), dtype=np.int8)
    roles[:1550] = CONTENT
    img = render_map(roles, ids(3))
    lay = layout_of(roles)
    assert lay.steps_per_px > 1
    assert lay.grid_h <= 1500
    x, y = lay.cell_center(0, 0)
    assert tuple(img[y, x]) == COLORS[CONTENT]
    x, y = lay.cell_center(3099, 0)
    assert tuple(img[y, x]) == COLORS[STYLE]


def test_text_scale_auto_and_explicit() -> None:
    assert layout_for(30, 16).text_scale == 1
    assert layout_for(30, 560).text_scale == 2
    assert layout_for(30, 560, text_scale=1).text_scale == 1


# ---------------------------------------------------------------------------------------------------------------
# legend, labels, ticks


def test_legend_colours_present() -> None:
    roles = monotone(20, 30)
    img = render_map(roles, ids(30))
    lay = layout_of(roles)
    labels = [label for label, *_ in lay.legend]
    assert labels[:2] == ["content", "style"]
    assert "both" not in labels  # only listed when present
    for _label, role, sx, sy, size in lay.legend:
        assert tuple(img[sy + size // 2, sx + size // 2]) == COLORS[role]
        assert sy + size <= lay.grid_y  # above the grid


def test_legend_lists_both_and_none_when_present() -> None:
    img = render_map(SMALL, ids(5))
    lay = layout_of(SMALL)
    assert [label for label, *_ in lay.legend] == ["content", "style", "both", "none"]
    for _label, role, sx, sy, size in lay.legend:
        assert tuple(img[sy + size // 2, sx + size // 2]) == COLORS[role]


def test_group_labels_never_overlap() -> None:
    layers = 600
    groups = [f"FLUX-S{i // 7}" for i in range(layers)]  # many narrow groups with long labels
    lay = layout_for(28, layers, groups=groups)
    by_row: dict[int, list[tuple[int, int]]] = {}
    for text, x, y in lay.x_labels:
        w, _ = text_size(text, lay.text_scale)
        assert x >= 0
        assert x + w <= lay.width
        by_row.setdefault(y, []).append((x, x + w))
    assert len(by_row) <= 2
    for spans in by_row.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start > end
    assert 0 < len(lay.x_labels) < len(set(groups))  # some skipped, not all
    assert len(lay.group_marks) == len(set(groups)) - 1


def test_x_ticks_without_groups_and_step_ticks() -> None:
    lay = layout_for(30, 140)
    labels = [int(text) for text, _, _ in lay.x_labels]
    assert labels[0] == 0
    interval = labels[1] - labels[0]
    assert interval in (1, 5, 10, 25, 50)
    assert labels == list(range(0, 140, interval))
    steps = [int(text) for _, text in lay.y_ticks]
    assert steps[0] == 0
    assert steps[1] - steps[0] in (5, 10)
    ys = [y for y, _ in lay.y_ticks]
    assert ys == sorted(ys)
    lay1 = layout_for(30, 140, first_step=1)
    assert lay1.y_ticks[0][1] == "1"


def test_axis_labels_and_title_are_drawn() -> None:
    img = render_map(SMALL, ids(5), title="Title", info_lines=["info"])
    lay = layout_of(SMALL, title="Title", info_lines=["info"])
    assert lay.title is not None
    _, tx, ty = lay.title
    tw, th = text_size("Title", lay.title_scale)
    assert (img[ty : ty + th, tx : tx + tw] != BACKGROUND).any()
    lx, ly = lay.layer_label
    w, h = text_size("layer", lay.text_scale)
    assert (img[ly : ly + h, lx : lx + w] != BACKGROUND).any()
    assert ly > lay.grid_y + lay.grid_h
    sx, sy = lay.step_label
    assert sx + GLYPH_H * lay.text_scale < lay.grid_x


# ---------------------------------------------------------------------------------------------------------------
# PNG output


def test_png_round_trip_and_metadata() -> None:
    roles = monotone(20, 40, seed=3)
    groups = [f"OUT{i // 10}" for i in range(40)]
    kw = {"groups": groups, "title": "K-LoRA map", "info_lines": ["gamma=1.23 alpha=1.5 beta=0.5"]}
    data = map_png_bytes(roles, ids(40), text={"plan": "{}"}, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(decode_png(data), render_map(roles, ids(40), **kw))  # type: ignore[arg-type]
    meta = read_png_text(data)
    assert meta["Title"] == "K-LoRA map"
    assert meta["Description"] == "gamma=1.23 alpha=1.5 beta=0.5"
    assert meta["Software"].startswith("sd-webui-k-lora")
    assert meta["plan"] == "{}"


def test_save_map_png(tmp_path: os.PathLike[str]) -> None:
    target = os.path.join(os.fspath(tmp_path), "sub", "map.png")
    out = save_map_png(target, SMALL, ids(5), groups=SMALL_GROUPS)
    assert out == target
    with open(target, "rb") as fh:
        np.testing.assert_array_equal(decode_png(fh.read()), render_map(SMALL, ids(5), groups=SMALL_GROUPS))
    assert os.listdir(os.path.dirname(target)) == ["map.png"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("roles", "layer_ids", "groups", "needle"),
    [
        (np.array([1, 0, 1]), ids(3), None, "2-D"),
        (np.zeros((2, 3, 1), dtype=int), ids(3), None, "2-D"),
        (np.zeros((0, 3), dtype=int), ids(3), None, "empty"),
        (np.zeros((2, 3), dtype=int), ids(4), None, "layer ids"),
        (np.zeros((2, 3), dtype=int), ids(3), ["A", "B"], "group labels"),
        (np.array([[0, 1, 4]]), ids(3), None, "unknown value"),
        (np.array([[0, -1, 1]]), ids(3), None, "unknown value"),
        (np.array([[0.0, 0.5, 1.0]]), ids(3), None, "integers"),
        (np.array([["a", "b", "c"]]), ids(3), None, "integers"),
    ],
)
def test_bad_input_raises_klora_error(
    roles: np.ndarray, layer_ids: list[str], groups: list[str] | None, needle: str
) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]") as info:
        render_map(roles, layer_ids, groups=groups)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kw", [{"cell": 0}, {"row_height": 0}, {"text_scale": 0}, {"text_scale": 9}])
def test_bad_options_raise(kw: dict[str, int]) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]"):
        render_map(SMALL, ids(5), **kw)  # type: ignore[arg-type]


def test_integral_floats_are_accepted() -> None:
    img = render_map(SMALL.astype(np.float32), ids(5))
    np.testing.assert_array_equal(img, render_map(SMALL, ids(5)))
