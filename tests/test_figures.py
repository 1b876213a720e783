"""Figure pixels: the composed figures match reference figures, and titles sit where the
earlier renderer put them.

The PNG files in tests/figures/ were drawn by the current figures.py (titles drawn by Pillow's
FreeType in matplotlib's copy of DejaVu Sans, laid out by libraqm), with this one-liner:

    python tests/test_figures.py gradcam_cli/figures.py

They no longer depend on matplotlib's font engine. They pin Pillow's rendering of the DejaVu
Sans files (DejaVuSans.ttf and DejaVuSans-Bold.ttf under matplotlib/mpl-data/fonts/ttf, the
same files in matplotlib's releases for years) with Pillow's FreeType and its raqm layout:
drawn with Pillow 13.0.0 (FreeType 2.14.3, raqm 0.11.0, HarfBuzz 14.5.0, FriBiDi 1.0.8), and
compared exactly (PNG is lossless), since no difference calling for a tolerance was seen.
Another FreeType or HarfBuzz may move a title's anti-aliased pixels: where only title pixels
differ, redraw the references with the one-liner and look at them. A Pillow without raqm
(Pillow's wheels load libfribidi from the system) lays lines out otherwise (FreeType's hinted
advances, no right-to-left reordering, so some titles wrap otherwise): the exact comparisons
and the comparison with the earlier renderer are skipped there. The inputs are made with exact
integer and float arithmetic only, so they are the same on every machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = Path(__file__).resolve().parent / "figures"

RANKS = ["1. tiger cat 38.1%", "2. tabby 20.4%", "3. Egyptian cat 12.9%",
         "lowest: African hunting dog 6.6e-05%"]
LONG = ["1. Rhodesian ridgeback hound of the southern African plains and hills 0.0003%",
        "2. tiny 2.1e-07%",
        "3. against Chesapeake Bay retriever, a long-haired hunting dog 100.0%",
        "lowest: supercalifragilisticexpialidociousnessword 0.1%"]
SHARED = [f"{t} (peak {p:.3g})" for t, p in zip(RANKS, [0.0123, 4.5e-06, 1.0, 0.000178])]
NON_LATIN = ["1. кошка тигровая 38.1%", "2. γάτα 12.5%", "3. chat tigré 9.9%",
             "lowest: גמל 0.0051%"]

CASES = {  # name: (panel, titles, image title, heading, guided row)
    "ranks": (224, RANKS, "tabby/chelsea.png", "Grad-CAM at layer 1 (_conv_head)", False),
    "long_labels": (224, LONG, "a folder with spaces/and a rather long file name.jpeg",
                    "Counterfactual Grad-CAM++ at layer-features.28", False),
    "shared_scale": (224, SHARED, "flat/0001.png", "HiResCAM at layer 3", False),
    "non_latin": (224, NON_LATIN, "кошки/фото.png", "LayerCAM at layer 1", False),
    "guided_small": (96, RANKS, "tabby/chelsea.png", "Grad-CAM at layer 1", True),
}


def case_inputs(panel: int, n_maps: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, heatmaps (K, H, W) float32 in [0, 1], guided (K, H, W, 3) uint8),
    made with exact arithmetic so every machine gets the same bits."""
    y, x = np.mgrid[0:panel, 0:panel].astype(np.int64)
    bx, by = x * 8 // panel, y * 8 // panel  # 8 x 8 blocks keep the PNG files small
    image = np.stack([bx * 255 // 7, by * 255 // 7, (bx + by) % 2 * 200 + 20],
                     axis=-1).astype(np.uint8)
    heatmaps = []
    for k in range(n_maps):
        cx, cy = panel * (k + 1) // (n_maps + 1), panel * (n_maps - k) // (n_maps + 1)
        rings = ((x - cx) ** 2 + (y - cy) ** 2) * 16 // (panel * panel // 4)  # 0, 1, 2, ...
        heatmaps.append(np.clip(np.float32(1) - rings.astype(np.float32) / np.float32(16),
                                0, 1).astype(np.float32))
    guided = np.stack([np.stack([bx * (k + 3) * 9 % 256, by * (k + 5) * 9 % 256,
                                 (bx ^ by) * 30 % 256], axis=-1)
                       for k in range(n_maps)]).astype(np.uint8)
    return image, np.stack(heatmaps), guided


def draw(figures_module, name: str, uint8_maps: bool = False) -> np.ndarray:
    """Compose the named case with the given figures module."""
    panel, titles, image_title, heading, guided_row = CASES[name]
    image, heatmaps, guided = case_inputs(panel, len(titles))
    if uint8_maps:
        heatmaps = np.clip(heatmaps * 255.0 + 0.5, 0, 255).astype(np.uint8)
    writer = figures_module.FigureWriter(n_maps=len(titles), panel=panel, guided_row=guided_row)
    return writer.compose(image, heatmaps, titles, image_title, heading,
                          guided=guided if guided_row else None)


def reference(name: str) -> np.ndarray:
    return np.asarray(Image.open(REFERENCES / f"{name}.png").convert("RGB"))


RAQM = pytest.mark.skipif(
    not features.check("raqm"),
    reason="this Pillow has only its basic text layout (libraqm or libfribidi not found): "
           "glyphs are placed otherwise than in tests/figures/*.png, drawn with raqm")


@pytest.fixture(scope="module")
def figures_module():
    from gradcam_cli import figures
    return figures


@RAQM
@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_matches_the_reference_exactly(figures_module, name: str) -> None:
    """Same pixels as the reference: layout, wrapping, ellipsis, probabilities, overlays."""
    drawn = draw(figures_module, name)
    expected = reference(name)
    assert drawn.shape == expected.shape
    differing = np.argwhere((drawn != expected).any(axis=-1))
    assert differing.size == 0, f"{len(differing)} pixels differ, first at {differing[:3]}"


@pytest.mark.parametrize("name", ["ranks", "guided_small"])
def test_uint8_colour_indices_give_the_float_maps_figure(figures_module, name: str) -> None:
    """Render processes get uint8 maps; the figure must not change."""
    assert np.array_equal(draw(figures_module, name, uint8_maps=True),
                          draw(figures_module, name))


def test_a_writer_draws_each_figure_as_a_fresh_writer_would(figures_module) -> None:
    """Nothing a writer keeps from one figure changes the next: the same titles but other
    probabilities, composed after another figure, give a fresh writer's pixels."""
    panel, titles, image_title, heading, _ = CASES["long_labels"]
    image, heatmaps, _ = case_inputs(panel)
    writer = figures_module.FigureWriter(n_maps=4, panel=panel)
    writer.compose(image, heatmaps, titles, image_title, heading)
    other = [t.replace("0.0003%", "9.8765%").replace("0.1%", "71.4%") for t in titles]
    fresh = figures_module.FigureWriter(n_maps=4, panel=panel)
    assert np.array_equal(writer.compose(image, heatmaps, other, image_title, heading),
                          fresh.compose(image, heatmaps, other, image_title, heading))


def test_long_titles_take_two_lines_and_keep_their_probability(figures_module) -> None:
    """At most two lines, each within the panel unless a lone word; a label too long is
    shortened with an ellipsis, never the probability."""
    writer = figures_module.FigureWriter(n_maps=4, panel=224)
    for title in LONG + RANKS + SHARED + NON_LATIN:
        lines = writer._fit(title)
        assert 1 <= len(lines) <= 2, title
        assert lines[-1].endswith(title.rpartition(" ")[2]), title
        assert all(" " not in line or writer._title.width(line) <= 224 - 4 for line in lines)
    shortened = writer._fit(LONG[0])
    assert shortened[0] == "1. Rhodesian ridgeback hound of"
    assert shortened[1].startswith("the southern African") and "\u2026 0.0003%" in shortened[1]
    assert writer._fit(LONG[1]) == ["2. tiny 2.1e-07%"]


def test_titles_are_dejavu_sans_from_matplotlib(figures_module) -> None:
    """Titles 9 pt regular and headings 10 pt bold at 100 dpi, from matplotlib's own files."""
    import matplotlib
    writer = figures_module.FigureWriter(n_maps=1, panel=64)
    assert writer._title.font.getname() == ("DejaVu Sans", "Book")
    assert writer._heading.font.getname() == ("DejaVu Sans", "Bold")
    assert writer._title.font.size == 12.5 and abs(writer._heading.font.size - 13.89) < 0.01
    assert (writer._title.line_height, writer._heading.line_height) == (16, 17)
    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if bundled.is_file():  # some distributions package matplotlib without its fonts
        assert Path(writer._title.font.path) == bundled


# ------------------------------------------------------ where the earlier renderer put titles

EARLIER = "5d16555"  # the last commit whose titles matplotlib's FT2Font drew (title_text.py)
INK = 64             # a pixel at least this dark (of 255) is ink when measuring lines
# Bounds on how far a title line may sit from the earlier renderer's, on the band's mean
# absolute difference (0-255, every pixel of the band) and on its total ink. Measured over
# CASES with Pillow 13.0.0 and matplotlib 3.11.2: centres within 1.5 px (mean +0.3), bottom
# rows equal, top rows within 2 (ascenders: FreeType's own hinting where matplotlib forced its
# autohinter), a band MAD of 6.9 to 16.9, which is 0.90 to 1.00 times the MAD between the
# earlier band and itself moved one pixel to the right (glyph edges and sub-pixel places, not
# layout), and 0.990 to 1.025 times the earlier ink.
CENTRE_PX, TOP_ROWS, BOTTOM_ROWS = 2.0, 2, 1
MAD_BOUND, MAD_VS_ONE_PIXEL, INK_RATIO = 24.0, 1.25, 0.06


@pytest.fixture(scope="module")
def earlier_figures(tmp_path_factory):
    """figures.py and title_text.py as of EARLIER, from git, imported as a package from a
    temporary folder (figures.py imports ``.title_text``)."""
    package = tmp_path_factory.mktemp("earlier") / f"figures_{EARLIER}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("figures.py", "title_text.py"):
        try:
            shown = subprocess.run(["git", "show", f"{EARLIER}:gradcam_cli/{name}"], cwd=ROOT,
                                   capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            pytest.skip(f"the earlier renderer's source is not at hand: git show "
                        f"{EARLIER}:gradcam_cli/{name} failed ({error})")
        (package / name).write_bytes(shown.stdout)
    spec = importlib.util.spec_from_file_location(package.name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    sys.modules[package.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[package.name])
    try:
        module = importlib.import_module(f"{package.name}.figures")
        module.FigureWriter(n_maps=1, panel=32).compose(
            np.zeros((32, 32, 3), np.uint8), np.zeros((1, 32, 32), np.uint8), ["a 1%"], "b", "c")
    except Exception as error:  # noqa: BLE001 (whatever an API change raises)
        import matplotlib
        pytest.skip(f"the earlier renderer (matplotlib's ft2font: FT2Font, Kerning, set_text's "
                    f"positions) does not run with matplotlib {matplotlib.__version__}: "
                    f"{type(error).__name__}: {error}")
    yield module
    for name in [name for name in sys.modules if name.startswith(package.name)]:
        del sys.modules[name]


def ink_extent(cell: np.ndarray) -> tuple[float, int, int]:
    """(horizontal centre of the ink's extent, first and last inked row) of a greyscale cell."""
    ink = cell <= 255 - INK
    columns, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
    assert columns.size, "no ink"
    return (columns[0] + columns[-1] + 1) / 2, int(rows[0]), int(rows[-1])


def title_lines(writer, name: str) -> dict[str, tuple[slice, slice]]:
    """Where each title line of the case is drawn: {name: (rows, columns)} of the figure.

    A panel's lines are told apart at the row 3 below each line's baseline; a panel's columns
    reach half a gap into its neighbours."""
    panel, titles, image_title, _, guided_row = CASES[name]
    step, band, gap = writer._title.line_height, writer.BAND, writer.GAP
    regions = {"heading": (slice(0, 22), slice(0, writer.width))}
    for slot, title in enumerate([image_title] + titles):
        n = len(writer._fit(title))
        baselines = [band - 6 - (n - 1 - row) * step for row in range(n)]
        tops = [22] + [b + 3 for b in baselines[:-1]]
        left = writer._panel_left(slot)
        for row, (top, bottom) in enumerate(zip(tops, tops[1:] + [band])):
            regions[f"panel {slot} line {row}"] = (slice(top, bottom),
                                                   slice(left - gap // 2,
                                                         left + panel + gap // 2))
    if guided_row:
        top = band + panel + gap
        middle = top + panel // 2 + 3
        regions["guided line 0"] = (slice(top, middle), slice(0, writer._panel_left(1)))
        regions["guided line 1"] = (slice(middle, writer.height), slice(0, writer._panel_left(1)))
    return regions


@RAQM  # the basic layout's hinted advances are wider: some titles wrap otherwise
@pytest.mark.parametrize("name", sorted(CASES))
def test_titles_sit_where_the_earlier_renderer_put_them(figures_module, earlier_figures,
                                                       name: str) -> None:
    """Every title line, the heading and the guided row's label are wrapped alike, centred
    within CENTRE_PX of the earlier renderer's ink and on its rows (BOTTOM_ROWS, TOP_ROWS);
    the title bands differ at glyph edges only: a mean absolute difference under MAD_BOUND and
    under MAD_VS_ONE_PIXEL times what moving the earlier band by one pixel makes, and as much
    ink within INK_RATIO."""
    panel, titles, image_title, _, guided_row = CASES[name]
    writer = figures_module.FigureWriter(n_maps=len(titles), panel=panel, guided_row=guided_row)
    earlier = earlier_figures.FigureWriter(n_maps=len(titles), panel=panel,
                                           guided_row=guided_row)
    for title in [image_title] + titles:
        assert writer._fit(title) == earlier._fit(title)
    new = draw(figures_module, name).min(axis=-1)
    old = draw(earlier_figures, name).min(axis=-1)
    assert new.shape == old.shape
    for line, (rows, columns) in title_lines(writer, name).items():
        (new_x, new_top, new_bottom) = ink_extent(new[rows, columns])
        (old_x, old_top, old_bottom) = ink_extent(old[rows, columns])
        assert abs(new_x - old_x) <= CENTRE_PX, (line, new_x, old_x)
        assert abs(new_top - old_top) <= TOP_ROWS, (line, new_top, old_top)
        assert abs(new_bottom - old_bottom) <= BOTTOM_ROWS, (line, new_bottom, old_bottom)
    band = slice(0, writer.BAND)
    mad = np.abs(new[band].astype(np.int16) - old[band]).mean()
    moved = np.abs(old[band, 1:].astype(np.int16) - old[band, :-1]).mean()
    assert mad <= MAD_BOUND and mad <= MAD_VS_ONE_PIXEL * moved, (mad, moved)
    ink_new, ink_old = (255 - new[band]).sum(), (255 - old[band]).sum()
    assert abs(ink_new / ink_old - 1) <= INK_RATIO  # the same glyphs, as dark


def test_overlay_matches_the_float_blend_for_every_index_and_value(figures_module) -> None:
    """Every (colour index, image value) pair, per channel, equals the float32 formula."""
    lut = figures_module._jet_lut()
    index, value = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    image = np.repeat(value.astype(np.uint8)[..., None], 3, axis=-1)
    heatmap = index.astype(np.uint8)
    expected = np.clip(0.5 * image.astype(np.float32) + 0.5 * lut[heatmap] + 0.5, 0, 255)
    assert np.array_equal(figures_module.overlay(image, heatmap), expected.astype(np.uint8))
    as_float = (index / 255.0).astype(np.float32)
    assert np.array_equal(figures_module.overlay(image, as_float), expected.astype(np.uint8))


def test_overlay_at_another_alpha_matches_the_float_blend(figures_module) -> None:
    """Alphas other than 0.5 go through the per-channel tables: still the float32 formula."""
    lut = figures_module._jet_lut()
    index, value = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    image = np.stack([value, 255 - value, (value * 7) % 256], axis=-1).astype(np.uint8)
    heatmap = index.astype(np.uint8)
    blended = 0.7 * image.astype(np.float32) + 0.3 * lut[heatmap]
    expected = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(figures_module.overlay(image, heatmap, alpha=0.3), expected)


def write_references(figures_path: str) -> None:
    """Draw every case with the figures module at ``figures_path`` into tests/figures/."""
    spec = importlib.util.spec_from_file_location("reference_figures", figures_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    REFERENCES.mkdir(exist_ok=True)
    for name in CASES:
        Image.fromarray(draw(module, name)).save(REFERENCES / f"{name}.png", optimize=True)
        print(REFERENCES / f"{name}.png")


if __name__ == "__main__":
    write_references(sys.argv[1])


def test_a_long_heading_on_a_narrow_figure_is_shortened_not_cut() -> None:
    from gradcam_cli.figures import FigureWriter
    """One panel (a multi-label image with one class present): the heading keeps clear of
    both edges, ending in an ellipsis; a wide figure keeps it whole."""
    heading = "Grad-CAM at vit.layers.1.layernorm_before (default layer for this transformer)"
    narrow = FigureWriter(1, 224)
    image = np.full((224, 224, 3), 128, dtype=np.uint8)
    figure = narrow.compose(image, np.zeros((1, 224, 224)), ["1. cat 90.0%"], "a.png", heading)
    band = figure[:narrow.BAND // 2]
    assert band[:, :narrow.GAP].min() == 255 and band[:, -narrow.GAP:].min() == 255
    assert band.min() < 128  # the heading is drawn
    assert narrow._fit_heading(heading).endswith("\u2026")
    assert FigureWriter(4, 224)._fit_heading(heading) == heading
