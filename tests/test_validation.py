"""The validation gate: each broken dataset is caught by exactly the expectation named for it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from html_a11y import read_page

from expectations.page import validation_page
from expectations.runner import (
    SUITES_DIR,
    Outcome,
    ValidationReport,
    load_suites,
    run_suites,
    validate_dataset,
)
from mlseg.cli import main
from mlseg.dataset import list_pairs
from mlseg.errors import ConfigError, DatasetError, ImageReadError
from mlseg.ingest import ingest
from mlseg.inventory import ValidateConfig, build_inventory, pixel_size_summary
from mlseg.io import read_image, read_mask, write_image, write_labels

README = Path(__file__).resolve().parents[1] / "expectations" / "README.md"


def check(root: Path, **cfg) -> ValidationReport:
    data = cfg.pop("data", None)
    config = ValidateConfig(**cfg) if data is None else ValidateConfig(data=data, **cfg)
    return run_suites(build_inventory(root, config))


def assert_caught(report: ValidationReport, rule: str, files: set[str]) -> None:
    outcome = report.outcome(rule)
    assert not outcome.success, f"{rule} did not fail"
    assert set(outcome.failed) == files
    assert outcome.n_failed == len(files)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------ suites


def test_suites_are_versioned_documented_and_name_each_rule():
    suites = load_suites()
    assert {s["name"] for s in suites} == {"dataset_errors", "dataset_warnings", "splits_errors"}
    readme = README.read_text()
    for suite in suites:
        assert suite["meta"]["version"] and suite["meta"]["severity"] in ("error", "warning")
        for exp in suite["expectations"]:
            assert exp["notes"], exp["meta"]["rule"]
            assert f"`{exp['meta']['rule']}`" in readme, f"{exp['meta']['rule']} not in README"


def test_a_bad_suite_file_is_a_config_error(tmp_path):
    shutil.copy(SUITES_DIR / "dataset_errors.json", tmp_path / "a.json")
    spec = json.loads((tmp_path / "a.json").read_text())
    del spec["meta"]["version"]
    (tmp_path / "a.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"a\.json.*meta\.version"):
        load_suites(tmp_path)


def test_an_expectation_that_cannot_run_counts_as_failed(tmp_path, nuclei_dataset):
    spec = json.loads((SUITES_DIR / "splits_errors.json").read_text())
    # a range of numbers over the split's name: Great Expectations cannot compare them
    spec["expectations"][2]["kwargs"]["column"] = "split"
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "splits_errors.json").write_text(json.dumps(spec))
    inventory = build_inventory(nuclei_dataset())
    report = run_suites(inventory, suites_dir=tmp_path / "suites")
    outcome = report.outcome("min_images_per_split")
    assert not report.success and not outcome.success and outcome.error


def edited_suites(tmp_path: Path, name: str, edit, copy_as: str | None = None) -> Path:
    """A copy of the suites where ``edit(spec)`` changed suite ``name`` (saved as ``copy_as``
    beside the original, if given, as a lab adds a suite of its own)."""
    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    spec = json.loads((suites / f"{name}.json").read_text())
    edit(spec)
    (suites / (copy_as or f"{name}.json")).write_text(json.dumps(spec))
    return suites


def warning_on(column: str, index_column: str | None = None):
    """An edit giving the warnings suite a lab's rule ``lab_rule`` on ``column``."""

    def edit(spec: dict) -> None:
        exp = {"type": "expect_column_values_to_be_between", "kwargs": {"column": column}}
        exp["kwargs"]["min_value"] = 0.1
        spec["expectations"].append({**exp, "meta": {"rule": "lab_rule"}, "notes": "Check it."})
        if index_column:
            spec["meta"]["index_column"] = index_column

    return edit


@pytest.mark.parametrize(
    ("column", "index_column", "said"),
    [
        ("pixel_size", None, r".*lab_rule\): no column 'pixel_size' .*'pixel_size_um'"),
        ("pixel_size_um", "pth", r"meta\.index_column: no column 'pth' .*'path'"),
    ],
)
def test_a_column_the_inventory_lacks_is_a_config_error_naming_the_suite_file(
    tmp_path, nuclei_dataset, column, index_column, said
):
    """A misspelt column made its rule one that 'could not run', whose 'what to do' was the
    data's fix; in the warnings suite the dataset then passed with the rule never checked."""
    suites = edited_suites(tmp_path, "dataset_warnings", warning_on(column, index_column))
    inventory = build_inventory(nuclei_dataset())
    file = re.escape(str(suites / "dataset_warnings.json"))
    with pytest.raises(ConfigError, match=rf"{file}: suite dataset_warnings, {said}.*inventory"):
        run_suites(inventory, suites_dir=suites)


def test_a_rule_a_lab_adds_runs_and_a_new_threshold_takes_effect(tmp_path, nuclei_dataset):
    def edit(spec: dict) -> None:
        (blank,) = (e for e in spec["expectations"] if e["meta"]["rule"] == "not_blank")
        blank["kwargs"]["min_value"] = 0.5  # above every image's grey_std

    suites = edited_suites(tmp_path, "dataset_errors", edit)
    warning_on("width_px")(spec := json.loads((suites / "dataset_warnings.json").read_text()))
    spec["expectations"][-1]["kwargs"]["min_value"] = 64  # the images are 48 px wide
    (suites / "dataset_warnings.json").write_text(json.dumps(spec))
    report = run_suites(build_inventory(nuclei_dataset(n_train=1, n_test=1)), suites_dir=suites)
    assert report.failed_rules("error") == ["not_blank"]
    assert (
        report.failed_rules("warning") == ["lab_rule"] and report.outcome("lab_rule").n_failed == 4
    )


def test_an_edited_threshold_is_the_one_the_cli_and_validation_html_give(tmp_path, nuclei_dataset):
    """A lab that raised not_blank's and mask_filled's bounds saw the new values in the Data
    Docs only: the CLI's line and validation.html gave the notes, which said 'constant
    within half a grey level' and 'Fewer than 20%' of images and masks far from either."""
    import io

    from rich.console import Console

    from flows.validate import summary_markdown
    from mlseg.cli.validate import print_report

    def edit(spec: dict) -> None:
        rules = {e["meta"]["rule"]: e for e in spec["expectations"]}
        rules["not_blank"]["kwargs"]["min_value"] = 0.5  # above every image's grey_std
        rules["mask_filled"]["kwargs"]["min_value"] = 0.99  # above every mask's interior

    suites = edited_suites(tmp_path, "dataset_errors", edit)
    report = validate_dataset(
        nuclei_dataset(n_train=1, n_test=1), tmp_path / "out", suites_dir=suites
    )
    assert report.failed_rules() == ["mask_filled", "not_blank"]
    console = Console(file=io.StringIO(), width=100_000)
    print_report(report, console)
    lines = console.file.getvalue().splitlines()
    said = {
        rule: [line for line in lines if line.startswith(rule)] for rule in report.failed_rules()
    }
    assert said["not_blank"][0].startswith("not_blank (needs grey_std >= 0.5): The image is blank")
    assert said["mask_filled"][0].startswith("mask_filled (needs interior_fraction >= 0.99): ")
    assert not re.search(r"half a grey|20 ?%", " ".join(said["not_blank"] + said["mask_filled"]))
    page = (tmp_path / "out" / "validation.html").read_text()
    assert "needs grey_std &gt;= 0.5;" in page and "needs interior_fraction &gt;= 0.99;" in page
    assert not re.search(r"half a grey|20 ?%", page)
    assert "`not_blank` (needs `grey_std >= 0.5`): 2 of 2" in summary_markdown(report)


def test_the_shipped_notes_state_no_bound_the_suite_sets():
    """The notes are what to do, shown beside the bound their rule's arguments set: a number
    in them ('Over 30%') is the one a lab's edit of the arguments leaves behind."""
    from expectations.runner import bound

    for suite in load_suites():
        for exp in suite["expectations"]:
            said = bound(exp, {"min_images_per_split": 1})
            if not said:
                continue
            values = [v for k, v in exp["kwargs"].items() if k in ("min_value", "max_value")]
            for v in (v for v in values if isinstance(v, int | float)):
                forms = {f"{v:g}", f"{v * 100:g}%", f"{v * 100:g} %"}
                forms |= {"half"} if v == 0.5 else set()
                forms |= {"within half a grey level"} if v == 0.002 else set()
                notes = exp["notes"]
                assert not [
                    f for f in forms if re.search(rf"(?<![\w.]){re.escape(f)}(?![\w.])", notes)
                ], (exp["meta"]["rule"], notes)


def test_the_bound_beside_each_failure_is_the_suites_own():
    from expectations.runner import bound

    def between(**kwargs) -> dict:
        return {"type": "expect_column_values_to_be_between", "kwargs": {"column": "x", **kwargs}}

    assert bound(between(min_value=0.002)) == "x >= 0.002"
    assert bound(between(min_value=0.0, strict_min=True)) == "x > 0"
    assert bound(between(max_value=10.0)) == "x <= 10"
    assert bound(between(min_value=0.01, max_value=10, mostly=0.95)) == (
        "0.01 <= x <= 10, in at least 95% of rows"
    )
    # a share near all is not rounded up to all of them
    assert bound(between(max_value=1, mostly=0.999)).endswith("in at least 99.9% of rows")
    assert bound(between(min_value={"$PARAMETER": "n"}), {"n": 3}) == "x >= 3"
    # a flag's set membership says no more than the rule's name
    flag = {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "x"}}
    assert bound({**flag, "kwargs": {**flag["kwargs"], "value_set": [True]}}) == ""
    assert bound(between()) == ""


def test_a_suite_copied_under_its_old_name_is_a_config_error(tmp_path, nuclei_dataset):
    """Great Expectations refused the second suite of one name with a traceback."""

    def edit(spec: dict) -> None:
        spec["expectations"] = []
        warning_on("width_px")(spec)

    suites = edited_suites(tmp_path, "dataset_warnings", edit, copy_as="lab.json")
    inventory = build_inventory(nuclei_dataset())
    with pytest.raises(ConfigError, match=r"lab\.json: suite name 'dataset_warnings' is also .*"):
        run_suites(inventory, suites_dir=suites)


@pytest.mark.parametrize("key", ["severity", "meta"])
def test_a_severity_on_one_expectation_is_refused_not_ignored(tmp_path, key):
    """A rule marked 'warning' in the errors suite still stopped training, without a word."""

    def edit(spec: dict) -> None:
        exp = spec["expectations"][0]
        (exp if key == "severity" else exp["meta"])["severity"] = "warning"

    suites = edited_suites(tmp_path, "dataset_errors", edit)
    with pytest.raises(
        ConfigError, match=r"dataset_errors\.json: .*allowed_extension\) sets .*severity 'warning'"
    ):
        load_suites(suites)
    # the severity Great Expectations gives every expectation, written out, is no contradiction
    edited_suites(
        tmp_path / "gx",
        "dataset_errors",
        lambda s: s["expectations"][0].update(severity="critical"),
    )
    assert load_suites(tmp_path / "gx" / "suites")


def test_a_broken_suite_file_stops_validate_before_the_files_are_read(
    tmp_path, nuclei_dataset, monkeypatch
):
    """A trailing comma in a suite file was found after every file of the dataset was read
    (hours for a large one)."""
    import expectations.runner as runner

    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    path = suites / "dataset_warnings.json"
    path.write_text(path.read_text().replace('"severity": "warning",', '"severity": "warning",,'))
    read = []
    monkeypatch.setattr(runner, "build_inventory", lambda *a, **k: read.append(a))
    with pytest.raises(ConfigError, match=r"dataset_warnings\.json: not valid JSON"):
        validate_dataset(nuclei_dataset(), tmp_path / "out", suites_dir=suites)
    assert not read


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"type": "expect_column_values_to_be_in_sett"}, "in_sett not found"),
        ({"kwargs": {"column": "only_in_one_split", "valu_set": [True]}}, "valu_set: extra"),
        ({"kwargs": {"column": "only_in_one_split", "value_set": {"$PARAMETER": "x"}}}, "'x'"),
    ],
)
def test_a_misspelt_expectation_is_a_config_error(tmp_path, nuclei_dataset, edit, said):
    """Great Expectations logged an expectation it could not build and left it out: a
    misspelt type dropped no_train_test_leakage from the gate, and a test image copied into
    the training split passed."""
    suites = tmp_path / "suites"
    shutil.copytree(SUITES_DIR, suites)
    spec = json.loads((suites / "dataset_errors.json").read_text())
    (leakage,) = (e for e in spec["expectations"] if e["meta"]["rule"] == "no_train_test_leakage")
    leakage.update(edit)
    (suites / "dataset_errors.json").write_text(json.dumps(spec))
    root = nuclei_dataset()
    for sub, name in (("original", "test0.png"), ("masks", "test0_mask.png")):
        shutil.copy(root / "test" / sub / name, root / "train" / sub / name)
    inventory = build_inventory(root)
    with pytest.raises(
        ConfigError, match=rf"suite dataset_errors, .*no_train_test_leakage.*{said}"
    ):
        run_suites(inventory, suites_dir=suites)


# ------------------------------------------------------------------ broken datasets


def with_pixel_sizes(root: Path, manifest: dict[str, object], tiffs: dict[str, dict]) -> Path:
    """Give ``root`` a manifest (``split/stem -> pixel_size_um`` as written) and turn some
    images into TIFFs written with ``tifffile.imwrite`` keyword arguments (their metadata)."""
    import tifffile

    rows = [f"{key.split('/')[0]},{key.split('/')[1]},{value}" for key, value in manifest.items()]
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\n" + "\n".join(rows) + "\n")
    for key, kwargs in tiffs.items():
        split, stem = key.split("/")
        png = root / split / "original" / f"{stem}.png"
        tifffile.imwrite(png.with_suffix(".tif"), read_image(png), photometric="rgb", **kwargs)
        png.unlink()
    return root


#: TIFF metadata as OME-TIFF writers store it (0.25 um per pixel).
OME_025 = {"ome": True, "metadata": {"PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm"}}
#: What an image program writes by default: 72 dots per inch, i.e. 353 um per pixel.
DPI_72 = {"resolution": (72, 72), "resolutionunit": "INCH"}


def test_a_clean_dataset_passes_every_expectation(nuclei_dataset):
    root = with_pixel_sizes(nuclei_dataset(), {"train/train0": 0.5}, {"test/test1": OME_025})
    inventory = build_inventory(root)
    report = run_suites(inventory)
    assert report.success and report.failed_rules() == []
    assert all(o.n_checked > 0 for o in report.outcomes)
    assert pixel_size_summary(inventory.files) == [
        "test: 1 at 0.25 um (metadata); 1 unknown",
        "train: 1 at 0.5 um (manifest); 2 unknown",
    ]
    sizes = inventory.files.set_index("path")
    assert sizes.loc["train/original/train0.png", "pixel_size_um"] == 0.5
    assert sizes.loc["train/original/train0.png", "pixel_size_source"] == "manifest"
    assert sizes.loc["test/original/test1.tif", "pixel_size_um"] == pytest.approx(0.25)
    assert sizes.loc["test/original/test1.tif", "pixel_size_source"] == "metadata"
    assert pd.isna(sizes.loc["train/original/train1.png", "pixel_size_um"])


@pytest.mark.parametrize("written", ["250", '"0,25"', "0.00025", "-0.5"])
def test_a_manifest_pixel_size_in_the_wrong_unit_stops_training(nuclei_dataset, written):
    # Nanometres, a decimal comma, millimetres, a sign slip: each would resample the image by a
    # wrong factor, so validation fails and training refuses the manifest, naming the line.
    root = with_pixel_sizes(nuclei_dataset(), {"train/train1": written, "test/test0": 0.5}, {})
    report = check(root)
    assert report.failed_rules("error") == ["pixel_size_valid"]
    assert_caught(report, "pixel_size_valid", {"train/original/train1.png"})
    with pytest.raises(DatasetError, match=r"manifest.csv line 2 \(train/train1\)"):
        list_pairs(root, "train")


def test_an_unquoted_decimal_comma_in_the_manifest_is_refused_not_shifted(nuclei_dataset):
    root = nuclei_dataset()
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\ntrain,train1,0,25\n")
    with pytest.raises(DatasetError, match="decimal comma"):
        list_pairs(root, "train")
    with pytest.raises(DatasetError, match="decimal comma"):
        build_inventory(root)


def test_print_resolution_in_tiff_metadata_is_ignored_with_a_warning(nuclei_dataset):
    root = with_pixel_sizes(
        nuclei_dataset(), {"train/train2": 0.5}, {"train/train1": DPI_72, "train/train2": DPI_72}
    )
    inventory = build_inventory(root)
    report = run_suites(inventory)
    assert report.success, "an implausible metadata size is ignored, so it cannot stop training"
    # train2's size comes from the manifest, which overrides its metadata: only train1 is named.
    assert_caught(report, "metadata_pixel_size_plausible", {"train/original/train1.tif"})
    sizes = inventory.files.set_index("path")
    assert sizes.loc["train/original/train1.tif", "metadata_pixel_size_um"] == pytest.approx(
        25400 / 72
    )
    assert pd.isna(sizes.loc["train/original/train1.tif", "pixel_size_um"])
    with pytest.warns(UserWarning, match=r"1 image\(s\).*train1.tif \(352.8 um\)"):
        pairs = {p.stem: p.pixel_size_um for p in list_pairs(root, "train")}
    assert pairs == {"train0": None, "train1": None, "train2": 0.5}


def save_jpeg(path: Path, image: np.ndarray, orientation: int | None) -> Path:
    """``image`` as a JPEG whose EXIF says viewers show it with ``orientation``."""
    from PIL import Image

    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(image).save(path, quality=95, exif=exif.tobytes())
    return path


def test_an_image_shown_turned_by_its_exif_is_named(nuclei_dataset):
    """A camera or phone JPEG whose EXIF orientation turns it when shown: a mask drawn on the
    turned view of a square image lines up with nothing and no size check can tell, so the
    warnings name the file (mlseg, Fiji and QuPath read the pixels as stored)."""
    root = nuclei_dataset()
    for stem, orientation in (("train1", 6), ("train2", 1)):
        png = root / "train/original" / f"{stem}.png"
        save_jpeg(png.with_suffix(".jpg"), read_image(png), orientation)
        png.unlink()
    report = check(root)
    assert report.success and report.failed_rules("warning") == ["shown_as_stored"]
    assert_caught(report, "shown_as_stored", {"train/original/train1.jpg"})


def test_a_mask_drawn_on_the_exif_turned_view_is_explained(nuclei_dataset, tmp_path):
    """A non-square JPEG stored on its side (EXIF orientation 6) whose mask was drawn as a
    photo viewer shows it: the size error says why and how to fix the image."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "original").mkdir(parents=True)
    save_jpeg(src / "original/slide.jpg", rng.integers(0, 255, (40, 64, 3), np.uint8), 6)
    mask = np.zeros((64, 40), np.uint8)
    mask[10:20, 10:20] = 1
    write_image(src / "masks/slide_mask.png", mask)
    with pytest.raises(
        DatasetError,
        match=r"mask is 40x64 px but its image is 64x40.*"
        r"slide\.jpg is stored on its side.*turned 90 degrees clockwise.*exiftran",
    ):
        ingest(src, tmp_path / "ds", progress=False)


def test_validate_says_what_the_profile_gives_images_without_a_pixel_size(nuclei_dataset):
    """mlseg validate printed "3 unknown (the profile's applies)" with the he profile, which
    sets no pixel size: nothing applied, and nothing said that the model's pixel size would
    then be unknown, or that in a set mixing scales those images are not resampled. It says
    what each profile gives them and what training makes of it."""
    from mlseg.config import get_profile

    he = get_profile("he")
    at_40x = he.model_copy(update={"name": "he40", "pixel_size_um": 0.25})
    root = nuclei_dataset()
    files = build_inventory(root).files
    assert pixel_size_summary(files, he) == [
        "test: 2 unknown (profile he sets none)",
        "train: 3 unknown (profile he sets none)",
        "training: 3 of 3 images have none and profile he sets none, so the model's pixel "
        "size will be unknown: mlseg segment and evaluate then scale each image by the size "
        "of its nuclei; give each image its size (mlseg ingest --pixel-sizes, manifest.csv's "
        "pixel_size_um or a JSON sidecar) or set pixel_size_um in the profile",
    ]
    assert pixel_size_summary(files, at_40x) == [
        "test: 2 unknown, at profile he40's 0.25 um",
        "train: 3 unknown, at profile he40's 0.25 um",
        "training: 3 of 3 images have none and train at profile he40's 0.25 um",
    ]
    # 20x and 40x tiles: the one without a size is left at its scale, the others resampled
    with_pixel_sizes(root, {"train/train0": 0.5, "train/train1": 0.25}, {})
    lines = pixel_size_summary(build_inventory(root).files, he)
    assert (
        lines[1] == "train: 1 at 0.25 um, 1 at 0.5 um (manifest); 1 unknown (profile he sets none)"
    )
    assert lines[2].startswith(
        "training: 1 of 3 images has none and profile he sets none: it stays at its own "
        "scale, 20x or 40x, while the others are resampled to 0.375 um"
    )
    files = build_inventory(root).files
    assert "resampled to 0.25 um" in pixel_size_summary(files, he, target_um=0.25)[2]


def test_validate_names_images_of_pixels_not_square_as_trained_at_their_own_scale(
    nuclei_dataset,
):
    """A TIFF tagged 0.25 x 0.5 um pixels and a sidecar declaring 0.5 x 1 um, with a profile
    at 0.25 um: training, segment and evaluate give such an image no size, not even the
    profile's, but mlseg validate passed them unsaid and said all three "train at profile
    he40's 0.25 um". Each is now named, with its fix, and counted apart."""
    from mlseg.config import get_profile

    he40 = get_profile("he").model_copy(update={"name": "he40", "pixel_size_um": 0.25})
    root = with_pixel_sizes(
        nuclei_dataset(), {}, {"train/train1": {"resolution": (4e4, 2e4), "resolutionunit": 3}}
    )
    (root / "train/original/train2.json").write_text('{"PixelSize": [0.5, 1.0]}')
    inventory = build_inventory(root)
    report = run_suites(inventory)
    assert report.success and report.failed_rules("warning") == ["metadata_pixels_square"]
    odd = {"train/original/train1.tif", "train/original/train2.png"}
    assert_caught(report, "metadata_pixels_square", odd)
    fix = report.outcome("metadata_pixels_square").fix
    assert "own scale" in fix and "in pixels" in fix
    assert "Resample it to square pixels" in fix and "manifest.csv" in fix
    train, note = pixel_size_summary(inventory.files, he40)[1:]
    assert train == (
        "train: 1 unknown, at profile he40's 0.25 um; 2 not square (no size, not even the "
        "profile's)"
    )
    assert note.startswith(
        "training: 3 of 3 images have none: 1 trains at profile he40's 0.25 um; 2 ("
    )
    assert "train1.tif" in note and "train2.png" in note and "own scale" in note
    # a manifest row gives the image its size: it trains at that, and is not named
    with_pixel_sizes(root, {"train/train1": 0.25, "train/train2": 0.5}, {})
    report = run_suites(build_inventory(root))
    assert report.outcome("metadata_pixels_square").success


def test_json_sidecars_give_pixel_sizes_and_are_in_their_place(nuclei_dataset):
    # BIDS microscopy keeps a <stem>.json beside each image: not a stray or a bad extension.
    root = nuclei_dataset()
    original = root / "train" / "original"
    (original / "train0.json").write_text('{"PixelSize": [0.5, 0.5], "PixelSizeUnits": "um"}')
    (original / "train1.json").write_text('{"PixelSize": [250, 250]}')  # nm, unit forgotten
    (original / "notes.json").write_text("{}")  # beside no image: training would skip it
    inventory = build_inventory(root)
    report = run_suites(inventory)
    assert report.failed_rules("error") == ["allowed_extension"]
    assert_caught(report, "allowed_extension", {"train/original/notes.json"})
    assert_caught(report, "metadata_pixel_size_plausible", {"train/original/train1.png"})
    assert pixel_size_summary(inventory.files)[1] == ("train: 1 at 0.5 um (metadata); 2 unknown")
    (original / "notes.json").unlink()
    # An OME-TIFF's sidecar as BIDS names it, without ".ome": slide.ome.tif + slide.json.
    import tifffile

    test = root / "test" / "original"
    tifffile.imwrite(test / "test0.ome.tif", read_image(test / "test0.png"), photometric="rgb")
    (test / "test0.png").unlink()
    (root / "test/masks/test0_mask.png").rename(root / "test/masks/test0.ome_mask.png")
    (test / "test0.json").write_text('{"PixelSize": [0.25, 0.25], "PixelSizeUnits": "um"}')
    assert check(root).success
    files = build_inventory(root).files.set_index("path")
    assert files.loc["test/original/test0.json", "role"] == "sidecar"
    assert files.loc["test/original/test0.ome.tif", "pixel_size_um"] == 0.25
    with pytest.warns(UserWarning, match=r"train1.png \(250 um\)"):
        pairs = {p.stem: p.pixel_size_um for p in list_pairs(root, "train")}
    assert pairs == {"train0": 0.5, "train1": None, "train2": None}


def test_missing_mask(nuclei_dataset):
    root = nuclei_dataset()
    (root / "train/masks/train0_mask.png").unlink()
    report = check(root)
    assert report.failed_rules("error") == ["image_has_mask"]
    assert_caught(report, "image_has_mask", {"train/original/train0.png"})


def test_orphan_mask(nuclei_dataset, nuclei_pair):
    root = nuclei_dataset()
    write_labels(root / "train/masks/ghost_mask.png", nuclei_pair(np.random.default_rng(9))[1])
    report = check(root)
    assert report.failed_rules("error") == ["mask_has_image"]
    assert_caught(report, "mask_has_image", {"train/masks/ghost_mask.png"})


@pytest.mark.parametrize("suffix", ["_Mask", "-mask", ""])
def test_misnamed_mask(nuclei_dataset, suffix):
    root = nuclei_dataset()
    bad = root / f"train/masks/train0{suffix}.png"
    (root / "train/masks/train0_mask.png").rename(bad)
    report = check(root)
    # The misnamed mask is named by mask_naming; its image is then (truly) without a mask.
    assert report.failed_rules("error") == ["mask_naming", "image_has_mask"]
    assert_caught(report, "mask_naming", {f"train/masks/train0{suffix}.png"})
    assert_caught(report, "image_has_mask", {"train/original/train0.png"})


def test_mask_of_another_size(nuclei_dataset):
    root = nuclei_dataset()
    write_labels(root / "test/masks/test1_mask.png", np.zeros((40, 48), np.uint16))
    report = check(root)
    assert report.failed_rules("error") == ["sizes_match"]
    assert_caught(report, "sizes_match", {"test/masks/test1_mask.png"})


@pytest.mark.parametrize("name", ["train/original/train1.png", "train/masks/train1_mask.png"])
def test_truncated_png(nuclei_dataset, name):
    root = nuclei_dataset()
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    report = check(root)
    assert report.failed_rules("error") == ["readable"]
    assert_caught(report, "readable", {name})
    row = build_inventory(root).files.set_index("path").loc[name]
    assert "truncated" in row["read_error"]


def test_non_image_file(nuclei_dataset):
    root = nuclei_dataset()
    (root / "train/original/notes.txt").write_text("scanned on Tuesday")
    report = check(root)
    assert report.failed_rules("error") == ["allowed_extension"]
    assert_caught(report, "allowed_extension", {"train/original/notes.txt"})


def test_files_the_file_browser_hides_are_no_part_of_the_dataset(nuclei_dataset):
    """Windows Explorer writes Thumbs.db and desktop.ini, hidden, into a folder of images as
    macOS writes .DS_Store and ._x.png: those were skipped, these failed allowed_extension
    and mask_naming ('rename the file'), stopping training on files the lab cannot see."""
    root = nuclei_dataset()
    for folder in ("train/original", "train/masks"):
        for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._train0.png"):
            (root / folder / name).write_bytes(b"\x00\x05\x16\x07 not an image")
    report = check(root)
    assert report.success, report.failed_rules()


def test_a_mask_named_with_accents_decomposed_pairs_with_its_image(nuclei_dataset):
    """An image named on Windows (é composed, NFC) and its mask on a Mac (e and an accent,
    NFD) are one name on a Mac's disk; they failed image_has_mask and mask_has_image."""
    import unicodedata

    root = nuclei_dataset()
    for folder, name, form in (
        ("original", "train0.png", "NFC"),
        ("masks", "train0_mask.png", "NFD"),
    ):
        path = root / "train" / folder / name
        path.rename(path.with_name(unicodedata.normalize(form, "café_") + name))
    report = check(root)
    assert report.success, report.failed_rules()


def test_a_jpeg_mask_is_refused_before_its_edges_become_nuclei(nuclei_dataset):
    root = nuclei_dataset()
    png = root / "train/masks/train1_mask.png"
    jpeg = png.with_suffix(".jpg")
    write_image(jpeg, (read_mask(png) > 0).astype(np.uint8) * 255)  # saved as JPEG by a lab
    png.unlink()
    assert len(np.unique(read_image(jpeg))) > 2  # the compression's new values along edges
    report = check(root)
    assert "allowed_extension" in report.failed_rules("error")
    assert_caught(report, "allowed_extension", {"train/masks/train1_mask.jpg"})
    with pytest.raises(ImageReadError, match=r"train1_mask\.jpg: a mask must be lossless"):
        read_mask(jpeg)


def test_mask_values_invalid_for_declared_binary(nuclei_dataset):
    root = nuclei_dataset()
    for path in root.glob("*/masks/*.png"):  # make every mask a proper 0/1 binary mask
        write_image(path, (read_mask(path) > 0).astype(np.uint8))
    odd = np.zeros((48, 48), np.uint8)
    odd[5:10, 5:10], odd[20:30, 20:30] = 3, 7
    write_image(root / "train/masks/train2_mask.png", odd)
    data = ValidateConfig().data.model_copy(update={"mask_kind": "binary"})
    report = check(root, data=data)
    assert report.failed_rules("error") == ["mask_values_valid"]
    assert_caught(report, "mask_values_valid", {"train/masks/train2_mask.png"})
    assert check(root).success  # declared "auto": {0, 3, 7} is a valid instance mask


def test_nuclei_drawn_as_outlines_stop_training(nuclei_dataset):
    """A lab that traced each nucleus's outline (an ROI export, a contour tool) instead of
    filling it would train a model that draws rings."""
    from skimage.draw import disk
    from skimage.segmentation import find_boundaries

    root = nuclei_dataset()
    labels = np.zeros((48, 48), np.uint16)
    for i, centre in enumerate([(12, 12), (12, 36), (36, 12), (36, 36)], start=1):
        labels[disk(centre, 9, shape=labels.shape)] = i
    path = root / "train/masks/train1_mask.png"
    write_labels(path, np.where(find_boundaries(labels, mode="inner"), labels, 0))
    report = check(root)
    assert report.failed_rules("error") == ["mask_filled"]
    assert_caught(report, "mask_filled", {"train/masks/train1_mask.png"})


@pytest.mark.parametrize("background", ["inverted binary", "label 1"])
def test_a_labelled_background_stops_training(nuclei_dataset, background):
    """Nuclei cover 10-50 % of a tile, so an inverted mask is 50-90 % foreground: the 90 %
    foreground warning alone let most of them train a model of the background."""
    root = nuclei_dataset()
    path = root / "test/masks/test0_mask.png"
    labels = read_mask(path)
    if background == "inverted binary":  # an ImageJ mask saved with black nuclei on white
        write_image(path, np.where(labels > 0, 0, 255).astype(np.uint8))
    else:  # a label image whose background is label 1 (a watershed's basin)
        write_labels(path, np.where(labels > 0, labels + 1, 1))
    report = check(root)
    # a 0/255 export among instance masks is also caught as one (mask_values_valid)
    extra = ["mask_values_valid"] if background == "inverted binary" else []
    assert report.failed_rules("error") == [*extra, "background_not_labelled"]
    assert_caught(report, "background_not_labelled", {"test/masks/test0_mask.png"})


@pytest.mark.parametrize("mask", ["classes", "JPEG saved as PNG"])
def test_masks_whose_values_are_not_one_per_nucleus_stop_training(nuclei_dataset, mask):
    """A class mask (1 = tumour, 2 = lymphocyte) passed as instance labels trained every
    nucleus of a class as one object and scored a perfect prediction PQ 0; a JPEG mask
    converted to PNG, to pass allowed_extension, kept its compression's values: one label
    for the inside of every nucleus, others in rings along their edges."""
    import cv2
    from skimage.draw import disk

    root = nuclei_dataset()
    labels = np.zeros((48, 48), np.uint8)
    for i, centre in enumerate([(12, 12), (12, 36), (36, 12), (36, 36)], start=1):
        labels[disk(centre, 9, shape=labels.shape)] = i
    path = root / "train/masks/train1_mask.png"
    if mask == "classes":
        write_image(path, (labels + 1) // 2)  # nuclei 1, 2: tumour; 3, 4: lymphocytes
    else:
        _, jpeg = cv2.imencode(".jpg", np.where(labels > 0, 255, 0).astype(np.uint8))
        write_image(path, cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE))
    report = check(root)
    assert_caught(report, "one_label_per_nucleus", {"train/masks/train1_mask.png"})


def test_the_mask_shape_rules_hold_the_limits_quantify_refuses_at():
    from mlseg.dataset import (
        MAX_EDGE_TO_EDGE_FRACTION,
        MAX_SPLIT_LABEL_FRACTION,
        MIN_INTERIOR_FRACTION,
    )

    rules = {e["meta"]["rule"]: e["kwargs"] for s in load_suites() for e in s["expectations"]}
    assert rules["mask_filled"]["min_value"] == MIN_INTERIOR_FRACTION
    assert rules["background_not_labelled"]["max_value"] == MAX_EDGE_TO_EDGE_FRACTION
    assert rules["one_label_per_nucleus"]["max_value"] == MAX_SPLIT_LABEL_FRACTION


def test_image_copied_into_train_and_test(nuclei_dataset):
    root = nuclei_dataset()
    shutil.copy(root / "train/original/train0.png", root / "test/original/copy.png")
    shutil.copy(root / "train/masks/train0_mask.png", root / "test/masks/copy_mask.png")
    report = check(root)
    assert report.failed_rules("error") == ["no_train_test_leakage"]
    assert_caught(
        report, "no_train_test_leakage", {"train/original/train0.png", "test/original/copy.png"}
    )


@pytest.mark.parametrize("turn", [np.fliplr, np.rot90], ids=["mirrored", "turned"])
def test_a_mirrored_or_turned_copy_across_splits_is_leakage(nuclei_dataset, turn):
    """An augmented copy of a training tile saved into test passed: only identical pixels
    were compared."""
    root = nuclei_dataset()
    image = read_image(root / "train/original/train0.png")
    write_image(root / "test/original/copy.png", np.ascontiguousarray(turn(image)))
    mask = read_image(root / "train/masks/train0_mask.png", labels=True)
    write_labels(root / "test/masks/copy_mask.png", np.ascontiguousarray(turn(mask[..., 0])))
    report = check(root)
    assert report.failed_rules("error") == ["no_train_test_leakage"]
    assert_caught(
        report, "no_train_test_leakage", {"train/original/train0.png", "test/original/copy.png"}
    )


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.uint16) * 257,
        lambda a: a.astype(np.uint16),
        lambda a: a.astype(np.uint16) << 8,
    ],
    ids=["16-bit-full-scale", "16-bit-as-is", "16-bit-byte-up"],
)
def test_a_copy_saved_in_16_bits_across_splits_is_leakage(nuclei_dataset, convert):
    """A training tile saved again as a 16-bit file into test passed: only identical pixels
    were compared, though training gives the model the same pixels from either file."""
    root = nuclei_dataset()
    image = read_image(root / "train/original/train0.png")
    write_image(root / "test/original/copy.png", convert(image))
    shutil.copy(root / "train/masks/train0_mask.png", root / "test/masks/copy_mask.png")
    report = check(root)
    assert report.failed_rules("error") == ["no_train_test_leakage"]
    assert_caught(
        report, "no_train_test_leakage", {"train/original/train0.png", "test/original/copy.png"}
    )


def test_a_grey_field_saved_blue_or_rgb_across_splits_is_leakage(nuclei_dataset):
    """A fluorescence field trained on as a grey file and saved again in blue alone (DAPI),
    or as RGB, into test passed: the files' pixels differ, the model's do not."""
    root = nuclei_dataset()
    for path in root.glob("*/original/*.png"):
        write_image(path, read_image(path).mean(axis=2).astype(np.uint8))
    grey = read_image(root / "train/original/train0.png")[..., 0]
    blue = np.zeros((*grey.shape, 3), np.uint8)
    blue[..., 2] = grey
    mask = read_image(root / "train/masks/train0_mask.png", labels=True)[..., 0]
    write_image(root / "test/original/blue.png", np.ascontiguousarray(np.rot90(blue)))
    write_labels(root / "test/masks/blue_mask.png", np.ascontiguousarray(np.rot90(mask)))
    write_image(root / "test/original/rgb.png", np.repeat(grey[..., None], 3, axis=2))
    write_labels(root / "test/masks/rgb_mask.png", mask)
    report = check(root, stain="fluorescence")
    assert report.failed_rules("error") == ["no_train_test_leakage"]
    assert_caught(
        report,
        "no_train_test_leakage",
        {"train/original/train0.png", "test/original/blue.png", "test/original/rgb.png"},
    )


def test_same_image_twice_in_one_split(nuclei_dataset):
    root = nuclei_dataset()
    shutil.copy(root / "train/original/train0.png", root / "train/original/again.png")
    shutil.copy(root / "train/masks/train0_mask.png", root / "train/masks/again_mask.png")
    report = check(root)
    assert report.failed_rules("error") == ["no_duplicate_images"]
    assert_caught(
        report, "no_duplicate_images", {"train/original/train0.png", "train/original/again.png"}
    )


def test_all_black_image(nuclei_dataset):
    root = nuclei_dataset()
    write_image(root / "train/original/train1.png", np.zeros((48, 48, 3), np.uint8))
    report = check(root)
    assert report.failed_rules("error") == ["not_blank"]
    assert_caught(report, "not_blank", {"train/original/train1.png"})
    assert "not_blurred" in report.failed_rules("warning")


def test_empty_split(nuclei_dataset):
    root = nuclei_dataset()
    for path in (root / "test").rglob("*.png"):
        path.unlink()
    report = check(root)
    assert report.failed_rules("error") == ["min_images_per_split"]
    assert_caught(report, "min_images_per_split", {"test"})


def test_minimum_images_per_split_is_a_parameter(nuclei_dataset):
    root = nuclei_dataset()  # 3 train, 2 test
    report = check(root, min_images_per_split=3)
    assert report.failed_rules("error") == ["min_images_per_split"]
    assert_caught(report, "min_images_per_split", {"test"})


def test_missing_mask_folder(nuclei_dataset):
    root = nuclei_dataset()
    shutil.rmtree(root / "test/masks")
    report = check(root)
    assert report.failed_rules("error") == [
        "image_has_mask",
        "mask_folder_exists",
        "min_images_per_split",
    ]
    assert_caught(report, "mask_folder_exists", {"test"})


def test_missing_image_folder_is_named_with_its_fix(nuclei_dataset):
    """A split whose original/ is misnamed must say so (and how to convert other layouts),
    not only that its masks are orphans and it has too few images."""
    root = nuclei_dataset()
    (root / "test/original").rename(root / "test/images")
    report = check(root)
    assert "image_folder_exists" in report.failed_rules("error")
    assert_caught(report, "image_folder_exists", {"test"})


def test_two_masks_for_one_image(nuclei_dataset):
    root = nuclei_dataset()
    labels = read_mask(root / "train/masks/train0_mask.png")
    write_labels(root / "train/masks/train0_mask.tif", labels)
    report = check(root)
    assert report.failed_rules("error") == ["one_mask_per_image"]
    # the files to act on: the two masks, not the image they both claim
    masks = {"train/masks/train0_mask.png", "train/masks/train0_mask.tif"}
    assert_caught(report, "one_mask_per_image", masks)


def test_two_images_for_one_mask_name_the_images(nuclei_dataset):
    root = nuclei_dataset()
    write_image(root / "train/original/train0.tif", read_image(root / "train/original/train0.png"))
    report = check(root)
    assert "one_mask_per_image" in report.failed_rules("error")
    images = {"train/original/train0.png", "train/original/train0.tif"}
    assert_caught(report, "one_mask_per_image", images)


@pytest.mark.parametrize("mask", ["_mask.tif", "_mask.ome.tif", "_mask.png"])
def test_an_ome_tiff_pairs_with_its_mask_by_its_name_less_ome_tif(nuclei_dataset, mask):
    """Bio-Formats, OMERO, QuPath and Fiji write ``x.ome.tif``: its mask is ``x_mask.tif``
    (or an OME-TIFF ``x_mask.ome.tif``), and its manifest row ``x``."""
    import tifffile

    root = nuclei_dataset()
    original, masks = root / "train/original", root / "train/masks"
    tifffile.imwrite(original / "train0.ome.tif", read_image(original / "train0.png"))
    (original / "train0.png").unlink()
    write_labels(masks / f"train0{mask}", read_mask(masks / "train0_mask.png"))
    if mask != "_mask.png":
        (masks / "train0_mask.png").unlink()
    (root / "manifest.csv").write_text("split,stem,pixel_size_um\ntrain,train0,0.5\n")
    inventory = build_inventory(root)
    assert run_suites(inventory).success
    files = inventory.files.set_index("path")
    assert files.loc["train/original/train0.ome.tif", "stem"] == "train0"
    assert files.loc["train/original/train0.ome.tif", "pixel_size_um"] == 0.5
    (pair,) = [p for p in list_pairs(root, "train") if p.stem == "train0"]
    assert pair.mask.name == f"train0{mask}" and pair.pixel_size_um == 0.5


def test_an_image_and_an_ome_tiff_of_one_stem_are_both_named(nuclei_dataset):
    root = nuclei_dataset()
    image = read_image(root / "train/original/train0.png")
    write_image(root / "train/original/train0.ome.tif", image)
    report = check(root)
    images = {"train/original/train0.png", "train/original/train0.ome.tif"}
    assert_caught(report, "one_mask_per_image", images)


def test_a_manifest_row_naming_no_image_stops_training(nuclei_dataset):
    """Training reads every manifest row: a stem written with its extension gave its image
    no pixel size and a row for a removed image stopped training, yet the gate passed."""
    root = nuclei_dataset()
    (root / "manifest.csv").write_text(
        "split,stem,pixel_size_um\ntrain,train0.png,0.25\ntrain,ghost,250\ntest,test0,0.5\n"
        "test,tset1,0.5\n"  # one row alone stops training too
    )
    report = check(root)
    assert report.failed_rules("error") == ["manifest_rows_name_images"]
    # the rows by line, where the verdict names what failed: "train" sent one to the inventory
    assert_caught(
        report,
        "manifest_rows_name_images",
        {"line 2: train/train0.png; line 3: train/ghost", "line 5: test/tset1"},
    )


def report_splits(root):
    return build_inventory(root).splits


def test_a_binary_export_among_instance_masks_stops_training(nuclei_dataset):
    """Masks of mixed kinds train as instance labels: a 0/255 (or 16-bit 0/65535) export
    among them becomes one nucleus of all its nuclei."""
    for top, dtype in ((255, np.uint8), (65535, np.uint16)):
        root = nuclei_dataset(f"mixed{top}")
        labels = read_mask(root / "train/masks/train1_mask.png")
        write_image(
            root / "train/masks/train1_mask.png", np.where(labels > 0, top, 0).astype(dtype)
        )
        report = check(root)
        assert report.failed_rules("error") == ["mask_values_valid"], top
        assert_caught(report, "mask_values_valid", {"train/masks/train1_mask.png"})


def test_grey_image_among_rgb(nuclei_dataset):
    root = nuclei_dataset()
    path = root / "train/original/train1.png"
    grey = np.asarray(np.random.default_rng(5).integers(0, 255, (48, 48)), np.uint8)
    write_image(path, grey)
    report = check(root)
    assert report.failed_rules("error") == ["consistent_channels"]
    assert_caught(report, "consistent_channels", {"train/original/train1.png"})


def test_a_fluorescence_set_of_grey_and_blue_files_validates_as_it_trains(nuclei_dataset, tmp_path):
    """Training with a fluorescence profile gives the model a DAPI field saved in blue
    alone as its grey file, yet validation counted it as RGB beside the grey ones:
    consistent_channels failed and stopped `mlseg train`, on a set `--no-validate` trained.
    With the profile's stain it counts as grey; bright field judges the file as before, a
    grey picture saved RGB among grey tiles included."""
    from mlseg.inventory import load_validate_config

    root = nuclei_dataset()
    for name in ("train/original/train1.png", "test/original/test1.png"):
        grey = read_image(root / name).mean(axis=2).astype(np.uint8)
        write_image(root / name, grey)
    blue = read_image(root / "train/original/train0.png")
    blue[..., :2] = 0
    write_image(root / "train/original/train0.png", blue)
    # each its own field: a field saved again in the other split is leakage
    grey = read_image(root / "train/original/train2.png").mean(axis=2).astype(np.uint8)
    write_image(root / "train/original/train2.png", np.repeat(grey[..., None], 3, axis=2))
    red = read_image(root / "test/original/test0.png")
    red[..., 1:] = 0
    write_image(root / "test/original/test0.png", red)  # red alone: one too
    fluorescence = tmp_path / "fluorescence.yaml"
    fluorescence.write_text("profile: fluorescence\n")

    assert main(["validate", str(root), "-c", str(fluorescence), "-o", str(tmp_path / "v")]) == 0
    cfg = load_validate_config(fluorescence)
    report = run_suites(build_inventory(root, cfg))
    assert report.success and report.outcome("consistent_channels").n_checked == 5
    # the inventory still says what the files are
    files = build_inventory(root, cfg).files.set_index("path")
    assert files.loc["train/original/train0.png", ["channels", "one_channel_rgb"]].tolist() == [
        3,
        True,
    ]
    assert pd.isna(files.loc["train/original/train1.png", "one_channel_rgb"])

    # bright field: the same files, judged by their channel counts as before
    for bright_field in (load_validate_config(None), ValidateConfig()):
        report = run_suites(build_inventory(root, bright_field))
        assert report.failed_rules("error") == ["consistent_channels"]
        assert_caught(
            report, "consistent_channels", {"train/original/train1.png", "test/original/test1.png"}
        )
    # a composite of two stains is RGB for a fluorescence profile too
    two = blue.copy()
    two[..., 1] = 255 - blue[..., 2]
    write_image(root / "train/original/train0.png", two)
    report = run_suites(build_inventory(root, cfg))
    assert_caught(report, "consistent_channels", {"train/original/train0.png"})


def test_a_fluorescence_set_saved_rgb_keeps_its_colour_tiles_consistent(nuclei_dataset, tmp_path):
    """DSB 2018 saves its fluorescence tiles as RGB with three equal channels and its
    bright-field ones as colour RGB: every file has 3 channels, and so the set passed
    consistent_channels under a fluorescence profile. Counting the equal-channel files as
    grey alone failed the colour tiles there (3 of DSB's 14 as train 10 / test 4), with
    "convert it to match the others" for RGB files among RGB files. Training reads an
    equal-channel file as its own three channels too, so it counts as either; a colour tile
    among grey files still fails."""
    from mlseg.inventory import load_validate_config

    root = nuclei_dataset(n_train=4, n_test=2)
    colour = {"train/original/train0.png"}
    for path in sorted(root.glob("*/original/*.png")):
        image = read_image(path)
        if path.relative_to(root).as_posix() not in colour:
            write_image(path, np.repeat(image.mean(axis=2).astype(np.uint8)[..., None], 3, axis=2))
    fluorescence = tmp_path / "fluorescence.yaml"
    fluorescence.write_text("profile: fluorescence\n")
    cfg = load_validate_config(fluorescence)

    report = run_suites(build_inventory(root, cfg))
    assert report.success, report.failed_rules("error")
    assert report.outcome("consistent_channels").n_checked == 6
    assert main(["validate", str(root), "-c", str(fluorescence), "-o", str(tmp_path / "v")]) == 0
    # the colour tile among grey files is not one kind of image
    for path in sorted(root.glob("*/original/*.png")):
        if path.relative_to(root).as_posix() not in colour:
            write_image(path, read_image(path)[..., 0])
    report = run_suites(build_inventory(root, cfg))
    assert_caught(report, "consistent_channels", colour)


def test_stray_file_is_only_a_warning(nuclei_dataset, nuclei_pair):
    root = nuclei_dataset()
    write_image(root / "train/images/lost.png", nuclei_pair(np.random.default_rng(6))[0])
    report = check(root)
    assert report.success and report.failed_rules() == ["stray_files"]
    assert_caught(report, "stray_files", {"train/images/lost.png"})


def test_quality_warnings_name_each_file_and_let_training_start(nuclei_dataset):
    """Each warning-level rule names the file it is about; no test made one of them fail,
    so a suite that no longer warned of an over-exposed image or an empty mask passed."""
    root = nuclei_dataset()
    image = read_image(root / "train/original/train1.png")
    write_image(root / "train/original/train1.png", image.astype(np.uint16) * 257)
    write_labels(root / "train/masks/train2_mask.png", np.zeros((48, 48), np.uint16))
    tiles = np.zeros((48, 48), np.uint16)  # four squares: 92% foreground, none the background
    for label, (r, c) in enumerate([(0, 0), (0, 24), (24, 0), (24, 24)], start=1):
        tiles[r : r + 23, c : c + 23] = label
    write_labels(root / "test/masks/test0_mask.png", tiles)
    image = read_image(root / "test/original/test1.png")
    image[:20] = 255  # 42% of the pixels at full scale
    write_image(root / "test/original/test1.png", image)
    report = check(root)
    assert report.success and report.failed_rules() == [
        "consistent_bit_depth",
        "mask_not_empty",
        "mask_not_inverted",
        "not_saturated",
    ]
    assert_caught(report, "consistent_bit_depth", {"train/original/train1.png"})
    assert_caught(report, "mask_not_empty", {"train/masks/train2_mask.png"})
    assert_caught(report, "mask_not_inverted", {"test/masks/test0_mask.png"})
    assert_caught(report, "not_saturated", {"test/original/test1.png"})


# ------------------------------------------------------------------ outputs, CLI, read-only


def test_a_validate_stopped_part_way_leaves_no_verdict_beside_the_new_fingerprint(
    nuclei_dataset, tmp_path, monkeypatch
) -> None:
    """The old 'passed' stayed beside the new data's inventory and fingerprint."""
    import expectations.runner as runner

    root = nuclei_dataset()
    out = tmp_path / "out"
    assert validate_dataset(root, out).success and (out / "validation.json").is_file()
    (root / "train/masks/train0_mask.png").unlink()  # the data changes

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_suites", stopped)
    with pytest.raises(KeyboardInterrupt):
        validate_dataset(root, out)
    assert (out / "fingerprint.json").is_file()  # the new data's
    assert not (out / "validation.json").exists() and not (out / "validation.csv").exists()
    assert not (out / "validation.html").exists() and not (out / "data_docs").exists()


def test_validate_dataset_writes_outputs_and_never_touches_the_dataset(nuclei_dataset, tmp_path):
    root = nuclei_dataset()
    (root / "train/masks/train0_mask.png").unlink()
    before = tree_digest(root)
    report = validate_dataset(root, tmp_path / "out")
    assert tree_digest(root) == before
    assert not report.success and report.failed_rules("error") == ["image_has_mask"]
    out = tmp_path / "out"
    for name in (
        "inventory.parquet",
        "inventory.csv",
        "splits.csv",
        "fingerprint.json",
        "validate_config.json",
        "validation.json",
        "validation.csv",
    ):
        assert (out / name).is_file(), name
    index = (out / "data_docs" / "index.html").read_text()
    assert "dataset_errors" in index
    saved = json.loads((out / "validation.json").read_text())
    assert saved["success"] is False and saved["n_errors"] == 1
    failing = [o for o in saved["outcomes"] if o["rule"] == "image_has_mask"][0]
    assert failing["failed"] == ["train/original/train0.png"]
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["n_images"] == 3 and fp["image_stats_params"]["max_side"] == 128


def _links(page: str) -> list[str]:
    return re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.IGNORECASE)


def test_validation_html_reads_offline_on_fail_and_on_pass(nuclei_dataset, tmp_path):
    """Data Docs load Bootstrap, jQuery, Font Awesome and Vega from CDNs: offline their index
    listed no result and a failed row showed no mark. validation.html is one file that needs
    nothing fetched: the verdict in words, each failure with its first files, the passes."""
    root = nuclei_dataset()
    for i in range(3):
        (root / f"train/masks/train{i}_mask.png").unlink()
    (root / "test/masks/test1_mask.png").unlink()
    (root / "train/notes.txt").write_text("x")  # a warning too
    out = tmp_path / "out"
    report = validate_dataset(root, out)
    assert not report.success and report.page == out / "validation.html"
    page = (out / "validation.html").read_text()
    assert "FAILED" in page and "PASSED" not in page  # in words, not only in red
    failed = page.split("Failed checks")[1].split("Passed checks")[0]
    assert "image_has_mask" in failed and "dataset_errors" in failed and "4 of " in failed
    assert "train/original/train0.png" in failed and "test/original/test1.png" in failed
    assert "stray_files" in failed and "WARN" in failed and "train/notes.txt" in failed
    assert "What to do: An image has no mask in the split" in failed  # the fix, each rule's
    assert "What to do: A file lies outside" in failed
    assert "not_blank" in page.split("Passed checks")[1]  # a passing check, in the table
    assert str(root) in page
    assert _links(page) == ["data_docs/index.html"]  # relative, and nothing else fetched
    assert "needs an internet connection" in page
    assert not re.search(r"https?://|<script|@import|url\(", page, flags=re.IGNORECASE)

    report = validate_dataset(nuclei_dataset("good"), tmp_path / "out-good")
    page = (tmp_path / "out-good" / "validation.html").read_text()
    assert report.success and "PASSED" in page and "FAILED" not in page
    assert "Failed checks" not in page and "image_has_mask" in page
    assert _links(page) == ["data_docs/index.html"] and "http" not in page


def test_cli_exit_codes_table_and_default_output_folder(
    nuclei_dataset, tmp_path, capsys, monkeypatch
):
    root = nuclei_dataset()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    assert main(["validate", str(root)]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "not_blank" in out
    assert "pixel sizes, train: 3 unknown (profile he sets none)" in out
    assert (tmp_path / "validation" / "ds" / "data_docs" / "index.html").is_file()
    assert str(Path("validation", "ds", "validation.html")) in out

    (root / "test/masks/test0_mask.png").rename(root / "test/masks/test0-mask.png")
    before = tree_digest(root)
    assert main(["validate", str(root), "--out", str(tmp_path / "o2")]) == 1
    captured = capsys.readouterr()
    assert "mask_naming" in captured.out and "test/masks/test0-mask.png" in captured.out
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
    assert "mask_naming" in captured.err and "image_has_mask" in captured.err
    # the page that reads offline first; Data Docs only as the full, online view
    page, docs = str(tmp_path / "o2" / "validation.html"), str(tmp_path / "o2" / "data_docs")
    assert page in captured.err and captured.err.index(page) < captured.err.index(docs)
    assert tree_digest(root) == before


def test_cli_names_why_each_unreadable_file_is_unreadable(nuclei_dataset, tmp_path, capsys):
    """A z-stack or a float TIFF is not "truncated or corrupt": its own fix is printed."""
    import tifffile

    root = nuclei_dataset()
    (root / "train/original/train1.png").unlink()
    stack = np.zeros((3, 48, 48), np.uint16)
    tifffile.imwrite(
        root / "train/original/train1.tif", stack, imagej=True, metadata={"axes": "ZYX"}
    )
    (root / "train/original/train2.png").unlink()
    tifffile.imwrite(root / "train/original/train2.tif", np.zeros((48, 48), np.float32))
    assert main(["validate", str(root), "--out", str(tmp_path / "o")]) == 1
    lines = capsys.readouterr().out.splitlines()
    stack_line = next(line for line in lines if "train1.tif" in line and "Z Project" in line)
    assert stack_line.startswith("unreadable: ")
    assert any("train2.tif" in line and "8/16-bit" in line for line in lines)


def test_cli_refuses_output_inside_the_dataset(nuclei_dataset, capsys):
    root = nuclei_dataset()
    before = tree_digest(root)
    assert main(["validate", str(root), "--out", str(root / "report")]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert tree_digest(root) == before


def test_cli_mask_kind_option(nuclei_dataset, capsys):
    root = nuclei_dataset()  # instance masks with labels 1..3
    assert (
        main(
            ["validate", str(root), "--out", str(root.parent / "o"), "-q", "--mask-kind", "binary"]
        )
        == 1
    )
    assert "mask_values_valid" in capsys.readouterr().err


def test_cli_min_images_and_config_reach_the_gate_and_quiet_prints_only_the_verdict(
    nuclei_dataset, tmp_path, capsys
):
    """--min-images and the run config's data section change what passes; with --quiet a
    failed run prints its one error line and no table."""
    root = nuclei_dataset()  # 3 train, 2 test
    argv = ["validate", str(root), "-q"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--min-images", "3"]) == 1
    captured = capsys.readouterr()
    assert "min_images_per_split" in captured.err and captured.out == ""
    config = tmp_path / "run.yaml"
    config.write_text("data: {mask_kind: binary}\n")
    assert main([*argv, "--out", str(tmp_path / "b"), "--config", str(config)]) == 1
    assert "mask_values_valid" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0


# ------------------------------------------------------------------ real data


def contract_from_shared(shared: Path, name: str, dst: Path, n: int | None = None) -> Path:
    """Symlink (part of) a shared set into the contract layout: 1 in 5 images to test."""
    images = sorted((shared / name / "original").glob("*.png"))[:n]
    for i, image in enumerate(images):
        split = "test" if i % 5 == 4 else "train"
        mask = shared / name / "masks" / f"{image.stem}_mask.png"
        for src, folder, target in ((image, "original", image.name), (mask, "masks", mask.name)):
            (dst / split / folder).mkdir(parents=True, exist_ok=True)
            (dst / split / folder / target).symlink_to(src)
    return dst


SHARED_SETS = ("gbm40_he", "cpm15_he", "dsb2018_stage1_test")


@pytest.mark.parametrize("name", SHARED_SETS)
def test_shared_data_subset_passes(shared_data, tmp_path, name):
    root = contract_from_shared(shared_data, name, tmp_path / name, n=5)
    before = tree_digest(shared_data / name)
    report = check(root)
    assert report.success, report.to_frame().query("not success").to_string()
    assert tree_digest(shared_data / name) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARED_SETS)
def test_every_shared_set_passes_after_ingest(shared_data, tmp_path, name):
    from mlseg.ingest import ingest

    root = ingest(shared_data / name, tmp_path / name, link=True, progress=False).root
    report = validate_dataset(root, tmp_path / "out")
    assert report.success, report.to_frame().query("not success").to_string()
    assert report.failed_rules() == []


def _page_report(tmp_path: Path) -> ValidationReport:
    """A verdict with a failed error, a warning and a passed check, as validate_dataset makes."""

    def outcome(rule: str, severity: str, failed: tuple[str, ...]) -> Outcome:
        return Outcome(
            rule, severity, not failed, len(failed), 6, failed, "files", "1", "expect_x", None,
            "fix it",
        )  # fmt: skip

    outcomes = (
        outcome("image_has_mask", "error", ("train/original/train0.png",)),
        outcome("stray_files", "warning", ("train/notes.txt",)),
        outcome("not_blank", "error", ()),
    )
    docs = tmp_path / "data_docs" / "index.html"
    return ValidationReport(str(tmp_path / "ds"), outcomes, {"files": "1"}, data_docs=docs)


def test_every_table_of_validation_html_has_a_caption(tmp_path):
    """The passed-checks and dataset tables had no caption: a screen reader listing the
    page's tables announced 'table, 4 columns' and 'table, 2 columns' with no name."""
    page = read_page(
        validation_page(_page_report(tmp_path), tmp_path / "validation.html").to_html()
    )
    assert len(page.captions) == 2
    assert all(caption.strip() for caption in page.captions), page.captions


def test_data_docs_show_hostile_file_and_folder_names_as_text(nuclei_dataset, tmp_path):
    """A shared dataset's file named '"><svg onload=alert(1)>.png' (without a mask) and its
    folder named '<svg onload=alert(2)>' went into the Data Docs pages as HTML, a script run
    when the page was opened; validation.json keeps the file's own name."""
    root = nuclei_dataset(name="<svg onload=alert(2)>")
    hostile = 'train/original/"><svg onload=alert(1)>.png'
    (root / "train/original/train0.png").rename(root / hostile)
    (root / "train/masks/train0_mask.png").unlink()
    report = validate_dataset(root, tmp_path / "out")
    failing = [o for o in report.outcomes if o.rule == "image_has_mask"][0]
    assert failing.failed == (hostile,)
    pages = list((tmp_path / "out" / "data_docs").rglob("*.html"))
    assert len(pages) > 3
    assert not [p for p in pages if "<svg" in p.read_text() or "<svg" in str(p)]
    saved = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert [o["failed"] for o in saved["outcomes"] if o["rule"] == "image_has_mask"] == [[hostile]]
