"""The HTML run report: self-contained, every section present, figures embedded."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
from html_a11y import read_page

from mlseg.report import Report, frame_records, pipeline_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_inputs(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    history = pd.DataFrame(
        {"step": [50, 100, 150], "train_loss": [1.2, 0.8, 0.6], "val_dice": [0.5, 0.7, 0.8]}
    )
    evaluation = pd.DataFrame(
        {"image": [f"img{i}" for i in range(8)], "dice": np.linspace(0.2, 0.9, 8)[::-1]}
    )
    nuclei = pd.DataFrame(
        {"area_um2": rng.lognormal(3.5, 0.3, 300), "circularity": rng.uniform(0.6, 1, 300)}
    )
    return dict(
        run={"dataset": "demo/dataset", "started": "today"},
        validation_status="passed",
        validation={"images": 32, "failed expectations": 0},
        history=history,
        evaluation=evaluation,
        evaluation_means={"dice": 0.55, "aji": 0.41},
        worst_metric="dice",
        decision={"promoted": True, "reason": "first production model <v1>"},
        quantification=pd.DataFrame({"image": ["a", "b"], "count": [10, 12]}),
        nuclei=nuclei,
        drift_status="ok",
        drift_message="no drift",
        run_metrics={"images_per_s": 3.2},
        paths={"model": str(tmp_path / "model"), "measurements": str(tmp_path / "m.csv")},
    )


def test_report_is_self_contained_with_embedded_figures(tmp_path: Path) -> None:
    path = pipeline_report(**_run_inputs(tmp_path)).write(tmp_path / "report.html")
    text = path.read_text()
    # nothing fetched from elsewhere: no external scripts, styles or images
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2  # training curves, quantification histograms
    assert all(base64.b64decode(data).startswith(PNG_SIGNATURE) for data in images)
    for section in (
        "Data validation",
        "Training",
        "Evaluation",
        "Model registry",
        "Segmentation and quantification",
        "Monitoring",
        "Outputs",
    ):
        assert section in text
    assert "Worst 4 cases by dice" in text
    assert str(tmp_path / "m.csv") in text


def test_worst_cases_are_the_lowest_scores(tmp_path: Path) -> None:
    html = pipeline_report(**_run_inputs(tmp_path)).to_html()
    worst = html.split("Worst 4 cases by dice")[1]
    assert "img7" in worst and "img4" in worst and "img3" not in worst.split("</table>")[0]


def test_text_is_escaped_and_long_tables_are_cut() -> None:
    rep = Report("t").text("<script>alert(1)</script>")
    rep.table(pd.DataFrame({"x": range(100)}), caption="many", max_rows=10)
    html = rep.to_html()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "first 10 of 100 rows" in html


def test_image_file_embeds_existing_png_and_skips_missing(tmp_path: Path) -> None:
    from mlseg.io import write_image

    png = write_image(tmp_path / "plot.png", np.zeros((4, 4, 3), np.uint8))
    html = Report("t").image_file(png, "plot").image_file(tmp_path / "none.png").to_html()
    assert html.count("data:image/png;base64,") == 1


def test_frame_records_are_json_ready() -> None:
    records = frame_records(pd.DataFrame({"a": [1.23456789, np.nan], "b": [np.int64(2), 3]}))
    assert records == [{"a": 1.2346, "b": 2}, {"a": None, "b": 3}]


def test_frame_records_keep_small_values():
    """The training history's last learning rate (3e-05, cosine decay to 1% of 3e-3) read
    0.0 in the dashboard, and the drift table's reference dark_fraction 2.3e-05 read 0.0,
    beside the CSVs they came from."""
    records = frame_records(pd.DataFrame({"lr": [3e-05], "dark": [2.288818e-05], "z": [0.0]}))
    assert records == [{"lr": 3e-05, "dark": 2.289e-05, "z": 0.0}]


def _header(html: str, caption: str) -> list[str]:
    table = html.split(caption, 1)[1].split("</thead>", 1)[0]
    return [re.sub(r"<[^>]+>", "", th) for th in re.findall(r"<th[^>]*>(.*?)</th>", table)]


def test_wide_run_tables_show_their_main_columns(tmp_path: Path) -> None:
    """The per-image summary's 73 columns made a table 12,538 px wide on a 1,366 px
    laptop, and a printout kept only image, image_file, profile, profile_version and model:
    no count, no density. The report shows the main columns; the CSV keeps them all."""
    provenance = ["image_file", "profile", "profile_version", "model", "settings", "input_digest"]
    stats = [f"{m}_{s}" for m in ("area_um2", "perimeter_um", "circularity", "solidity",
             "eccentricity", "hematoxylin_od_mean", "eosin_od_mean") for s in ("mean", "median", "std")]  # fmt: skip
    quantification = pd.DataFrame(
        [{"image": "a", **dict.fromkeys(provenance, "x"), "count": 812,
          "density_per_mm2": 3038.2, "tissue_fraction": 0.93, **dict.fromkeys(stats, 1.5)}]
    )  # fmt: skip
    evaluation = pd.DataFrame(
        [{"stem": "a", **{m: 0.5 for m in ("dice", "iou", "aji", "pq", "sq", "rq", "f1")},
          **{m: 3 for m in ("tp", "fp", "fn", "fn_missed", "fn_merged", "fp_split")}}]
    )  # fmt: skip
    html = pipeline_report(
        quantification=quantification, evaluation=evaluation, worst_metric="aji"
    ).to_html()

    shown = _header(html, "per image")
    assert shown[:3] == ["image", "count", "density_per_mm2"]
    assert "area_um2_mean" in shown and "hematoxylin_od_mean_mean" in shown
    assert "image_file" not in shown and "area_um2_std" not in shown
    assert f"{len(quantification.columns) - len(shown)} more in the CSV" in html
    per_test_image = _header(html, "per test image")
    assert "aji" in per_test_image and "fp_split" not in per_test_image
    worst = _header(html, "Worst 1 cases by aji")
    assert worst.count("aji") == 1 and "dice" in worst
    # anything wider than the page scrolls in its own box
    assert html.count('<div class="wide" tabindex="0" role="region"') == html.count("<table>")
    # ... on screen; on paper it may not scroll, so the box lets it show and tables shrink
    printed = html.split("@media print{", 1)[1]
    assert "div.wide{overflow:visible}" in printed and "table{font-size:" in printed


def test_large_numbers_are_not_in_scientific_notation() -> None:
    """A tumour's 15,873.9 nuclei per mm2 read 1.587e+04 in the report, a 2,000-image
    run's 12,345.6 seconds 1.235e+04; small and fractional values keep 4 significant digits."""
    html = Report("t").table(
        {"density_per_mm2": 15873.9, "seconds": 12345.6, "ratio": np.inf, "aji": 0.04219,
         "lr": 3e-05, "area_um2_mean": 279.32, "density": 3038.2, "count": 12000}
    ).to_html()  # fmt: skip
    cells = re.findall(r"<td>([^<]*)</td>", html)
    assert cells == ["15,874", "12,346", "inf", "0.04219", "3e-05", "279.3", "3,038", "12,000"]


def _luminance(hex_colour: str) -> float:
    """WCAG 2.1 relative luminance of ``#rrggbb`` or ``#rgb``."""
    if len(hex_colour) == 4:
        hex_colour = "#" + "".join(c * 2 for c in hex_colour[1:])
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _rule(css: str, selector: str, prop: str) -> str | None:
    """The value of ``prop`` in the rule of exactly ``selector`` (the last one wins)."""
    found = None
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        if selector in [s.strip() for s in selectors.split(",")]:
            match = re.search(rf"(?:^|;){prop}:([^;]+)", body)
            found = match.group(1).strip() if match else found
    return found


def test_status_badges_have_readable_contrast() -> None:
    """The WARN badge was white on orange, 3.1:1 (axe-core color-contrast, WCAG 1.4.3 asks
    4.5:1 for its 13.6 px text): a warned rule's mark in validation.html was hard to read
    for a lab member with low vision. Every badge now reads at 4.5:1 or more."""
    css = Report("t").to_html().split("<style>", 1)[1].split("</style>", 1)[0]
    for status in ("ok", "warn", "fail", "info"):
        background = _rule(css, f".{status}", "background")
        text = _rule(css, f".{status}", "color") or _rule(css, ".badge", "color")
        lighter, darker = sorted((_luminance(background), _luminance(text)), reverse=True)
        assert (lighter + 0.05) / (darker + 0.05) >= 4.5, (status, background, text)


def test_every_table_of_the_run_report_has_a_caption(tmp_path: Path) -> None:
    """The run, worst-cases and registry-decision tables had no caption: a screen reader
    listing the page's tables announced three as 'table, 2 columns' with nothing to tell
    them apart. Every table is now named by its caption."""
    page = read_page(pipeline_report(**_run_inputs(tmp_path)).to_html())
    assert len(page.captions) == 8
    assert all(caption.strip() for caption in page.captions), page.captions


def test_a_table_scrolled_in_its_box_is_reached_by_keyboard(tmp_path: Path) -> None:
    """A table wider than the page (at 200% zoom, the run table's long paths) scrolls in its
    box, but the box could not take the keyboard focus: axe-core scrollable-region-focusable,
    WCAG 2.1.1; someone without a mouse could not scroll to its right-hand columns. Each box
    now takes the focus and is named by its table's caption."""
    page = read_page(pipeline_report(**_run_inputs(tmp_path)).to_html())
    assert len(page.scroll_boxes) == len(page.captions) == 8
    for box, caption in zip(page.scroll_boxes, page.captions, strict=True):
        assert box.get("tabindex") == "0" and box.get("role") == "region"
        assert box.get("aria-label") == caption


def test_long_paths_wrap_instead_of_widening_the_page() -> None:
    """A path with no space or hyphen in it (/home/jsmith/projects/glioblastoma_cohort_2026/
    runs/he_unet_resnet34_run03/segment/measurements/nuclei_measurements.parquet) ran past
    the right edge in Outputs: at 200% zoom (640 CSS px) the whole page scrolled sideways,
    927 px wide, and every line had to be read by scrolling back and forth (WCAG 1.4.10).
    Text now breaks inside a word that does not fit; a table still scrolls in its box."""
    css = Report("t").to_html().split("<style>", 1)[1].split("</style>", 1)[0]
    assert _rule(css, "body", "overflow-wrap") in ("break-word", "anywhere")


def test_figures_say_in_words_what_they_show(tmp_path: Path) -> None:
    """Each figure's alt text was its caption ('training curves', '300 nuclei', 'worst cases:
    image | truth | prediction'): a screen reader read the caption twice and nothing of what
    was drawn. The alt text now gives the curves' values, the measurements' medians and
    what each worst-case panel holds."""
    from mlseg.io import write_image

    worst = write_image(tmp_path / "worst.png", np.zeros((4, 12, 3), np.uint8))
    page = read_page(pipeline_report(**_run_inputs(tmp_path), worst_png=worst).to_html())
    curves, worst_cases, histograms = page.alts
    assert "train_loss 1.2 at step 50, 0.6 at step 150" in curves
    assert "val_dice 0.5 at step 50, 0.8 at step 150, best 0.8 at step 150" in curves
    assert "true nuclei and the predicted nuclei" in worst_cases
    assert "300 nuclei" in histograms
    assert "area_um2 median 3" in histograms and "circularity median 0.8" in histograms
    assert not set(page.alts) & set(page.figcaptions)


def test_an_ihc_run_report_shows_the_dab_it_grades_by() -> None:
    """An IHC run's report showed the first stain's density alone, haematoxylin, in its
    per-image table and histograms: an image of 3+ nuclei (DAB 1.6) read 0.91 there beside
    an H-score of 300, and no DAB anywhere on the page. DAB is now shown beside it; an H&E
    run's report is as before."""
    ods = ("hematoxylin_od_mean", "residual_od_mean", "dab_od_mean")
    nuclei = pd.DataFrame({"area_px": [500.0, 520.0], **dict.fromkeys(ods, [0.9, 1.6])})
    per_image = pd.DataFrame(
        [{"image": "a", "count": 2, "positive_pct": 100.0, "h_score": 300.0,
          **{f"{c}_{s}": 1.0 for c in ods for s in ("mean", "median", "std")}}]
    )  # fmt: skip
    html = pipeline_report(quantification=per_image, nuclei=nuclei).to_html()
    shown = _header(html, "per image")
    assert "dab_od_mean_mean" in shown and "hematoxylin_od_mean_mean" in shown
    assert "residual_od_mean_mean" not in shown
    page = read_page(html)
    assert any("dab_od_mean median 1.25" in alt for alt in page.alts)
    he = nuclei.rename(columns={"residual_od_mean": "eosin_od_mean", "dab_od_mean": "res"})
    alts = read_page(pipeline_report(nuclei=he).to_html()).alts
    assert any("hematoxylin_od_mean" in a for a in alts)
    assert not any("eosin_od_mean" in a or "res " in a for a in alts)


def test_figure_alt_texts_give_numbers_as_a_screen_reader_reads_them() -> None:
    """The histograms' alt text gave a 95th percentile of 1,340 px (a nucleus's area at 40x)
    as '1.34e+03', which a screen reader reads letter by letter."""
    from mlseg.report import curves_alt, histograms_alt

    nuclei = pd.DataFrame({"area_px": np.linspace(600.0, 1410.0, 100)})
    history = pd.DataFrame({"step": [250, 12000], "train_loss": [2400.0, 0.15]})
    said = histograms_alt(nuclei) + curves_alt(history)
    assert "e+" not in said
    assert (
        "median 1,000 (5th to 95th percentile 640 to 1,370)" in said
        and "train_loss 2,400 at step 250" in said
    )


def test_the_report_is_one_main_landmark(tmp_path: Path) -> None:
    """The page had no landmark (axe-core landmark-one-main, region): a screen reader's
    landmark list was empty and 'go to main content' went nowhere. Everything from the
    title down is now in one <main>."""
    page = read_page(pipeline_report(**_run_inputs(tmp_path)).to_html())
    assert page.landmarks == ["main"] and page.tags_outside_main == []


def test_the_worst_cases_table_lists_the_images_worst_png_draws(tmp_path: Path) -> None:
    """The report's "Worst 5 cases by aji" table sat above evaluate's worst.png, which draws
    four: a pathologist looked for the fifth image's panels under its name and found none.
    The table now lists the images the figure draws, lowest AJI first."""
    from mlseg.evaluate import _kept_worst
    from mlseg.io import write_image

    aji = [0.61, 0.12, 0.48, 0.05, 0.33, 0.27, 0.9, 0.4]
    evaluation = pd.DataFrame({"stem": [f"img{i}" for i in range(8)], "aji": aji})
    drawn: list = []
    for stem, score in zip(evaluation["stem"], aji, strict=True):  # as evaluate keeps them
        drawn = _kept_worst(drawn, score, lambda stem=stem: stem)
    worst = write_image(tmp_path / "worst.png", np.zeros((4, 12, 3), np.uint8))
    html = pipeline_report(evaluation=evaluation, worst_metric="aji", worst_png=worst).to_html()
    table = html.split("the test images of lowest aji", 1)[1].split("</table>", 1)[0]
    listed = re.findall(r'<td class="t">(img\d)</td>', table)
    assert listed == [stem for _, stem in drawn] == ["img3", "img1", "img5", "img4"]
    assert f"Worst {len(drawn)} cases by aji" in html
