"""The next GPU run's experiment list (scripts/offline_gpu/headline.py): the headline first, in order."""
import importlib.util

from cfsam.pipeline import cache, specs

spec = importlib.util.spec_from_file_location("headline", cache.REPO / "scripts" / "offline_gpu" / "headline.py")
headline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headline)


def test_the_smoke_headline_by_hand():
    points = [f"-s1234-{k}of4" for k in range(1, 5)]
    assert headline.headline("smoke") == ["base", "frontier-stage1", *[f"open-platypus-adamw-lr0.001{p}" for p in points],
                                          *[f"open-platypus-sam-rho2{p}" for p in points]]


def test_the_h200_headline_is_adamw_then_sam_at_every_lr_of_its_grid():
    names = headline.headline("h200")
    assert names[:2] == ["base", "frontier-stage1"] and set(names) <= set(specs.expand("h200"))
    runs = list(dict.fromkeys(n.rsplit("-", 1)[0] for n in names[2:]))  # in order, without the point
    assert runs == ["metamathqa-adamw-lr5e-05-s1234", "metamathqa-adamw-lr0.0001-s1234", "metamathqa-adamw-lr0.0003-s1234",
                    *[f"metamathqa-sam-rho{r}-s1234" for r in ("0.05", "0.5", "2", "8")],
                    *[f"metamathqa-sam-rho{r}-lr{lr}-s1234" for lr in ("5e-05", "0.0001") for r in ("0.05", "0.5", "2", "8")]]
    assert len(names) == 2 + 4 * len(runs)
