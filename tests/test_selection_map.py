"""Selection map rendering with Pillow: cell colours at the positions the layout exposes, size caps, legend, group
ticks, the content-share curve, fonts (non-ASCII names), PNG metadata, errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from klora_ext import selection_map  # noqa: E402
from klora_ext.errors import KLoraError  # noqa: E402
from klora_ext.selection_map import (  # noqa: E402
    BACKGROUND,
    BOTH,
    COLORS,
    CONTENT,
    LARGE_LAYERS,
    MAX_WIDTH,
    NONE,
    STYLE,
    Layout,
    content_share,
    find_font,
    layout_for,
    map_png_bytes,
    render_map,
    save_map_png,
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


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def assert_cells(arr: np.ndarray, lay: Layout, roles: np.ndarray) -> None:
    """Every pixel of every cell has its role's colour (exact: no anti-aliasing, no downsampling)."""
    assert not lay.downsampled
    for t in range(roles.shape[0]):
        for i in range(roles.shape[1]):
            x0, y0 = lay.col_x0[i], lay.row_y0[t]
            cell = arr[y0 : y0 + lay.row_h, x0 : x0 + lay.col_w]
            assert (cell == COLORS[int(roles[t, i])]).all(), (t, i)


def ink_in(arr: np.ndarray, box: tuple[int, int, int, int]) -> int:
    """How many pixels in (x0, y0, x1, y1) differ from the background."""
    x0, y0, x1, y1 = box
    region = arr[y0:y1, x0:x1].astype(int)
    return int((np.abs(region - np.array(BACKGROUND)).sum(axis=2) > 60).sum())


# ---- cells ----------------------------------------------------------------------------------------------------------
def test_small_map_cell_colours() -> None:
    img = render_map(SMALL, ids(5))
    lay = layout_of(SMALL)
    assert img.size == (lay.width, lay.height)
    assert_cells(pixels(img), lay, SMALL)


def test_groups_get_one_pixel_gaps_and_ticks() -> None:
    img = pixels(render_map(SMALL, ids(5), groups=SMALL_GROUPS))
    lay = layout_of(SMALL, groups=SMALL_GROUPS)
    assert lay.gaps
    assert_cells(img, lay, SMALL)
    # the gap column between IN4 (layers 0, 1) and MID (layer 2) is background over the whole grid height
    gap_x = lay.col_x0[2] - 1
    assert gap_x == lay.col_x0[1] + lay.col_w
    assert (img[lay.grid_y : lay.grid_y + lay.grid_h, gap_x] == BACKGROUND).all()
    # a tick under the grid at each group boundary
    below = lay.grid_y + lay.grid_h + 2
    for x in lay.x_ticks:
        assert tuple(img[below, x]) != BACKGROUND
    labels = [text for text, *_ in lay.x_labels]
    assert labels[:3] == ["IN4", "MID", "OUT0"] and "layer" in labels


def test_bool_roles_and_integral_floats() -> None:
    roles = np.array([[True, False], [False, False]])
    np.testing.assert_array_equal(pixels(render_map(roles, ids(2))), pixels(render_map(roles.astype(np.int8), ids(2))))
    np.testing.assert_array_equal(
        pixels(render_map(SMALL.astype(np.float32), ids(5))), pixels(render_map(SMALL, ids(5)))
    )


def test_one_by_one() -> None:
    roles = np.array([[CONTENT]])
    img = pixels(render_map(roles, ids(1)))
    lay = layout_of(roles)
    x, y = lay.cell_center(0, 0)
    assert tuple(img[y, x]) == COLORS[CONTENT]


# ---- size -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 16, 192, 399, 400, 722, 1500, 2600, 5000])
def test_width_cap_for_any_layer_count(layers: int) -> None:
    lay = layout_for(30, layers, groups=[f"G{i // 37}" for i in range(layers)])
    assert lay.width <= MAX_WIDTH
    assert lay.grid_x + lay.grid_w < lay.width
    assert len(lay.col_x0) == layers
    assert all(lay.grid_x <= x < lay.grid_x + lay.grid_w for x in lay.col_x0)


def test_sdxl_and_flux_layer_counts_get_a_larger_sharper_map() -> None:
    sd15, sdxl = layout_for(30, 192), layout_for(30, 722)
    assert sd15.scale == 1 and sdxl.scale == 2 and LARGE_LAYERS <= 722
    assert sdxl.font_size == 2 * sd15.font_size
    assert sdxl.col_w >= 2 and not sdxl.downsampled  # every layer its own columns, never averaged away
    assert sdxl.grid_h > sd15.grid_h
    roles = monotone(30, 722, seed=3)
    groups = [f"IN{i // 61}" for i in range(722)]
    img = pixels(render_map(roles, ids(722), groups=groups))
    assert_cells(img, layout_of(roles, groups=groups), roles)


def test_many_layers_are_averaged_into_columns() -> None:
    steps, layers = 6, 6000
    roles = np.full((steps, layers), STYLE, dtype=np.int8)
    roles[:, : layers // 2] = CONTENT
    roles[:, layers // 2 :: 2] = CONTENT  # right half: 50 % content per column
    img = pixels(render_map(roles, ids(layers)))
    lay = layout_of(roles)
    assert img.shape[1] <= MAX_WIDTH and lay.layers_per_px > 1 and lay.col_w == 1
    x_left, y = lay.cell_center(0, 10)
    assert tuple(img[y, x_left]) == COLORS[CONTENT]
    x_mid, _ = lay.cell_center(0, layers // 2 + 10)
    x_end, _ = lay.cell_center(0, layers - 10)
    expect = (np.array(COLORS[CONTENT]) + np.array(COLORS[STYLE])) / 2
    assert np.abs(img[y, x_mid:x_end].astype(float).mean(axis=0) - expect).max() <= 2  # the half's mean colour


def test_many_steps_are_averaged_into_rows() -> None:
    roles = np.zeros((3100, 3), dtype=np.int8)
    roles[:1550] = CONTENT
    img = pixels(render_map(roles, ids(3), curve=False))
    lay = layout_of(roles, curve=False)
    assert lay.steps_per_px > 1 and lay.grid_h <= 1500
    x, y = lay.cell_center(0, 0)
    assert tuple(img[y, x]) == COLORS[CONTENT]
    x, y = lay.cell_center(3099, 0)
    assert tuple(img[y, x]) == COLORS[STYLE]


# ---- legend, labels, curve -----------------------------------------------------------------------------------------
def test_legend_lists_both_and_none_only_when_present() -> None:
    roles = monotone(20, 30)
    img = pixels(render_map(roles, ids(30)))
    lay = layout_of(roles)
    assert [label for label, *_ in lay.legend] == ["content", "style"]
    for _label, role, sx, sy, size in lay.legend:
        assert tuple(img[sy + size // 2, sx + size // 2]) == COLORS[role]
    assert [label for label, *_ in layout_of(SMALL).legend] == ["content", "style", "both", "none"]


def test_content_share_matches_a_hand_count() -> None:
    np.testing.assert_allclose(content_share(SMALL), [4 / 5, 3 / 5, 1 / 5])  # content or both per row


def test_curve_is_drawn_at_each_steps_share() -> None:
    steps, layers = 10, 20
    roles = np.full((steps, layers), STYLE, dtype=np.int8)
    for t in range(steps):
        roles[t, : layers - 2 * t] = CONTENT  # share 1.0, 0.9, ... 0.1
    img = pixels(render_map(roles, ids(layers)))
    lay = layout_of(roles)
    x0, y0, x1, y1 = lay.curve_box
    share = content_share(roles)
    for t in range(steps):
        x = round(x0 + (x1 - x0) * (t + 0.5) / steps)
        y = round(y1 - share[t] * (y1 - y0))
        column = img[max(y - 2, y0) : y + 3, x].astype(int)
        assert (np.abs(column - np.array(COLORS[CONTENT])).sum(axis=1) < 40).any(), t
    no_curve = layout_of(roles, curve=False)
    assert no_curve.curve_box is None and no_curve.height < lay.height


def test_title_info_and_axis_labels_are_drawn() -> None:
    img = pixels(render_map(SMALL, ids(5), title="K-LoRA map", info_lines=["gamma 1.2"]))
    lay = layout_of(SMALL, title="K-LoRA map", info_lines=["gamma 1.2"])
    _, x, y = lay.title
    assert ink_in(img, (x, y, x + 60, y + 16)) > 20
    _, x, y = lay.info[0]
    assert ink_in(img, (x, y, x + 40, y + 12)) > 10
    # the vertical "step" label left of the step numbers
    assert ink_in(img, (0, lay.grid_y, lay.grid_x - 30, lay.grid_y + lay.grid_h)) > 10


def test_non_ascii_names_are_drawn_as_their_own_letters() -> None:
    if find_font() is None:
        pytest.skip("no TrueType font on this machine")
    a = pixels(render_map(SMALL, ids(5), title="Ölgemälde γ"))
    b = pixels(render_map(SMALL, ids(5), title="?lgem?lde ?"))
    lay = layout_of(SMALL, title="Ölgemälde γ")
    _, x, y = lay.title
    assert not np.array_equal(a[y : y + 20, x : x + 140], b[y : y + 20, x : x + 140])


def test_font_choice_env_and_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    found = find_font()
    if found is not None:
        monkeypatch.setenv("KLORA_FONT", found)
        selection_map.find_font.cache_clear()
        assert find_font() == found
    monkeypatch.setenv("KLORA_FONT", os.path.join(os.fspath(tmp_path), "missing.ttf"))
    monkeypatch.setattr(selection_map, "_FONT_DIRS", ())
    monkeypatch.setattr(selection_map, "_extra_font_dirs", [])
    selection_map.find_font.cache_clear()
    selection_map._font.cache_clear()
    try:
        assert find_font() is None
        img = render_map(SMALL, ids(5), title="fallback font")  # Pillow's own font
        assert_cells(pixels(img), layout_of(SMALL, title="fallback font"), SMALL)
    finally:
        selection_map.find_font.cache_clear()
        selection_map._font.cache_clear()


# ---- PNG ------------------------------------------------------------------------------------------------------------
def test_png_bytes_carry_pixels_and_utf8_metadata() -> None:
    kw = {"groups": SMALL_GROUPS, "title": "map", "info_lines": ["a", "b"]}
    data = map_png_bytes(SMALL, ids(5), text={"plan": "{}", "name": "水彩 é"}, **kw)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels(render_map(SMALL, ids(5), **kw)))
        info = image.info
    assert info["Title"] == "map" and info["Description"] == "a\nb" and info["name"] == "水彩 é"
    assert info["Software"].startswith("sd-webui-k-lora ")


def test_save_map_png_is_atomic(tmp_path: os.PathLike[str]) -> None:
    target = os.path.join(os.fspath(tmp_path), "sub", "map.png")
    out = save_map_png(target, SMALL, ids(5), groups=SMALL_GROUPS)
    assert out == target
    with Image.open(target) as image:
        np.testing.assert_array_equal(
            np.asarray(image.convert("RGB")), pixels(render_map(SMALL, ids(5), groups=SMALL_GROUPS))
        )
    assert os.listdir(os.path.dirname(target)) == ["map.png"]  # no temp file left behind


# ---- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("roles", "layer_ids", "groups", "needle"),
    [
        (np.array([1, 0, 1]), ids(3), None, "2-D"),
        (np.zeros((0, 3), dtype=int), ids(3), None, "empty"),
        (np.zeros((2, 3), dtype=int), ids(4), None, "layer ids"),
        (np.zeros((2, 3), dtype=int), ids(3), ["A", "B"], "group labels"),
        (np.array([[0, 1, 4]]), ids(3), None, "unknown value"),
        (np.array([[0.0, 0.5, 1.0]]), ids(3), None, "integers"),
        (np.array([["a", "b", "c"]]), ids(3), None, "integers"),
    ],
)
def test_bad_input_raises_klora_error(roles, layer_ids, groups, needle) -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\]") as info:
        render_map(roles, layer_ids, groups=groups)
    assert needle in str(info.value)


def test_bad_scale_raises() -> None:
    with pytest.raises(KLoraError, match=r"^\[K-LoRA\] selection map scale"):
        render_map(SMALL, ids(5), scale=7)
