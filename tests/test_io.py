import contextlib
import errno
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlseg.errors import ImageReadError, OutputError
from mlseg.io import (
    SIXTEEN_BIT_DEPTHS,
    MemoryUse,
    atomic_path,
    available_memory,
    exif_orientation,
    full_scale,
    image_extension,
    image_size,
    image_stem,
    match_stem,
    read_image,
    read_mask,
    warn_if_short_of_memory,
    without_image_extension,
    write_image,
    write_labels,
    write_table,
    written_together,
)
from mlseg.pixel_size import tiff_pixel_size_um


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


@pytest.mark.parametrize(
    ("largest", "white"),
    [
        (0, 255),
        (255, 255),
        (256, 1023),
        (1023, 1023),
        (4000, 4095),
        (4095, 4095),
        (4096, 16383),
        (16384, 65535),
        (65535, 65535),
    ],
)
def test_full_scale_of_a_sixteen_bit_image_is_its_camera_bit_depth(largest, white):
    image = np.zeros((4, 4, 3), np.uint16)
    image[1, 2, 0] = largest
    assert full_scale(image) == white
    assert full_scale(image.astype(np.uint8)) == 255
    with pytest.raises(ValueError, match="uint8 or uint16"):
        full_scale(image.astype(np.float32))


def test_the_readme_lists_every_full_scale():
    """The README told that a 16-bit file holding 0-255 was taken against 1023 (OD 0.6 glass)."""
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    scales = ", ".join(str(2**bits - 1) for bits in SIXTEEN_BIT_DEPTHS[:-1])
    assert f"the smallest of {scales} and {2 ** SIXTEEN_BIT_DEPTHS[-1] - 1} that holds" in readme


def test_tiff_16bit_and_pixel_size(tmp_path):
    import tifffile

    arr = (np.arange(120, dtype=np.uint16) * 500).reshape(10, 12)
    tifffile.imwrite(
        tmp_path / "t.tif", arr, resolution=(1 / 0.25e-4, 1 / 0.25e-4), resolutionunit="CENTIMETER"
    )
    assert np.array_equal(read_image(tmp_path / "t.tif")[..., 0], arr)
    assert tiff_pixel_size_um(tmp_path / "t.tif") == pytest.approx(0.25)


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


GiB = 2**30


def _memory_files(tmp_path: Path, own: str, cgroups: dict[str, dict[str, str]]) -> dict:
    """Fake ``/proc/meminfo`` (16 GiB available), ``/proc/self/cgroup`` (``own``) and
    cgroup folders (path under the cgroup root -> file name -> content), as
    :func:`available_memory`'s arguments."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "meminfo").write_text(
        "MemTotal:       33554432 kB\nMemFree:         1048576 kB\nMemAvailable:   16777216 kB\n"
    )
    (tmp_path / "cgroup").write_text(own)
    for folder, files in cgroups.items():
        for name, text in files.items():
            (tmp_path / "fs" / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "fs" / folder / name).write_text(text)
    return {
        "meminfo": tmp_path / "meminfo",
        "own_cgroups": tmp_path / "cgroup",
        "cgroup_root": tmp_path / "fs",
    }


def test_memory_left_is_the_least_of_what_the_system_and_each_cgroup_above_allow(tmp_path):
    # cgroup v2, a batch job's step without a limit of its own inside a job of 4 GiB using
    # 3 GiB, half a GiB of it file cache the kernel gives back
    files = {
        "job": {
            "memory.max": str(4 * GiB),
            "memory.current": str(3 * GiB),
            "memory.stat": f"anon {2 * GiB}\nfile {GiB}\ninactive_file {GiB // 2}\n",
        },
        "job/step": {"memory.max": "max", "memory.current": str(3 * GiB)},
    }
    assert available_memory(**_memory_files(tmp_path, "0::/job/step\n", files)) == 1.5 * GiB


def test_memory_left_with_no_cgroup_limit_is_what_the_system_has(tmp_path):
    # "max" in cgroup v2 (a container run without --memory), v1's "unlimited" number
    v2 = {"": {"memory.max": "max", "memory.current": str(GiB)}}
    assert available_memory(**_memory_files(tmp_path / "a", "0::/\n", v2)) == 16 * GiB
    v1 = {
        "memory/docker/x": {
            "memory.limit_in_bytes": "9223372036854771712",
            "memory.usage_in_bytes": str(GiB),
        }
    }
    own = "5:cpu,cpuacct:/docker/x\n4:memory:/docker/x\n0::/\n"
    assert available_memory(**_memory_files(tmp_path / "b", own, v1)) == 16 * GiB


def test_memory_left_in_a_cgroup_v1_container_is_its_limit_less_its_use(tmp_path):
    # the host's name for the container's cgroup; the container sees it at the root
    v1 = {"memory": {"memory.limit_in_bytes": str(2 * GiB), "memory.usage_in_bytes": str(GiB)}}
    files = _memory_files(tmp_path, "4:memory:/docker/0123abcd\n", v1)
    assert available_memory(**files) == GiB


def test_memory_left_is_unknown_where_nothing_can_be_read(tmp_path):
    missing = {k: tmp_path / k for k in ("meminfo", "own_cgroups", "cgroup_root")}
    assert available_memory(**missing) is None


def test_a_field_larger_than_the_memory_left_is_named_in_a_warning_with_the_fix(monkeypatch):
    import mlseg.io

    use = MemoryUse(fixed=0, per_pixel=30)
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: 4 * GiB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_short_of_memory("in/field.tif", (20_000, 20_000, 3), use, "segment")
        warn_if_short_of_memory("in/tile.png", (2_000, 2_000, 3), use, "segment")
    assert [str(w.message) for w in caught] == [
        "in/field.tif: 20,000 x 20,000 px needs about 11.2 GiB of memory in mlseg segment, "
        "more than the 4.0 GiB this process has left, so the system may stop it part-way: "
        "crop the field or export it as tiles (QuPath: File > Export images) and segment "
        "those, or run on a machine with more memory"
    ]
    # where the memory left cannot be read (not Linux), nothing is said
    monkeypatch.setattr(mlseg.io, "available_memory", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_short_of_memory("in/field.tif", (20_000, 20_000, 3), use, "segment")


def _measured_peaks() -> list[tuple[str, int, str, float]]:
    """``(command, side, network, peak bytes)`` of the table bench/README.md records under
    its "Memory warnings" heading (``bench/warning_memory.py``)."""
    text = (Path(__file__).resolve().parents[1] / "bench" / "README.md").read_text()
    section = text.split("### Memory warnings", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("segment", "evaluate", "quantify"):
            peak = float(cells[4].replace(",", "")) * 1e6
            rows.append((cells[0], int(cells[1].replace(",", "")), cells[2], peak))
    return rows


def test_each_memory_warning_covers_the_peak_measured_at_every_field_size(monkeypatch):
    """segment and evaluate assumed 30 and 50 bytes a pixel, figures of 6144-8192 px fields,
    where row bands bound the memory; fields of 512-4096 px, segmented whole, took 73-946
    bytes a pixel above the imports and model (a batch of tiles through the network), so
    with that much memory left nothing warned and the system stopped the process part-way,
    naming no file: a 1024 px field took 607 MB in segment (992 in float32), where 30 bytes
    a pixel said 31 MB. With one byte less left than each peak bench/README.md records, each command's
    warning fires; and from 2048 px up, where the network ran (or none is needed), it does
    not fire with half the peak to spare."""
    import mlseg.io
    from mlseg.config import InferenceConfig
    from mlseg.evaluate import EVALUATE_MEMORY
    from mlseg.segment import QUANTIFY_MEMORY, SEGMENT_MEMORY

    uses = {"segment": SEGMENT_MEMORY, "evaluate": EVALUATE_MEMORY, "quantify": QUANTIFY_MEMORY}
    stream = InferenceConfig().stream_min_pixels
    rows = _measured_peaks()
    assert {(c, s) for c, s, _, _ in rows} >= {
        (c, s) for c in uses for s in (512, 1024, 2048, 4096, 6144)
    }
    for command, side, network, peak in rows:
        monkeypatch.setattr(mlseg.io, "available_memory", lambda peak=peak: int(peak) - 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warned = warn_if_short_of_memory(
                f"in/{side}.tif", (side, side, 3), uses[command], command,
                stream_min_pixels=stream,
            )  # fmt: skip
        assert warned and len(caught) == 1, (command, side, peak)
        assert f"in/{side}.tif: {side:,} x {side:,} px needs" in str(caught[0].message)
        if side >= 2048 and network != "stand-in":  # not warning of room a field would have
            need = uses[command].need(side * side, stream)
            assert need < 2 * peak, (command, side, need, peak)


def _png_claiming(path, width: int, height: int, colour_type: int) -> None:
    """A PNG of only a header declaring ``width`` x ``height`` 8-bit pixels, then its end."""
    import zlib

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour_type, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    png = b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk
    png += zlib.crc32(chunk).to_bytes(4, "big") + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    path.write_bytes(png)


def test_a_png_too_large_to_read_is_refused_with_its_size_not_called_corrupt(tmp_path):
    _png_claiming(tmp_path / "scan.png", 50_000, 40_000, 2)  # RGB: 5.6 GiB decoded
    with pytest.raises(ImageReadError, match=r"scan.png: 50,000 x 40,000 px would take 5.6 GiB"):
        read_image(tmp_path / "scan.png")


def test_a_png_or_jpeg_over_opencvs_pixel_limit_is_refused_by_name_not_with_its_traceback(
    tmp_path,
):
    import cv2

    # A grey PNG declaring 40,000 x 30,000 px: 1.1 GiB decoded, under MAX_IMAGE_BYTES, but
    # over the 2**30 pixels OpenCV decodes (OpenCV 5 raises cv2.error there).
    _png_claiming(tmp_path / "scan.png", 40_000, 30_000, 0)
    with pytest.raises(ImageReadError, match=r"scan.png: 40,000 x 30,000 px, more than the"):
        read_image(tmp_path / "scan.png")
    # A JPEG whose frame header declares 40,000 x 40,000 px (a whole slide saved as JPEG).
    jpeg = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 180, np.uint8))[1].tobytes())
    frame = jpeg.index(b"\xff\xc0")
    jpeg[frame + 5 : frame + 9] = (40_000).to_bytes(2, "big") * 2
    (tmp_path / "scan.jpg").write_bytes(bytes(jpeg))
    with pytest.raises(ImageReadError, match=r"scan.jpg: more than the .* pixels OpenCV"):
        read_image(tmp_path / "scan.jpg")


@pytest.mark.parametrize(
    ("shape", "kwargs", "refused"),
    [
        ((16, 16, 4), {"photometric": "rgb", "extrasamples": ["unassalpha"]}, None),  # RGBA
        ((16, 16, 2), {"photometric": "minisblack", "extrasamples": ["unassalpha"]}, None),
        ((3, 16, 16), {"photometric": "rgb", "planarconfig": "separate"}, None),  # planar RGB
        ((3, 16, 16), {"imagej": True, "metadata": {"axes": "CYX"}}, None),  # 3-channel composite
        ((4, 16, 16), {"imagej": True, "metadata": {"axes": "CYX"}}, "4 channels"),
        ((2, 16, 16), {"ome": True, "metadata": {"axes": "CYX"}}, "2 channels"),
        ((3, 16, 16), {"imagej": True, "metadata": {"axes": "ZYX"}}, "stack of 3 .*z planes"),
        ((2, 3, 16, 16), {"ome": True, "metadata": {"axes": "ZCYX"}}, "stack of 6"),
        ((5, 16, 16), {"photometric": "minisblack"}, "5 planes"),
        ((3, 16, 16, 3), {"photometric": "rgb"}, r"stack of 3 2-D images \(TIFF axes .YXS"),
    ],
    ids=[
        "rgba",
        "grey-alpha",
        "planar-rgb",
        "imagej-c3",
        "imagej-c4",
        "ome-c2",
        "z-stack",
        "ome-zc",
        "q5",
        "rgb-stack",
    ],
)
def test_a_tiff_is_one_grey_or_rgb_image_never_a_stack_read_as_colour(
    tmp_path, shape, kwargs, refused
):
    import tifffile

    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", data, **kwargs)
    if refused is None:
        assert read_image(tmp_path / "x.tif").shape == (16, 16, 1 if shape[-1] == 2 else 3)
        return
    # Before, the first three channels or z planes came back as if they were R, G and B.
    with pytest.raises(ImageReadError, match=rf"x\.tif: .*{refused}.*(Fiji|one grey)"):
        read_image(tmp_path / "x.tif")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_the_transparent_outside_of_a_scan_reads_as_white_glass(tmp_path, suffix):
    """OpenSlide and QuPath export what lies outside a scan as transparent black; read as
    black it would count as densely stained tissue."""
    import cv2
    import tifffile

    from mlseg.quantify import tissue_fraction

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, :20] = (150, 80, 160, 255)  # stained tissue, opaque
    rgba[:, 25:, 3] = 128  # half-transparent black: half-way to white
    if suffix == ".png":
        cv2.imwrite(str(tmp_path / "t.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    else:
        tifffile.imwrite(tmp_path / "t.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    image = read_image(tmp_path / f"t{suffix}")
    assert image.shape == (20, 30, 3)
    assert (image[:, :20] == (150, 80, 160)).all() and (image[:, 20:25] == 255).all()
    assert (np.abs(image[:, 25:].astype(int) - 127) <= 1).all()
    assert tissue_fraction(image, "he") == pytest.approx(25 / 30)  # the white 5 columns: glass
    # a mask's transparent background stays label 0
    rgba[..., :3] = np.where(rgba[..., 3:] == 255, 1, 0)
    rgba[..., 3] = np.where(rgba[..., 3] == 255, 255, 0)
    if suffix == ".png":
        cv2.imwrite(str(tmp_path / "t_mask.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    else:
        tifffile.imwrite(
            tmp_path / "t_mask.tif", rgba, photometric="rgb", extrasamples=["unassalpha"]
        )
    mask = read_mask(tmp_path / f"t_mask{suffix}")
    assert (mask[:, :20] == 1).all() and (mask[:, 20:] == 0).all()


def test_the_transparent_outside_of_a_16_bit_scan_reads_as_its_white_not_black(tmp_path):
    """A 16-bit RGBA scan (a 12-bit camera's, 0-4095) laid over white: its transparent
    outside is the image's full scale, 4095, not 255 (near black in a 16-bit image)."""
    import cv2

    rgba = np.zeros((4, 6, 4), np.uint16)
    rgba[:, :3] = (3000, 1500, 4000, 65535)  # tissue, opaque; the rest transparent black
    cv2.imwrite(str(tmp_path / "t.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    image = read_image(tmp_path / "t.png")
    assert image.dtype == np.uint16 and (image[:, :3] == (3000, 1500, 4000)).all()
    assert (image[:, 3:] == 4095).all()


def test_a_fluorescence_image_s_transparent_outside_can_be_read_as_black(tmp_path):
    """``alpha="black"`` lays an RGBA image over black (fluorescence: no light), of 8 and
    16 bits, half-transparent pixels half-way to 0; the default stays white."""
    import cv2

    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        rgba = np.zeros((4, 6, 4), dtype)
        rgba[:, :2] = (100, 200, 50, top)  # opaque signal
        rgba[:, 2:4] = (100, 200, 50, top // 2 + 1)  # half transparent
        cv2.imwrite(str(tmp_path / "f.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        image = read_image(tmp_path / "f.png", alpha="black")
        assert image.dtype == dtype and (image[:, :2] == (100, 200, 50)).all()
        assert (image[:, 2:4] == (50, 100, 25)).all() and (image[:, 4:] == 0).all()
        assert (read_image(tmp_path / "f.png")[:, 4:] == 255).all()  # white: 8-bit data


def test_an_image_is_read_for_its_stain_by_one_rule_and_bright_field_as_before(tmp_path):
    """The rule every reader that knows the profile reads by: fluorescence over black, any
    other stain (and none known) bit for bit as read_image reads it, over white."""
    import cv2

    from mlseg.io import read_image_for

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :2] = (100, 200, 50, 255)
    rgba[:, 2:4] = (100, 200, 50, 128)
    rgba[:, 4:] = (30, 30, 30, 0)  # transparent, with colour under it
    cv2.imwrite(str(tmp_path / "f.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    for stain in ("he", "ihc", "none", None):
        bright = read_image_for(tmp_path / "f.png", stain)
        assert bright.tobytes() == read_image(tmp_path / "f.png").tobytes()
        assert bright.dtype == np.uint8 and (bright[:, 4:] == 255).all()
    dark = read_image_for(tmp_path / "f.png", "fluorescence")
    assert np.array_equal(dark, read_image(tmp_path / "f.png", alpha="black"))
    assert (dark[:, 4:] == 0).all()


def test_an_image_of_32_bit_integers_keeps_its_values_above_255(tmp_path):
    """A TIFF of int32 values (as some analysis programs save) is read as the 8- or 16-bit
    image that holds its values: 256 stays 256, not wrapped to 0 in 8 bits."""
    import tifffile

    values = np.array([[0, 255], [256, 1]], np.int32)
    tifffile.imwrite(tmp_path / "i.tif", values)
    image = read_image(tmp_path / "i.tif")
    assert image.dtype == np.uint16 and np.array_equal(image[..., 0], values)
    tifffile.imwrite(tmp_path / "j.tif", values.clip(0, 255))
    assert read_image(tmp_path / "j.tif").dtype == np.uint8


def test_a_grey_png_with_alpha_stays_grey(tmp_path):
    """As the same picture without alpha, or as a TIFF: OpenCV decodes it as BGRA, and it
    came back RGB, so an H&E profile segmented it as a colourless slide (0 nuclei) where
    the grey file is refused for its channel count."""
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    opacity = np.full_like(grey, 255)
    opacity[:, 25:] = 0  # outside the scan: white glass
    Image.fromarray(np.stack([grey, opacity], axis=-1), "LA").save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (20, 30, 1) and image.dtype == np.uint8
    assert np.array_equal(image[:, :25, 0], grey[:, :25]) and (image[:, 25:] == 255).all()
    # a mask's transparent pixels are its background
    assert np.array_equal(read_mask(tmp_path / "g.png"), np.where(opacity == 0, 0, grey))


def test_a_masks_transparent_background_is_background_whatever_its_colour(tmp_path):
    """GIMP and Photoshop keep the colour under a transparent background, often white: read
    as that colour, the background was one object spanning the tile, which validate took for
    an inverted mask and told the user to invert (leaving nothing)."""
    from PIL import Image

    from mlseg.dataset import mask_to_labels

    rgba = np.full((40, 40, 4), 255, np.uint8)  # white everywhere
    rgba[..., 3] = 0  # the background transparent
    rgba[5:15, 5:15, 3] = rgba[25:35, 20:30, 3] = 255  # two opaque white nuclei
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a_mask.png")
    mask = read_mask(tmp_path / "a_mask.png")
    assert np.array_equal(mask != 0, rgba[..., 3] == 255)
    assert mask_to_labels(mask).max() == 2


@pytest.mark.parametrize("compression", ["lzw", "jpeg", "zstd", "packbits", "jpeg2000"])
def test_compressed_tiffs_as_scanners_and_image_programs_write_them(tmp_path, compression):
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", rgb, photometric="rgb", compression=compression)
    back = read_image(tmp_path / "x.tif")
    lossy = compression == "jpeg"
    assert back.shape == rgb.shape and (lossy or np.array_equal(back, rgb))


@pytest.mark.parametrize("compression", ["lzw", "zstd"])
def test_a_compressed_tiff_without_imagecodecs_names_the_package(tmp_path, compression):
    """Where imagecodecs cannot be imported (an install without its dependencies), a ZSTD
    TIFF failed as 'cannot be decoded as TIFF (No module named 'compression')', which reads
    as a corrupt file; now the message names the compression and the package to install."""
    import subprocess
    import sys

    import tifffile

    rgb = np.zeros((16, 16, 3), np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", rgb, photometric="rgb", compression=compression)
    code = (
        "import sys; sys.modules['imagecodecs'] = None\n"
        "from mlseg.io import read_image\n"
        f"read_image({str(tmp_path / 'x.tif')!r})"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "ImageReadError" in last and "x.tif" in last
    assert f"{compression.upper()} compression needs the imagecodecs package" in last
    assert "pip install imagecodecs" in last


def test_a_tiff_of_too_many_images_is_refused_before_tifffile_sorts_them(tmp_path, monkeypatch):
    """tifffile sorts a file's images into series in time growing with the square of their
    count: a 7 MB TIFF of 30,000 pages of 2 x 2 px (from elsewhere) took 434 s to read, 5,000
    pages 10 s. One of over 1,000 is refused at once, naming the file."""
    import tifffile

    with tifffile.TiffWriter(tmp_path / "many.tif") as tif:
        for i in range(1001):
            tif.write(np.full((2, 2), i % 255, np.uint8), contiguous=False)
    # refused before tifffile sorts the pages into series (where the time went)
    sorted_into_series = []
    monkeypatch.setattr(
        tifffile.TiffFile, "series", property(lambda self: sorted_into_series.append(1) or [])
    )
    with pytest.raises(ImageReadError, match=r"many\.tif: holds 1,001 images \(TIFF pages\)"):
        read_image(tmp_path / "many.tif")
    assert not sorted_into_series


def test_a_tiff_of_several_images_says_only_the_first_is_read(tmp_path):
    import tifffile

    fields = [np.full((16, 16, 3), v, np.uint8) for v in (10, 20, 30)]
    with tifffile.TiffWriter(tmp_path / "plate.ome.tif", ome=True) as tif:
        for field in fields:
            tif.write(field, photometric="rgb")
    with pytest.warns(UserWarning, match=r"plate\.ome\.tif: holds 3 images; only the first"):
        assert (read_image(tmp_path / "plate.ome.tif") == 10).all()
    # a scanner's label and macro pictures beside the slide are not images to segment
    with tifffile.TiffWriter(tmp_path / "slide.ome.tif", ome=True) as tif:
        for field, name in zip(fields, ("slide", "label image", "macro image"), strict=True):
            tif.write(field, photometric="rgb", metadata={"Name": name})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(tmp_path / "slide.ome.tif")


def test_an_empty_file_is_called_empty(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"a\.png: empty file \(0 bytes\)"):
        read_image(tmp_path / "a.png")


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


def test_an_indexed_png_mask_gives_its_indices_not_its_colours(tmp_path):
    """CVAT, LabelMe and VOC-style tools save instance masks as palette PNGs; the colours
    may repeat (here every nucleus white), the indices are the labels."""
    from PIL import Image

    labels = np.zeros((40, 50), np.uint8)
    labels[5:15, 5:15], labels[15:30, 10:30], labels[30:38, 40:48] = 1, 2, 3  # 1 and 2 touch
    for palette in ([0, 0, 0] + [255, 255, 255] * 255, [0, 0, 0, 128, 0, 0, 0, 128, 0]):
        indexed = Image.fromarray(labels)  # "L"; a palette makes it "P"
        indexed.putpalette(palette)
        indexed.save(tmp_path / "m.png")
        assert np.array_equal(read_mask(tmp_path / "m.png"), labels)


def test_a_colour_mask_is_refused_whichever_channel_differs(tmp_path):
    """Only a mask whose three channels agree is grey; one whose blue alone differs (red
    and green equal) is a colour mask too, not read as its red channel."""
    import cv2

    for channel in range(3):
        rgb = np.zeros((4, 4, 3), np.uint8)
        rgb[1:3, 1:3] = 7
        rgb[1:3, 1:3, channel] = 9
        cv2.imwrite(str(tmp_path / f"c{channel}_mask.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        with pytest.raises(ImageReadError, match=rf"c{channel}_mask\.png: colour mask"):
            read_mask(tmp_path / f"c{channel}_mask.png")


def test_an_indexed_png_mask_is_read_whatever_pillows_decompression_bomb_limit(
    tmp_path, monkeypatch
):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS (179 million pixels): a
    20,000 x 20,000 px indexed mask, within what mlseg reads, failed with its
    DecompressionBombError traceback. Here the limit is lowered to a 40 x 50 px mask's size."""
    from PIL import Image

    labels = np.zeros((40, 50), np.uint8)
    labels[5:15, 5:15] = 2
    indexed = Image.fromarray(labels)
    indexed.putpalette([0, 0, 0] + [255, 255, 255] * 255)
    indexed.save(tmp_path / "m.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 50 // 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(read_mask(tmp_path / "m.png"), labels)


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


def test_atomic_path_ctrl_c_stays_an_interrupt_behind_a_writer_error(tmp_path):
    # torch.save interrupted while writing last.state.pt raises RuntimeError('unexpected
    # pos') on its way out: Ctrl-C during a checkpoint was a traceback and exit code 1
    target = tmp_path / "last.state.pt"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        try:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_normal_permissions(tmp_path):
    import os

    path = write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_outputs_in_a_group_shared_folder_keep_its_set_group_id(tmp_path):
    """A lab's shared folder is ``chmod g+s``, so what anyone makes in it has the lab's
    group. The staging folder of a run's tables (and of a new dataset) was set to the
    umask's mode alone, which cleared that bit: summary.csv, nuclei.parquet and run.json,
    and every folder of a synth or ingest dataset, had their maker's own group instead,
    beside per-image files with the lab's."""
    import stat

    from mlseg.io import written_together

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    if not shared.stat().st_mode & stat.S_ISGID:
        pytest.skip("this file system does not keep chmod g+s")
    (shared / "by_mkdir").mkdir()
    with written_together(shared / "out") as staging:
        (staging / "summary.csv").write_text("image\n")
        assert staging.stat().st_mode == (shared / "by_mkdir").stat().st_mode
    assert (shared / "out" / "summary.csv").stat().st_gid == shared.stat().st_gid


def test_exif_orientation_is_read_and_one_means_as_stored(tmp_path):
    from PIL import Image

    pixels = np.zeros((8, 12, 3), np.uint8)
    for orientation, expected in ((6, 6), (3, 3), (1, None), (None, None)):
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        Image.fromarray(pixels).save(path, exif=exif.tobytes())
        assert exif_orientation(path) == expected
        assert read_image(path).shape == (8, 12, 3)  # pixels as stored, as Fiji and QuPath
    write_image(tmp_path / "plain.png", pixels)
    assert exif_orientation(tmp_path / "plain.png") is None
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe1junk")
    assert exif_orientation(tmp_path / "junk.jpg") is None


def test_labels_beyond_16_bits_are_kept_and_images_beyond_16_bits_refused(tmp_path):
    """A label image of over 65,535 nuclei (a tile of a whole slide's keeps its global ids)
    reads back as written, not wrapped around 16 bits; an image or mask whose values no
    dtype of mlseg's holds is refused with the file named."""
    import tifffile

    labels = np.zeros((4, 4), np.uint32)
    labels[0, 0], labels[1, 1], labels[2, 2] = 70000, 1, 65536
    write_labels(tmp_path / "many.tif", labels)
    back = read_mask(tmp_path / "many.tif")
    assert back.dtype == np.int32 and back[0, 0] == 70000 and back[2, 2] == 65536
    tifffile.imwrite(tmp_path / "bright.tif", labels)
    with pytest.raises(ImageReadError, match=r"bright\.tif: uint32 values 0\.\.70000 do not fit"):
        read_image(tmp_path / "bright.tif")
    tifffile.imwrite(tmp_path / "negative.tif", -labels.astype(np.int32))
    with pytest.raises(ImageReadError, match=r"negative\.tif: int32 labels -70000\.\.0"):
        read_mask(tmp_path / "negative.tif")


def test_labels_that_no_label_file_holds_are_refused_not_wrapped(tmp_path):
    """A label outside 0..2**31 - 1 (what read_mask reads) is an error naming the file, not
    a nucleus written under another id: 2**32 + 5 was saved as 5, -1 as 65535."""
    for value in (2**32 + 5, 2**31, -1):
        labels = np.array([[0, 1], [value, 2]], np.int64)
        with pytest.raises(
            ValueError, match=rf"l\.tif: labels {min(value, 0)}\.\.{max(value, 2)} "
        ):
            write_labels(tmp_path / "l.tif", labels)
    assert list(tmp_path.iterdir()) == []
    top = np.array([[0, 2**31 - 1]], np.int64)
    write_labels(tmp_path / "top.tif", top)
    assert np.array_equal(read_mask(tmp_path / "top.tif"), top)


@pytest.mark.parametrize(
    "name, stem, ext",
    [
        ("slide1.ome.tif", "slide1", ".ome.tif"),
        ("dir/Slide1.OME.TIFF", "Slide1", ".ome.tiff"),
        ("a.tif", "a", ".tif"),
        ("a.ome.png", "a.ome", ".png"),  # OME-TIFF only: a PNG has no OME extension
        ("TCGA.01.png", "TCGA.01", ".png"),
    ],
)
def test_image_stem_counts_ome_tif_as_one_extension(name, stem, ext):
    assert (image_stem(name), image_extension(name)) == (stem, ext)
    assert without_image_extension(name) == stem


def test_match_stem_reads_an_ome_stem_as_the_ome_tiffs_unless_an_image_has_it():
    assert match_stem("x.ome") == "x" and match_stem("x.OME", {"x"}) == "x"
    assert match_stem("x.ome", {"x.ome"}) == "x.ome" and match_stem("TCGA.01") == "TCGA.01"


def test_write_image_never_leaves_a_short_file_when_the_disk_fills(tmp_path):
    """A label image cut short by a full disk (here a file size limit) is an error, never a
    file under its final name: OpenCV's own writer reported such files as written."""
    labels = np.zeros((256, 256), np.int32)
    rng = np.random.default_rng(0)
    for i in range(200):  # about 6 KB as a 16-bit PNG
        y, x = rng.integers(0, 250, 2)
        labels[y : y + 6, x : x + 6] = i + 1
    with file_size_limit(4096), pytest.raises(OutputError, match=r"x_labels\.png: .*too large"):
        write_labels(tmp_path / "x_labels.png", labels)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, shape",
    [("e.png", (0, 5)), ("e.jpg", (5, 0, 3)), ("e.tif", (0, 5)), ("e_mask.png", (0, 0))],
)
def test_an_empty_array_is_refused_naming_the_file(tmp_path, name, shape):
    """A 0 x N array ended in OpenCV's bare 'cv2.error: (-215:Assertion failed)
    !_img.empty() in function imencode' (a TIFF: a nonconformant file); it is a ValueError
    naming the file, nothing written."""
    with pytest.raises(ValueError, match=rf"{name}: the image is empty \(shape"):
        write_image(tmp_path / name, np.zeros(shape, np.uint8))
    if not name.endswith(".jpg"):  # labels are written lossless only
        with pytest.raises(ValueError, match=rf"{name}: the image is empty"):
            write_labels(tmp_path / name, np.zeros(shape[:2], np.int32))
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes beyond ``limit`` bytes fail (EFBIG), as ``ulimit -f`` makes them: a disk that
    fills up part-way through a file."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_write_names_the_output_and_the_cause(tmp_path):
    """One line a person can act on, naming the output (not its temporary file), and the
    older file of that name left as it was."""
    table = pd.DataFrame({"area": np.arange(2000.0)})
    (tmp_path / "t.csv").write_text("old")
    with file_size_limit(1024), pytest.raises(OutputError) as caught:
        write_table(table, tmp_path / "t.csv")
    assert str(caught.value).startswith(f"{tmp_path / 't.csv'}: cannot be written (file too large)")
    assert (tmp_path / "t.csv").read_text() == "old"
    (tmp_path / "in_the_way.png").mkdir()
    with pytest.raises(OutputError, match=r"in_the_way\.png: .*folder of that name is in the way"):
        write_image(tmp_path / "in_the_way.png", np.zeros((4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_the_way.png", "t.csv"]
    with pytest.raises(OutputError, match=r"t\.csv[/\\]x\.csv: .*a file is in the way"):
        write_table(table, tmp_path / "t.csv" / "x.csv")
    # a network file system's I/O error stays itself: the flows retry it
    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "n.csv"):
        raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(caught.value, OutputError)


def test_a_cmyk_tiff_reads_in_the_colours_it_shows(tmp_path):
    """A CMYK TIFF (a publication or print workflow's export) came back as RGBA, its black
    ink taken for transparency: the image laid over white, its darkest stain lightest."""
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (60, 20, 90)  # hematoxylin-dark nuclei
    rgb[:, 10:20] = (230, 150, 200)  # eosin
    rgb[:, 20:] = 245  # glass
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "x.tif")
    shown = np.asarray(Image.open(tmp_path / "x.tif").convert("RGB"))
    image = read_image(tmp_path / "x.tif")
    assert image.shape == (20, 30, 3)
    assert np.abs(image.astype(int) - shown).max() <= 1
    assert np.abs(image.astype(int) - rgb).max() <= 1


def test_a_colour_separation_of_other_inks_than_cmyk_is_refused(tmp_path):
    """Four inks declared other than CMYK (InkSet 2) were converted as if they were CMYK,
    in colours no viewer shows; such a file is refused, naming it and the fix."""
    import tifffile

    inks = np.zeros((20, 30, 4), np.uint8)
    tifffile.imwrite(tmp_path / "cmyk.tif", inks, photometric="separated")
    assert read_image(tmp_path / "cmyk.tif").shape == (20, 30, 3)
    tifffile.imwrite(
        tmp_path / "spot.tif", inks, photometric="separated", extratags=[(332, "H", 1, 2, True)]
    )
    with pytest.raises(ImageReadError, match=r"spot\.tif: .*other inks than CMYK.*as RGB"):
        read_image(tmp_path / "spot.tif")


def test_an_indexed_tiff_image_reads_in_its_colours_and_its_mask_by_its_indices(tmp_path):
    """An indexed TIFF (Pillow's, or ImageJ's with a colour LUT) came back as its indices,
    a grey image of 0..N that no viewer shows; its mask, like an indexed PNG's, is read by
    its indices."""
    from PIL import Image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (60, 20, 90)
    rgb[:, 10:20] = (230, 150, 200)
    rgb[:, 20:] = 245
    indexed = Image.fromarray(rgb).quantize(4)
    indexed.save(tmp_path / "x.tif")
    image = read_image(tmp_path / "x.tif")
    assert np.array_equal(image, np.asarray(indexed.convert("RGB")))
    assert np.abs(image.astype(int) - rgb).max() <= 2
    indexed.save(tmp_path / "x_mask.tif")
    assert np.array_equal(read_mask(tmp_path / "x_mask.tif"), np.asarray(indexed))


def test_an_image_saved_with_a_lookup_table_keeps_its_intensities(tmp_path):
    """ImageJ saves an 8-bit image shown with a LUT (Fire, Green) as an indexed TIFF whose
    indices are the measured intensities, as Fiji reads them; its colours are only a view."""
    import tifffile

    dapi = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    ramp = np.arange(256)
    fire = np.stack([np.minimum(ramp * 3, 255), np.clip(ramp * 2 - 255, 0, 255), ramp // 2])
    tifffile.imwrite(
        tmp_path / "x.tif",
        dapi,
        imagej=True,
        photometric="palette",
        colormap=(fire * 257).astype(np.uint16),
    )
    assert np.array_equal(read_image(tmp_path / "x.tif")[..., 0], dapi)


def test_a_grey_image_quantised_by_pillow_reads_in_its_greys_not_inverted(tmp_path):
    """Pillow's palette of a grey fluorescence image is a smooth ramp of greys, brightest
    first: taken for an ImageJ lookup table, its indices were kept, and a dark field of
    bright nuclei read as a bright field of dark ones."""
    from PIL import Image

    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 8:24] = np.arange(16 * 16).reshape(16, 16) // 3  # a nucleus of 0..85 on black
    indexed = Image.fromarray(np.dstack([grey] * 3)).quantize(256)
    indexed.save(tmp_path / "dapi.tif")
    image = read_image(tmp_path / "dapi.tif")
    assert image.shape == (32, 32, 1)
    assert np.array_equal(image[..., 0], np.asarray(indexed.convert("L")))
    assert image[0, 0, 0] == 0  # the background stays black


def test_a_tiff_with_premultiplied_alpha_reads_as_its_viewer_shows_it(tmp_path):
    """A TIFF whose colours are premultiplied by alpha (associated alpha, ExtraSamples 1)
    was laid over white as if they were not: its half-transparent edge of a scan came out
    darker than viewers show it."""
    import tifffile

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:] = (60, 20, 90)
    alpha = np.full((20, 30, 1), 255, np.uint8)
    alpha[:, 10:20], alpha[:, 20:] = 128, 0
    premultiplied = np.round(rgb * (alpha / 255)).astype(np.uint8)
    tifffile.imwrite(
        tmp_path / "x.tif",
        np.concatenate([premultiplied, alpha], axis=-1),
        photometric="rgb",
        extrasamples=["assocalpha"],
    )
    shown = premultiplied + 255 * (1 - alpha / 255)  # over white, as viewers composite it
    image = read_image(tmp_path / "x.tif")
    assert np.abs(image - shown).max() <= 1.5
    assert (image[:, 20:] == 255).all()


@pytest.mark.parametrize(
    ("photometric", "compression"), [("cielab", None), ("ycbcr", None), ("ycbcr", "lzw")]
)
def test_a_tiff_in_a_colour_space_mlseg_does_not_convert_is_refused_by_name(
    tmp_path, photometric, compression
):
    """tifffile gives CIELab, and YCbCr that no JPEG codec decoded, as stored: read as RGB,
    they came back in colours no viewer shows them in (a YCbCr brown as blue), with no
    error."""
    import tifffile

    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:] = (29, 68, 143)
    kwargs = {"subsampling": (1, 1)} if photometric == "ycbcr" else {}
    tifffile.imwrite(
        tmp_path / "x.tif", stored, photometric=photometric, compression=compression, **kwargs
    )
    with pytest.raises(ImageReadError, match=rf"x\.tif: .*{photometric.upper()}.*save .* RGB"):
        read_image(tmp_path / "x.tif")


def test_a_tiff_whose_jpeg_tiles_hold_ycbcr_reads_as_rgb(tmp_path):
    """As slide scanners (Aperio) write their tiles: the JPEG codec gives RGB."""
    import tifffile
    from PIL import Image

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:] = (230, 150, 200)
    tifffile.imwrite(tmp_path / "x.tif", rgb, photometric="ycbcr", compression="jpeg")
    shown = np.asarray(Image.open(tmp_path / "x.tif").convert("RGB"))
    assert np.abs(read_image(tmp_path / "x.tif").astype(int) - shown).max() <= 2


def test_an_rgb_tiff_with_an_unspecified_extra_sample_reads_as_its_rgb(tmp_path):
    """A fourth sample the file declares unspecified (ExtraSamples 0: padding, RGBX) is no
    opacity: taken for alpha, a TIFF padded with 0 read as a blank white tile."""
    import tifffile
    from PIL import Image

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:] = (60, 20, 90)
    padded = np.concatenate([rgb, np.zeros((16, 16, 1), np.uint8)], axis=-1)
    tifffile.imwrite(tmp_path / "x.tif", padded, photometric="rgb", extrasamples=["unspecified"])
    image = read_image(tmp_path / "x.tif")
    assert np.array_equal(image, rgb)
    assert np.array_equal(image, np.asarray(Image.open(tmp_path / "x.tif").convert("RGB")))


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_a_grey_tiff_of_four_samples_is_refused_as_four_channels(tmp_path, planar):
    """tifffile writes a 4-channel fluorescence image as grey with three extra samples of
    unspecified meaning: read as RGB + padding, its first three channels passed for a
    colour image and the fourth was dropped, without a word."""
    import tifffile

    channels = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    data = channels if planar == "separate" else channels.transpose(1, 2, 0)
    tifffile.imwrite(tmp_path / "x.tif", data, photometric="minisblack", planarconfig=planar)
    with pytest.raises(ImageReadError, match=r"x\.tif: 4 channels.*Split Channels"):
        read_image(tmp_path / "x.tif")


def test_labels_that_would_not_read_back_as_written_are_refused(tmp_path):
    """Float labels were cast (1.7 written as 1, NaN as 0) and a JPEG written lossy (300 read
    as 255, edges as new labels) where read_mask refuses it; both are errors naming the file,
    and nothing is written."""
    with pytest.raises(ValueError, match=r"l\.png: labels must be integers"):
        write_labels(tmp_path / "l.png", np.array([[0.0, 1.7], [np.nan, 2.2]]))
    labels = np.zeros((16, 16), np.int32)
    labels[4:12, 4:12] = 300
    for name in ("l.jpg", "l.bmp"):
        with pytest.raises(ValueError, match=rf"{name}: labels are written as .*l\.png"):
            write_labels(tmp_path / name, labels)
    assert list(tmp_path.iterdir()) == []
    write_labels(tmp_path / "mask.png", labels > 0)  # a binary mask: 0/1
    assert np.array_equal(read_mask(tmp_path / "mask.png"), labels > 0)


def test_an_array_that_a_png_would_not_hold_as_given_is_refused_not_clipped(tmp_path):
    """OpenCV wrote int32 300 and 70,000 as 255, and float [0, 1] as 0 or 1, in an 8-bit
    PNG, with no error; such arrays are refused naming the file. Integers of 0-255 are
    written as their uint8 copy, as before."""
    arrays = (
        np.array([[0, 300], [70000, 5]], np.int32),
        np.array([[0, -1], [20, 5]], np.int16),  # -1 is no 8-bit value either
        np.full((2, 2), 0.5, np.float32),
    )
    for array in arrays:
        with pytest.raises(ValueError, match=r"w\.png: .* convert the array to uint8"):
            write_image(tmp_path / "w.png", array)
    assert list(tmp_path.iterdir()) == []
    small = np.array([[0, 200], [17, 5]], np.int64)
    write_image(tmp_path / "w.png", small)
    assert np.array_equal(read_image(tmp_path / "w.png")[..., 0], small)


def test_a_16_bit_array_a_jpeg_would_not_hold_is_refused_not_clipped(tmp_path):
    """OpenCV writes a JPEG in 8 bits: a 12-bit camera's 0-4095 was written as 0-255 with
    every value above 255 as 255, and no error."""
    grey16 = np.array([[0, 300], [4095, 5]], np.uint16)
    with pytest.raises(ValueError, match=r"w\.jpg: uint16 values up to 4095 .* PNG or TIFF"):
        write_image(tmp_path / "w.jpg", grey16)
    assert list(tmp_path.iterdir()) == []
    write_image(tmp_path / "w.png", grey16)  # 16 bits hold it
    assert np.array_equal(read_image(tmp_path / "w.png")[..., 0], grey16)


@pytest.mark.parametrize("new_file", [None, "nuclei.parquet"])
def test_a_set_written_together_that_cannot_all_be_moved_leaves_the_previous_set(
    tmp_path, monkeypatch, new_file
) -> None:
    """A file of the set that cannot be replaced (held open on a share: EBUSY) once stopped
    the moves with the files before it already the new run's beside the previous run's
    summary.csv; the previous set stays whole, and nothing is left behind. A file new to the
    folder (``new_file``: the previous run wrote no nuclei.parquet), moved in before the
    refusal, is taken out again, not left as a table of the failed run beside the previous
    run's summary."""
    names = ("histograms.png", "nuclei.parquet", "run.json", "summary.csv")
    previous = tuple(n for n in names if n != new_file)
    _set_in(tmp_path, previous, "previous")
    busy = OSError(errno.EBUSY, "Device or resource busy", str(tmp_path / "summary.csv"))
    _replace_refused(monkeypatch, tmp_path / "summary.csv", busy)
    with pytest.raises(OSError):
        _new_set_written_together(tmp_path, names)
    assert _contents(tmp_path) == dict.fromkeys(previous, "previous")


def _set_in(folder: Path, names: tuple[str, ...], text: str) -> None:
    """Files ``names`` in ``folder``, each holding ``text`` (a run's previous set)."""
    for name in names:
        (folder / name).write_text(text)


def _new_set_written_together(folder: Path, names: tuple[str, ...]) -> None:
    """Files ``names``, each holding 'new', written into ``folder`` together."""
    with written_together(folder) as staging:
        _set_in(staging, names, "new")


def _contents(folder: Path) -> dict[str, str]:
    """The folder's files as a user lists them (its hidden lock files left out)."""
    return {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}


def _replace_refused(monkeypatch, target: Path, error: OSError, new_only: bool = False) -> None:
    """``Path.replace`` onto ``target`` raises ``error``; with ``new_only``, only for the new
    file from the staging folder, not for the previous one put back."""
    replace = Path.replace

    def refused(self, dest):
        if Path(dest) == target and (not new_only or self.parent.parent == target.parent):
            raise error
        return replace(self, dest)

    monkeypatch.setattr(Path, "replace", refused)


def _no_link_no_room(monkeypatch) -> None:
    """A file system without hard links (exFAT, s3fs) whose disk holds the new set but no
    copy of the previous one."""

    def no_link(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    def no_room(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr("os.link", no_link)
    monkeypatch.setattr("shutil.copy2", no_room)


def test_a_killed_runs_staging_folder_is_removed_by_the_next_set_written_together(tmp_path):
    """A run killed while it wrote a set together (evaluate's per_image.csv and worst.png,
    validate's inventory, tune's ranking, monitor's drift tables) left its hidden staging
    folder for good: only segment's output folders were cleaned. The next set written into
    the folder removes one untouched for 10 minutes; a fresh one (a run at work) and a
    person's hidden folder stay."""
    import os
    import time

    from mlseg.io import staging_dir

    out = tmp_path / "out"
    killed, fresh = staging_dir(out / "outputs"), staging_dir(out / "outputs")
    (killed / "per_image.csv").write_text("partial")
    kept = out / ".outputs.notes.tmp"
    kept.mkdir()
    hour_ago = time.time() - 3600
    for path in (killed / "per_image.csv", killed, kept):
        os.utime(path, (hour_ago, hour_ago))
    with written_together(out) as staging:
        (staging / "per_image.csv").write_text("new")
    left = sorted(p.name for p in out.iterdir() if p.name != ".outputs.lock")
    assert left == sorted([fresh.name, kept.name, "per_image.csv"])


def test_a_file_of_a_set_written_together_that_cannot_be_replaced_is_named(
    tmp_path, monkeypatch
) -> None:
    """A summary.csv one may not replace (chattr +i, or another's in a sticky-bit folder)
    made a segment rerun say 'out: cannot be written (operation not permitted); make the
    folder writable', of a folder that is writable; the error names the file, and the
    previous set stays whole."""
    out = tmp_path / "out"
    out.mkdir()
    names = ("run.json", "summary.csv")
    _set_in(out, names, "previous")
    target = out / "summary.csv"
    immutable = PermissionError(errno.EPERM, "Operation not permitted", str(target))
    _replace_refused(monkeypatch, target, immutable)
    with pytest.raises(OutputError, match=r"out/summary\.csv: cannot be written \(operation not"):
        _new_set_written_together(out, names)
    assert _contents(out) == dict.fromkeys(names, "previous")


def test_a_set_written_together_replaces_the_previous_without_links_or_room_for_a_copy(
    tmp_path, monkeypatch
) -> None:
    """Keeping each replaced file until the whole set is in place must not need room for a
    copy of it: on a nearly full disk without hard links the run's outputs were refused
    (no space left) where a rename needs none."""
    names = ("nuclei.parquet", "summary.csv")
    _set_in(tmp_path, names, "previous")
    _no_link_no_room(monkeypatch)
    _new_set_written_together(tmp_path, names)
    assert _contents(tmp_path) == dict.fromkeys(names, "new")


def test_a_set_without_links_or_room_that_cannot_all_be_moved_leaves_the_previous_set(
    tmp_path, monkeypatch
) -> None:
    """Where the previous files are moved aside (no link, no room for a copy), a file that
    cannot be replaced (EBUSY) still puts every previous file back."""
    names = ("histograms.png", "nuclei.parquet", "summary.csv")
    _set_in(tmp_path, names, "previous")
    _no_link_no_room(monkeypatch)
    busy = OSError(errno.EBUSY, "Device or resource busy", str(tmp_path / "summary.csv"))
    # the new summary.csv (from the staging folder), not the previous one put back
    _replace_refused(monkeypatch, tmp_path / "summary.csv", busy, new_only=True)
    with pytest.raises(OSError):
        _new_set_written_together(tmp_path, names)
    assert _contents(tmp_path) == dict.fromkeys(names, "previous")


def test_a_folder_named_as_an_output_is_never_moved_away(tmp_path, monkeypatch) -> None:
    """A folder where the set has a file (a user's ``summary.csv/``) is refused as before,
    not moved aside with the previous files and removed with the staging folder."""
    (tmp_path / "summary.csv").mkdir()
    (tmp_path / "summary.csv" / "notes.txt").write_text("mine")
    _no_link_no_room(monkeypatch)
    with pytest.raises((OSError, OutputError)), written_together(tmp_path) as staging:
        (staging / "summary.csv").write_text("new")
    assert (tmp_path / "summary.csv" / "notes.txt").read_text() == "mine"


def test_two_sets_written_together_into_one_folder_at_once_land_whole(
    tmp_path, monkeypatch
) -> None:
    """Two runs into one folder at once (two monitor runs' drift.csv and drift.json) moved
    their files in turn: one's drift.csv was left beside the other's drift.json. Here the
    second set is written while the first is half-way in; each lands whole, one after the
    other."""
    import threading

    names = ("drift.csv", "drift.json")
    replace, second = Path.replace, {}

    def write(text: str) -> None:
        with written_together(tmp_path) as staging:
            _set_in(staging, names, text)

    def half_way(self, dest):
        moved = replace(self, dest)
        if Path(dest) == tmp_path / names[0] and "thread" not in second:
            second["thread"] = threading.Thread(target=write, args=("second",))
            second["thread"].start()
            second["thread"].join(timeout=0.5)  # the second set's move waits for this one's
        return moved

    monkeypatch.setattr(Path, "replace", half_way)
    write("first")
    second["thread"].join()
    assert _contents(tmp_path) == dict.fromkeys(names, "second")


def test_image_size_is_read_from_the_header_as_read_image_reads_the_pixels(tmp_path) -> None:
    """The training memory warning sums the split's sizes before decoding any image: each
    format's header gives the ``(height, width)`` that reading the pixels gives; a file it
    cannot read is ``None`` (reading it names the problem), never an error."""
    import tifffile

    rgb = np.zeros((30, 50, 3), np.uint8)
    grey16 = np.zeros((40, 20), np.uint16)
    paths = [
        write_image(tmp_path / "a.png", rgb),
        write_image(tmp_path / "b.jpg", rgb),
        write_image(tmp_path / "c.png", grey16),
    ]
    tifffile.imwrite(tmp_path / "d.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "e.tif", np.zeros((3, 30, 50), np.uint8), photometric="rgb")
    paths += [tmp_path / "d.tif", tmp_path / "e.tif"]
    for path in paths:
        assert image_size(path) == read_image(path).shape[:2], path.name
    (tmp_path / "cut.png").write_bytes(b"\x89PNG")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00")
    assert image_size(tmp_path / "cut.png") is image_size(tmp_path / "cut.tif") is None


def test_a_black_and_white_tiff_stored_white_is_zero_reads_as_shown(tmp_path):
    """ImageMagick's Group 4 (fax) compression writes a binary mask as 1-bit TIFF whose
    bits mean black (1) and white (0): read as stored, its white nuclei came back as 0 and
    the black background as one object covering the mask, which validate and quantify
    refused as "inverted" though every viewer shows it right."""
    import tifffile
    from PIL import Image

    nuclei = np.zeros((16, 16), bool)
    nuclei[4:8, 4:8] = nuclei[10:14, 9:12] = True
    tifffile.imwrite(tmp_path / "x_mask.tif", ~nuclei, photometric="miniswhite")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x_mask.tif")), nuclei)
    assert np.array_equal(read_mask(tmp_path / "x_mask.tif"), nuclei.astype(np.int32))
    # an 8-bit one (ImageJ's image with an inverted LUT) keeps its values, as Fiji reads them
    values = np.where(nuclei, 255, 0).astype(np.uint8)
    tifffile.imwrite(tmp_path / "ij_mask.tif", values, photometric="miniswhite")
    assert np.array_equal(read_mask(tmp_path / "ij_mask.tif"), values.astype(np.int32))
