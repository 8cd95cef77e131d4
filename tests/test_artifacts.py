"""The markdown the flows publish: names and messages render as they are written."""

from __future__ import annotations

import html
import re

import pytest
from markdown_it import MarkdownIt

import flows.artifacts as artifacts

NAMES = ["slide*1*.png", "a_b_.png", "x[y](http://e.x).png", "p|q.png", "t`ick.png", "<stem>.png"]


def _rendered(text: str) -> tuple[str, str]:
    """The HTML of ``text`` (CommonMark, as the dashboard reads it) and its text alone."""
    page = MarkdownIt("commonmark").render(text)
    return page, html.unescape(re.sub(r"<[^>]+>", "", page))


@pytest.fixture
def published(monkeypatch):
    texts: list[str] = []
    monkeypatch.setattr(artifacts, "_in_run", lambda: True)
    monkeypatch.setattr(
        artifacts, "_publish", lambda create, key, text, **kwargs: texts.append(text)
    )
    return texts


def test_a_failed_image_list_shows_every_name_as_written(published):
    """``slide*1*.png`` rendered as an italic "slide1.png" and ``x[y](url)`` as a link."""
    artifacts.warning("failed", "2 image(s) failed", "\n".join(f"- {n}: bad" for n in NAMES))
    page, text = _rendered(published[0])
    for name in NAMES:
        assert f"{name}: bad" in text
    assert "<em>" not in page and "<a " not in page and page.count("<li>") == len(NAMES)


def test_output_paths_with_a_backtick_or_line_break_stay_one_code_span(published):
    """A backtick in a path ended its code span; a line break ended its list item."""
    paths = {"table": "out/t`ick.csv", "page": "out/line\nbreak.html", "plain": "out/a_b*.csv"}
    artifacts.outputs("outputs", paths)
    page, _ = _rendered(published[0])
    assert page.count("<li>") == 3 and page.count("<code>") == 3
    codes = [html.unescape(c) for c in re.findall(r"<code>(.*?)</code>", page)]
    assert codes == ["out/t`ick.csv", "out/line break.html", "out/a_b*.csv"]
