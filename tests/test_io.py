import numpy as np
import pytest

from mlseg.errors import ImageReadError
from mlseg.io import (
    atomic_path,
    declared_pixel_size_um,
    read_image,
    read_mask,
    tiff_pixel_size_um,
    usable_pixel_size_um,
    write_image,
    write_labels,
)


def test_png_roundtrip_rgb_grey_16bit(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", rgb)
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    grey16 = np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000
    write_image(tmp_path / "b.png", grey16)
    back = read_image(tmp_path / "b.png")
    assert (
        back.shape == (7, 9, 1) and back.dtype == np.uint16 and np.array_equal(back[..., 0], grey16)
    )


def test_tiff_16bit_and_pixel_size(tmp_path):
    import tifffile

    arr = (np.arange(120, dtype=np.uint16) * 500).reshape(10, 12)
    tifffile.imwrite(
        tmp_path / "t.tif", arr, resolution=(1 / 0.25e-4, 1 / 0.25e-4), resolutionunit="CENTIMETER"
    )
    assert np.array_equal(read_image(tmp_path / "t.tif")[..., 0], arr)
    assert tiff_pixel_size_um(tmp_path / "t.tif") == pytest.approx(0.25)


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
    ],
)
def test_pixel_size_from_a_json_sidecar(tmp_path, sidecar, um):
    write_image(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.json").write_text(sidecar)
    found = declared_pixel_size_um(tmp_path / "a.png")
    assert found == (pytest.approx(um) if um is not None else None)


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
        ('{"PixelSize": ["0,25"], "PixelSizeUnits": "um"}', "'0,25' is not a number"),
        ('{"PixelSize": [0.25], "PixelSizeUnits": "inch"}', "'inch' is not one of um, nm"),
    ):
        (tmp_path / "a.ome.json").write_text(broken)
        with pytest.warns(UserWarning, match=rf"a\.ome\.json: pixel size ignored because.*{why}"):
            # Not a declaration: the OME metadata applies again.
            assert declared_pixel_size_um(tmp_path / "a.ome.tif") == pytest.approx(0.5)


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


def test_a_whole_slide_pyramid_too_large_to_read_is_refused_before_decoding(tmp_path, monkeypatch):
    import tifffile

    import mlseg.io

    level0 = np.full((512, 384, 3), 200, np.uint8)
    with tifffile.TiffWriter(tmp_path / "slide.tif") as tif:
        tif.write(level0, subifds=1, tile=(128, 128), photometric="rgb")
        tif.write(level0[::4, ::4], subfiletype=1, tile=(128, 128), photometric="rgb")
    assert read_image(tmp_path / "slide.tif").shape == (512, 384, 3)  # level 0, when it fits
    # The same file as if it were a 40x slide on a lab workstation: refused, not decoded.
    monkeypatch.setattr(mlseg.io, "MAX_IMAGE_BYTES", 512 * 384 * 3 - 1)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: pytest.fail())
    with pytest.raises(
        ImageReadError,
        match=r"slide.tif: 384 x 512 px, level 0 of a 2-level "
        r"pyramid would take .* GiB decoded.*export the regions",
    ):
        read_image(tmp_path / "slide.tif")


def test_a_png_too_large_to_read_is_refused_with_its_size_not_called_corrupt(tmp_path):
    import zlib

    # A PNG header declaring 50,000 x 40,000 RGB pixels (5.6 GiB decoded), then its end.
    ihdr = (50_000).to_bytes(4, "big") + (40_000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    png = b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk
    png += zlib.crc32(chunk).to_bytes(4, "big") + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    (tmp_path / "scan.png").write_bytes(png)
    with pytest.raises(ImageReadError, match=r"scan.png: 50,000 x 40,000 px would take 5.6 GiB"):
        read_image(tmp_path / "scan.png")


def test_truncated_png_is_refused(tmp_path):
    write_image(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png: truncated PNG"):
        read_image(tmp_path / "cut.png")


def test_non_image_and_missing(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_labels_roundtrip_16bit(tmp_path):
    labels = np.zeros((5, 5), np.int32)
    labels[1, 1] = 40000
    write_labels(tmp_path / "l.png", labels)
    assert read_mask(tmp_path / "l.png")[1, 1] == 40000


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_outputs_get_normal_permissions(tmp_path):
    import os

    path = write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
