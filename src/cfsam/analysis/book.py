"""What every chapter does first, in one call: point at the results, select its experiments, say what they are."""
from __future__ import annotations

import os

from cfsam.analysis import report
from cfsam.pipeline import chapters, specs


def open_chapter(name: str, preset: str, results_dir: str | None = None, *, missing: bool = False) -> list[str]:
    """The experiment names chapter ``name`` reads (its notebook's ``cfsam`` metadata), after pointing the
    cache at ``results_dir`` when given; shows the preset's note (and, with ``missing``, what is missing, stale or
    damaged, with the command that computes it)."""
    if results_dir:
        os.environ["CFSAM_RESULTS"] = str(results_dir)
    names = chapters.chapter_experiments(name, list(specs.expand(preset)))
    from IPython.display import Markdown, display

    display(Markdown(report.preset_note(preset)))
    if missing and names:
        display(Markdown(report.missing_note(report.frame(preset, names), preset)))
    return names
