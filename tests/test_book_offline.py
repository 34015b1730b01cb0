"""The committed results read anywhere: a book built without the data mirror and with the Hub offline shows them."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfsam.core.io import read_json

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PRESET = "cpu-pilot"  # a preset whose results are committed


def _build_tab2a(tmp_path, **env_extra) -> str:
    """Build the Table 2(a) chapter alone, without the data mirror and with the Hub offline; its HTML."""
    toc = tmp_path / "_toc.yml"
    toc.write_text("format: jb-book\nroot: book/methods\nchapters:\n  - file: notebooks/tab2a\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CFSAM_DATA_DIR", "MPLBACKEND", "CFSAM_RESULTS")}
    env.update(CFSAM_PRESET=PRESET, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CFSAM_CACHE=str(tmp_path / "cache"),
               **env_extra)
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO), "--toc", str(toc),
                            "--path-output", str(tmp_path / "book"), "--keep-going"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    # one chapter alone: the root page's links to the other pages dangle; nothing else may warn (an error in a cell does)
    warnings = [line for line in (build.stdout + build.stderr).splitlines()
                if "WARNING:" in line and "unknown document" not in line]
    assert not warnings, warnings
    return (tmp_path / "book" / "_build" / "html" / "notebooks" / "tab2a.html").read_text()


def test_book_without_the_mirror_shows_the_committed_numbers(tmp_path):
    entry = read_json(REPO / "results" / PRESET / "s2-open-platypus-sam.json.gz")
    avg = 100 * entry["eval"]["categories"]["AVG"]["score"]  # read straight from the committed file
    page = _build_tab2a(tmp_path)
    assert f"{avg:.2f}" in page  # the committed AVG of SAM on Open-Platypus, on the page
    assert "not available here" not in page  # every entry current without the data: none to recompute


def test_a_damaged_entry_shows_on_its_chapter_and_the_chapter_builds(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / PRESET, results / PRESET)
    path = results / PRESET / "s2-open-platypus-sam.json.gz"
    path.write_bytes(path.read_bytes()[:200])  # a truncated download
    page = _build_tab2a(tmp_path, CFSAM_RESULTS=str(results))
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)).replace(" )", ")")  # the page's words
    assert "(1 damaged)" in text and f"cfsam run-missing --preset {PRESET} --only s2-open-platypus-sam" in text
    stage1 = read_json(results / PRESET / "stage1.json.gz")
    assert f"{100 * stage1['eval']['categories']['AVG']['score']:.2f}" in page  # the other rows still shown
