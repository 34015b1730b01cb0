"""Presets expand into experiment specs here, and only here.

An *experiment* is one model state (a *run*) and what is measured on it. A run is one of
- a model preset: ``{"model": "smollm2-135m"}`` (the base model);
- a stage: a stage spec in the trainer's own vocabulary (``cfsam.training.config``), whose ``model`` is the
  preset name or the spec of the stage it continues;
- a Wise-FT merge: ``{"wise_ft": {"stage1": run, "stage2": run, "alpha": a}}``.
``run_id`` names a run's model in the one model cache, ``$CFSAM_CACHE/runs/<run id>``, whichever road
(``cfsam train``, ``run-missing``, a notebook) asked for it; ``experiment_id`` names a result.
"""
from __future__ import annotations

from cfsam.core.errors import UsageError
from cfsam.core.io import config_hash
from cfsam.evaluation import tasks
from cfsam.pipeline import runs
from cfsam.pipeline.presets import RECIPE, load_preset
from cfsam.training import config as train_config

MEASURE_VERSION = 1  # bump when a measurement changes meaning: every cached result then turns stale


def recipe(p: dict, model: str) -> dict:
    """The preset ``p`` with the training recipe of ``model`` (``presets.RECIPE``): its ``size_recipes`` preset's,
    where it names one (a size tuned as its own study tunes it: the same runs, the same ids), else ``p``'s own."""
    name = p.get("size_recipes", {}).get(model)
    return {**p, **{k: load_preset(name)[k] for k in RECIPE}} if name else p


def stage1(p: dict, model: str) -> dict:
    return {"model": model, **p["train"], **p["stage1"]}


def stage2(p: dict, parent: dict, dataset: str, **changes) -> dict:
    """A stage-2 run: the preset's stage-2 options on ``dataset`` from ``parent``, with ``changes``."""
    return {"model": parent, **p["train"], **p["stage2"], "dataset": dataset, **changes}


def sam(p: dict, **changes) -> dict:
    return {"optimizer": "sam", **p["sam"], **changes}


def snapshot(run: dict, at: int, of: int) -> dict:
    """The model saved at point ``at`` of ``of`` evenly spaced along a stage (``at == of``: its end)."""
    return {"snapshot": {"run": run, "at": at, "of": of}}


# the stage-2 set of the paper's method comparisons (Wise-FT, rehearsal: Table 2(c)), its rho sweep
# (Table 3), its landscapes of SAM (Fig. 1) and its sizes (Table 6): every one of them on Open-Platypus
PAPER_SET = "open-platypus"


def run_kind(run: dict) -> str:
    """base, stage, snapshot or wise_ft (``runs.parse``)."""
    return runs.parse(run).kind


def run_id(run: dict) -> str:
    """The id of a run's model (``runs``): the name of its cache folder and part of its experiments' ids."""
    return runs.parse(run).id()


def canonical_run(run: dict) -> dict:
    """What identifies a run's model: defaults filled in, starting models by id (``training.config``)."""
    return runs.parse(run).canonical()


def experiment_id(exp: dict) -> str:
    """The hash of what the experiment is (its run's canonical spec, what it measures) and the measurement
    version. Never of paths, data files or the package version: results read anywhere."""
    return config_hash({"run": canonical_run(exp["run"]), "measure": exp["measure"], "measure_version": MEASURE_VERSION})


def eval_measure(ev: dict) -> dict:
    """What an eval measures: tasks, limit, seed, and which of the tasks draw their items by group
    (``stratified``: where ``ev["stratify"]``, the preset's ``eval.stratify``, holds and some do; the ids of
    the others stay as they were)."""
    out = {"tasks": list(ev["tasks"]), "limit": ev["limit"], "seed": ev["seed"]}
    strat = [t for t in out["tasks"] if ev["stratify"] and tasks.sampling(t) == "stratified"]
    return {**out, "stratified": strat} if strat else out


def expand(preset: str | dict) -> dict[str, dict]:
    """Every named experiment of a preset: {name: {"run": run, "measure": what to measure}}."""
    p = load_preset(preset) if isinstance(preset, str) else preset
    max_length, seed = p["train"].get("max_length", train_config.DEFAULTS["max_length"]), \
        p["train"].get("seed", train_config.DEFAULTS["seed"])
    heldout = {"datasets": [p["stage1"]["dataset"]], "n": p["heldout"]["n"], "max_length": max_length, "seed": seed}
    ev = eval_measure({**p["eval"], "seed": seed})
    out: dict[str, dict] = {}

    def add(name, run, landscape=False, sets=()):
        sets_here = heldout["datasets"] + [s for s in sets if s not in heldout["datasets"]]
        measure = {"eval": ev, "heldout": {**heldout, "datasets": sets_here}}
        if landscape:  # on examples after the held-out ones, so flatness never sits on forgetting's examples
            ls = dict(p["landscape"])
            # a preset's `disjoint: false` keeps the held-out examples, as specs did before: cpu-pilot's kept ids
            measure["landscape"] = {**ls, "disjoint": True} if ls.pop("disjoint", True) else ls
        out[name] = {"run": run, "measure": measure}

    stage2_sets = p["stage2_datasets"]
    for model in [p["model"]] + [m for m in p["sizes"] if m != p["model"]]:
        prefix = "" if model == p["model"] else f"{model}/"
        q = recipe(p, model)
        s1 = stage1(q, model)
        add(prefix + "base", {"model": model}, sets=stage2_sets if not prefix else ())
        # a size's stage 1 measures the set its stage 2 tunes on too, so its rows show learning beside forgetting
        add(prefix + "stage1", s1, landscape=not prefix, sets=stage2_sets if not prefix else [PAPER_SET])
        for ds in (stage2_sets if not prefix else [PAPER_SET]):
            add(f"{prefix}s2-{ds}-adamw", stage2(q, s1, ds), landscape=not prefix, sets=[ds])
            add(f"{prefix}s2-{ds}-sam", stage2(q, s1, ds, **sam(q)), landscape=not prefix and ds == PAPER_SET,
                sets=[ds])
            if not prefix:
                add(f"s2-{ds}-adamw-e1", stage2(p, s1, ds, epochs=1), sets=[ds])
        if prefix:
            continue
        op = PAPER_SET
        rehearse = {"rehearsal_from": p["stage1"]["dataset"], **p["rehearsal"]}
        for name, changes in (("adamw", {}), ("sam", sam(p))):
            add(f"wiseft-{op}-{name}", {"wise_ft": {"stage1": s1, "stage2": stage2(p, s1, op, **changes),
                                                    "alpha": p["wise_ft"]["alpha"]}}, sets=[op])
            add(f"rehearsal-{op}-{name}", stage2(p, s1, op, **changes, **rehearse), sets=[op])
        for rho in p["rho_sweep"]:
            for adaptive in (False, True):
                run = stage2(p, s1, op, **sam(p, rho=rho, adaptive=adaptive))
                if train_config.canonical(run) != train_config.canonical(out[f"s2-{op}-sam"]["run"]):
                    add(f"s2-{op}-{'asam' if adaptive else 'sam'}-rho{rho:g}", run, sets=[op])
    if "frontier" in p:
        f = p["frontier"]
        # which tasks the base model is above chance on: the frontier's general-ability suite is chosen from it
        out["screen"] = {"run": {"model": p["model"]}, "measure": {"eval": eval_measure({**f["screen"], "seed": seed, "stratify": p["eval"]["stratify"]})}}
        out.update(frontier(p, stage1(p, p["model"]), heldout, ev))
        if "starts" in p:
            out.update(starts(p, stage1(p, p["model"]), out["frontier-stage1"]["measure"]))
    _share_snapshots(out)
    return out


def _stage_runs(run: dict):
    """Every stage spec a run trains, itself and the stages it starts from or merges."""
    return runs.parse(run).stages()


def _share_snapshots(exps: dict) -> None:
    """A stage that any experiment measures along the way is trained with its snapshots whichever experiment
    trains it first (``snapshots`` says how it runs, not what it trains: the run's id is unchanged)."""
    wanted = {run_id(e["run"]["snapshot"]["run"]): e["run"]["snapshot"]["of"]
              for e in exps.values() if run_kind(e["run"]) == "snapshot"}
    if not wanted:
        return
    for e in exps.values():
        for stage in _stage_runs(e["run"]):
            n = wanted.get(run_id(stage))
            if n is not None:
                stage["snapshots"] = n


def frontier(p: dict, s1: dict, heldout: dict, ev: dict) -> dict[str, dict]:
    """The learning-forgetting frontier runs: per stage-2 set, AdamW over learning rates, SAM and ASAM over
    rho, rehearsal over fractions (each measured at ``snapshots`` points along the run), and Wise-FT of every
    AdamW run over alpha. Every method is tuned alike: on the full sets SAM, ASAM and rehearsal run at the
    stage-2 lr and at each of ``method_lr`` (together AdamW's grid, ``adamw_lr``; the preset checks it), and
    Wise-FT merges the end of AdamW at each of those lrs. The first ``full`` sets (the headline first) get
    every seed; the others, lighter, the first seed and the ``light`` sweeps; seeds after the first run only
    the ``seeded`` sweep points, at the ``seeded.lr`` learning rates. End points carry the landscape (on
    examples disjoint from the held-out ones that measure forgetting)."""
    f = p["frontier"]
    n, out = f["snapshots"], {}
    measure = {"eval": eval_measure({**ev, **f["eval"], "stratify": p["eval"]["stratify"]}), "heldout": {**heldout, "n": f["heldout_n"]}}
    # every curve starts at the stage-1 model: its held-out losses on every set, its general ability
    out["frontier-stage1"] = {"run": s1, "measure": {**measure, "heldout": {
        **measure["heldout"], "datasets": heldout["datasets"] + [d for d in f["datasets"] if d not in heldout["datasets"]]}}}
    # the start's calibration: stage 1 at other learning rates, measured as frontier-stage1 is (stage1.lr is
    # chosen from them: a start must learn its own set clearly, analysis.calibration)
    for lr in (p.get("calibration") or {}).get("stage1_lr", []):
        if lr != s1["lr"]:
            out[f"frontier-stage1-lr{lr:g}"] = {"run": {**s1, "lr": lr}, "measure": out["frontier-stage1"]["measure"],
                                                "group": "calibration"}
    lr2 = p["stage2"]["lr"]
    seeded_lrs = f["seeded"].get("lr", [lr2])
    for i, ds in enumerate(f["datasets"]):
        light = i >= f["full"]
        lrs, rhos = (f["light"]["adamw_lr"], f["light"]["sam_rho"]) if light else (f["adamw_lr"], f["sam_rho"])
        ep = {"epochs": f["epochs"]}  # every frontier run: the same schedule; the sweep traces the frontier
        methods = [(f"adamw-lr{lr:g}", {**ep, "lr": lr}, lr in f["seeded"]["adamw_lr"]) for lr in lrs]
        others = [(f"sam-rho{rho:g}", sam(p, **ep, rho=rho, adaptive=False), rho in f["seeded"]["sam_rho"])
                  for rho in rhos]
        if not light:
            every = f["seeded"]  # the sweep points that every seed runs
            others += [(f"asam-rho{rho:g}", sam(p, **ep, rho=rho, adaptive=True), rho in every["asam_rho"])
                       for rho in f["asam_rho"]]
            others += [(f"rehearsal{fr:g}", {**ep, "rehearsal_from": p["stage1"]["dataset"], "rehearsal_fraction": fr},
                        fr in every["rehearsal_fraction"]) for fr in f["rehearsal_fraction"]]
            # the complementarity claims: rehearsal with SAM at the radii of ``complements``, seeded where both
            # its radius and its fraction are
            c = f["complements"]
            others += [(f"sam-rho{rho:g}-rehearsal{fr:g}", sam(p, **ep, rho=rho, adaptive=False,
                        rehearsal_from=p["stage1"]["dataset"], rehearsal_fraction=fr),
                        rho in every["sam_rho"] and fr in every["rehearsal_fraction"])
                       for rho in c["sam_rho"] for fr in c["rehearsal_fraction"]]
        # at the stage-2 lr under their plain names (as first computed), at the grid's other lrs with "-lr"
        methods += [(name, changes, seeded and lr2 in seeded_lrs) for name, changes, seeded in others]
        methods += [(f"{name}-lr{lr:g}", {**changes, "lr": lr}, seeded and lr in seeded_lrs)
                    for lr in ([] if light else f["method_lr"]) for name, changes, seeded in others]
        for k, seed in enumerate(f["seeds"][:1] if light else f["seeds"]):
            here = {**measure, "heldout": {**measure["heldout"], "datasets": heldout["datasets"] + [ds]}}
            for name, changes, seeded in methods:
                if k > 0 and not seeded:  # further seeds: only the sweep points the preset names (compute)
                    continue
                run = stage2(p, s1, ds, **changes, seed=seed)
                for at in range(1, n + 1):
                    exp = {"run": snapshot(run, at, n), "measure": here}
                    if at == n and f["landscape"]:  # end points: flatness, on examples disjoint from forgetting's
                        over = f["landscape"] if isinstance(f["landscape"], dict) else {}
                        exp["measure"] = {**here, "landscape": {**p["landscape"], **over, "disjoint": True}}
                    out[f"{ds}-{name}-s{seed}-{at}of{n}"] = exp
            if light:
                continue
            # Wise-FT of each AdamW run of the grid (the stage-2 lr's under its first name), and of the SAM runs
            # of ``complements``, where this seed ran them
            for lr in [lr2] + [x for x in lrs if x != lr2]:
                tag = "" if lr == lr2 else f"-lr{lr:g}"
                at_lr = {} if lr == lr2 else {"lr": lr}
                merged = [("", {}, lr == lr2 or lr in f["seeded"]["adamw_lr"])]
                merged += [(f"sam-rho{rho:g}-", sam(p, rho=rho, adaptive=False),
                            rho in f["seeded"]["sam_rho"] and lr in seeded_lrs) for rho in f["complements"]["sam_rho"]]
                for prefix, changes, seeded in merged:
                    if k > 0 and not seeded:
                        continue
                    tuned = stage2(p, s1, ds, seed=seed, **{**changes, **ep, **at_lr})
                    for alpha in f["wise_ft_alpha"]:
                        out[f"{ds}-wiseft-{prefix}a{alpha:g}{tag}-s{seed}"] = {
                            "run": {"wise_ft": {"stage1": s1, "stage2": tuned, "alpha": alpha}}, "measure": here}
            # a short run against a snapshot: half the steps with its own full schedule (first seed, no landscape)
            for name, changes, _ in methods:
                if k == 0 and name in f["short"]["runs"]:
                    half = p["stage2"]["n_train"] * f["epochs"] // p["stage2"]["batch_size"] // 2
                    out[f"{ds}-{name}-half-s{seed}"] = {"run": stage2(p, s1, ds, **changes, seed=seed, max_steps=half),
                                                        "measure": here, "group": "short"}
            # the same run trained in another precision (first seed, no landscape): does bf16 change the numbers?
            pc = f["precision_check"]
            for name, changes, _ in methods:
                if k == 0 and name in pc["runs"]:
                    out[f"{ds}-{name}-{pc['precision']}-s{seed}"] = {
                        "run": stage2(p, s1, ds, **changes, seed=seed, precision=pc["precision"]), "measure": here,
                        "group": "precision"}
    for exp in out.values():
        exp.setdefault("group", "frontier")  # for the analysis; not part of the id (run and measure are)
    return out


def starts(p: dict, s1: dict, start_measure: dict) -> dict[str, dict]:
    """Does a flatter start forget less? Stage 1 trained with SAM at each radius of ``starts.sam_rho`` (the same
    base, data, lr and seed as ``frontier-stage1``), each measured like it plus its landscape on examples
    disjoint from the held-out ones (and ``frontier-stage1``'s own landscape, as ``frontier-stage1-flatness``);
    from each SAM start, AdamW stage 2 on the headline set at every lr of ``frontier.adamw_lr`` with the
    frontier's snapshots and measurements, the first ``starts.seeds`` seeds at ``starts.seeded_lr``. The AdamW
    start's stage-2 runs are the frontier's own."""
    st, f = p["starts"], p["frontier"]
    ls = {**p["landscape"], **(f["landscape"] if isinstance(f["landscape"], dict) else {}), "disjoint": True}
    flat = {**start_measure, "landscape": ls}
    out = {"frontier-stage1-flatness": {"run": s1, "measure": flat, "group": "starts"}}
    ds, n, ep = f["datasets"][0], f["snapshots"], {"epochs": f["epochs"]}
    # measured as the frontier's points are: the stage-1 set and the run's own, the end with its landscape
    here = {**start_measure, "heldout": {**start_measure["heldout"], "datasets": [p["stage1"]["dataset"], ds]}}
    end = {**here, "landscape": ls} if f["landscape"] else here
    for rho in st["sam_rho"]:
        start = {**s1, "optimizer": "sam", "rho": rho, "adaptive": False}  # all else as frontier-stage1
        out[f"frontier-stage1-sam-rho{rho:g}"] = {"run": start, "measure": flat, "group": "starts"}
        for k, seed in enumerate(f["seeds"][:st["seeds"]]):
            for lr in f["adamw_lr"]:
                if k > 0 and lr not in st["seeded_lr"]:
                    continue
                run = stage2(p, start, ds, **ep, lr=lr, seed=seed)
                for at in range(1, n + 1):
                    out[f"{ds}-from-sam-rho{rho:g}-adamw-lr{lr:g}-s{seed}-{at}of{n}"] = {
                        "run": snapshot(run, at, n), "measure": end if at == n else here, "group": "starts"}
    return out


def needed(preset: str | dict, notebooks: list[str] | None = None) -> list[str]:
    """Experiment names the given chapters read (all of the preset's when None)."""
    from cfsam.pipeline import chapters

    names = list(expand(preset))
    if notebooks is None:
        return names
    known = chapters.chapters()
    bad = [n for n in notebooks if n not in known]
    if bad:
        raise UsageError(f"unknown chapter(s) {', '.join(bad)}; allowed: {', '.join(known)}")
    keep = set().union(*(chapters.chapter_experiments(nb, names) for nb in notebooks))
    return [n for n in names if n in keep]


def last_stage(run: dict) -> dict | None:
    """The spec of a run's last training stage (a merge's tuned side), resolved; None for a base model."""
    return runs.parse(run).last_stage()


def describe(run: dict) -> dict:
    """The paper's identity of a run: method, stage-2 set, optimizer, epochs, SAM's settings, its kind."""
    r = runs.parse(run)
    kind, last = r.kind, r.last_stage()
    if last is None:
        return {"at": None, "of": None, "seed": None, "lr": None, "rehearsal_fraction": None, "alpha": None,
                "method": "none", "stage2": "", "optimizer": "none", "epochs": None, "kind": "base",
                "rho": None, "adaptive": None}
    stage = "stage2" if isinstance(last["model"], dict) or kind == "wise_ft" else "stage1"
    method = "wise_ft" if kind == "wise_ft" else ("rehearsal" if last["rehearsal_fraction"] else "none")
    sam = last["optimizer"] == "sam"
    at, of = (r.at, r.of) if isinstance(r, runs.Snapshot) else (None, None)
    return {"at": at, "of": of, "seed": last["seed"], "lr": last["lr"],
            "rehearsal_fraction": last["rehearsal_fraction"],
            "alpha": r.alpha if isinstance(r, runs.WiseFT) else None, "method": method, "stage2": last["dataset"] if stage == "stage2" else "", "optimizer": last["optimizer"],
            "epochs": last["epochs"], "kind": stage, "rho": last["rho"] if sam else None,
            "adaptive": last["adaptive"] if sam else None}
