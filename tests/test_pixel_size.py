import json

import numpy as np
import pytest

from mlseg.config import Profile
from mlseg.io import read_image, write_image
from mlseg.pixel_size import (
    declared_pixel_size_um,
    image_pixel_size,
    tiff_pixel_size_um,
    usable_pixel_size_um,
)

ESCAPED_MICRO = "\\u00B5m"  # how ImageJ writes "µm" into a TIFF description


@pytest.mark.parametrize(
    ("kwargs", "um"),
    [
        ({"imagej": True, "resolution": (4, 4), "metadata": {"unit": ESCAPED_MICRO}}, 0.25),
        ({"imagej": True, "resolution": (2, 2), "metadata": {"unit": "micron"}}, 0.5),
        ({"imagej": True, "resolution": (0.004, 0.004), "metadata": {"unit": "nm"}}, 0.25),
        ({"imagej": True, "resolution": (4, 4), "metadata": {"unit": "pixel"}}, None),
        ({"ome": True, "metadata": {"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"}}, 0.5),
        ({"ome": True, "metadata": {"PhysicalSizeX": 0.325}}, 0.325),  # OME's default: microns
        ({"ome": True, "metadata": {"PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"}}, 0.25),
        (
            {"description": "Aperio Image Library v12.0.15\r\n2220x2967 |AppMag = 20|MPP = 0.499"},
            0.499,
        ),
        ({"resolution": (40000, 40000), "resolutionunit": "CENTIMETER"}, 0.25),
        ({"resolution": (101600, 101600), "resolutionunit": "INCH"}, 0.25),
        ({"resolution": (4, 4), "resolutionunit": "NONE"}, None),  # 4 pixels per what?
        ({"resolution": (72, 72), "resolutionunit": "INCH"}, None),  # a print default
        ({"resolution": (300, 300), "resolutionunit": "INCH"}, None),
        ({}, None),
    ],
    ids=[
        "imagej-escaped-micro",
        "imagej-micron",
        "imagej-nm",
        "imagej-pixel",
        "ome-um",
        "ome-default-unit",
        "ome-nm",
        "aperio-mpp",
        "tags-cm",
        "tags-inch",
        "tags-no-unit",
        "72-dpi",
        "300-dpi",
        "none",
    ],
)
def test_pixel_size_from_tiff_metadata_as_microscopy_software_writes_it(tmp_path, kwargs, um):
    import tifffile

    image = np.zeros((16, 16, 3), np.uint8)
    photometric = {} if kwargs.get("imagej") else {"photometric": "rgb"}
    tifffile.imwrite(tmp_path / "t.tif", image, **photometric, **kwargs)
    found = tiff_pixel_size_um(tmp_path / "t.tif")
    assert found == (pytest.approx(um) if um is not None else None)
    assert np.array_equal(read_image(tmp_path / "t.tif"), image)


def test_implausible_metadata_is_seen_only_when_asked(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "t.tif", np.zeros((8, 8), np.uint8), resolution=(72, 72))
    assert tiff_pixel_size_um(tmp_path / "t.tif") is None
    assert tiff_pixel_size_um(tmp_path / "t.tif", plausible_only=False) == pytest.approx(
        352.78, abs=0.01
    )
    # what the image declares, as usable_pixel_size_um sees it to warn of it
    assert declared_pixel_size_um(tmp_path / "t.tif") is None
    assert declared_pixel_size_um(tmp_path / "t.tif", plausible_only=False) == pytest.approx(
        352.78, abs=0.01
    )
    write_image(tmp_path / "t.png", np.zeros((8, 8), np.uint8))
    assert tiff_pixel_size_um(tmp_path / "t.png", plausible_only=False) is None


@pytest.mark.parametrize(
    ("sidecar", "um"),
    [
        ('{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}', 0.25),  # BIDS microscopy
        ('{"PixelSize": [500, 500, 2000], "PixelSizeUnits": "nm"}', 0.5),  # with a z step
        ('{"PixelSize": [0.00025, 0.00025], "PixelSizeUnits": "mm"}', 0.25),
        ('{"PixelSize": 0.5, "PixelSizeUnits": "\u00b5m"}', 0.5),
        ('{"PixelSize": [0.325, 0.325]}', 0.325),  # no unit: microns
        ('{"pixel_size_um": 0.5, "stain": "H&E"}', 0.5),  # mlseg's own key
        ('{"pixel_size_um": null}', None),  # declared unknown
        ('{"shapes": [], "imagePath": "a.png"}', None),  # LabelMe annotations, same name
        ("[0.25, 0.25]", None),
        ('\ufeff{"PixelSize": [0.25, 0.25]}\r\n', 0.25),  # Notepad's UTF-8: a BOM, CRLF
    ],
    ids=[
        "bids-um",
        "bids-nm-xyz",
        "bids-mm",
        "scalar-micro-sign",
        "no-unit",
        "mlseg",
        "null",
        "labelme",
        "not-an-object",
        "bom",
    ],
)
def test_pixel_size_from_a_json_sidecar(tmp_path, sidecar, um):
    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.json").write_text(sidecar)
    found = declared_pixel_size_um(tmp_path / "a.png")
    assert found == (pytest.approx(um) if um is not None else None)


@pytest.mark.parametrize(
    ("unit", "size"),
    [
        ("um", 0.25),
        ("UM", 0.25),
        ("\u00b5m", 0.25),  # micro sign
        ("\u03bcm", 0.25),  # Greek mu, as some programs write it
        ("micron", 0.25),
        ("Microns", 0.25),
        ("micrometer", 0.25),
        ("micrometre", 0.25),
        ("nm", 250),
        ("nanometer", 250),
        ("mm", 0.00025),
        ("cm", 0.000025),
        ("m", 2.5e-7),
        ("\u00e5", 2500),  # angstrom
        ("angstrom", 2500),
    ],
)
def test_every_unit_a_sidecar_may_name_gives_the_size_in_microns(tmp_path, unit, size):
    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.json").write_text(
        json.dumps({"PixelSize": [size, size], "PixelSizeUnits": unit})
    )
    assert declared_pixel_size_um(tmp_path / "a.png") == pytest.approx(0.25)


@pytest.mark.parametrize("size", ["NaN", "[NaN, NaN]", "[Infinity, Infinity]"])
def test_a_sidecar_size_of_nan_is_named_as_no_number(tmp_path, size):
    """json.dump writes a script's unknown (NaN) size as NaN: it was called pixels not
    square ('resample the image to square pixels') or a unit error, the wrong fixes."""
    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.json").write_text(f'{{"PixelSize": {size}, "PixelSizeUnits": "um"}}')
    with pytest.warns(UserWarning, match=r"a\.json: pixel size ignored because .* is not a number"):
        assert declared_pixel_size_um(tmp_path / "a.png", plausible_only=False) is None


def test_a_sidecar_beats_tiff_metadata_and_a_broken_one_is_named(tmp_path):
    import tifffile

    # OME says 0.5 um; the lab's sidecar, written on purpose, says 0.25.
    tifffile.imwrite(
        tmp_path / "a.ome.tif", np.zeros((8, 8), np.uint8), metadata={"PhysicalSizeX": 0.5}
    )
    assert declared_pixel_size_um(tmp_path / "a.ome.tif") == pytest.approx(0.5)
    (tmp_path / "a.json").write_text('{"PixelSize": [0.3, 0.3], "PixelSizeUnits": "um"}')  # BIDS
    assert declared_pixel_size_um(tmp_path / "a.ome.tif") == pytest.approx(0.3)
    (tmp_path / "a.ome.json").write_text('{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}')
    assert declared_pixel_size_um(tmp_path / "a.ome.tif") == pytest.approx(0.25)
    # Nanometres without their unit: implausible, so ignored unless asked for.
    (tmp_path / "a.ome.json").write_text('{"PixelSize": [250, 250]}')
    assert declared_pixel_size_um(tmp_path / "a.ome.tif") is None
    assert declared_pixel_size_um(tmp_path / "a.ome.tif", plausible_only=False) == 250
    for broken, why in (
        ('{"PixelSize": [0.25, 0.25],}', "not readable as JSON"),  # trailing comma
        ("[" * 100_000, "not readable as JSON"),  # crafted: nested beyond Python's recursion
        ('{"PixelSize": ["0,25"], "PixelSizeUnits": "um"}', "'0,25' is not a number"),
        ('{"PixelSize": [0.25], "PixelSizeUnits": "inch"}', "'inch' is not one of um, nm"),
    ):
        (tmp_path / "a.ome.json").write_text(broken)
        with pytest.warns(UserWarning, match=rf"a\.ome\.json: pixel size ignored because.*{why}"):
            # Not a declaration: the OME metadata applies again.
            assert declared_pixel_size_um(tmp_path / "a.ome.tif") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "declare",
    [
        lambda folder, tifffile: (folder / "a.json").write_text('{"PixelSize": [0.25, 0.5]}'),
        lambda folder, tifffile: tifffile.imwrite(
            folder / "a.tif",
            np.zeros((8, 8), np.uint8),
            ome=True,
            metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5},
        ),
        lambda folder, tifffile: tifffile.imwrite(
            folder / "a.tif",
            np.zeros((8, 8), np.uint8),
            imagej=True,
            resolution=(4, 2),
            metadata={"unit": "um"},
        ),
        lambda folder, tifffile: tifffile.imwrite(
            folder / "a.tif",
            np.zeros((8, 8), np.uint8),
            resolution=(40000, 20000),
            resolutionunit="CENTIMETER",
        ),
    ],
    ids=["sidecar", "ome", "imagej", "tags"],
)
def test_pixels_that_are_not_square_are_named_not_measured_as_square(tmp_path, declare):
    import tifffile

    # 0.25 x 0.5 um pixels: read as 0.25 um square, every area would be half the truth.
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    declare(tmp_path, tifffile)
    with pytest.warns(UserWarning, match=r"a\.(json|tif): pixel size ignored.*not square"):
        assert declared_pixel_size_um(tmp_path / "a.tif") is None
    # A scanner's rounding (0.2527 x 0.2528 um) is square enough.
    (tmp_path / "a.json").write_text('{"PixelSize": [0.2527, 0.2528, 1.0]}')
    assert declared_pixel_size_um(tmp_path / "a.tif") == pytest.approx(0.2527)


def test_a_sidecar_of_pixels_not_square_is_not_replaced_by_the_tiffs_square_size(tmp_path):
    import tifffile

    # The TIFF's tags say 0.25 um square; the sidecar written beside it, 0.25 x 0.5 um.
    # Measured at the tags' 0.25 um, a disc 20 x 40 um would read as half its area.
    tifffile.imwrite(
        tmp_path / "a.tif",
        np.zeros((8, 8), np.uint8),
        resolution=(40000, 40000),
        resolutionunit="CENTIMETER",
    )
    assert declared_pixel_size_um(tmp_path / "a.tif") == pytest.approx(0.25)
    (tmp_path / "a.json").write_text('{"PixelSize": [0.25, 0.5], "PixelSizeUnits": "um"}')
    with pytest.warns(UserWarning, match=r"a\.json: pixel size ignored.*not square"):
        assert declared_pixel_size_um(tmp_path / "a.tif", plausible_only=False) is None


def test_an_image_of_pixels_not_square_takes_no_other_size(tmp_path):
    import tifffile

    # Tags of 0.25 x 0.5 um pixels: the profile's 0.3 um, or the 0.4 um its labels' record
    # carries, would be as wrong as either axis; the image has no size, and says so.
    path = tmp_path / "a.tif"
    tifffile.imwrite(
        path, np.zeros((8, 8), np.uint8), resolution=(40000, 20000), resolutionunit="CENTIMETER"
    )
    profile = Profile(name="he", pixel_size_um=0.3)
    with pytest.warns(UserWarning, match=r"a\.tif: pixel size ignored.*not square"):
        assert image_pixel_size(path, None, profile) == (None, "unknown")
        assert image_pixel_size(path, None, profile, carried=0.4) == (None, "unknown")
    assert image_pixel_size(path, None, profile, listed=0.25) == (0.25, "table")


def test_usable_size_collects_implausible_declarations_for_one_warning(tmp_path):
    implausible = []
    for stem, sidecar in (("ok", '{"pixel_size_um": 0.5}'), ("nm", '{"PixelSize": [250]}')):
        write_image(tmp_path / f"{stem}.png", np.zeros((8, 8, 3), np.uint8))
        (tmp_path / f"{stem}.json").write_text(sidecar)
    write_image(tmp_path / "none.png", np.zeros((8, 8, 3), np.uint8))
    assert usable_pixel_size_um(tmp_path / "ok.png", implausible) == pytest.approx(0.5)
    assert usable_pixel_size_um(tmp_path / "none.png", implausible) is None
    assert usable_pixel_size_um(tmp_path / "nm.png", implausible) is None
    assert implausible == [(tmp_path / "nm.png", 250)]  # only the one worth a warning


def test_the_first_source_found_decides_and_is_named(tmp_path):
    import tifffile

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), metadata={"PhysicalSizeX": 0.5}, ome=True)
    profile = Profile(name="he", pixel_size_um=0.3)
    assert image_pixel_size(path, 0.1, profile, listed=0.2) == (0.1, "argument")
    assert image_pixel_size(path, None, profile, listed=0.2) == (0.2, "table")
    assert image_pixel_size(path, None, profile) == (pytest.approx(0.5), "image metadata")
    # the size the labels' folder records comes after the image's own, before the profile's
    assert image_pixel_size(path, None, profile, carried=0.4)[1] == "image metadata"
    assert image_pixel_size(tmp_path / "b.png", None, profile, carried=0.4) == (
        0.4,
        "labels metadata",
    )
    (tmp_path / "a.json").write_text('{"pixel_size_um": 0.25}')
    assert image_pixel_size(path, None, profile) == (pytest.approx(0.25), "image metadata")
    (tmp_path / "a.json").write_text('{"PixelSize": [250]}')  # nanometres, unit forgotten
    with pytest.warns(UserWarning, match=r"a\.tif \(250 um\).*ignored"):
        assert image_pixel_size(path, None, profile) == (0.3, "profile")
        assert image_pixel_size(path, None, Profile(name="he")) == (None, "unknown")
