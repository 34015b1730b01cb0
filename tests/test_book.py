"""End to end: the smoke preset computes its results, and the book builds from them with warnings as errors."""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cfsam.data import sources
from cfsam.pipeline import cache

REPO = Path(__file__).resolve().parents[1]
# on the fixtures (no mirror) a build of its own: results computed on other data are never mixed
OUT = REPO / "_build" / ("smoke-test-fixtures" if sources.is_fixture_data() else "smoke-test")
pytestmark = pytest.mark.slow


def smoke_env() -> dict:
    env = {**os.environ, "CFSAM_RESULTS": str(OUT / "results"), "CFSAM_PRESET": "smoke"}
    env.pop("MPLBACKEND", None)  # figures vanish from the book under a backend override
    return env


def smoke_book() -> Path:
    """Computes the smoke preset's results and builds its book, once per test session (tests/test_browser.py
    reads the same build; a failure is reported once, then each test that needs the book fails at once);
    returns the folder of the built HTML."""
    built = _build_smoke_book()
    if isinstance(built, str):
        pytest.fail(built, pytrace=False)
    return built


@functools.cache
def _build_smoke_book() -> Path | str:
    env = smoke_env()
    run = subprocess.run([sys.executable, "-m", "cfsam", "run-missing", "--preset", "smoke"], env=env,
                         capture_output=True, text=True)
    if run.returncode:
        return "run-missing --preset smoke failed:\n" + run.stderr[-3000:]
    book = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO), "--path-output",
                           str(OUT), "--warningiserror", "--keep-going"], env=env, capture_output=True, text=True)
    if book.returncode:
        return "the smoke book did not build:\n" + (book.stdout + book.stderr)[-5000:]
    return OUT / "_build" / "html"


def test_smoke_pipeline_and_book():
    html_dir = smoke_book()
    env = smoke_env()
    os.environ["CFSAM_RESULTS"] = env["CFSAM_RESULTS"]
    try:
        status = cache.load_results("smoke")
    finally:
        del os.environ["CFSAM_RESULTS"]
    assert {e["status"] for e in status.values()} == {"ok"}
    for entry in status.values():  # every entry carries its provenance
        assert entry["provenance"]["data"] and entry["provenance"]["end"] >= entry["provenance"]["start"]
    # the papermill path of `cfsam batch` on the same cache: nothing left to compute, one notebook executed
    batch = subprocess.run([sys.executable, "-m", "cfsam", "batch", "--preset", "smoke", "--notebooks", "tab2a",
                            "--out", str(OUT / "batch")], env=env, capture_output=True, text=True)
    assert batch.returncode == 0, batch.stderr[-3000:]
    executed = (OUT / "batch" / "tab2a.ipynb").read_text()
    assert '"smoke"' in executed and "Open-Platypus" in executed
    html = (html_dir / "notebooks" / "tab2a.html").read_text()
    assert "Open-Platypus" in html and "Smoke preset" in html
    fig1 = (html_dir / "notebooks" / "fig1.html").read_text()
    assert "<img" in fig1  # the landscape figures rendered
    assert (html_dir / "_static" / "mathjax" / "tex-chtml.js").exists()  # MathJax served by the book, no CDN
    assert 'src="../_static/mathjax/tex-chtml.js' in fig1 and "cdn.jsdelivr" not in fig1


def test_chapters_hide_setup_end_with_our_numbers_and_offer_csv():
    html_dir = smoke_book()
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        if not any("open_chapter(" in "".join(c["source"]) for c in cells):
            continue  # not a results chapter
        page = (html_dir / "notebooks" / f"{nb.stem}.html").read_text()
        assert "open_chapter" not in page, f"{nb.stem}: the setup cell is shown"
        last = cells[-1]  # the chapter ends with sentences computed from our results, not with fixed text
        assert last["cell_type"] == "code" and "remove-input" in last["metadata"].get("tags", []), nb.stem
        if "book.say(" in "".join(last["source"]):
            assert "book.say" not in page, f"{nb.stem}: the closing cell's code is shown"
            closing = re.search(r"What our run shows\.</strong>(.+?)</p>", page, re.S)
            assert closing and len(closing.group(1).strip()) > 20, f"{nb.stem}: no closing sentence from our numbers"
        links = re.findall(r'download="([^"]+\.csv)" href="data:text/csv;base64,([^"]+)"', page)
        assert len(links) >= page.count('<table id="T_'), f"{nb.stem}: a table without its CSV link"
        for name, data in links:
            assert base64.b64decode(data).decode().strip(), f"{nb.stem}: {name} is empty"
