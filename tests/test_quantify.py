"""Per-nucleus measurements against known answers and against scikit-image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlseg.config import Profile, get_profile
from mlseg.errors import ConfigError
from mlseg.quantify import (
    glass_level,
    ihc_classes,
    measure,
    optical_density,
    summarize,
    tissue_fraction,
)

HE = get_profile("he")
IHC = get_profile("ihc")


def ellipse_mask(shape, cy, cx, a, b, theta_deg=0.0) -> np.ndarray:
    """Pixels whose centre lies in the ellipse (semi-axes a along x before rotation, b),
    rotated counter-clockwise as displayed by ``theta_deg``."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    t = np.radians(theta_deg)
    x, y = xx - cx, -(yy - cy)  # y up, as displayed
    u = x * np.cos(t) + y * np.sin(t)
    v = -x * np.sin(t) + y * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def ramanujan(a: float, b: float) -> float:
    return np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))


@pytest.mark.parametrize("radius", [8.0, 20.0, 35.0])
def test_disc_known_answers(radius):
    labels = ellipse_mask((100, 100), 50.3, 49.6, radius, radius).astype(np.int32)
    row = measure(labels, None, HE, pixel_size_um=None).iloc[0]
    assert row["area_px"] == pytest.approx(np.pi * radius**2, rel=0.01)
    assert row["perimeter_px"] == pytest.approx(2 * np.pi * radius, rel=0.03)
    assert row["equivalent_diameter_px"] == pytest.approx(2 * radius, rel=0.01)
    # eccentricity is steep near a circle (axis ratio 0.98 -> 0.2): check the ratio too
    assert row["minor_axis_length_px"] / row["major_axis_length_px"] > 0.97
    assert row["eccentricity"] < 0.25
    assert row["circularity"] > 0.93
    assert row["solidity"] > 0.93
    # Feret of the pixel outline: within a pixel of the true diameter
    assert row["feret_max_px"] == pytest.approx(2 * radius, abs=1.0)
    assert row["feret_min_px"] == pytest.approx(2 * radius, abs=1.0)
    assert row["centroid_x_px"] == pytest.approx(49.6 + 0.5, abs=0.05)
    assert row["centroid_y_px"] == pytest.approx(50.3 + 0.5, abs=0.05)


@pytest.mark.parametrize("theta", [0.0, 30.0, 72.0, 135.0])
def test_ellipse_known_answers(theta):
    a, b = 30.0, 15.0
    labels = ellipse_mask((110, 110), 54.7, 55.2, a, b, theta).astype(np.int32)
    row = measure(labels, None, HE, pixel_size_um=None).iloc[0]
    assert row["area_px"] == pytest.approx(np.pi * a * b, rel=0.01)
    assert row["perimeter_px"] == pytest.approx(ramanujan(a, b), rel=0.03)
    # 4 pi area / perimeter^2 of a 2:1 ellipse, 0.84: below the cap of 1, so it is measured
    assert row["circularity"] == pytest.approx(
        4 * np.pi**2 * a * b / ramanujan(a, b) ** 2, rel=0.06
    )
    assert row["eccentricity"] == pytest.approx(np.sqrt(1 - (b / a) ** 2), abs=0.01)
    assert row["major_axis_length_px"] == pytest.approx(2 * a, rel=0.02)
    assert row["minor_axis_length_px"] == pytest.approx(2 * b, rel=0.03)
    angle = abs(row["orientation_deg"] - theta) % 180
    assert min(angle, 180 - angle) < 1.0
    assert row["feret_max_px"] == pytest.approx(2 * a, abs=1.0)
    assert row["feret_min_px"] == pytest.approx(2 * b, abs=1.0)


def test_bars_and_single_pixels():
    labels = np.zeros((20, 30), np.int32)
    labels[2, 3:13] = 1  # 1 x 10 bar
    labels[10, 20] = 2  # one pixel
    labels[14:18, 2:4] = 5  # label values need not be consecutive
    table = measure(labels, None, HE, pixel_size_um=None)
    assert table["label"].tolist() == [1, 2, 5]
    bar, dot, box = (table.iloc[i] for i in range(3))
    assert bar["feret_max_px"] == pytest.approx(10.0)
    assert bar["feret_min_px"] == pytest.approx(1.0)
    assert bar["orientation_deg"] == pytest.approx(0.0)
    assert bar["bbox_width_px"] == 10 and bar["bbox_height_px"] == 1
    assert dot["area_px"] == 1 and dot["extent"] == 1
    assert box["orientation_deg"] == pytest.approx(90.0)
    assert box["solidity"] == 1.0


def test_orientation_of_a_horizontal_nucleus_is_0_not_180():
    """A nucleus mirror-symmetric about a vertical line lies along x: orientation_deg is in
    [0, 180) and 0 for it; its covariance rounded to -8e-17 once read as 180.0."""
    labels = np.zeros((12, 82), np.int32)
    labels[4, 18:63] = labels[5, 5:76] = labels[6, 4:77] = labels[7, 14:67] = 1
    assert measure(labels, None, HE, pixel_size_um=None)["orientation_deg"].iloc[0] == (
        pytest.approx(0.0, abs=1e-9)
    )


def test_orientation_turns_counter_clockwise_as_displayed_as_the_readme_says():
    """README: orientation_deg is from the x axis, counter-clockwise as the image is shown
    (rows run down), in [0, 180), and scikit-image's orientation maps to it by
    (degrees + 90) % 180. A bar rising to the right on screen is 45, falling 135."""
    from skimage.measure import regionprops

    labels = np.zeros((40, 40), np.int32)
    for i in range(30):  # rising to the right: row falls as column grows
        labels[34 - i, 5 + i] = labels[34 - i, 6 + i] = 1
        labels[5 + i, 5 + i] = labels[5 + i, 6 + i] = 2  # falling to the right
    table = measure(labels, None, HE, pixel_size_um=None)
    assert table["orientation_deg"].tolist() == pytest.approx([45.0, 135.0], abs=1.0)
    ours = [(np.degrees(r.orientation) + 90) % 180 for r in regionprops(labels)]
    assert table["orientation_deg"].tolist() == pytest.approx(ours, abs=1e-6)


def test_microns_and_pixels_columns():
    labels = ellipse_mask((60, 60), 30, 30, 10, 6).astype(np.int32)
    in_px = measure(labels, None, HE, pixel_size_um=None)
    in_um = measure(labels, None, HE, pixel_size_um=0.5)
    assert "area_px" in in_px and "area_um2" not in in_px
    assert "area_um2" in in_um and "perimeter_um" in in_um and "feret_max_um" in in_um
    assert in_um["area_um2"].iloc[0] == pytest.approx(in_px["area_px"].iloc[0] * 0.25)
    assert in_um["perimeter_um"].iloc[0] == pytest.approx(in_px["perimeter_px"].iloc[0] * 0.5)
    assert in_um["circularity"].iloc[0] == pytest.approx(in_px["circularity"].iloc[0])
    # units: px ignores a known pixel size; um without one is a clear error
    forced_px = HE.model_copy(update={"units": "px"})
    assert "area_px" in measure(labels, None, forced_px, pixel_size_um=0.5)
    with pytest.raises(ConfigError, match="micron units"):
        measure(labels, None, HE.model_copy(update={"units": "um"}), pixel_size_um=None)


def test_a_profile_name_in_place_of_a_profile_is_a_clear_type_error():
    # measure(..., "he") ended in "'str' object has no attribute 'units'"
    labels = ellipse_mask((20, 20), 10, 10, 5, 4).astype(np.int32)
    with pytest.raises(TypeError, match=r"got str 'he'; pass mlseg.config.get_profile\('he'\)"):
        measure(labels, None, "he", pixel_size_um=None)
    table = measure(labels, None, HE, pixel_size_um=None)
    with pytest.raises(TypeError, match="must be a mlseg.config.Profile"):
        summarize(table, labels.shape, "he", None, None)


def test_empty_labels_give_empty_table_with_columns():
    labels = np.zeros((32, 32), np.int32)
    image = np.full((32, 32, 3), 255, np.uint8)
    table = measure(labels, image, IHC, pixel_size_um=0.5)
    assert len(table) == 0
    assert {"area_um2", "dab_od_mean", "ihc_class", "intensity_mean_r"} <= set(table.columns)
    summary = summarize(table, labels.shape, IHC, 0.5, 0.0)
    assert summary["count"] == 0 and summary["density_per_mm2"] == 0.0
    assert summary["h_score"] is None and summary["area_um2_mean"] is None


def test_an_image_without_nuclei_has_no_class_percentages():
    """summary.csv's row of an IHC tile without nuclei said 0 % negative, 0 % 1+... beside an
    empty positive_pct: a run's mean pct_negative counted the tile as 0 % while its mean
    positive_pct left it out, and the two no longer added up to 100."""
    image = np.full((40, 40, 3), 255, np.uint8)
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1
    rows = pd.DataFrame(
        [
            summarize(measure(lab, image, IHC, pixel_size_um=0.5), lab.shape, IHC, 0.5, None)
            for lab in (labels, np.zeros_like(labels))
        ]
    )
    pct = ["pct_negative", "pct_1plus", "pct_2plus", "pct_3plus"]
    assert rows.loc[1, [*pct, "positive_pct", "h_score"]].isna().all()
    assert rows["pct_negative"].mean() + rows["positive_pct"].mean() == pytest.approx(100.0)
    assert rows.loc[1, "n_negative"] == 0


def test_ihc_shape_only_reports_no_positivity():
    """Without the image no DAB is measured: no nucleus may be reported negative."""
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1
    labels[20:30, 20:30] = 2
    table = measure(labels, None, IHC, pixel_size_um=0.5)
    assert "ihc_class" not in table.columns
    summary = summarize(table, labels.shape, IHC, 0.5, None)
    assert summary["positive_pct"] is None and summary["h_score"] is None
    assert "n_negative" not in summary


def test_touches_border():
    labels = np.zeros((40, 40), np.int32)
    labels[0:5, 10:15] = 1
    labels[20:25, 20:25] = 2
    labels[35:40, 35:40] = 3
    labels[10:15, 0:3] = 4  # left edge only
    labels[20:25, 37:40] = 5  # right edge only
    labels[37:40, 10:15] = 6  # bottom edge only
    table = measure(labels, None, HE, pixel_size_um=None)
    assert table["touches_border"].tolist() == [True, False, True, True, True, True]
    assert summarize(table, labels.shape, HE, None, None)["border_count"] == 5


def _beer_lambert(conc_h: np.ndarray, conc_dab: np.ndarray, profile: Profile) -> np.ndarray:
    m = profile.stain_matrix()
    od = conc_h[..., None] * m[0] + conc_dab[..., None] * m[2]
    return np.clip(np.round(255.0 * 10.0 ** (-od)), 0, 255).astype(np.uint8)


def test_ihc_classes_positive_percentage_and_h_score():
    """Ten nuclei with known DAB optical density: 4 negative, 3 at 1+, 2 at 2+, 1 at 3+."""
    dab_levels = [0.0] * 4 + [0.22] * 3 + [0.45] * 2 + [0.8]
    labels = np.zeros((120, 300), np.int32)
    conc_h = np.zeros(labels.shape)
    conc_dab = np.zeros(labels.shape)
    for i, dab in enumerate(dab_levels):
        cy, cx = 30 + 60 * (i // 5), 30 + 60 * (i % 5)
        disc = ellipse_mask(labels.shape, cy, cx, 12, 12)
        labels[disc] = i + 1
        conc_h[disc] = 0.4
        conc_dab[disc] = dab
    image = _beer_lambert(conc_h, conc_dab, IHC)
    table = measure(labels, image, IHC, pixel_size_um=0.5)
    assert table["ihc_class"].tolist() == [0] * 4 + [1] * 3 + [2] * 2 + [3]
    assert np.allclose(table["dab_od_mean"], dab_levels, atol=0.02)
    assert np.allclose(table["hematoxylin_od_mean"], 0.4, atol=0.02)
    assert np.all(table["residual_od_mean"] < 0.02)  # an H-DAB slide has no eosin
    summary = summarize(table, labels.shape, IHC, 0.5, tissue_fraction(image, "ihc"))
    assert summary["positive_pct"] == pytest.approx(60.0)
    assert summary["h_score"] == pytest.approx((3 * 1 + 2 * 2 + 1 * 3) * 10.0)
    assert summary["n_negative"] == 4 and summary["n_3plus"] == 1
    area_mm2 = 120 * 300 * 0.5**2 / 1e6
    assert summary["density_per_mm2"] == pytest.approx(10 / area_mm2)


def test_an_all_positive_image_is_exactly_100_percent_positive():
    """Six nuclei, every one positive (one 1+, four 2+, one 3+): positive_pct, the sum of
    the three rounded shares, read 100.00000000000001, above the 0-100 a percentage keeps
    (`positive_pct == 100` false, beside pct_negative 0), and the H-score 1+ 2+ 2+ of
    three nuclei 166.66666666666669. Both now come from the class counts."""
    labels = np.zeros((24, 64), np.int32)
    conc_dab = np.zeros(labels.shape)
    for k, dab in enumerate([0.22, 0.45, 0.45, 0.45, 0.45, 0.8]):
        labels[6:16, 2 + 10 * k : 10 + 10 * k] = k + 1
        conc_dab[labels == k + 1] = dab
    image = _beer_lambert(np.full(labels.shape, 0.3), conc_dab, IHC)
    table = measure(labels, image, IHC, pixel_size_um=None)
    assert table["ihc_class"].tolist() == [1, 2, 2, 2, 2, 3]
    summary = summarize(table, labels.shape, IHC, None, None)
    assert summary["pct_negative"] == 0.0
    assert summary["positive_pct"] == 100.0  # exactly: the range a pathologist checks
    assert summary["h_score"] == 200.0
    thirds = table.iloc[[0, 1, 2]]  # 1+, 2+, 2+: H-score 500 / 3
    assert summarize(thirds, labels.shape, IHC, None, None)["h_score"] == 500 / 3


def test_readme_names_the_ihc_summary_and_how_to_change_the_thresholds():
    """README said "positive percentage and H-score per image" and gave the default
    dab_thresholds without saying where they come from or how to change them: a
    pathologist looked for neither `positive_pct` nor `h_score`, nor learnt that an image
    without nuclei leaves them empty. It names every IHC column of the summary, the
    packaged thresholds, and the --profiles route to other ones."""
    from pathlib import Path

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 1
    image = np.full((20, 20, 3), 200, np.uint8)
    table = measure(labels, image, IHC, pixel_size_um=None)
    summary = summarize(table, labels.shape, IHC, None, None)
    ihc_keys = [
        k for k in summary if k.startswith(("n_", "pct_")) or "score" in k or "positive" in k
    ]
    assert len(ihc_keys) == 10
    for key in ["ihc_class", *ihc_keys]:
        if not key.startswith("pct_") or key in ("pct_negative", "pct_3plus"):
            assert f"`{key}`" in readme, key
    low, mid, high = IHC.dab_thresholds
    assert f"(default {low:.2f}, {mid:.2f}, {high:.2f};" in readme
    assert "equal to a threshold takes the higher class" in readme
    assert ihc_classes(np.array(IHC.dab_thresholds), IHC.dab_thresholds).tolist() == [1, 2, 3]
    assert "`dab_thresholds`" in readme and "--profiles FILE --profile NAME" in readme
    summary = summarize(table.iloc[:0], labels.shape, IHC, None, None)
    assert summary["h_score"] is None and "`h_score` empty, not 0" in readme


def test_ihc_classes_read_the_stain_named_dab_wherever_it_stands():
    """A profile listing DAB first grades by DAB, not by the third stain (its residual)."""
    labels = np.zeros((40, 40), np.int32)
    labels[10:30, 10:30] = 1
    image = _beer_lambert(np.full(labels.shape, 0.3), np.full(labels.shape, 0.8), IHC)
    vectors = IHC.stain_matrix()
    dab_first = IHC.model_copy(
        update={
            "stain_names": ("dab", "hematoxylin", "residual"),
            "stain_vectors": vectors[[2, 0, 1]].tolist(),
        }
    )
    for profile in (IHC, dab_first):
        table = measure(labels, image, profile, pixel_size_um=None)
        assert table["dab_od_mean"][0] == pytest.approx(0.8, abs=0.02)
        assert table["ihc_class"].tolist() == [3]


def test_default_stain_vectors_follow_the_stain_names(tmp_path):
    """A profile that names its stains in another order and gives no vectors measures each
    stain by its own vector: a haematoxylin-only nucleus is negative, a brown one 3+ (with
    the vectors taken by position, DAB first read haematoxylin as DAB: 2+ for the first)."""
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n"
        "  dab_first:\n    stain: ihc\n    stain_names: [dab, hematoxylin, residual]\n"
        "  dab_second:\n    stain: ihc\n    stain_names: [hematoxylin, dab, residual]\n"
    )
    labels = np.zeros((40, 80), np.int32)
    labels[10:30, 10:30] = 1
    labels[10:30, 50:70] = 2
    conc_h = np.full(labels.shape, 0.5)
    conc_dab = np.where(labels == 2, 0.8, 0.0)
    image = _beer_lambert(conc_h, conc_dab, IHC)
    for name in ("dab_first", "dab_second"):
        table = measure(labels, image, get_profile(name, path), pixel_size_um=None)
        assert np.allclose(table["dab_od_mean"], [0.0, 0.8], atol=0.02), name
        assert np.allclose(table["hematoxylin_od_mean"], 0.5, atol=0.02), name
        assert table["ihc_class"].tolist() == [0, 3], name


def test_an_ihc_profile_without_a_stain_named_dab_is_refused(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  mine:\n    stain: ihc\n    stain_names: [h, brown, residual]\n")
    with pytest.raises(ConfigError, match=r"mine.*'dab'"):
        get_profile("mine", path)


def test_stain_od_matches_skimage_separate_stains():
    from skimage.color import separate_stains

    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (40, 50, 3), dtype=np.uint8)
    labels = np.zeros((40, 50), np.int32)
    labels[5:20, 5:25] = 1
    labels[22:38, 10:45] = 2
    ref = separate_stains(image, np.linalg.inv(HE.stain_matrix())) * 6.0
    # the same picture in a 16-bit file (I * 257 of 65535) has the same densities
    for pixels in (image, image.astype(np.uint16) * 257):
        table = measure(labels, pixels, HE, pixel_size_um=None)
        for k, stain in enumerate(HE.stain_names):
            for label in (1, 2):
                values = ref[..., k][labels == label]
                row = table[table["label"] == label].iloc[0]
                assert row[f"{stain}_od_mean"] == pytest.approx(values.mean(), rel=1e-4)
                assert row[f"{stain}_od_max"] == pytest.approx(values.max(), rel=1e-4)
                assert row[f"{stain}_od_integrated"] == pytest.approx(values.sum(), rel=1e-4)


def test_an_rgba_array_given_to_an_ihc_profile_is_refused_not_measured_without_dab():
    """An RGBA array (PIL and scikit-image read a PNG with alpha so) gave an IHC table with
    no DAB density and no class, and a positive percentage of None, its alpha measured as a
    fourth intensity channel; it is refused, with the fix named. Its RGB is measured."""
    labels = np.zeros((20, 20), np.int32)
    labels[5:12, 5:12] = 1
    rgba = np.full((20, 20, 4), 255, np.uint8)
    rgba[labels > 0, :3] = (120, 74, 64)  # DAB about 0.7, 3+
    ihc = get_profile("ihc")
    with pytest.raises(ValueError, match=r"RGB image, got 4 channel.*image\[\.\.\., :3\]"):
        measure(labels, rgba, ihc, pixel_size_um=None)
    table = measure(labels, rgba[..., :3], ihc, pixel_size_um=None)
    assert table["ihc_class"].tolist() == [3]


def test_sixteen_bit_and_grey_images():
    labels = np.zeros((30, 30), np.int32)
    labels[5:15, 5:15] = 1
    image16 = np.full((30, 30, 3), 65535, np.uint16)
    image16[5:15, 5:15] = 6553  # OD 1.0 in every channel
    table = measure(labels, image16, HE, pixel_size_um=None)
    assert table["intensity_mean_r"].iloc[0] == pytest.approx(6553)
    rgb_od = np.full(3, -np.log10(6553 / 65535))
    expected = np.maximum(rgb_od @ np.linalg.inv(HE.stain_matrix()), 0)
    assert table["hematoxylin_od_mean"].iloc[0] == pytest.approx(expected[0], rel=1e-4)
    grey = np.zeros((30, 30, 1), np.uint8)
    grey[labels > 0] = 200
    fluo = get_profile("fluorescence")
    table = measure(labels, grey, fluo, pixel_size_um=None)
    assert table["intensity_mean_grey"].iloc[0] == 200
    assert not any(c.endswith("_od_mean") for c in table.columns)


@pytest.mark.parametrize("bits", [12, 14])
def test_a_camera_image_in_a_sixteen_bit_file_measures_as_its_eight_bit_version(nuclei_pair, bits):
    """Optical density is taken against the camera's full scale (4095 for 12-bit data), not
    65535, which would read glass as OD 1.2 and every nucleus as three times too dark."""
    image8, labels = nuclei_pair(np.random.default_rng(4), 64)
    image8[0, 0] = 255  # glass at full scale somewhere, as on any bright-field field
    image16 = np.round(image8 * ((2**bits - 1) / 255)).astype(np.uint16)
    for profile in (HE, IHC):
        t8 = measure(labels, image8, profile, pixel_size_um=None)
        t16 = measure(labels, image16, profile, pixel_size_um=None)
        for stain in profile.stain_names:
            assert np.allclose(t16[f"{stain}_od_mean"], t8[f"{stain}_od_mean"], atol=0.01), stain
        assert np.array_equal(t16.get("ihc_class"), t8.get("ihc_class"))
    assert tissue_fraction(image16, "he") == pytest.approx(tissue_fraction(image8, "he"), abs=0.01)


def test_a_big_endian_sixteen_bit_image_measures_as_its_native_copy(nuclei_pair):
    """Intensities and optical densities of a ``>u2`` array (a raw camera file) are its
    native copy's; it was refused as 'image must be uint8 or uint16, got >u2'."""
    image8, labels = nuclei_pair(np.random.default_rng(4), 64)
    image16 = image8.astype(np.uint16) * 16
    native = measure(labels, image16, HE, pixel_size_um=None)
    pd.testing.assert_frame_equal(
        measure(labels, image16.astype(">u2"), HE, pixel_size_um=None), native
    )


def test_tissue_fraction():
    image = np.full((40, 40, 3), 250, np.uint8)
    image[:, :10] = (120, 60, 150)  # stained quarter
    assert tissue_fraction(image, "he") == pytest.approx(0.25)
    image[:, 30:] = (225, 190, 225)  # pale stroma (summed OD 0.24) is tissue too
    assert tissue_fraction(image, "he") == pytest.approx(0.5)
    # a grey image is one with the same value in every channel
    grey = np.tile(np.linspace(120, 255, 40).astype(np.uint8), (40, 1))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    assert 0.2 < tissue_fraction(grey, "he") == tissue_fraction(rgb, "he") < 0.9
    fluo = np.zeros((40, 40, 3), np.uint8)
    fluo[:20] = 100
    assert tissue_fraction(fluo, "fluorescence", intensity_threshold=0.05) == pytest.approx(0.5)
    assert tissue_fraction(fluo, "fluorescence") is None  # no threshold: not measured


def _smear(shared_data, tint=(1.0, 1.0, 1.0)):
    """A cytology smear: eight 32 x 32 patches of a real GBM40 H&E tile (3% of the field)
    and their nuclei on glass at 242 of 255 (noise 2 levels), the whole field multiplied by
    ``tint`` as a scanner that is not white-balanced or a yellowed mounting medium does."""
    from mlseg.io import read_image, read_mask

    tile = read_image(shared_data / "gbm40_he" / "original" / "01.png")
    nuclei = read_mask(shared_data / "gbm40_he" / "masks" / "01_mask.png")
    image = np.random.default_rng(0).normal(242.0, 2.0, (512, 512, 3))
    labels = np.zeros((512, 512), np.int32)
    for i in range(8):
        y, x, src = 40 + 60 * i, 30 + 55 * i, np.s_[64 * i : 64 * i + 32, 64 * i : 64 * i + 32]
        image[y : y + 32, x : x + 32] = tile[src]
        labels[y : y + 32, x : x + 32] = nuclei[src]
    image = np.clip(np.round(image * np.asarray(tint)), 0, 255).astype(np.uint8)
    return image, labels


def _tissue_against_full_scale(image, threshold=0.15):
    """The tissue fraction against white at full scale, glass not estimated."""
    od = sum(optical_density(image[..., c]) for c in range(image.shape[2]))
    return np.count_nonzero(od > threshold) / od.size


@pytest.mark.parametrize("tint", [(0.89, 0.88, 0.86), (0.97, 0.95, 0.85)], ids=["grey", "yellow"])
def test_tinted_glass_is_not_read_as_tissue(shared_data, tint):
    """A 3% smear on glass darkened by an unbalanced scanner white (grey) or a yellowed
    mounting medium: every pixel read as tissue (tissue fraction 1.0 against 0.031 on
    white glass), and nuclei per mm2 of tissue became nuclei per mm2 of image. Against the
    image's glass, the tissue and its density are those of the white-glass smear."""
    from mlseg.segment import quantify_image

    white, labels = _smear(shared_data)
    tinted, _ = _smear(shared_data, tint)
    _, on_white = quantify_image(white, labels, HE, pixel_size_um=0.5)
    _, on_tint = quantify_image(tinted, labels, HE, pixel_size_um=0.5)
    assert 0.025 < on_white["tissue_fraction"] < 0.04
    assert on_tint["tissue_fraction"] == pytest.approx(on_white["tissue_fraction"], rel=0.03)
    assert on_tint["density_per_mm2_tissue"] == pytest.approx(
        on_white["density_per_mm2_tissue"], rel=0.03
    )
    assert on_tint["density_per_mm2_tissue"] > 20 * on_tint["density_per_mm2"]


def test_real_glass_reads_as_glass_under_any_white(shared_data):
    """A real bright-field DSB 2018 tile, half yellowish glass (about 233, 233, 210): its
    glass was read as tissue in patches (0.90 of the field), and all of it (1.0) on a
    scanner whose white is off; measured against its glass, the two agree."""
    from mlseg.io import read_image

    name = "9f17aea854db13015d19b34cb2022cfdeda44133323fcd6bb3545f7b9404d8ab.png"
    image = read_image(shared_data / "dsb2018_stage1_test" / "original" / name)
    tinted = np.round(image * np.array([0.89, 0.88, 0.86])).astype(np.uint8)
    as_is = tissue_fraction(image, "he")
    assert as_is < 0.6
    assert tissue_fraction(tinted, "he") == pytest.approx(as_is, abs=0.02)


def test_tissue_without_glass_or_on_white_glass_is_measured_as_before(shared_data):
    """Only glass darker than white moves the threshold: a tile all tissue (a GBM40 tile,
    as scanned and tinted, where no glass is there to estimate) and a smear on white glass
    measure exactly as against full scale."""
    from mlseg.io import read_image

    tile = read_image(shared_data / "gbm40_he" / "original" / "01.png")
    tinted = np.round(tile * np.array([0.89, 0.88, 0.86])).astype(np.uint8)
    smear, _ = _smear(shared_data)
    for image in (tile, tinted, smear):
        assert glass_level(image) is None or (glass_level(image) >= 0.94 * 255).all()
        assert tissue_fraction(image, "he") == _tissue_against_full_scale(image)


def test_fluorescence_tissue_is_not_read_from_a_camera_offset():
    """A nuclear stain does not show tissue: the same field with a 12-bit camera's dark
    offset at 150 or 250 counts must not report another tissue area (it gave 0.13 and 0.94
    of the field, and density per tissue area followed)."""
    from skimage.draw import disk

    from mlseg.segment import quantify_image

    profile = get_profile("fluorescence")
    rng = np.random.default_rng(0)
    labels = np.zeros((128, 160), np.int32)
    for i, (y, x) in enumerate([(30, 30), (30, 90), (90, 50), (90, 120)], start=1):
        labels[disk((y, x), 9, shape=labels.shape)] = i
    summaries = []
    for offset in (150, 250):
        image = offset + rng.normal(0, 30, labels.shape)
        image[labels > 0] += 2000
        image = np.clip(image, 0, 4095).astype(np.uint16)
        _, summary = quantify_image(image[..., None], labels, profile, pixel_size_um=0.65)
        summaries.append(summary)
    for summary in summaries:
        assert summary["count"] == 4 and summary["density_per_mm2"] > 0
        assert summary["tissue_fraction"] is None
        assert summary["density_per_mm2_tissue"] is None


def test_min_feret_against_dense_rotation():
    """Exact calipers agree with a brute-force sweep over 0.05 degree steps."""
    rng = np.random.default_rng(3)
    labels = np.zeros((64, 64), np.int32)
    for i in range(1, 7):
        cy, cx = rng.uniform(12, 52, 2)
        blob = ellipse_mask(
            labels.shape, cy, cx, rng.uniform(3, 9), rng.uniform(2, 6), rng.uniform(0, 180)
        )
        labels[blob & (labels == 0)] = i
    table = measure(labels, None, HE, pixel_size_um=None)
    angles = np.radians(np.arange(0, 180, 0.05))
    dirs = np.stack([np.cos(angles), np.sin(angles)], 1)
    diamond = np.array([[0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]])
    for row in table.itertuples():
        ys, xs = np.nonzero(labels == row.label)
        pts = (np.stack([xs, ys], 1)[:, None, :] + diamond).reshape(-1, 2)
        proj = pts @ dirs.T
        widths = proj.max(0) - proj.min(0)
        # sampling can only miss the extremes: min from above, max from below
        assert widths.min() - 0.01 < row.feret_min_px <= widths.min() + 1e-9
        assert widths.max() - 1e-9 <= row.feret_max_px < widths.max() + 0.01


def test_agrees_with_regionprops_on_real_masks(shared_data):
    """Real CPM-15 annotations: regionprops values (see the tolerances in mlseg.quantify),
    and one row per label (counts equal the number of labels)."""
    from skimage.measure import regionprops_table

    from mlseg.io import read_image, read_mask

    masks = sorted((shared_data / "cpm15_he" / "masks").glob("*_mask.png"))[:6]
    assert masks
    for mask_path in masks:
        labels = read_mask(mask_path)
        image = read_image(
            shared_data / "cpm15_he" / "original" / mask_path.name.replace("_mask", "")
        )
        ours = measure(labels, image, HE, pixel_size_um=None)
        ref = pd.DataFrame(
            regionprops_table(
                labels,
                intensity_image=image,
                properties=(
                    "label",
                    "area",
                    "centroid",
                    "bbox",
                    "perimeter_crofton",
                    "perimeter",
                    "eccentricity",
                    "axis_major_length",
                    "axis_minor_length",
                    "orientation",
                    "solidity",
                    "extent",
                    "feret_diameter_max",
                    "intensity_mean",
                ),
            )
        )
        assert len(ours) == len(np.unique(labels)) - 1 == len(ref)
        assert (ours["label"].to_numpy() == ref["label"].to_numpy()).all()
        assert (ours["area_px"].to_numpy() == ref["area"].to_numpy()).all()
        close = dict(rtol=0, atol=1e-6)
        assert np.allclose(ours["centroid_y_px"] - 0.5, ref["centroid-0"], **close)
        assert np.allclose(ours["centroid_x_px"] - 0.5, ref["centroid-1"], **close)
        assert (ours["bbox_y_px"].to_numpy() == ref["bbox-0"].to_numpy()).all()
        assert (
            ours["bbox_width_px"].to_numpy() == (ref["bbox-3"] - ref["bbox-1"]).to_numpy()
        ).all()
        assert np.allclose(ours["perimeter_px"], ref["perimeter_crofton"], **close)
        assert np.allclose(ours["eccentricity"], ref["eccentricity"], **close)
        assert np.allclose(ours["major_axis_length_px"], ref["axis_major_length"], **close)
        assert np.allclose(ours["minor_axis_length_px"], ref["axis_minor_length"], **close)
        assert np.allclose(ours["solidity"], ref["solidity"], **close)
        assert np.allclose(ours["extent"], ref["extent"], **close)
        expected_angle = (np.degrees(ref["orientation"]) + 90.0) % 180.0
        diff = np.abs(ours["orientation_deg"] - expected_angle) % 180.0
        assert np.all(np.minimum(diff, 180.0 - diff) < 1e-6)
        feret_gap = ref["feret_diameter_max"] - ours["feret_max_px"]
        assert feret_gap.min() > -1e-6 and feret_gap.max() <= 1.0
        ratio = ours["perimeter_px"] / ref["perimeter"]
        assert 0.95 < ratio.median() < 1.06  # documented in mlseg.quantify
        for k, channel in enumerate("rgb"):
            assert np.allclose(
                ours[f"intensity_mean_{channel}"], ref[f"intensity_mean-{k}"], **close
            )


def test_ihc_synthetic_images_with_known_positive_nuclei():
    """mlseg.synth renders DAB per nucleus from a known grade (through a simulated camera,
    so optical densities are only approximately recovered): positive nuclei are found and
    the measured DAB density rises with the grade."""
    from mlseg.synth import synth_pair

    rng = np.random.default_rng(11)
    for _ in range(2):
        image, labels, info = synth_pair("ihc", 160, rng)
        table = measure(labels, image, IHC, pixel_size_um=None)
        truth = np.array([info["dab_class"][int(label)] for label in table["label"]])
        ours = table["ihc_class"].to_numpy()
        assert np.mean((truth > 0) == (ours > 0)) >= 0.95
        means = [table["dab_od_mean"][truth == g].mean() for g in range(4) if (truth == g).any()]
        assert np.all(np.diff(means) > 0)
        summary = summarize(table, labels.shape, IHC, None, None)
        assert summary["positive_pct"] == pytest.approx(100.0 * np.mean(truth > 0), abs=5.0)


def test_summary_of_one_nucleus_and_density_per_tissue_area():
    """One nucleus: its values are the mean and median, with no spread to give (two give
    one); half of the image being tissue, twice as many nuclei per mm2 of tissue as of image."""
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 10:20] = 1
    table = measure(labels, None, HE, pixel_size_um=0.5)
    summary = summarize(table, labels.shape, HE, 0.5, 0.5)
    assert summary["area_um2_mean"] == summary["area_um2_median"] == pytest.approx(25.0)
    assert summary["area_um2_std"] is None
    assert summary["density_per_mm2"] == pytest.approx(1 / (40 * 40 * 0.5**2 / 1e6))
    assert summary["density_per_mm2_tissue"] == pytest.approx(2 * summary["density_per_mm2"])
    labels[25:31, 25:31] = 2  # and two: 25 and 9 um2
    summary = summarize(measure(labels, None, HE, pixel_size_um=0.5), labels.shape, HE, 0.5, 0.5)
    assert summary["area_um2_std"] == pytest.approx(np.std([25.0, 9.0], ddof=1))
