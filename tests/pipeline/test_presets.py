import pytest

from cfsam.pipeline.presets import PresetError, load_preset, preset_names


def test_all_presets_load_and_validate():
    assert {"smoke", "cpu", "paper"} <= set(preset_names())
    for name in preset_names():
        assert load_preset(name)["name"] == name


def test_paper_preset_holds_the_papers_hyper_parameters():
    p = load_preset("paper")  # Appendix A.2
    assert (p["stage1"]["epochs"], p["stage1"]["lr"], p["stage1"]["batch_size"]) == (3, 2e-5, 128)
    assert (p["stage2"]["lr"], p["stage2"]["batch_size"], p["sam"]["rho"]) == (5e-6, 128, 2.0)
    assert (p["stage2"]["epochs"], p["sam"]["epochs"], p["train"]["seed"]) == (2, 1, 1234)


@pytest.mark.parametrize("overrides, message", [
    ({"modell": "x"}, "unknown preset key"),
    ({"model": "gpt5"}, "unknown model preset 'gpt5'; allowed: smollm2-135m"),
    ({"stage2_datasets": ["sharegpt", "wiki"]}, "unknown dataset 'wiki'"),
    ({"stage2.lr": -1.0}, "section stage2: lr=-1.0; allowed: a finite number > 0"),
    ({"stage2.lr": float("inf")}, "section stage2: lr=inf"),
    ({"stage2.lr": "2e-05"}, "section stage2: lr='2e-05'"),  # YAML 1.1 reads 2e-05 as a string
    ({"stage2.batch_size": "8"}, "batch_size='8'; allowed: an integer >= 1"),
    ({"stage2.n_train": 0}, "n_train=0; allowed: None or an integer >= 1"),
    ({"stage2.n_train": 2}, "n_train=2 is fewer than one batch"),
    ({"stage2.optimiser": "sam"}, "unknown stage option.*optimiser"),
    ({"rehearsal.rehearsal_fraction": 1.5}, r"rehearsal_fraction=1.5; allowed: 0 <= fraction < 1"),
    ({"wise_ft.alpha": 2}, "wise_ft.alpha"),
    ({"stage1.optimizer": "sgd"}, "allowed: adamw | sam"),
    ({"sam.rho": float("nan")}, "section sam: rho=nan"),
    ({"rho_sweep": [0.5, float("nan")]}, r"rho_sweep\[1\]=nan"),
    ({"landscape.grid": 2}, "landscape.grid=2"),
    ({"landscape.grid": 4}, "landscape.grid=4 must be an odd number"),
    ({"landscape.seeds": []}, "landscape.seeds=\\[\\] must be a non-empty list"),
    ({"eval.limit": 0}, "eval.limit=0 must be a positive integer"),
    ({"heldout.n": 0}, "heldout.n=0 must be a positive integer"),
    ({"frontier.full": 3}, r"frontier.full=3 must be between 1 and the number of frontier.datasets \(2\)"),
    ({"frontier.full": 0}, "frontier.full=0"),
])
def test_bad_presets_are_named(overrides, message):
    with pytest.raises(PresetError, match=message):
        load_preset("smoke", overrides)


def test_unknown_preset_and_malformed_file(tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'gpu'; allowed: cpu-gemma, cpu-pilot, cpu, h200, paper, smoke"):
        load_preset("gpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(PresetError, match="not valid YAML"):
        load_preset(bad)


def test_frontier_full_gives_the_first_sets_every_seed_and_sweep():
    """full=1: only the headline set has the second seed; full=2: the next set too, with the same sweeps."""
    from cfsam.pipeline import specs

    def names(full):
        p = load_preset("smoke", {"frontier.full": full, "frontier.seeds": [1234, 1235]})
        return {n for n, e in specs.expand(p).items() if e.get("group") == "frontier"}

    one, two = names(1), names(2)
    assert "open-platypus-sam-rho2-s1235-4of4" in one and "auto-wiki-sam-rho2-s1235-4of4" not in one
    assert {n.replace("open-platypus", "auto-wiki") for n in one if n.startswith("open-platypus")} <= two
    assert one <= two


def test_frontier_method_lr_tunes_every_method_over_adamws_grid():
    """SAM, ASAM and rehearsal run at every lr of AdamW's grid (the other lrs first seed only, unless
    ``seeded.lr`` names them), Wise-FT merges every AdamW lr's end point; a grid that is not AdamW's, or
    that lists the stage-2 lr again, is refused."""
    from cfsam.pipeline import specs

    lr2 = load_preset("smoke")["stage2"]["lr"]
    p = load_preset("smoke", {"frontier.method_lr": [5.0e-4], "frontier.adamw_lr": [5.0e-4, lr2],
                              "frontier.asam_rho": [1.0], "frontier.rehearsal_fraction": [0.2],
                              "frontier.seeds": [1234, 1235]})
    exps = specs.expand(p)
    extra = sorted(n for n in exps if "-lr0.0005-" in n and "adamw" not in n)
    want = sorted(f"open-platypus-{m}-lr0.0005-s1234-{k}of4" for m in ("sam-rho2", "asam-rho1", "rehearsal0.2")
                  for k in range(1, 5))
    assert extra == want + ["open-platypus-wiseft-a0.5-lr0.0005-s1234"]
    for name, (opt, adaptive, frac) in {"sam-rho2": ("sam", False, 0.0), "asam-rho1": ("sam", True, 0.0),
                                        "rehearsal0.2": ("adamw", None, 0.2)}.items():
        d = specs.describe(exps[f"open-platypus-{name}-lr0.0005-s1234-4of4"]["run"])
        assert (d["optimizer"], d["adaptive"], d["rehearsal_fraction"], d["lr"]) == (opt, adaptive, frac, 5.0e-4)
        same = specs.describe(exps[f"open-platypus-{name}-s1234-4of4"]["run"])
        assert same["lr"] == lr2 and {**same, "lr": 5.0e-4} == d  # only the lr differs
    merged = exps["open-platypus-wiseft-a0.5-lr0.0005-s1234"]["run"]["wise_ft"]["stage2"]
    assert specs.run_id(merged) == specs.run_id(exps["open-platypus-adamw-lr0.0005-s1234-4of4"]["run"]["snapshot"]["run"])
    # the seeded SAM radius replicates at the seeded lrs only
    assert "open-platypus-sam-rho2-s1235-4of4" in exps and "open-platypus-sam-rho2-lr0.0005-s1235-4of4" not in exps
    seeded = specs.expand(load_preset("smoke", {**{k: v for k, v in [("frontier.method_lr", [5.0e-4]),
                          ("frontier.adamw_lr", [5.0e-4, lr2]), ("frontier.seeds", [1234, 1235])]},
                          "frontier.seeded.lr": [5.0e-4, lr2]}))
    assert "open-platypus-sam-rho2-lr0.0005-s1235-4of4" in seeded
    with pytest.raises(PresetError, match="frontier.method_lr: .* is the stage-2 lr"):
        load_preset("smoke", {"frontier.method_lr": [lr2]})
    with pytest.raises(PresetError, match=r"must be AdamW's grid"):
        load_preset("smoke", {"frontier.method_lr": [5.0e-4]})  # AdamW's grid is the stage-2 lr alone
    with pytest.raises(PresetError, match=r"frontier.method_lr\[0\]=-1"):
        load_preset("smoke", {"frontier.method_lr": [-1]})
    with pytest.raises(PresetError, match=r"frontier.seeded.lr: \[0.5\]"):
        load_preset("smoke", {"frontier.seeded.lr": [0.5]})


def test_seeded_rehearsal_and_asam_settings_replicate_like_sams():
    """Every method on the same terms: the ASAM radius and rehearsal fraction that ``seeded`` names run at every
    seed and at each ``seeded.lr``, SAM with rehearsal where both its radius and its fraction are seeded; the
    others, and an empty list, stay first-seed only; a seeded setting outside the sweep is refused."""
    from cfsam.pipeline import specs

    base = {"frontier.asam_rho": [1.0, 3.0], "frontier.rehearsal_fraction": [0.2, 0.4], "frontier.seeds": [1234, 1235],
            "frontier.complements": {"sam_rho": [2.0], "rehearsal_fraction": [0.2, 0.4]}}
    first_only = {n for n in specs.expand(load_preset("smoke", base)) if "-s1235-" in n}
    assert not any("asam" in n or "rehearsal" in n for n in first_only)
    exps = specs.expand(load_preset("smoke", {**base, "frontier.seeded.asam_rho": [3.0],
                                              "frontier.seeded.rehearsal_fraction": [0.4]}))
    second = sorted(n.rsplit("-", 2)[0] for n in exps if n.endswith("-s1235-4of4"))
    assert second == sorted(["open-platypus-adamw-lr0.001", "open-platypus-sam-rho2", "open-platypus-asam-rho3",
                             "open-platypus-rehearsal0.4", "open-platypus-sam-rho2-rehearsal0.4"])
    d = specs.describe(exps["open-platypus-rehearsal0.4-s1235-4of4"]["run"])
    assert (d["rehearsal_fraction"], d["seed"]) == (0.4, 1235)
    assert {n for n in exps if "-s1235-" in n} >= first_only  # only added: no earlier experiment moves
    with pytest.raises(PresetError, match=r"frontier.seeded.rehearsal_fraction: \[0.3\] are not in"):
        load_preset("smoke", {**base, "frontier.seeded.rehearsal_fraction": [0.3]})


def test_only_evals_with_a_stratified_task_say_so_in_their_spec():
    """MMLU draws its items by subject: the evals that list it name that (so entries measured on the
    earlier random draw turn stale), the others keep their spec and id."""
    from cfsam.pipeline import specs

    exps = specs.expand(load_preset("smoke", {"frontier.screen.tasks": ["mmlu", "copa"]}))
    assert exps["screen"]["measure"]["eval"]["stratified"] == ["mmlu"]
    assert exps["base"]["measure"]["eval"]["stratified"] == ["mmlu"]  # the paper's suite
    assert "stratified" not in exps["frontier-stage1"]["measure"]["eval"]  # copa, arc_c


def test_eval_stratify_false_keeps_random_items_and_the_earlier_ids():
    """A preset whose entries were computed before MMLU was stratified says ``eval.stratify: false``."""
    from cfsam.pipeline import specs

    exps = specs.expand(load_preset("smoke", {"eval.stratify": False}))
    assert "stratified" not in exps["base"]["measure"]["eval"]
    with pytest.raises(PresetError, match="eval.stratify"):
        load_preset("smoke", {"eval.stratify": "yes"})


def test_complements_and_short_runs():
    """Rehearsal with SAM and Wise-FT of SAM runs at the radii of ``complements``; a short run of half the steps
    (its own schedule) beside the snapshot runs, kept out of the frontier's points; unknown names refused."""
    from cfsam.pipeline import specs

    p = load_preset("smoke", {"frontier.complements": {"sam_rho": [2.0], "rehearsal_fraction": [0.2]},
                              "frontier.short": {"runs": ["sam-rho2"]}})
    exps = specs.expand(p)
    d = specs.describe(exps["open-platypus-sam-rho2-rehearsal0.2-s1234-4of4"]["run"])
    assert (d["optimizer"], d["rho"], d["rehearsal_fraction"], d["method"]) == ("sam", 2.0, 0.2, "rehearsal")
    merged = exps["open-platypus-wiseft-sam-rho2-a0.5-s1234"]["run"]["wise_ft"]
    assert specs.run_id(merged["stage2"]) == specs.run_id(exps["open-platypus-sam-rho2-s1234-4of4"]["run"]["snapshot"]["run"])
    short = exps["open-platypus-sam-rho2-half-s1234"]
    steps = p["stage2"]["n_train"] * p["frontier"]["epochs"] // p["stage2"]["batch_size"]
    assert short["group"] == "short" and short["run"]["max_steps"] * 2 == steps
    assert {k: v for k, v in short["run"].items() if k != "max_steps"} == \
        {k: v for k, v in exps["open-platypus-sam-rho2-s1234-4of4"]["run"]["snapshot"]["run"].items() if k != "snapshots"}
    with pytest.raises(PresetError, match=r"frontier.short.runs: unknown run\(s\) 'sam-rho9'; allowed: adamw-lr0.001, sam-rho2"):
        load_preset("smoke", {"frontier.short": {"runs": ["sam-rho9"]}})
    with pytest.raises(PresetError, match=r"frontier.complements.sam_rho: \[0.3\] are not in frontier.sam_rho"):
        load_preset("smoke", {"frontier.complements": {"sam_rho": [0.3], "rehearsal_fraction": []}})


def test_precision_auto_is_the_machines_native_precision_in_every_id(tmp_path, monkeypatch):
    """``precision: auto`` becomes bf16 on a CPU with AVX512-BF16 or AMX, else fp32, and that value (not
    "auto") is in every run's spec, so the two give different ids and never share results."""
    import torch
    import yaml

    from cfsam.core import precision
    from cfsam.pipeline import presets, specs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    zen4, zen3 = tmp_path / "zen4", tmp_path / "zen3"
    zen4.write_text("processor : 0\nflags : fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    zen3.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert precision.auto_precision(zen4) == "bf16" and precision.auto_precision(zen3) == "fp32"
    assert precision.cpu_flags(tmp_path / "absent") == set()

    p = yaml.safe_load(presets.registered_file("smoke").read_text())
    p["train"]["precision"] = "auto"
    path = tmp_path / "smoke-auto.yaml"
    path.write_text(yaml.safe_dump(p))
    ids = {}
    read = precision.cpu_flags
    for cpu in (zen4, zen3):
        monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="", cpu=cpu: read(cpu))  # this machine: cpu
        exps = specs.expand(str(path))
        stage1 = exps["stage1"]["run"]
        ids[cpu.name] = specs.run_id(stage1)
        assert stage1["precision"] == ("bf16" if cpu is zen4 else "fp32")
    assert ids["zen4"] != ids["zen3"]


def test_a_size_with_its_own_recipe_trains_as_its_own_preset_does():
    """cpu's Gemma rows (Tables 2(b), 6) train with cpu-gemma's lrs and precision, read here from the YAML
    itself, not through the loader: the very runs cpu-gemma trains (the same ids, one cached model), while
    SmolLM2's rows keep cpu's own recipe and the measurement stays cpu's."""
    import yaml

    from cfsam.pipeline import presets, specs

    raw = yaml.safe_load(presets.registered_file("cpu-gemma").read_text())
    cpu_raw = yaml.safe_load(presets.registered_file("cpu").read_text())
    assert cpu_raw["size_recipes"] == {"gemma3-270m": "cpu-gemma"}
    cpu, gemma = specs.expand("cpu"), specs.expand("cpu-gemma")
    s1 = cpu["gemma3-270m/stage1"]["run"]
    assert (s1["lr"], s1["precision"]) == (raw["stage1"]["lr"], raw["train"]["precision"]) == (1e-5, "bf16")
    s2 = cpu["gemma3-270m/s2-open-platypus-sam"]["run"]
    assert (s2["lr"], s2["optimizer"], s2["rho"]) == (raw["stage2"]["lr"], "sam", raw["sam"]["rho"])
    for name in ("stage1", "s2-open-platypus-adamw", "s2-open-platypus-sam"):
        assert specs.run_id(cpu[f"gemma3-270m/{name}"]["run"]) == specs.run_id(gemma[name]["run"])
        assert cpu[f"gemma3-270m/{name}"]["measure"]["eval"] == cpu["stage1"]["measure"]["eval"]
    assert cpu["stage1"]["run"]["lr"] == cpu_raw["stage1"]["lr"] == 1e-4
    assert "precision" not in cpu["s2-open-platypus-sam"]["run"]


@pytest.mark.parametrize("preset, recipes, message", [
    ("smoke", {"tiny": "smoke"}, r"size_recipes.tiny: not one of the sizes other than model 'tiny'; allowed: \(none\)"),
    ("smoke", {"tiny": "nope"}, r"size_recipes.tiny: not one of the sizes"),
    ("cpu", {"gemma3-270m": "cpu-gemmma"}, r"size_recipes.gemma3-270m='cpu-gemmma': not a registered preset; allowed: cpu-gemma"),
    ("cpu", {"gemma3-270m": "cpu-pilot"}, r"size_recipes.gemma3-270m='cpu-pilot': that preset trains 'smollm2-135m', not 'gemma3-270m'"),
])
def test_bad_size_recipes_are_named(preset, recipes, message):
    """A size's recipe must be one of the other sizes' and a registered preset of that very model."""
    with pytest.raises(PresetError, match=message):
        load_preset(preset, {"size_recipes": recipes})
