"""Per-image and per-run outputs: exact polygons, QuPath GeoJSON, overlays, atomic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlseg.config import get_profile
from mlseg.io import read_image
from mlseg.outputs import (
    IHC_CLASSES,
    IHC_OVERLAY_COLOURS,
    RunNuclei,
    class_lookup,
    display_rgb,
    geojson_text,
    image_done,
    nuclei_table,
    outline_mask,
    overlay,
    polygons,
    read_nuclei,
    tag_table,
    to_geojson,
    write_image_outputs,
    write_run_outputs,
)
from mlseg.quantify import measure, summarize


def rasterise(rings: list[np.ndarray], shape) -> np.ndarray:
    """Pixel centres inside the polygon (even-odd over all rings)."""
    from matplotlib.path import Path as MplPath

    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside = np.zeros(centres.shape[0], dtype=bool)
    for ring in rings:
        inside ^= MplPath(ring).contains_points(centres)
    return inside.reshape(shape)


def tricky_labels() -> np.ndarray:
    labels = np.zeros((24, 30), np.int32)
    labels[2:10, 2:10] = 1
    labels[4:7, 4:7] = 0  # hole
    labels[12, 12] = 2
    labels[13, 13] = 2  # diagonal pieces: two polygons
    labels[11:13, 15:20] = 3
    labels[13:16, 18:20] = 3  # L shape
    labels[0:3, 27:30] = 4  # touches the border
    labels[18:23, 2:12] = 7  # non-consecutive label
    labels[18:23, 12:14] = 8  # touching 7
    return labels


def test_polygons_follow_pixel_edges_exactly():
    labels = tricky_labels()
    outlines = polygons(labels)
    assert sorted(outlines) == [1, 2, 3, 4, 7, 8]
    assert len(outlines[2]) == 2  # diagonal pixels -> a MultiPolygon
    assert len(outlines[1]) == 1 and len(outlines[1][0]) == 2  # exterior + hole
    for label, polys in outlines.items():
        rings = [ring for poly in polys for ring in poly]
        for ring in rings:
            assert (ring[0] == ring[-1]).all()
        assert (rasterise(rings, labels.shape) == (labels == label)).all(), label


def test_polygons_are_simple_rings_where_background_cuts_in_diagonally():
    """A background pixel open to the outside only at a corner (cpm15 image01, nucleus 100)
    is a hole touching the exterior there: a ring through that corner twice is a
    self-intersection to GEOS/JTS (shapely's is_valid, QuPath), and so is a hole ring through
    two diagonal pixels."""
    labels = np.zeros((10, 20), np.int32)
    labels[2:8, 2:8] = 1
    labels[4, 7] = 0  # notch on the right edge: open to the outside
    labels[5, 6] = 0  # below-left of the notch: open to it only at their shared corner
    labels[2:8, 11:17] = 2
    labels[4, 13] = labels[5, 14] = 0  # a hole of two pixels touching diagonally
    outlines = polygons(labels)
    for label, polys in outlines.items():
        rings = [ring for poly in polys for ring in poly]
        for ring in rings:
            corners = [tuple(v) for v in ring[:-1].tolist()]
            assert len(set(corners)) == len(corners), (label, ring.tolist())
        assert (rasterise(rings, labels.shape) == (labels == label)).all(), label
    assert [len(poly) for poly in outlines[1]] == [2]  # one exterior, the pocket a hole
    assert [len(poly) for poly in outlines[2]] == [3]  # the hole is two holes


def test_polygons_on_real_masks(shared_data):
    from mlseg.io import read_mask

    labels = read_mask(shared_data / "cpm15_he" / "masks" / "image02_mask.png")
    outlines = polygons(labels)
    assert sorted(outlines) == sorted(set(np.unique(labels)) - {0})
    counts = np.bincount(labels.ravel())
    for label, polys in outlines.items():
        area = 0.0
        for poly in polys:
            for ring in poly:
                x, y = ring[:, 0], ring[:, 1]
                area += 0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
        assert area == counts[label]


def test_polygons_of_a_large_label_image_hold_no_int64_copy_of_it():
    """The outlines of a whole field were the peak of `mlseg segment` and `mlseg quantify` on
    large images: 29 bytes a pixel (int64 compact ids, the padded labels and the edge
    finding's temporaries kept to the end), 1 GB for 6000 x 6000. Now about 13, the same
    rings."""
    import tracemalloc

    from skimage.draw import disk

    side, step = 1536, 24  # one nucleus per 24 x 24 cell: as many edges as tissue has
    labels = np.zeros((side, side), np.int32)
    for i, (y, x) in enumerate(np.ndindex(side // step, side // step)):
        labels[disk((y * step + 12, x * step + 12), 7, shape=labels.shape)] = i + 1
    tracemalloc.start()
    outlines = polygons(labels)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 18 * labels.size, f"{peak / labels.size:.1f} bytes a pixel"
    assert len(outlines) == labels.max()
    last = outlines[int(labels.max())][0][0]  # keys of the last label pass 2**31
    x, y = last[:, 0], last[:, 1]
    assert 0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) == (labels == labels.max()).sum()


def test_geojson_matches_qupath_reader():
    labels = tricky_labels()
    profile = get_profile("ihc")
    image = np.full((*labels.shape, 3), 230, np.uint8)
    image[labels == 7] = (120, 80, 40)  # brown: DAB positive
    table = measure(labels, image, profile, pixel_size_um=0.25)
    collection = to_geojson(labels, table, pixel_size_um=0.25, properties={"profile": "ihc"})
    text = json.dumps(collection, allow_nan=False)  # strict JSON: no NaN anywhere
    data = json.loads(text)
    assert data["type"] == "FeatureCollection" and len(data["features"]) == len(table)
    by_label = {}
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] in [name for name, _ in IHC_CLASSES]
        assert len(props["classification"]["color"]) == 3
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())
        by_label[props["measurements"]["label"]] = feature
    assert by_label[2]["geometry"]["type"] == "MultiPolygon"
    assert by_label[7]["properties"]["classification"]["name"] != "Negative"
    assert by_label[1]["properties"]["classification"]["name"] == "Negative"
    assert "area_um2" in by_label[1]["properties"]["measurements"]


def test_geojson_measurements_are_every_numeric_value_of_the_row():
    """Read column by column, each feature holds what its row holds: integers and booleans
    as ints, finite floats as floats, no NaN, inf or missing value, no text; and the text
    written is the collection's, byte for byte."""
    labels = tricky_labels()
    table = measure(labels, None, get_profile("ihc"), pixel_size_um=None)
    n = len(table)
    table["ihc_class"] = np.arange(n) % 5  # 4 is clipped to 3+
    table["flag"] = np.arange(n) % 2 == 0
    table["odd"] = [(0.5 * i, np.nan, -np.inf)[i % 3] for i in range(n)]
    table["count"] = pd.array([None, *range(1, n)], dtype="Int64")
    table["note"] = "x"
    meta = {"profile": "ihc"}
    collection = to_geojson(labels, table, pixel_size_um=0.5, properties=meta)
    by_label = {f["properties"]["name"]: f["properties"] for f in collection["features"]}
    for record in table.to_dict(orient="records"):
        props = by_label[f"nucleus {record['label']}"]
        expected = {}
        for key, value in record.items():
            if key == "note" or pd.isna(value) or not np.isfinite(float(value)):
                continue
            expected[key] = int(value) if isinstance(value, (bool, int)) else float(value)
        assert props["measurements"] == expected
        assert list(props["measurements"]) == list(expected)  # in the table's order
        for value in props["measurements"].values():
            assert type(value) in (int, float)
        name = IHC_CLASSES[min(int(record["ihc_class"]), 3)][0]
        assert props["classification"]["name"] == name
    text = geojson_text(labels, table, pixel_size_um=0.5, properties=meta)
    assert text == json.dumps(collection, separators=(",", ":"))


def test_overlay_outlines_and_ihc_colours():
    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    plain = overlay(image, labels)
    edge = outline_mask(labels)
    assert (plain[edge] == (0, 200, 0)).all()
    assert (plain[~edge] == 200).all()
    classes = pd.Series([0, 3], index=[1, 7])  # labels not listed count as negative
    coloured = overlay(image, labels, classes)
    assert (coloured[edge & (labels == 7)] == IHC_OVERLAY_COLOURS[3]).all()
    assert (coloured[edge & (labels == 8)] == IHC_OVERLAY_COLOURS[0]).all()
    # the README's legend: dark blue Negative, yellow 1+, red-orange 2+, pink 3+
    negative, one, two, three = (np.array(c, int) for c in IHC_OVERLAY_COLOURS)
    assert negative[2] > max(negative[:2]) and negative.max() < 128
    assert min(one[:2]) > 200 and one[2] < 64
    assert two[0] > 200 and 32 <= two[1] < 128 and two[2] < 64
    assert three[0] > 200 and three[2] > three[1] > 64
    grey16 = np.full((*labels.shape, 1), 40000, np.uint16)
    assert overlay(grey16, labels).shape == (*labels.shape, 3)


def test_an_overlay_of_labels_of_another_size_names_both_sizes():
    """A notebook's labels of ``img[::2, ::2]`` drawn on ``img`` ended in numpy's "boolean
    index did not match indexed array along axis 0", naming neither array."""
    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    with pytest.raises(ValueError, match=r"labels \(\d+, \d+\) differ in size"):
        overlay(image[::2, ::2], labels)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, labels[:, :-1])


def test_a_16_bit_overlay_shows_the_nuclei_beside_one_saturated_pixel():
    """16-bit images are stretched between percentiles, not their extremes: one hot pixel
    (a cosmic ray, a dead sensor pixel) would leave every nucleus black in the overlay."""
    image = np.full((40, 40), 100, np.uint16)
    image[10:20, 10:20] = 1000  # a nucleus, a quarter of the image
    image[0, 0] = 65535
    shown = display_rgb(image)
    assert shown[15, 15].min() == 255 and shown[30, 30].max() == 0


def test_a_16_bit_dapi_field_saved_blue_shows_its_background_as_dark_as_its_grey_file():
    """DAPI exported as 16-bit RGB, blue alone: the stretch took its percentiles over the
    empty red and green too, so the dark background of a field of sparse nuclei came out
    blue (on a DSB 2018 field, 221 of 255 where its grey file shows 12)."""
    grey = np.full((40, 40), 3000, np.uint16)
    grey[5:15, 5:15] = 20000  # one nucleus, 6% of the field
    blue = np.zeros((40, 40, 3), np.uint16)
    blue[..., 2] = grey
    shown_grey, shown_blue = display_rgb(grey), display_rgb(blue)
    assert shown_grey[30, 30].max() < 32 and shown_grey[10, 10].min() == 255
    assert shown_blue[30, 30, 2] == shown_grey[30, 30, 2] and shown_blue[10, 10, 2] == 255
    assert (shown_blue[..., :2] == 0).all()


def test_ihc_overlay_classes_stay_apart_for_colour_blind_viewers():
    """QuPath's class colours in the overlay: with deuteranopia 1+ and 2+ were 14 apart
    (CIEDE2000), with protanopia a 3+ outline 13 from its dark brown nucleus, and Negative
    outlines 8-10 from their blue nuclei for everyone. Measured on the overlay's pixels over
    synthetic DAB tiles, as seen in normal vision and the three dichromacies."""
    import itertools

    from colour_vision import VISIONS, distance

    from mlseg.synth import synth_pair

    profile = get_profile("ihc")
    drawn, under = [[] for _ in range(4)], [[] for _ in range(4)]
    for seed in range(3):
        image, labels, _ = synth_pair("ihc", 192, np.random.default_rng(seed))
        classes = class_lookup(measure(labels, image, profile, pixel_size_um=None))
        edge = outline_mask(labels)
        of_edge = classes.reindex(labels[edge]).to_numpy(dtype=np.int64)
        shown = overlay(image, labels, classes)[edge]
        for c in range(4):
            drawn[c].append(shown[of_edge == c])
            under[c].append(image[edge][of_edge == c])
    colours = [np.unique(np.concatenate(d), axis=0) for d in drawn]
    assert all(len(c) == 1 for c in colours)  # every class drawn, in one colour
    for vision in VISIONS:
        for a, b in itertools.combinations(range(4), 2):
            assert distance(colours[a][0], colours[b][0], vision) >= 20, (vision, a, b)
        for c in range(4):
            apart = distance(np.concatenate(under[c]), colours[c][0], vision)
            assert np.percentile(apart, 10) >= 15, (vision, c)


@pytest.mark.parametrize(
    "nucleus", [(0, 200, 0), (20, 230, 40), (0, 0, 200), (180, 180, 180), (90, 50, 130)]
)
def test_overlay_outlines_stand_out_from_the_nuclei_they_outline(nucleus):
    """Green outlines vanished on a green nuclear stain (SYTOX Green, GFP-H2B)."""
    labels = tricky_labels()
    image = np.zeros((*labels.shape, 3), np.uint8)
    image[labels > 0] = nucleus
    edge = outline_mask(labels)
    drawn = overlay(image, labels)[edge].astype(int)
    assert np.abs(drawn - np.array(nucleus)).sum(axis=1).min() >= 200


def _outputs(tmp_path, labels, image, profile_name="he"):
    profile = get_profile(profile_name)
    table = measure(labels, image, profile, pixel_size_um=None)
    summary = summarize(table, labels.shape, profile, None, 0.5)
    summary.update(image="img1", profile=profile.name, profile_version=profile.version)
    summary.update(
        model="best.safetensors@0123456789abcdef",
        input_digest="fedcba9876543210",
        mlseg_version="0.1.0+g0123456789ab",
        started_at="2026-12-06T13:00:00+0000",
        finished_at="2026-12-06T13:00:02+0000",
    )
    return write_image_outputs(tmp_path, "img1", image, labels, table, summary), table


def test_write_image_outputs_and_done_marker(tmp_path):
    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    written, table = _outputs(tmp_path, labels, image)
    names = written["outputs"]
    for name in names.values():
        assert (tmp_path / name).is_file()
    from mlseg.io import read_mask

    assert (read_mask(tmp_path / names["labels"]) == labels).all()
    csv = pd.read_csv(tmp_path / names["csv"])
    parquet = pd.read_parquet(tmp_path / names["parquet"])
    assert len(csv) == len(parquet) == len(table) == 6
    assert (parquet["profile"] == "he").all() and "profile_version" in csv.columns
    geo = json.loads((tmp_path / names["geojson"]).read_text())
    assert geo["mlseg"]["profile"] == "he"
    # a GeoJSON moved into a QuPath project named its image and profile but not the model
    # or the image's bytes: the record's identifying keys come along
    assert {k: geo["mlseg"][k] for k in ("model", "input_digest", "mlseg_version")} == {
        "model": "best.safetensors@0123456789abcdef",
        "input_digest": "fedcba9876543210",
        "mlseg_version": "0.1.0+g0123456789ab",
    }
    assert image_done(tmp_path, "img1", {"profile_version": written["profile_version"]})
    assert image_done(tmp_path, "img1", {"profile_version": "other"}) is None
    (tmp_path / names["geojson"]).unlink()
    assert image_done(tmp_path, "img1") is None
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_a_folder_named_as_an_images_record_is_refused_not_hidden(tmp_path):
    """A folder img1.json in the output folder was set aside as the redo's earlier record:
    renamed to the hidden .img1.earlier.json, contents and all, and the run then failed
    naming that hidden name."""
    from mlseg.errors import OutputError

    (tmp_path / "img1.json").mkdir()
    (tmp_path / "img1.json" / "notes.txt").write_text("kept")
    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    with pytest.raises(OutputError, match=r"img1\.json: cannot be written .*in the way: move it"):
        _outputs(tmp_path, labels, image)
    assert (tmp_path / "img1.json" / "notes.txt").read_text() == "kept"
    assert not (tmp_path / ".img1.earlier.json").exists()


def test_a_rerun_past_65535_nuclei_leaves_one_label_file(tmp_path):
    """Redone with ids past 65535 (a new mask, another model), an image's labels go to
    img1_labels.tif: the first run's img1_labels.png, with other nuclei than the tables,
    stayed beside them; and the other way round."""
    from mlseg.io import read_mask

    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    for ids in (labels, np.where(labels > 0, labels + 70_000, 0), labels):
        written, _ = _outputs(tmp_path, ids, image)
        assert [p.name for p in tmp_path.glob("img1_labels.*")] == [written["outputs"]["labels"]]
        assert np.array_equal(read_mask(tmp_path / written["outputs"]["labels"]), ids)


def test_ihc_overlay_of_a_tile_with_a_slides_ids_needs_no_table_of_every_id(tmp_path):
    """A tile cut from a slide's label image keeps its global ids (up to 2**31 - 1 read): the
    overlay's classes were an array indexed by label value, 16 GiB for ids near 2**31, here
    0.8 GB for ids near 5e7, allocated twice."""
    import tracemalloc

    labels = tricky_labels().astype(np.int64)
    labels[labels > 0] += 50_000_000
    image = np.full((*labels.shape, 3), 230, np.uint8)
    image[labels == 50_000_007] = (120, 80, 40)  # brown: DAB positive
    tracemalloc.start()
    try:
        written, table = _outputs(tmp_path, labels, image, profile_name="ihc")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6
    shown = read_image(tmp_path / written["outputs"]["overlay"])
    positive = table.loc[table["label"] == 50_000_007, "ihc_class"].item()
    assert positive > 0
    edge = outline_mask(labels)
    assert (shown[edge & (labels == 50_000_007)] == IHC_OVERLAY_COLOURS[positive]).all()


def test_empty_image_outputs(tmp_path):
    labels = np.zeros((20, 20), np.int32)
    image = np.full((20, 20, 3), 255, np.uint8)
    written, table = _outputs(tmp_path, labels, image)
    assert written["count"] == 0 and len(table) == 0
    assert json.loads((tmp_path / "img1_nuclei.geojson").read_text())["features"] == []
    assert len(pd.read_parquet(tmp_path / "img1_nuclei.parquet")) == 0


def test_run_outputs(tmp_path):
    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    written, table = _outputs(tmp_path, labels, image)
    paths = write_run_outputs(tmp_path, [written, written], [table, table.iloc[:0]], {"x": 1})
    summary = pd.read_csv(paths["summary"])
    assert len(summary) == 2 and "count" in summary.columns and "outputs" not in summary
    assert paths["histograms"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["run"].read_text()) == {"x": 1}


@pytest.mark.parametrize("n", [0, 3])
def test_histograms_with_no_or_few_nuclei(tmp_path, n):
    from mlseg.outputs import plot_histograms

    table = pd.DataFrame({"area_px": np.arange(n, dtype=float), "circularity": np.ones(n)})
    assert plot_histograms(table, tmp_path / "h.png").is_file()


def test_histograms_show_the_profiles_stains_not_the_residual():
    from mlseg.outputs import histogram_columns

    labels = np.zeros((20, 20), np.int32)
    labels[4:12, 4:12] = 1
    image = np.full((20, 20, 3), 120, np.uint8)
    drawn = {}
    for name in ("he", "ihc"):
        table = measure(labels, image, get_profile(name), pixel_size_um=0.5)
        drawn[name] = [c for c in histogram_columns(list(table.columns)) if "_od_" in c]
    assert drawn == {
        "he": ["hematoxylin_od_mean", "eosin_od_mean"],  # an H&E slide has no DAB
        "ihc": ["hematoxylin_od_mean", "dab_od_mean"],
    }
    assert "area_um2" in histogram_columns(list(table.columns))


def test_histograms_of_a_run_with_and_without_pixel_sizes_show_every_nucleus_size():
    """Images without a pixel size are measured in pixels beside others in microns: the
    run's histograms drew area_um2 alone, and the other images' nuclei were in no size
    histogram while their circularity was."""
    from mlseg.outputs import histogram_columns

    labels = np.zeros((20, 20), np.int32)
    labels[4:12, 4:12] = 1
    image = np.full((20, 20, 3), 120, np.uint8)
    tables = [measure(labels, image, get_profile("he"), pixel_size_um=px) for px in (0.5, None)]
    drawn = histogram_columns(list(pd.concat(tables).columns))
    assert {"area_um2", "area_px", "perimeter_um", "perimeter_px"} <= set(drawn)


def test_a_hole_belongs_to_the_piece_it_is_cut_from(tmp_path):
    """A nucleus in pieces, one inside the other's hole and holed itself: each polygon must
    describe its own piece (QuPath and every GeoJSON reader draw polygon by polygon), so the
    inner hole is the inner piece's, not the first piece's around it."""
    from mlseg.annotations import annotation_labels

    labels = np.zeros((15, 15), np.int32)
    labels[1:14, 1:14] = 1
    labels[3:12, 3:12] = 0  # a ring
    labels[5:10, 5:10] = 1  # a square inside its hole
    labels[7, 7] = 0  # with a hole of one pixel
    for poly in polygons(labels)[1]:
        assert (rasterise(poly, labels.shape) <= (labels == 1)).all()
    table = pd.DataFrame({"label": [1]})
    collection = to_geojson(labels, table, pixel_size_um=None)
    path = tmp_path / "nested.geojson"
    path.write_text(json.dumps(collection))
    assert (annotation_labels(path, labels.shape).labels == labels).all()


def test_a_run_where_every_image_failed_writes_a_readable_summary(tmp_path):
    paths = write_run_outputs(tmp_path, [], [], {"command": "segment"})
    table = pd.read_csv(paths["summary"])
    assert list(table.columns) == ["image"] and table.empty
    nuclei = pd.read_parquet(paths["nuclei"])  # no image measured: no columns but the image's
    assert list(nuclei.columns) == ["image"] and nuclei.empty


def test_a_disk_that_fills_while_a_run_is_recorded_leaves_the_previous_record_whole(
    tmp_path, monkeypatch
):
    """The run's four files are one record: a disk that filled at nuclei.parquet left this
    run's summary.csv beside the previous run's nuclei.parquet and run.json. Now the error
    names the output folder and the previous four files stay as they were, none beside them."""
    import errno

    import mlseg.outputs
    from mlseg.errors import OutputError

    first = write_run_outputs(tmp_path, [], [], {"command": "segment", "run": 1})
    before = {key: path.read_bytes() for key, path in first.items()}
    real_write_table = mlseg.outputs.write_table

    def full_disk(table, path, **kwargs):
        if Path(path).suffix == ".parquet":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_table(table, path, **kwargs)

    monkeypatch.setattr(mlseg.outputs, "write_table", full_disk)
    summary = {"image": "a", "count": 3}
    with pytest.raises(OutputError, match="no space left on device") as caught:
        write_run_outputs(tmp_path, [summary], [pd.DataFrame()], {"command": "segment", "run": 2})
    assert str(caught.value).startswith(f"{tmp_path}: cannot be written")
    assert {key: path.read_bytes() for key, path in first.items()} == before
    outputs = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # no lock
    assert outputs == sorted(p.name for p in first.values())


def test_an_unreadable_image_table_is_named_not_silently_left_out(tmp_path):
    labels = tricky_labels()
    written, _ = _outputs(tmp_path, labels, np.full((*labels.shape, 3), 200, np.uint8))
    (tmp_path / "img1_nuclei.parquet").write_bytes(b"PAR1 cut short")
    with pytest.warns(UserWarning, match=r"img1_nuclei.parquet: unreadable .* delete img1.json"):
        table = read_nuclei(tmp_path, written)
    assert table.empty
    # the run's only image unreadable: its nuclei.parquet still has the column readers join on
    assert list(nuclei_table([table]).columns) == ["image"]


def test_a_run_holding_its_tables_together_writes_the_table_of_them_one_by_one(
    tmp_path, monkeypatch
):
    """RunNuclei keeps tables of one column set together (three at most here) so a run of
    small tiles holds a few DataFrames, not one an image; the run's table is the one of the
    tables one by one, value for value: micron and pixel columns, an image without nuclei
    whose label column is float, a column of booleans in some tables, of integers in others
    and missing in the rest (tables grouped three by three regardless made them floats), and
    skipped images read from their files."""
    import mlseg.outputs
    from mlseg.io import write_table

    monkeypatch.setattr(mlseg.outputs, "COMPACT_EVERY", 3)

    def nuclei(stem: str, n: int, unit: str) -> pd.DataFrame:
        table = pd.DataFrame({"label": np.arange(1, n + 1), f"area_{unit}": np.full(n, 2.5)})
        if unit == "um2":
            table["touches_border"] = np.arange(n) % 2 == 0
        elif stem.startswith("q"):
            table["touches_border"] = np.arange(n) % 2
        return tag_table(table, {"image": stem, "profile": "he", "profile_version": 1})

    def skipped(stem: str, n: int, unit: str) -> dict:
        write_table(nuclei(stem, n, unit), tmp_path / f"{stem}_nuclei.parquet")
        return {"image": stem, "outputs": {"parquet": f"{stem}_nuclei.parquet"}}

    empty = tag_table(
        pd.DataFrame({"label": pd.Series(dtype=float), "area_px": pd.Series(dtype=float)}),
        {"image": "e", "profile": "he", "profile_version": 1},
    )
    run = [nuclei(f"u{i}", i % 3, "um2") for i in range(7)]
    run += [skipped(f"s{i}", 2, "um2" if i < 2 else "px") for i in range(5)]
    run += [nuclei("p0", 2, "px"), empty, nuclei("q0", 1, "px"), nuclei("p1", 3, "px")]
    run += [skipped("s5", 1, "px"), *(nuclei(f"q{i}", 1, "px") for i in range(1, 4))]
    kept = RunNuclei(tmp_path)
    for entry in run:
        if isinstance(entry, dict):
            kept.add_done(entry)
        else:
            kept.add(entry)
    one_by_one = [read_nuclei(tmp_path, e) if isinstance(e, dict) else e for e in run]
    together = list(kept.tables())
    # u0-u2, u3-u5, u6; s0-s1, s2-s4; p0; e; q0; p1; s5; q1-q3
    assert len(together) == 11
    whole = nuclei_table(together)
    pd.testing.assert_frame_equal(whole, nuclei_table(one_by_one))
    assert repr(whole.to_dict("list")) == repr(nuclei_table(one_by_one).to_dict("list"))


def test_parquet_tables_copied_out_alone_say_what_made_them(tmp_path):
    """A per-image or run Parquet file copied out of its folder named its image and
    profile, but not the model, the input's digest, the settings or the run: its footer
    now holds its <stem>.json, and nuclei.parquet's the run.json, without their times."""
    import pyarrow.parquet as pq

    labels = tricky_labels()
    image = np.full((*labels.shape, 3), 200, np.uint8)
    written, table = _outputs(tmp_path, labels, image)
    record = pq.read_schema(tmp_path / written["outputs"]["parquet"]).metadata[b"mlseg"]
    made = json.loads((tmp_path / "img1.json").read_text())
    # when is <stem>.json's to say: a rerun at the same numbers writes the same bytes
    when = ("seconds", "started_at", "finished_at")
    assert json.loads(record) == {k: v for k, v in made.items() if k not in when}
    assert len(pd.read_parquet(tmp_path / written["outputs"]["parquet"])) == len(table)
    run_info = {"command": "segment", "model": "best.safetensors@0123", "processed": ["img1"]}
    timed = {**run_info, "started_at": "2026-12-06T13:00:00+0000"}
    paths = write_run_outputs(tmp_path, [written], [tag_table(table, written)], timed)
    # when is run.json's to say: the same numbers make the same bytes in a rerun
    assert json.loads(pq.read_schema(paths["nuclei"]).metadata[b"mlseg"]) == run_info
    assert pd.read_parquet(paths["nuclei"])["image"].tolist() == ["img1"] * len(table)
