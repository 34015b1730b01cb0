"""Issue 27 #3: a preset given as a YAML path, absolute or relative, files its results under the file's stem."""
import pytest

from cfsam.core import registry
from cfsam.core.io import read_json
from cfsam.pipeline import batch, cache, presets, runner
from cfsam.pipeline.presets import PresetError

SMOKE = registry.ROOT / "presets" / "smoke.yaml"


@pytest.fixture
def own(tmp_path, monkeypatch):
    """A copy of smoke as ``work/s.yaml``, results in a private folder."""
    (tmp_path / "work").mkdir()
    path = tmp_path / "work" / "s.yaml"
    path.write_text(SMOKE.read_text().replace("tiny random model", "my copy of the tiny random model"))
    monkeypatch.setenv("CFSAM_RESULTS", str(tmp_path / "results"))
    return path


def test_a_preset_path_is_filed_under_its_stem(own, monkeypatch):
    monkeypatch.chdir(own.parent)
    for given in (str(own), "s.yaml", "./s.yaml"):
        assert presets.load_preset(given)["name"] == "s"
        assert cache.results_dir(given) == own.parent.parent / "results" / "s"
        assert cache.entry_path(given, "base") == own.parent.parent / "results" / "s" / "base.json.gz"
        assert batch.default_out(given).name == "s"
    with pytest.raises(PresetError, match="preset file nope.yaml does not exist"):
        presets.load_preset("nope.yaml")


def test_run_missing_with_an_absolute_preset_path(own, tmp_path):
    assert runner.run_missing(str(own), only=["base"]) == ["base"]
    entry = read_json(tmp_path / "results" / "s" / "base.json.gz")
    assert entry["preset"] == "s" and entry["name"] == "base"
    assert cache.load_results(str(own), ["base"])["base"]["status"] == "ok"
    assert not (tmp_path / "results" / str(own).lstrip("/")).exists()


def test_a_file_named_like_a_registered_preset_is_refused(tmp_path):
    clash = tmp_path / "smoke.yaml"
    clash.write_text(SMOKE.read_text().replace("limit: 8", "limit: 4", 1))
    with pytest.raises(PresetError, match=r"named like the registered preset 'smoke'.*rename it"):
        presets.load_preset(clash)
    clash.write_text(SMOKE.read_text())  # the same preset, copied: its results are the registered one's
    assert presets.load_preset(clash)["name"] == "smoke"
