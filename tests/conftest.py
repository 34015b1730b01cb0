import os
from pathlib import Path

import pytest

# Tests run offline against the shared mirror when it sits beside the checkout (as in CI).
_mirror = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "CFSAM_DATA_DIR" not in os.environ and (_mirror / "MANIFEST.md").exists():
    os.environ["CFSAM_DATA_DIR"] = str(_mirror)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CFSAM_DATA_DIR"):
        return
    skip = pytest.mark.skip(reason="needs the data mirror (CFSAM_DATA_DIR)")
    for item in items:
        if "mirror" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    from cfsam.data.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    from cfsam.data.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
