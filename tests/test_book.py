"""End to end: the smoke preset computes its results, and the book builds from them with warnings as errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfsam.pipeline import cache

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.mirror]


def test_smoke_pipeline_and_book():
    out = REPO / "_build" / "smoke-test"
    env = {**os.environ, "CFSAM_RESULTS": str(out / "results"), "CFSAM_PRESET": "smoke"}
    env.pop("MPLBACKEND", None)  # figures vanish from the book under a backend override
    run = subprocess.run([sys.executable, "-m", "cfsam", "run-missing", "--preset", "smoke"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
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
                            "--out", str(out / "batch")], env=env, capture_output=True, text=True)
    assert batch.returncode == 0, batch.stderr[-3000:]
    executed = (out / "batch" / "tab2a.ipynb").read_text()
    assert '"smoke"' in executed and "Open-Platypus" in executed
    book = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO), "--path-output",
                           str(out), "--warningiserror", "--keep-going"], env=env, capture_output=True, text=True)
    assert book.returncode == 0, (book.stdout + book.stderr)[-5000:]
    html = (out / "_build" / "html" / "notebooks" / "tab2a.html").read_text()
    assert "Open-Platypus" in html and "Smoke preset" in html
    fig1 = (out / "_build" / "html" / "notebooks" / "fig1.html").read_text()
    assert "<img" in fig1  # the landscape figures rendered
