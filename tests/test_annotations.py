"""Polygon annotations (QuPath GeoJSON, ImageScope XML) drawn as label masks."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from skimage.segmentation import relabel_sequential

from mlseg.annotations import annotation_labels, read_annotations
from mlseg.dataset import list_pairs, mask_to_labels
from mlseg.errors import DatasetError, ImageReadError
from mlseg.ingest import ingest
from mlseg.io import read_mask, write_image
from mlseg.outputs import to_geojson


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(rings, kind=None, nucleus=None, multi=False):
    geometry = {"type": "MultiPolygon" if multi else "Polygon", "coordinates": rings}
    out = {"type": "Feature", "geometry": geometry, "properties": {}}
    if kind:
        out["properties"]["objectType"] = kind
    if nucleus is not None:
        out["nucleusGeometry"] = {"type": "Polygon", "coordinates": [nucleus]}
    return out


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_a_pixel_belongs_to_the_polygon_holding_its_centre(tmp_path):
    """Coordinates are pixels with the origin at the image's corner (QuPath's): a square on
    pixel edges covers exactly its pixels, and shrinking it past a pixel centre drops it."""
    cases = {(2, 2, 5, 5): 9, (2.4, 2.4, 4.6, 4.6): 9, (2.6, 2.6, 4.4, 4.4): 1}
    for box, area in cases.items():
        path = write_json(tmp_path / "a.geojson", [feature([square(*box)])])
        labels = annotation_labels(path, (8, 8)).labels
        assert labels.sum() == area, box
        assert labels[3, 3] == 1  # pixel (row 3, col 3): centre (3.5, 3.5)


@pytest.mark.parametrize("name", ["gbm40_he", "cpm15_he", "dsb2018_stage1_test"])
def test_masks_exported_as_geojson_come_back_pixel_for_pixel(shared_data, tmp_path, name):
    """A real mask written as mlseg's own GeoJSON (what QuPath imports, a pathologist
    corrects and exports again) is drawn back exactly: same pixels, same nuclei."""
    folder = shared_data / name / "masks"
    if not folder.is_dir():
        pytest.skip(f"{name} not found in {shared_data}")
    masks = sorted(folder.glob("*_mask.png"))[:3]
    assert masks, f"{folder}: no *_mask.png to compare"  # else nothing is checked
    for mask_path in masks:
        truth, _, _ = relabel_sequential(mask_to_labels(read_mask(mask_path)))
        table = pd.DataFrame({"label": np.arange(1, truth.max() + 1)})
        path = write_json(tmp_path / "nuclei.geojson", to_geojson(truth, table, pixel_size_um=None))
        drawn = annotation_labels(path, truth.shape)
        np.testing.assert_array_equal(drawn.labels, truth, err_msg=str(mask_path))
        assert drawn.notes == []


def test_qupath_cells_give_their_nuclei_and_regions_are_left_out(tmp_path):
    """QuPath cell detection inside an annotated region: the nuclei are the cells'
    ``nucleusGeometry``, not their cell outlines; the region annotation is not a nucleus."""
    features = [feature([square(0, 0, 40, 40)], kind="annotation")]
    for x in (5, 15, 25):
        features.append(
            feature([square(x - 3, 5, x + 7, 15)], kind="cell", nucleus=square(x, 8, x + 4, 12))
        )
    features.append(feature([square(30, 30, 38, 38)], kind="cell"))  # no nucleus
    path = write_json(
        tmp_path / "cells.geojson", {"type": "FeatureCollection", "features": features}
    )
    drawn = annotation_labels(path, (40, 40))
    assert drawn.labels.max() == 3
    assert [int((drawn.labels == i).sum()) for i in (1, 2, 3)] == [16, 16, 16]
    assert drawn.labels[8:12, 5:9].min() == 1
    assert "1 cells without a nucleus left out" in drawn.notes
    assert "1 region annotations left out" in drawn.notes


def test_nuclei_drawn_in_qupath_among_mlseg_detections_are_kept(shared_data, tmp_path):
    """The correction loop: mlseg's GeoJSON imported into QuPath, a pathologist deletes wrong
    detections, draws the nuclei missed as annotations (QuPath's properties on them) beside a
    full-image region annotation, and exports. The drawn nuclei are nuclei (they were left out
    as regions: 97 of 100), the region is not."""
    mask_path = shared_data / "gbm40_he" / "masks" / "01_mask.png"
    if not mask_path.is_file():
        pytest.skip(f"{mask_path} not found")
    truth, _, _ = relabel_sequential(mask_to_labels(read_mask(mask_path)))
    table = pd.DataFrame({"label": np.arange(1, truth.max() + 1)})
    detections = to_geojson(truth, table, pixel_size_um=None)["features"]
    drawn_by_hand = [
        {
            "type": "Feature",
            "id": f"6f1c0d2e-0000-4000-8000-00000000000{i}",
            "geometry": f["geometry"],
            "properties": {
                "objectType": "annotation",
                "isLocked": False,
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            },
        }
        for i, f in enumerate(detections[10:13])
    ]
    height, width = truth.shape
    region = feature([square(0, 0, width, height)], kind="annotation")
    region["properties"]["isLocked"] = True
    features = [region, *detections[:10], *detections[15:], *drawn_by_hand]
    path = write_json(tmp_path / "01.geojson", {"type": "FeatureCollection", "features": features})
    drawn = annotation_labels(path, truth.shape)
    kept = np.isin(truth, np.r_[1:14, 16 : truth.max() + 1])  # labels 14 and 15 deleted
    assert drawn.labels.max() == truth.max() - 2
    np.testing.assert_array_equal(drawn.labels > 0, kept)
    assert drawn.notes == ["1 region annotations left out"]


def test_an_empty_region_beside_detections_is_no_nucleus(tmp_path):
    """A region annotation in which no nucleus was found is still a region, not a nucleus;
    a nucleus drawn beside small detections is one, even nine times their area (a tumour
    nucleus among lymphocytes: taken for a region when the largest detection was the
    measure)."""
    features = [feature([square(x, 5, x + 4, 9)], kind="detection") for x in (5, 15, 25)]
    features.append(feature([square(20, 20, 80, 80)], kind="annotation"))  # 3,600 px, empty
    features.append(feature([square(40, 5, 52, 17)], kind="annotation"))  # a nucleus, 144 px
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (80, 80))
    assert drawn.labels.max() == 4
    assert drawn.labels[20:80, 20:80].max() == 0
    assert drawn.labels[10, 45] > 0
    assert drawn.notes == ["1 region annotations left out"]


@pytest.mark.parametrize("regions", [1, 2])
def test_empty_regions_beside_few_detections_are_no_nuclei(tmp_path, regions):
    """One or two empty region annotations beside a single detection: half the objects or
    more are regions, so the median object is one, and they were drawn as nuclei of
    3,600 px (review); the detections' median still tells them."""
    features = [feature([square(5, 5, 10, 10)], kind="detection")]  # 25 px
    for x in (20, 100)[:regions]:
        features.append(feature([square(x, 20, x + 60, 80)], kind="annotation"))
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (100, 180))
    assert drawn.labels.max() == 1
    assert drawn.notes == [f"{regions} region annotations left out"]


def _detections(*boxes):
    return [feature([square(*box)], kind="detection") for box in boxes]


def test_an_outline_drawn_again_over_a_detection_replaces_it(tmp_path):
    """The correction loop: a pathologist redraws a detection's wrong outline without deleting
    it. The drawing held the detection's centre, so it was left out as a region and the
    model's outline kept (review); it now replaces the detection, its neighbour kept."""
    features = _detections((10, 10, 16, 16), (30, 10, 36, 16))  # model: 6x6 px nuclei
    features.append(feature([square(8, 8, 19, 18)], kind="annotation"))  # the true outline
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (40, 40))
    assert drawn.labels.max() == 2
    assert int((drawn.labels == drawn.labels[12, 12]).sum()) == 11 * 10  # the drawn outline
    assert drawn.labels[12, 32] > 0 and drawn.labels[12, 32] != drawn.labels[12, 12]
    assert drawn.notes == ["1 detections drawn again by hand left out"]


def test_a_nucleus_annotated_twice_is_kept_once(tmp_path):
    """The same nucleus drawn twice among detections (an accidental duplicate): each copy held
    the other's centre, both were left out as regions and the nucleus lost (review)."""
    features = _detections((10, 10, 16, 16), (30, 10, 36, 16))
    features += [feature([square(10, 30, 20, 40)]), feature([square(10, 30, 20, 39)])]
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (50, 50))
    assert drawn.labels.max() == 3
    assert int((drawn.labels == drawn.labels[35, 15]).sum()) == 10 * 9  # the later copy
    assert drawn.notes == ["1 duplicate annotations left out"]


def test_two_overlapping_nuclei_under_the_duplicate_iou_are_both_kept(tmp_path):
    """Two nuclei drawn overlapping by two thirds (intersection over union 0.67, under
    DUPLICATE_IOU 0.8) are two nuclei, the later keeping the shared pixels; a mutant that took
    any pair over 0.5 for a duplicate (dropping the first nucleus) passed the tests."""
    features = [feature([square(10, 10, 20, 20)]), feature([square(12, 10, 22, 20)])]
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (30, 30))
    assert drawn.labels.max() == 2
    assert int((drawn.labels == drawn.labels[15, 10]).sum()) == 20  # the first, less the shared
    assert int((drawn.labels == drawn.labels[15, 21]).sum()) == 100
    assert drawn.notes == ["1 nuclei overlap one drawn before (shared pixels go to the later)"]


def test_an_outline_corrected_before_its_detection_in_the_file_replaces_it(tmp_path):
    """A detection redrawn one row taller (intersection over union 0.91) by an annotation
    listed before it, as QuPath lists annotations first: the drawing replaces the detection.
    A mutant that checked detections for duplicates too took the drawing for an earlier copy
    of the detection, and the model's outline came back."""
    drawing = feature([square(10, 10, 20, 21)], kind="annotation")  # 110 px
    features = [drawing, *_detections((10, 10, 20, 20), (30, 30, 36, 36))]
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (40, 40))
    assert drawn.labels.max() == 2
    assert int((drawn.labels == drawn.labels[15, 15]).sum()) == 110
    assert drawn.notes == ["1 detections drawn again by hand left out"]


def test_a_large_nucleus_drawn_over_a_small_detection_wins(tmp_path):
    """A tumour nucleus drawn over the centre of a small lymphocyte the model found beside
    it was left out as a region (review): the pathologist's drawing wins over the model's,
    wherever it lies in the file; a region around several detections is still a region."""
    tumour = feature([square(20, 20, 40, 36)], kind="annotation")  # 320 px
    lymphocytes = _detections((36, 26, 42, 32), (60, 20, 66, 26), (60, 40, 66, 46))
    lymphocytes += _detections((18, 34, 24, 40))  # touches the tumour: shares 8 of its 36 px
    region = feature([square(55, 15, 75, 55)], kind="annotation")  # around two detections
    for features in ([tumour, *lymphocytes, region], [*lymphocytes, region, tumour]):
        drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (60, 80))
        assert drawn.labels.max() == 4
        assert int((drawn.labels == drawn.labels[30, 30]).sum()) == 320
        assert drawn.labels[22, 62] > 0 and drawn.labels[42, 62] > 0
        assert drawn.labels[50, 70] == 0  # the region is no nucleus
        assert "1 detections drawn again by hand left out" in drawn.notes
        assert "1 region annotations left out" in drawn.notes


def test_a_nucleus_drawn_in_a_crescent_detections_hollow_keeps_the_crescent(tmp_path):
    """Overlapping nuclei: the model found the one behind as a crescent and missed the one in
    front, which a pathologist draws in the crescent's hollow. The crescent's centroid lies
    in that hollow, so the drawing held its centre and replaced (deleted) it (review); an
    object's centre is now its own pixel nearest its centroid."""
    t = np.linspace(np.pi / 4, 7 * np.pi / 4, 40)  # three quarters of a ring, open right
    outer = np.stack([20 + 12 * np.cos(t), 20 + 12 * np.sin(t)], axis=1)
    inner = np.stack([20 + 8 * np.cos(t[::-1]), 20 + 8 * np.sin(t[::-1])], axis=1)
    crescent = np.concatenate([outer, inner, outer[:1]]).tolist()
    a = np.linspace(0, 2 * np.pi, 30)
    missed = np.stack([18 + 5 * np.cos(a), 20 + 5 * np.sin(a)], axis=1).tolist()
    features = [feature([crescent], kind="detection"), *_detections((35, 35, 39, 39))]
    features.append(feature([missed], kind="annotation"))
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (40, 40))
    assert drawn.labels.max() == 3
    assert drawn.labels[20, 10] > 0  # the crescent's left side
    assert drawn.labels[20, 18] > 0 and drawn.labels[20, 18] != drawn.labels[20, 10]
    assert drawn.notes == []


def test_a_nucleus_redrawn_at_a_small_regions_centre_is_kept(tmp_path):
    """A region drawn around a cluster of five nuclei, and the middle one redrawn: the
    region's centre fell in the redrawing and in the detection under it, so each held two
    centres and both were left out as regions, the nucleus lost (review). What an object is
    drawn around is smaller than it: the redrawing replaces the detection."""
    cluster = [(12, 12), (30, 12), (12, 30), (30, 30), (21, 21)]
    features = _detections(*[(x, y, x + 6, y + 6) for x, y in cluster])
    features += _detections((50, 50, 56, 56), (50, 5, 56, 11), (5, 50, 11, 56))
    features.append(feature([square(9, 9, 39, 39)], kind="annotation"))  # the region
    features.append(feature([square(20, 20, 28, 28)], kind="annotation"))  # the redrawing
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (60, 60))
    assert drawn.labels.max() == 8
    assert int((drawn.labels == drawn.labels[24, 24]).sum()) == 8 * 8
    assert drawn.labels[10, 10] == 0  # the region is no nucleus
    assert drawn.notes == [
        "1 detections drawn again by hand left out",
        "1 region annotations left out",
    ]


def test_one_outline_drawn_over_a_nucleus_split_in_two_merges_it(tmp_path):
    """The correction loop: the model split one nucleus into two detections and a pathologist
    draws its outline over both without deleting them. The drawing held two centres, so it
    was left out as a region and the two halves kept; it now replaces them. A region drawn
    around two touching detections, mostly background between them, is still a region."""
    halves = _detections((10, 10, 16, 20), (16, 10, 22, 20))  # one 12x10 nucleus, split
    merge = feature([square(9, 10, 23, 20)], kind="annotation")  # drawn 1 px wide: 140 px
    others = _detections((40, 10, 48, 18), (48, 10, 56, 18))  # two touching nuclei
    region = feature([square(37, 7, 59, 21)], kind="annotation")  # 3 px around them
    for features in ([*halves, merge, *others, region], [merge, region, *halves, *others]):
        drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (30, 60))
        assert drawn.labels.max() == 3
        assert int((drawn.labels == drawn.labels[15, 12]).sum()) == 140
        assert drawn.labels[15, 12] == drawn.labels[15, 20]  # one nucleus, not two halves
        assert drawn.labels[14, 44] > 0 and drawn.labels[14, 52] > 0
        assert drawn.labels[14, 44] != drawn.labels[14, 52]
        assert drawn.labels[8, 38] == 0  # the region is no nucleus
        assert drawn.notes == [
            "2 detections drawn again by hand left out",
            "1 region annotations left out",
        ]


def test_a_split_nucleus_redrawn_just_inside_its_pieces_merges_them(tmp_path):
    """A split nucleus's outline drawn a pixel inside its two pieces' outer edges (each piece
    5/6 inside it) is their merge; a mutant that asked for each piece wholly inside took it
    for a region and kept the two halves."""
    halves = _detections((10, 10, 16, 20), (16, 10, 22, 20))
    merge = feature([square(11, 10, 21, 20)], kind="annotation")  # 100 px
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", [*halves, merge]), (30, 30))
    assert drawn.labels.max() == 1
    assert int((drawn.labels == 1).sum()) == 100
    assert drawn.notes == ["2 detections drawn again by hand left out"]


def test_tumour_nuclei_drawn_beside_small_detections_are_nuclei(tmp_path):
    """Four tumour nuclei drawn by hand, 27 times the area of the three lymphocytes the model
    found (the median object is a drawn nucleus): nuclei, as the limit for a region is 100
    times the detections' median; a mutant limiting at 25 times left them out as regions."""
    features = _detections(*[(x, 5, x + 6, 11) for x in (5, 15, 25)])  # 36 px each
    features += [feature([square(x, 20, x + 31, 51)]) for x in (5, 40, 75, 110)]  # 961 px
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (60, 150))
    assert drawn.labels.max() == 7
    assert int((drawn.labels > 0).sum()) == 3 * 36 + 4 * 961
    assert drawn.notes == []


def _split_across_minor_axis(labels, label):
    """``labels`` with nucleus ``label`` cut in two through its centre, across its long axis,
    the second half a new label (as a model that split it would give it)."""
    from skimage.measure import regionprops

    props = regionprops((labels == label).astype(np.uint8))[0]
    rows, cols = np.nonzero(labels == label)
    along = (rows - props.centroid[0]) * np.cos(props.orientation) + (
        cols - props.centroid[1]
    ) * np.sin(props.orientation)
    out = labels.copy()
    out[rows[along > 0], cols[along > 0]] = labels.max() + 1
    return out


def test_real_nuclei_split_by_the_model_and_redrawn_come_back_whole(shared_data, tmp_path):
    """gbm40 image 01 as detections with a tenth of its nuclei split in two, each redrawn by
    hand as it is: the drawn mask is the true one, nucleus for nucleus (the redrawn outlines
    were left out as regions and the halves kept)."""
    mask_path = shared_data / "gbm40_he" / "masks" / "01_mask.png"
    if not mask_path.is_file():
        pytest.skip(f"{mask_path} not found")
    truth, _, _ = relabel_sequential(mask_to_labels(read_mask(mask_path)))
    areas = np.bincount(truth.ravel())
    split = [n for n in range(1, truth.max() + 1, 10) if areas[n] >= 40]
    model = truth
    for n in split:
        model = _split_across_minor_axis(model, n)
    detections = to_geojson(
        model, pd.DataFrame({"label": np.arange(1, model.max() + 1)}), pixel_size_um=None
    )["features"]
    redrawn = to_geojson(truth, pd.DataFrame({"label": split}), pixel_size_um=None)["features"]
    for f in redrawn:
        f["properties"] = {"objectType": "annotation"}
    path = write_json(tmp_path / "01.geojson", [*detections, *redrawn])
    drawn = annotation_labels(path, truth.shape)
    pairs = np.unique(np.stack([truth.ravel(), drawn.labels.ravel()]), axis=1)
    np.testing.assert_array_equal(drawn.labels > 0, truth > 0)
    assert drawn.labels.max() == truth.max()
    assert len(split) >= 5
    assert pairs.shape[1] == truth.max() + 1  # each drawn nucleus is one true one, whole
    assert drawn.notes == [f"{2 * len(split)} detections drawn again by hand left out"]


def test_hand_drawn_nuclei_with_a_region_around_them(tmp_path):
    """Annotations only (a pathologist's brush strokes, QuPath 0.2's list of features): each
    is a nucleus, except the polygon drawn around them, which is a region."""
    nuclei = [square(x, 10, x + 5, 15) for x in (5, 15, 25)]
    features = [feature([square(2, 2, 38, 38)])] + [feature([n]) for n in nuclei]
    drawn = annotation_labels(write_json(tmp_path / "a.json", features), (40, 40))
    assert drawn.labels.max() == 3
    assert int((drawn.labels > 0).sum()) == 75
    assert "1 regions around nuclei left out" in drawn.notes


def test_holes_overlaps_and_multipolygons(tmp_path):
    ring = [square(0, 0, 10, 10), square(3, 3, 7, 7)[::-1]]  # a 10x10 nucleus with a hole
    two_parts = [[square(20, 0, 24, 4)], [square(26, 0, 30, 4)]]  # one nucleus in two pieces
    later = [square(8, 0, 12, 4)]  # overlaps the first by 2x4 px, listed later
    features = [feature(ring), feature(two_parts, multi=True), feature(later)]
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (12, 32))
    labels = drawn.labels
    assert labels[5, 5] == 0  # the hole
    assert (labels == 1).sum() == 100 - 16 - 8
    assert (labels == 2).sum() == 32 and labels[2, 22] == labels[2, 28] == 2
    assert (labels == 3).sum() == 16 and labels[2, 9] == 3
    assert any("overlap" in note for note in drawn.notes)


IMAGESCOPE = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.252100">
  <Annotation Id="1" Name="" LineColor="65280">
    <Regions>
      <Region Id="1" Type="0" NegativeROA="0">
        <Vertices>
          <Vertex X="2" Y="2" Z="0"/><Vertex X="12" Y="2" Z="0"/>
          <Vertex X="12" Y="12" Z="0"/><Vertex X="2" Y="12" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="2" Type="0" NegativeROA="1">
        <Vertices>
          <Vertex X="2" Y="2" Z="0"/><Vertex X="12" Y="2" Z="0"/>
          <Vertex X="12" Y="4" Z="0"/><Vertex X="2" Y="4" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="3" Type="2" NegativeROA="0">
        <Vertices><Vertex X="20" Y="2" Z="0"/><Vertex X="30" Y="12" Z="0"/></Vertices>
      </Region>
      <Region Id="4" Type="4" NegativeROA="0">
        <Vertices><Vertex X="1" Y="20" Z="0"/><Vertex X="30" Y="20" Z="0"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_imagescope_xml_as_monuseg_ships_it(tmp_path):
    path = tmp_path / "TCGA-18-5592-01Z-00-DX1.xml"
    path.write_text(IMAGESCOPE)
    drawn = annotation_labels(path, (24, 32))
    assert drawn.pixel_size_um == pytest.approx(0.2521)
    assert (drawn.labels == 1).sum() == 100 - 20  # the negative region cut its top two rows
    ellipse = drawn.labels == 2
    assert 70 <= ellipse.sum() <= 85  # pi * 5 * 5 = 78.5
    assert ellipse[7, 25] and not ellipse[2, 20]
    assert drawn.labels.max() == 2
    assert "1 rulers, arrows and points left out" in drawn.notes


def test_a_geojson_with_a_byte_order_mark_and_an_unknown_microns_per_pixel(tmp_path):
    """A GeoJSON saved with a UTF-8 byte order mark (Windows editors) is read, and an
    ImageScope MicronsPerPixel of 0 is no pixel size: mutants reading plain UTF-8 (the file
    'not valid JSON') or taking 0 passed the tests."""
    path = tmp_path / "bom.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([feature([square(1, 1, 5, 5)])]).encode())
    assert annotation_labels(path, (8, 8)).labels.sum() == 16
    xml = tmp_path / "unknown.xml"
    xml.write_text(IMAGESCOPE.replace('MicronsPerPixel="0.252100"', 'MicronsPerPixel="0"'))
    assert read_annotations(xml).pixel_size_um is None


def test_unusable_files_name_themselves_and_the_fix(tmp_path):
    outside = write_json(tmp_path / "slide.geojson", [feature([square(10000, 5000, 10010, 5010)])])
    with pytest.raises(ImageReadError, match=r"slide\.geojson.*x 10000-10010.*relative to"):
        annotation_labels(outside, (64, 64))
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(ImageReadError, match=r"broken\.geojson: not valid JSON"):
        read_annotations(broken)
    broken.write_text("[" * 100_000)  # crafted: nested beyond Python's recursion
    with pytest.raises(ImageReadError, match=r"broken\.geojson: not valid JSON"):
        read_annotations(broken)
    labelme = write_json(tmp_path / "labelme.json", {"shapes": [], "imageHeight": 8})
    with pytest.raises(ImageReadError, match=r"labelme\.json: not GeoJSON features \(LabelMe"):
        read_annotations(labelme)
    points = write_json(
        tmp_path / "points.geojson",
        [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}}],
    )
    with pytest.raises(ImageReadError, match=r"points\.geojson: no nucleus polygons.*points"):
        annotation_labels(points, (8, 8))
    html = tmp_path / "page.xml"
    html.write_text("<html><body/></html>")
    with pytest.raises(ImageReadError, match=r"page\.xml: not an Aperio ImageScope"):
        read_annotations(html)


def _source(root):
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c", "d"):
        write_image(root / "original" / f"{stem}.png", rng.integers(0, 255, (24, 32, 3), np.uint8))
    write_json(
        root / "masks" / "a.geojson",
        [feature([square(2, 2, 8, 8)]), feature([square(10, 2, 16, 8)])],
    )
    write_json(root / "masks" / "b.png.geojson", [feature([square(4, 4, 9, 9)])])  # QuPath naming
    (root / "masks" / "c.xml").write_text(IMAGESCOPE)
    labels = np.zeros((24, 32), np.uint8)
    labels[3:9, 3:9] = 1
    write_image(root / "masks" / "d_mask.png", labels)
    return root


def test_ingest_draws_annotation_files_as_masks(tmp_path):
    src = _source(tmp_path / "src")
    before = sorted(p.name for p in (src / "masks").iterdir())
    with pytest.warns(UserWarning, match=r"c\.xml: 1 rulers, arrows and points left out"):
        result = ingest(src, tmp_path / "ds", test_fraction=0.25, progress=False)
    manifest = result.manifest.set_index("stem")
    assert sorted(p.name for p in (src / "masks").iterdir()) == before  # source untouched
    for stem, n in {"a": 2, "b": 1, "c": 2, "d": 1}.items():
        mask = tmp_path / "ds" / manifest.loc[stem, "mask"]
        assert mask.name == f"{stem}_mask.png"
        assert read_mask(mask).max() == n
    assert manifest.loc["a", "source_mask"].endswith("a.geojson")
    assert manifest.loc["c", "pixel_size_um"] == pytest.approx(0.2521)  # MicronsPerPixel
    assert pd.isna(manifest.loc["a", "pixel_size_um"])


def test_ingest_takes_mlsegs_own_nuclei_geojson_as_its_images_mask(shared_data, tmp_path):
    """The GeoJSON mlseg segment writes beside its labels, ``<stem>_nuclei.geojson``, put back
    among the masks after a correction, is its image's mask (it was 'mask without image' and
    the image 'without mask'); an image named ``x_nuclei`` keeps its own."""
    mask_path = shared_data / "gbm40_he" / "masks" / "02_mask.png"
    if not mask_path.is_file():
        pytest.skip(f"{mask_path} not found")
    truth, _, _ = relabel_sequential(mask_to_labels(read_mask(mask_path)))
    src = tmp_path / "src"
    geojson = to_geojson(
        truth, pd.DataFrame({"label": np.arange(1, truth.max() + 1)}), pixel_size_um=None
    )
    for stem, mask_name in (("02", "02_nuclei.geojson"), ("x_nuclei", "x_nuclei.geojson")):
        write_image(src / "original" / f"{stem}.png", np.full((*truth.shape, 3), 200, np.uint8))
        write_json(src / "masks" / mask_name, geojson)
    result = ingest(src, tmp_path / "ds", test_fraction=0, progress=False)
    manifest = result.manifest.set_index("stem")
    assert sorted(manifest.index) == ["02", "x_nuclei"]
    np.testing.assert_array_equal(read_mask(tmp_path / "ds" / manifest.loc["02", "mask"]), truth)


def test_ingest_keeps_the_pixel_size_mlsegs_own_geojson_records(tmp_path):
    """mlseg's <stem>_nuclei.geojson put back as a mask brings its labels' microns per pixel
    (mlseg.pixel_size_um) into the manifest, after the image's own metadata and the sizes
    given to ingest, as ImageScope's MicronsPerPixel."""
    labels = np.zeros((24, 32), np.int32)
    labels[3:9, 3:9], labels[12:20, 14:22] = 1, 2
    table = pd.DataFrame({"label": [1, 2]})
    src = tmp_path / "src"
    for stem in ("a", "b"):
        write_image(src / "original" / f"{stem}.png", np.full((24, 32, 3), 200, np.uint8))
        write_json(
            src / "masks" / f"{stem}_nuclei.geojson", to_geojson(labels, table, pixel_size_um=0.5)
        )
    write_json(src / "original" / "b.json", {"pixel_size_um": 0.25})  # b's own sidecar
    manifest = ingest(src, tmp_path / "ds", test_fraction=0, progress=False).manifest
    assert manifest.set_index("stem")["pixel_size_um"].to_dict() == {"a": 0.5, "b": 0.25}
    assert manifest["pixel_size_source"].tolist() == ["annotation", "image metadata"]
    given = ingest(src, tmp_path / "ds2", test_fraction=0, pixel_size_um=0.3, progress=False)
    assert given.manifest["pixel_size_um"].tolist() == [0.3, 0.3]
    unknown = to_geojson(labels, table, pixel_size_um=None)
    write_json(src / "masks" / "a_nuclei.geojson", {**unknown, "mlseg": {"pixel_size_um": True}})
    manifest = ingest(src, tmp_path / "ds3", test_fraction=0, progress=False).manifest
    assert pd.isna(manifest.set_index("stem").loc["a", "pixel_size_um"])


def test_ingest_refuses_two_masks_for_one_image_and_bad_annotations(tmp_path):
    src = _source(tmp_path / "src")
    write_json(src / "masks" / "d.geojson", [feature([square(2, 2, 8, 8)])])
    write_json(src / "masks" / "e.geojson", [feature([square(2, 2, 8, 8)])])
    with pytest.raises(DatasetError) as err:
        ingest(src, tmp_path / "ds", progress=False)
    message = str(err.value)
    assert "d_mask.png: a second mask for 'd' (also d.geojson); keep one" in message
    assert "e.geojson: mask without image" in message
    assert not (tmp_path / "ds").exists()
    src2 = _source(tmp_path / "src2")
    (src2 / "masks" / "b.png.geojson").write_text("not json")
    with pytest.raises(DatasetError, match=r"b\.png\.geojson: not valid JSON"):
        ingest(src2, tmp_path / "ds2", progress=False)
    assert not (tmp_path / "ds2").exists()


def test_a_dataset_holding_annotations_says_to_ingest_it(tmp_path):
    """Annotation files put straight into a dataset's mask folder are not masks yet: the
    error says which file and how to draw it, and ingest does."""
    src = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        write_image(
            src / split / "original" / f"{split}1.png", rng.integers(0, 255, (16, 16, 3), np.uint8)
        )
        write_json(src / split / "masks" / f"{split}1.geojson", [feature([square(2, 2, 8, 8)])])
    with pytest.raises(
        DatasetError,
        match=r"train1\.png: no mask; train1\.geojson is a polygon annotation: draw it as a mask with `mlseg ingest",
    ):
        list_pairs(src, "train")
    result = ingest(src, tmp_path / "drawn", progress=False)
    assert result.layout == "contract" and result.counts == {"train": 1, "test": 1}
    assert [p.mask.name for p in list_pairs(tmp_path / "drawn", "test")] == ["test1_mask.png"]


def _dsb_case(root, stem, image, nuclei):
    write_image(root / stem / "images" / f"{stem}.png", image)
    (root / stem / "masks").mkdir(parents=True)
    for i, mask in enumerate(nuclei):
        write_image(root / stem / "masks" / f"{i:04d}.png", mask.astype(np.uint8) * 255)


def test_dsb_layout_one_mask_per_nucleus(shared_data, tmp_path):
    """The Data Science Bowl 2018 layout (BBBC038): a real mask split into one file per
    nucleus comes back as the same label mask; an empty file is no nucleus, and where two
    overlap the later file wins."""
    mask_path = sorted((shared_data / "dsb2018_stage1_test" / "masks").glob("*_mask.png"))[0]
    truth, _, _ = relabel_sequential(mask_to_labels(read_mask(mask_path)))
    image = np.zeros((*truth.shape, 3), np.uint8)
    src = tmp_path / "src"
    _dsb_case(src, "real.1", image, [truth == i for i in range(1, truth.max() + 1)])
    blank = np.zeros((16, 16), bool)
    first, second = blank.copy(), blank.copy()
    first[2:8, 2:8] = True
    second[6:12, 6:12] = True
    _dsb_case(src, "toy", np.zeros((16, 16, 3), np.uint8), [first, blank, second])
    _dsb_case(src, "no_nuclei", np.zeros((16, 16, 3), np.uint8), [])
    with pytest.warns(UserWarning, match=r"masks: 1 empty masks left out, 1 nuclei overlap"):
        result = ingest(src, tmp_path / "ds", test_fraction=0, progress=False)
    assert result.layout == "dsb"
    manifest = result.manifest.set_index("stem")
    masks = {
        stem: read_mask(tmp_path / "ds" / manifest.loc[stem, "mask"]) for stem in manifest.index
    }
    assert manifest.loc["real.1", "mask"].endswith("real.1_mask.png")
    np.testing.assert_array_equal(masks["real.1"], truth)
    assert masks["toy"].max() == 2 and masks["toy"][7, 7] == 2 and masks["toy"][3, 3] == 1
    assert masks["no_nuclei"].max() == 0


def test_one_mask_per_nucleus_saved_as_zero_and_one_is_read(tmp_path):
    """Every non-zero pixel of a one-nucleus mask is the nucleus: masks saved 0/1 (not
    0/255) came back empty under a mutant reading them at 128, every nucleus 'empty'."""
    from mlseg.annotations import object_mask_labels

    for i, x in enumerate((2, 9)):
        mask = np.zeros((16, 16), np.uint8)
        mask[2:6, x : x + 4] = 1
        write_image(tmp_path / "masks" / f"{i}.png", mask)
    drawn = object_mask_labels(tmp_path / "masks", (16, 16))
    assert drawn.labels.max() == 2 and int((drawn.labels > 0).sum()) == 32
    assert drawn.notes == []


def test_dsb_layout_problems_are_listed_together(tmp_path):
    src = tmp_path / "src"
    ok = np.zeros((16, 16), bool)
    ok[2:6, 2:6] = True
    _dsb_case(src, "good", np.zeros((16, 16, 3), np.uint8), [ok])
    _dsb_case(src, "small", np.zeros((16, 16, 3), np.uint8), [np.ones((8, 8), bool)])
    write_image(src / "unlabelled" / "images" / "unlabelled.png", np.zeros((16, 16, 3), np.uint8))
    _dsb_case(src, "two", np.zeros((16, 16, 3), np.uint8), [ok])
    write_image(src / "two" / "images" / "extra.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        ingest(src, tmp_path / "ds", progress=False)
    message = str(err.value)
    assert "unlabelled.png: image without mask" in message
    assert "two/images: 2 images; the DSB layout has one per folder" in message
    assert not (tmp_path / "ds").exists()
    shutil.rmtree(src / "unlabelled")
    shutil.rmtree(src / "two")
    with pytest.raises(
        DatasetError, match=r"small/masks/0000\.png: mask is 8x8 px but its image is 16x16"
    ):
        ingest(src, tmp_path / "ds", progress=False)


def test_a_dsb_source_unzipped_from_a_mac_is_ingested(tmp_path):
    """A zip made on a Mac unpacks on Linux or Windows with __MACOSX/<case>/images/._x.png
    beside the cases: ingest refused it as a case holding 0 images."""
    src = tmp_path / "src"
    ok = np.zeros((16, 16), bool)
    ok[2:6, 2:6] = True
    _dsb_case(src, "good", np.zeros((16, 16, 3), np.uint8), [ok])
    for sub in ("images", "masks"):
        (src / "__MACOSX" / "good" / sub).mkdir(parents=True)
        (src / "__MACOSX" / "good" / sub / "._good.png").write_bytes(b"\x00\x05\x16\x07")
    result = ingest(src, tmp_path / "ds", test_fraction=0, progress=False)
    assert result.layout == "dsb" and list(result.manifest["stem"]) == ["good"]


def test_geojson_as_other_converters_write_it(tmp_path):
    """An empty polygon (JTS, shapely) is no nucleus, not a broken file; a class written in
    ``properties.type`` ("Neoplastic", as PanNuke converters do) is read as QuPath reads an
    unknown type, an annotation, so those nuclei are kept."""
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}},
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square(1, 1, 5, 5)]},
            "properties": {"type": "Neoplastic"},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square(7, 1, 11, 5)]},
            "properties": {"type": 1},
        },
    ]
    drawn = annotation_labels(write_json(tmp_path / "c.geojson", features), (8, 12))
    assert drawn.labels.max() == 2
    assert drawn.notes == ["1 points, lines and empty geometries left out"]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "null"])
def test_non_finite_coordinates_name_the_file(tmp_path, bad):
    path = tmp_path / "bad.geojson"
    path.write_text(
        '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
        f"[[[{bad}, 1], [5, 1], [5, 5], [1, 5]]]}}}}]"
    )
    with pytest.raises(ImageReadError, match=r"bad\.geojson: feature 1 has a malformed geometry"):
        annotation_labels(path, (8, 8))
    xml = tmp_path / "bad.xml"
    xml.write_text(IMAGESCOPE.replace('X="12" Y="12"', 'X="NaN" Y="12"', 1))
    with pytest.raises(ImageReadError, match=r"bad\.xml: region '1' has a vertex at a non-finite"):
        annotation_labels(xml, (24, 32))


@pytest.mark.parametrize(
    "geometry",
    [
        square(1, 1, 5, 5),  # the coordinates alone, where the geometry object belongs
        {"type": "GeometryCollection", "geometries": [square(1, 1, 5, 5)]},
    ],
)
def test_a_geometry_that_is_no_object_names_the_file(tmp_path, geometry):
    """Bare coordinates as a geometry ended ingest in AttributeError ('list' object has no
    attribute 'get'), a traceback, not the file's name among the dataset's problems."""
    path = write_json(tmp_path / "bad.geojson", [{"type": "Feature", "geometry": geometry}])
    with pytest.raises(ImageReadError, match=r"bad\.geojson: feature 1 has a malformed geometry"):
        annotation_labels(path, (8, 8))


def test_other_json_in_a_mask_folder_is_left_alone(tmp_path):
    """A class map or a sidecar beside the masks is not an annotation file."""
    src = flat_source(tmp_path / "src")
    (src / "masks" / "classes.json").write_text('{"1": "tumour", "2": "stroma"}')
    (src / "masks" / "a.json").write_text('{"PixelSize": [0.25, 0.25]}')
    result = ingest(src, tmp_path / "ds", test_fraction=0, progress=False)
    assert len(result.manifest) == 3


def flat_source(root):
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        write_image(root / "original" / f"{stem}.png", rng.integers(0, 255, (16, 16, 3), np.uint8))
        labels = np.zeros((16, 16), np.uint8)
        labels[4:9, 4:9] = 1
        write_image(root / "masks" / f"{stem}_mask.png", labels)
    return root


@pytest.mark.parametrize("properties", [["Tumor"], "Tumor", 3])
def test_properties_that_are_no_object_name_the_file(tmp_path, properties):
    """A feature's properties other than an object or null (GeoJSON allows no more) ended
    ingest in AttributeError ("'list' object has no attribute 'get'"), a traceback naming no
    file, not one of the dataset's listed problems."""
    bad = {**feature([square(1, 1, 5, 5)]), "properties": properties}
    path = write_json(tmp_path / "bad.geojson", [feature([square(1, 1, 3, 3)]), bad])
    with pytest.raises(ImageReadError, match=r"bad\.geojson: feature 2 has properties that"):
        annotation_labels(path, (8, 8))


def test_a_nucleus_redrawn_smaller_off_its_detections_centre_replaces_it(tmp_path):
    """The model drew one nucleus with the stroma beside it (11x11 px); the pathologist redraws
    the nucleus in its corner (5x5 px), clear of the detection's centre pixel (15, 15).
    Sharing all its own pixels with the detection, the drawing replaces it; a mutant that
    asked for half the larger one's pixels kept the detection's other 96 px as a nucleus."""
    features = [*_detections((10, 10, 21, 21)), feature([square(16, 16, 21, 21)])]
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (30, 30))
    assert drawn.labels.max() == 1
    assert int((drawn.labels == 1).sum()) == 25 and drawn.labels[18, 18] == 1
    assert drawn.notes == ["1 detections drawn again by hand left out"]


def test_a_region_drawn_tight_around_two_touching_nuclei_is_no_merge(tmp_path):
    """A region drawn 2 px around two touching 10x10 px detections is 60% theirs: still a
    region, the two nuclei kept apart; a merge needs MERGE_MIN_COVER (0.7). A mutant at 0.5
    read it as one nucleus drawn over both and replaced them with it."""
    pair = _detections((10, 10, 20, 20), (20, 10, 30, 20))
    region = feature([square(8, 8, 32, 22)], kind="annotation")  # 24x14 = 336 px, 200 theirs
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", [*pair, region]), (40, 40))
    assert drawn.labels.max() == 2
    assert drawn.labels[15, 15] != drawn.labels[15, 25] and drawn.labels[9, 9] == 0
    assert drawn.notes == ["1 region annotations left out"]


def test_labels_have_no_gap_where_a_later_nucleus_covers_an_earlier_one(tmp_path):
    """A nucleus wholly covered by one drawn later leaves no unused label: labels run 1..n
    (a mutant without the relabelling gave 0 and 2, and labels.max() counted two nuclei)."""
    features = [feature([square(2, 2, 4, 4)]), feature([square(1, 1, 7, 7)])]
    drawn = annotation_labels(write_json(tmp_path / "a.geojson", features), (10, 10))
    assert sorted(np.unique(drawn.labels)) == [0, 1]
    assert "1 nuclei overlap one drawn before (shared pixels go to the later)" in drawn.notes


def test_a_qupath_0_2_cell_named_by_its_id_gives_its_nucleus(tmp_path):
    """QuPath 0.2 scripts wrote no objectType: a cell is told by its id, PathCellObject, and
    gives its nucleus, not its cell outline (a mutant that lost that name drew the cell)."""
    cell = feature([square(2, 2, 18, 18)], nucleus=square(6, 6, 11, 11))
    cell["id"] = "PathCellObject"
    drawn = annotation_labels(write_json(tmp_path / "a.json", [cell]), (20, 20))
    assert drawn.labels.max() == 1 and int((drawn.labels == 1).sum()) == 25


def test_annotations_named_as_masks_are_ingested_and_mac_sidecars_left_alone(tmp_path):
    """QuPath exports named as the mask (a_mask.geojson) or after the image (b.tif.geojson)
    are those images' masks, and the ._c.geojson a Mac leaves on a shared drive (resource
    data, no JSON) is no annotation: mutants that kept the _mask suffix in the stem, or read
    dot files, failed the ingest."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.tif", "c.png"):
        write_image(src / "original" / name, rng.integers(0, 255, (16, 16, 3), np.uint8))
    write_json(src / "masks" / "a_mask.geojson", [feature([square(2, 2, 8, 8)])])
    write_json(src / "masks" / "b.tif.geojson", [feature([square(4, 4, 9, 9)])])
    write_json(src / "masks" / "c.geojson", [feature([square(1, 1, 5, 5)])])
    (src / "masks" / "._c.geojson").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    result = ingest(src, tmp_path / "ds", test_fraction=0, progress=False)
    manifest = result.manifest.set_index("stem")
    assert sorted(manifest.index) == ["a", "b", "c"]
    for stem, area in {"a": 36, "b": 25, "c": 16}.items():
        assert int((read_mask(tmp_path / "ds" / manifest.loc[stem, "mask"]) > 0).sum()) == area


def test_ingest_gives_an_image_of_pixels_not_square_no_size_from_its_annotation(tmp_path):
    """An image whose sidecar declares 0.25 x 0.5 um pixels took the 0.5 um its mlseg
    GeoJSON records, after a warning that its size was ignored: every area off by 2."""
    labels = np.zeros((24, 32), np.int32)
    labels[3:9, 3:9] = 1
    src = tmp_path / "src"
    write_image(src / "original" / "a.png", np.full((24, 32, 3), 200, np.uint8))
    write_json(
        src / "masks" / "a_nuclei.geojson",
        to_geojson(labels, pd.DataFrame({"label": [1]}), pixel_size_um=0.5),
    )
    write_json(src / "original" / "a.json", {"PixelSize": [0.25, 0.5], "PixelSizeUnits": "um"})
    with pytest.warns(UserWarning, match=r"a\.json: pixel size ignored.*not square"):
        manifest = ingest(src, tmp_path / "ds", test_fraction=0, progress=False).manifest
    assert pd.isna(manifest.loc[0, "pixel_size_um"])
    assert manifest.loc[0, "pixel_size_source"] == "unknown"
