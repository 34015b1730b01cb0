import os
from pathlib import Path

import pytest

# The data the tests read: CFSAM_DATA_DIR when set (make test sets it to ../shared/data when the mirror sits
# beside the checkout), else that mirror when it is there, else the fixtures the repository ships
# (scripts/make_fixtures.py). CFSAM_TEST_DATA=fixtures runs on the fixtures even where a mirror is.
# Tests that need the real data's content are marked `mirror` and skip on the fixtures.
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
_mirror = REPO.parent / "shared" / "data"
_choice = os.environ.get("CFSAM_TEST_DATA", "auto")
if _choice not in ("auto", "fixtures"):
    raise pytest.UsageError(f"CFSAM_TEST_DATA={_choice!r}; allowed: auto, fixtures")
if _choice == "fixtures":
    os.environ.pop("CFSAM_DATA_DIR", None)
elif "CFSAM_DATA_DIR" not in os.environ and (_mirror / "MANIFEST.md").exists():
    os.environ["CFSAM_DATA_DIR"] = str(_mirror)
REAL_DATA = bool(os.environ.get("CFSAM_DATA_DIR"))
if not REAL_DATA:
    os.environ["CFSAM_DATA_DIR"] = str(FIXTURES)
    # models trained on the fixtures get a cache of their own: a cached stage is checked against the data it
    # was trained on, and one trained on fixtures must never meet a run on the real data (nor the reverse).
    # The prepared (data-free) base models are shared, so the embedded model is not converted again.
    if "CFSAM_CACHE" not in os.environ:
        default = Path.home() / ".cache" / "cfsam"
        os.environ["CFSAM_CACHE"] = str(default / "fixtures")
        (default / "fixtures").mkdir(parents=True, exist_ok=True)
        if not (default / "fixtures" / "models").exists():
            (default / "models").mkdir(parents=True, exist_ok=True)
            (default / "fixtures" / "models").symlink_to(default / "models")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if REAL_DATA:
        return
    skip = pytest.mark.skip(reason="needs the real data's content: the data mirror (CFSAM_DATA_DIR)")
    for item in items:
        if "mirror" in item.keywords:
            item.add_marker(skip)


class Manifest:
    """The record counts and sizes that the data folder's MANIFEST.md lists (the mirror's or the fixtures'),
    read from its table, independently of the loaders."""

    def __init__(self, root: Path):
        self.rows = {}
        for row in (root / "MANIFEST.md").read_text().splitlines():
            # | dataset | `local file` | source | path | split | records | bytes | sha256 | licence |
            cells = [c.strip() for c in row.split("|")]
            if len(cells) > 8 and cells[2].startswith("`"):
                self.rows[cells[2].split("`")[1]] = cells  # "`mmlu/data/...` (from mmlu.zip)": the path

    def records(self, rel: str) -> int:
        return int(self.rows[rel][6])

    def bytes(self, rel: str) -> int:
        return int(self.rows[rel][7])

    def split_records(self, rel: str, split: str) -> int:
        """A grouped row's count of one split ("dev 285 / val 1531 / test 14042 (...)")."""
        counts = dict(part.split()[:2] for part in self.rows[rel][6].split("(")[0].split("/"))
        return int(counts[split])


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    return Manifest(Path(os.environ["CFSAM_DATA_DIR"]))


@pytest.fixture(scope="session")
def tiny():
    from cfsam.data.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    from cfsam.data.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def smoke_variant(tmp_path, monkeypatch):
    """A function: the smoke preset with ``edit`` applied to its mapping, written as ``<name>.yaml`` (its results
    in ``tmp_path/results/<name>``); returns the file's path."""
    import yaml

    from cfsam.pipeline import presets

    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))

    def make(name: str, edit) -> str:
        p = yaml.safe_load(presets.registered_file("smoke").read_text())
        edit(p)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(p))
        return str(path)

    return make
