"""What a screen reader or keyboard user meets on a page mlseg writes, read with the standard
library's HTML parser: its landmarks, each table's caption and the box it scrolls in, each
image's alt text and figure caption."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Page:
    captions: list[str] = field(default_factory=list)  # one per <table>, "" where it has none
    alts: list[str | None] = field(default_factory=list)  # one per <img>, None: no alt
    figcaptions: list[str] = field(default_factory=list)
    landmarks: list[str] = field(default_factory=list)  # main, nav, ... in document order
    tags_outside_main: list[str] = field(default_factory=list)  # in <body>, not in <main>
    scroll_boxes: list[dict[str, str | None]] = field(default_factory=list)  # div.wide attributes


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._in: str | None = None  # "caption" or "figcaption" while inside one
        self._body = self._main = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("main", "nav", "header", "footer", "aside"):
            self.page.landmarks.append(tag)
        elif self._body and not self._main:
            self.page.tags_outside_main.append(tag)
        self._body = self._body or tag == "body"
        self._main = self._main or tag == "main"
        if tag == "table":
            self.page.captions.append("")
        elif tag == "img":
            self.page.alts.append(dict(attrs).get("alt"))
        elif tag == "figcaption":
            self.page.figcaptions.append("")
        elif tag == "div" and "wide" in (dict(attrs).get("class") or "").split():
            self.page.scroll_boxes.append(dict(attrs))
        if tag in ("caption", "figcaption"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._main = self._main and tag != "main"
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "caption":
            self.page.captions[-1] += data
        elif self._in == "figcaption":
            self.page.figcaptions[-1] += data


def read_page(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.page
