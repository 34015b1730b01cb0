"""The built smoke book as a reader meets it, in headless Chromium: formulas typeset by the MathJax the book
serves itself (offline), no table wider than its box unless it scrolls inside it, a figure or table in every
results chapter. Skipped, saying so, where Chromium is not installed (`apt-get install chromium`)."""
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from test_book import REPO, smoke_book  # the same build, made once per session

pytestmark = pytest.mark.slow
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

# Runs in the page once MathJax has typeset it; writes what it measured into <pre id="cfsam-check">.
PROBE = """<script>
window.addEventListener("load", function () {
  function check() {
    var article = document.querySelector("article") || document.body, a = article.getBoundingClientRect();
    var tables = Array.from(article.querySelectorAll("table")).map(function (t) {
      var box = t;  // the box that shows the table: the nearest one that scrolls sideways, else the table itself
      while (box !== article && !/auto|scroll/.test(getComputedStyle(box).overflowX)) box = box.parentElement;
      var r = (box === article ? t : box).getBoundingClientRect();
      return {id: t.id, fits: r.left >= a.left - 1 && r.right <= a.right + 1, right: r.right, limit: a.right};
    });
    var clone = article.cloneNode(true);
    clone.querySelectorAll("script, style, mjx-assistive-mml, .toggle-hidden, .cell_input").forEach(function (e) { e.remove(); });
    var out = {mathjax: document.querySelectorAll("mjx-container").length, tables: tables, text: clone.textContent,
               images: article.querySelectorAll("img").length};
    var pre = document.createElement("pre");
    pre.id = "cfsam-check";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  var mj = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
  (mj || Promise.resolve()).then(check, check);
});
</script>"""


class _Pre(HTMLParser):
    """The text of <pre id="cfsam-check"> in a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.inside, self.text = False, ""

    def handle_starttag(self, tag, attrs):
        self.inside = self.inside or (tag == "pre" and ("id", "cfsam-check") in attrs)

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "pre"

    def handle_data(self, data):
        self.text += data if self.inside else ""


def render(page: Path, width: int = 1000) -> dict:
    """Opens ``page`` (a copy with the probe, beside it so its relative links hold) and returns the probe's report."""
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                  f"--user-data-dir={profile}", "--allow-file-access-from-files",
                                  f"--window-size={width},900", "--virtual-time-budget=20000", "--dump-dom",
                                  probe.as_uri()], capture_output=True, text=True, timeout=180)
    finally:
        probe.unlink()
    parser = _Pre()
    parser.feed(dom.stdout)
    assert parser.text, f"{page.name}: the probe did not run\n{dom.stderr[-2000:]}"
    return json.loads(parser.text)


def chapter_pages(html_dir: Path) -> dict[str, bool]:
    """Every page of the book (by path) and whether it is a results chapter (a notebook that opens its results)."""
    pages = {}
    for page in sorted(html_dir.rglob("*.html")):
        rel = page.relative_to(html_dir)
        if rel.parts[0].startswith("_") or rel.parts[0] in ("reports", "genindex.html", "search.html"):
            continue
        nb = REPO / rel.with_suffix(".ipynb")
        pages[str(rel)] = nb.exists() and "open_chapter(" in nb.read_text()
    return pages


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); "
                                             "the book's browser check did not run")
def test_book_in_a_browser():
    html_dir = smoke_book()
    pages = chapter_pages(html_dir)
    assert sum(pages.values()) >= 10, pages
    for rel, is_chapter in pages.items():
        html = (html_dir / rel).read_text()
        has_math = 'class="math' in html
        if not (has_math or is_chapter):
            continue
        seen = render(html_dir / rel)
        if has_math:
            sources = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', html)
            assert sources and not any("//" in s for s in sources), f"{rel}: MathJax not served by the book: {sources}"
            assert seen["mathjax"] > 0, f"{rel}: no formula typeset"
            assert "\\(" not in seen["text"] and "\\[" not in seen["text"], f"{rel}: raw TeX shown"
        wide = [t for t in seen["tables"] if not t["fits"]]
        assert not wide, f"{rel}: tables overflow their box: {wide}"
        if is_chapter:
            assert seen["tables"] or seen["images"], f"{rel}: no figure or table"
