"""Figures: training curves and worst-case panels."""

from __future__ import annotations

import numpy as np
import pandas as pd
from colour_vision import VISIONS, distance
from skimage.draw import disk

from mlseg.io import read_image, read_mask
from mlseg.plots import plot_worst


def test_worst_cases_of_a_tile_with_a_slides_ids_need_no_colour_for_every_id(tmp_path):
    """A tile cut from a slide's label image keeps its global ids (up to 2**31 - 1 read):
    the panel's palette had a colour per label value, 45 GiB for ids near 2**31 (mlseg
    evaluate ended in a MemoryError after scoring), here 1.2 GB for ids near 5e7."""
    import tracemalloc

    truth = np.zeros((64, 64), np.int32)
    for i, centre in enumerate(((16, 16), (40, 44))):
        truth[disk(centre, 8, shape=truth.shape)] = 50_000_000 + i
    image = np.full((64, 64, 3), 230, np.uint8)
    tracemalloc.start()
    try:
        path = plot_worst([("tile", image, truth, truth, "Dice 1.00")], tmp_path / "worst.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6
    shown = read_image(path)
    assert shown.shape[2] == 3 and shown.std() > 0


def test_worst_cases_count_the_nuclei_of_the_prediction_too():
    """A prediction without nuclei is a black panel: its title says so, as the truth's
    says how many were annotated; it gave the scores alone."""
    from mlseg.plots import worst_figure

    truth = np.zeros((32, 32), np.int32)
    truth[disk((16, 16), 6, shape=truth.shape)] = 1
    image = np.full((32, 32, 3), 230, np.uint8)
    fig = worst_figure([("x", image, truth, np.zeros_like(truth), "Dice 0.00")])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["x", "truth (1 nucleus)", "prediction (0 nuclei)\nDice 0.00"]


def test_training_curves_without_validation_images_say_so():
    """With data.val_fraction 0 the history has no validation Dice: the right panel was
    an empty 'Validation Dice' frame, as if the curve had failed to draw."""
    from mlseg.plots import history_figure

    history = pd.DataFrame(
        {
            "step": [30, 60],
            "train_loss": [1.4, 0.9],
            "val_loss": [np.nan] * 2,
            "val_dice": [np.nan] * 2,
        }
    )
    _, ax_dice = history_figure(history).axes
    assert [t.get_text() for t in ax_dice.texts] == ["no validation images"]


def test_worst_cases_show_nuclei_one_pixel_apart_as_two(tmp_path):
    """A 512-pixel tile's panels were drawn about 200 pixels wide (three to a 9-inch figure
    at 100 dpi): nuclei a few pixels across, and touching ones, merged into one blob, so the
    figure could not show the split or merged nuclei it is there to show."""
    from scipy import ndimage

    truth = np.zeros((512, 512), np.int32)
    n = 0
    for top in range(20, 480, 40):
        for left in range(20, 480, 40):
            truth[top : top + 6, left : left + 6] = n + 1  # two 6-pixel nuclei, 1 pixel apart
            truth[top : top + 6, left + 7 : left + 13] = n + 2
            n += 2
    image = np.zeros((512, 512, 3), np.uint8)
    path = plot_worst([("tile", image, truth, np.zeros_like(truth), "")], tmp_path / "w.png")
    shown = read_image(path).astype(int)
    black = shown.max(axis=2) < 8
    cols = np.flatnonzero(black.sum(axis=0) > 100)  # the three black panels' columns
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    assert len(runs) == 3
    truth_cols = runs[1]
    rows = np.flatnonzero(black[:, truth_cols].sum(axis=1) > 100)  # not the title's text
    panel = shown[rows[0] : rows[-1] + 1, truth_cols[0] : truth_cols[-1] + 1]
    _, count = ndimage.label(panel.max(axis=2) > 40)
    assert count == n


def test_worst_cases_of_a_narrow_tile_keep_their_titles_apart():
    """A tall, narrow tile (512 x 96 pixels) had columns as narrow as its panels: the
    prediction's caption ran into the truth's title and off the figure's edge."""
    from mlseg.plots import worst_figure

    truth = np.zeros((512, 96), np.int32)
    truth[disk((40, 40), 6, shape=truth.shape)] = 1
    image = np.full((512, 96, 3), 230, np.uint8)
    fig = worst_figure([("tile_0001", image, truth, truth, "Dice 0.62  AJI 0.41  PQ 0.38")])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(box.x0 >= 0 and box.x1 <= fig.bbox.width for box in boxes)


def test_worst_cases_keep_touching_nuclei_apart_for_colour_blind_viewers(shared_data):
    """Truth and prediction panels drew each nucleus in a random colour: touching nuclei in
    near-equal colours read as one, a correct split as a merge, for 6% of the touching pairs
    of the shared masks in normal vision and 10-15% with a dichromacy (CIEDE2000 under 10,
    Machado 2009 simulation)."""
    from mlseg.plots import worst_figure

    dsb = (
        "dsb2018_stage1_test/masks/432f367a4c5b5674de2e2977744d10289a064e5704b21af6607b4975be47c580"
    )
    for mask in ("cpm15_he/masks/image04_mask.png", f"{dsb}_mask.png"):
        truth = read_mask(shared_data / mask)
        image = np.zeros((*truth.shape, 3), np.uint8)
        fig = worst_figure([("tile", image, truth, truth, "")])
        shown = np.round(np.asarray(fig.axes[1].images[0].get_array()) * 255)
        flat, ids = shown.reshape(-1, 3), truth.ravel()
        pixel = dict(zip(ids[::-1], np.arange(ids.size)[::-1], strict=True))  # one per label
        pairs = set()
        for a, b in ((truth[:, :-1], truth[:, 1:]), (truth[:-1], truth[1:])):
            apart = (a != b) & (a > 0) & (b > 0)
            pairs |= set(zip(a[apart].tolist(), b[apart].tolist(), strict=True))
        assert len(pairs) > 40
        first = flat[[pixel[a] for a, _ in pairs]]
        second = flat[[pixel[b] for _, b in pairs]]
        for vision in VISIONS:
            assert distance(first, second, vision).min() >= 20, vision


def test_a_large_tiles_worst_case_is_held_at_its_panels_size_in_its_full_size_colours():
    """A large tile's worst case is reduced to its panels' size once scored, not held whole
    until worst.png is drawn: each panel pixel is the nucleus at the middle of its block
    (ids never mixed), in the colour chosen on the full-size labels, as drawn before (a
    nucleus thinner than a block still gives its neighbours other colours than its own);
    the titles count every nucleus, one smaller than a block too. A tile under twice the
    panel's size is kept whole, as drawn before."""
    from mlseg.plots import PANEL_MAX_PX, _colour_index, _display, worst_case

    truth = np.zeros((2100, 1030), np.int32)
    truth[100:300, 100:301] = 1  # 1 and 2 touch along columns 300 | 301 only
    truth[100:300, 301:500] = 2
    truth[1001, 1001] = 3  # one pixel, between the sampled ones
    truth[600:800, 100:301] = 4
    truth[600:800, 301] = 5  # one column, between the sampled ones, touching 4 and 6
    truth[600:800, 302:500] = 6
    truth[800:820, 100:500] = 6  # touching 4 too: the third colour, drawn at full size
    image = np.full((*truth.shape, 3), 230, np.uint8)
    image[truth > 0] = (90, 60, 140)
    case = worst_case("tile", image, truth, np.zeros_like(truth), "Dice 0.00")
    step = 2100 // PANEL_MAX_PX  # 4: the largest that leaves the panel its 512 pixels
    assert case.shape == (2100, 1030) and case.truth.shape == (2100 // step, 1030 // step)
    assert case.image.shape == (*case.truth.shape, 3) and case.pred.shape == case.truth.shape
    assert case.truth.dtype == np.int8 and (case.pred == -1).all()
    full = _colour_index(truth)  # the colours as drawn from the full-size labels
    assert np.array_equal(case.truth, full[2::step, 2::step][: 2100 // step, : 1030 // step])
    one, two = case.truth[50, 50], case.truth[50, 100]
    assert one >= 0 and two >= 0 and one != two
    assert (case.truth[175, 50], case.truth[175, 100], case.truth[202, 50]) == (0, 2, 2)
    assert (case.truth_count, case.pred_count) == ("6 nuclei", "0 nuclei")
    # the image panel: the mean of each block of the full-size display
    assert np.allclose(case.image[30, 30], _display(image)[120:124, 120:124].mean(axis=(0, 1)))
    small = worst_case("tile", image[:1000, :1000], truth[:1000, :1000], truth[:1000, :1000], "")
    assert np.array_equal(small.image, _display(image[:1000, :1000]))
    assert np.array_equal(small.truth, _colour_index(truth[:1000, :1000]))


def test_worst_cases_show_a_dapi_field_saved_blue_as_its_grey_file():
    """A fluorescence test tile of one channel saved as RGB (DAPI in blue, red and green
    empty): its panel was stretched over the empty channels too, and the dark background
    shone at 87% of full blue, as bright as the nuclei, where its grey file shows 5%."""
    from mlseg.plots import worst_case

    truth = np.zeros((64, 64), np.int32)
    truth[disk((20, 20), 6, shape=truth.shape)] = 1
    grey = np.where(truth > 0, 200, 12).astype(np.uint8)
    grey[40:, 40:] = 20  # a brighter patch of background: the top is not the nuclei alone
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = grey
    shown_grey = worst_case("grey", grey, truth, truth, "").image
    shown_blue = worst_case("blue", blue, truth, truth, "").image
    assert shown_grey[5, 5] < 0.1 and shown_grey[20, 20] == 1.0
    assert np.isclose(shown_blue[5, 5, 2], shown_grey[5, 5]) and shown_blue[20, 20, 2] == 1.0
