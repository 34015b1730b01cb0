"""Per-item metrics, per-task results, and the paper's category and AVG arithmetic (the one implementation)."""
from __future__ import annotations

import math

import numpy as np

from cfsam.evaluation import tasks

CATEGORY_ORDER = tasks.CATEGORIES


METRICS = ("acc", "acc_norm", "acc_tok", "gold_logprob", "gold_choice_logprob", "mc2")


def _mean_se(values) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


def score_item(item: tasks.Item, lls: list[float], n_tokens: list[int], primary: str) -> dict:
    """Per-item record: log-likelihoods, the prediction by the task's primary metric, the gold answer."""
    ll = np.asarray(lls)
    norm = ll / np.maximum([len(c) for c in item.choices], 1)   # lm-eval's acc_norm: per character
    tok = ll / np.asarray(n_tokens)                              # OpenCompass's perplexity: per token
    golds = item.gold if isinstance(item.gold, list) else [item.gold]
    p = np.exp(ll - ll.max())
    rec = {"idx": item.idx, "ll": ll.tolist(), "ll_norm": norm.tolist(), "n_tokens": list(n_tokens),
           "gold": item.gold, "group": item.group,
           "acc": float(int(ll.argmax()) in golds), "acc_norm": float(int(norm.argmax()) in golds),
           "acc_tok": float(int(tok.argmax()) in golds),
           "gold_logprob": float(ll[golds[0]]),
           # log-prob of the gold among the choices: moves even when the argmax does not
           "gold_choice_logprob": float(ll[golds[0]] - (ll.max() + np.log(p.sum())))}
    if primary == "mc2":
        rec["mc2"] = float(p[golds].sum() / p.sum())
    rec["pred"] = int({"acc_norm": norm, "acc_tok": tok}.get(primary, ll).argmax())
    return rec


def aggregate_groups(group_scores: dict[str, float], group_categories: dict[str, list[str]]) -> tuple[float, dict]:
    """Unweighted mean over groups (MMLU subjects) and over the groups of each category."""
    cats = {}
    for cat, members in group_categories.items():
        vals = [group_scores[g] for g in members if g in group_scores]
        cats[cat] = float(np.mean(vals)) if vals else None
    return float(np.mean(list(group_scores.values()))), cats


def task_result(name: str, records: list[dict], n_total: int) -> dict:
    """Per-task metrics from per-item records."""
    spec = tasks.task_spec(name)
    primary = spec.get("primary", "acc")
    res = {"status": "ok", "task": name, "paper": spec.get("paper"), "category": spec["category"],
           "variant": tasks.variant(name), "lm_eval": spec.get("lm_eval"), "primary": primary,
           "n": len(records), "n_total": n_total}
    for m in METRICS:
        if m in records[0]:
            res[m], res[m + "_stderr"] = _mean_se([r[m] for r in records])
    res["score"], res["score_stderr"] = res[primary], res[primary + "_stderr"]
    if spec.get("aggregate") == "macro":
        by_group: dict[str, list[float]] = {}
        for r in records:
            by_group.setdefault(r["group"], []).append(r[primary])
        groups = {g: {"n": len(v), "score": float(np.mean(v)), "stderr": _mean_se(v)[1]}
                  for g, v in sorted(by_group.items())}
        res["score"], res["subcategories"] = aggregate_groups({g: v["score"] for g, v in groups.items()},
                                                               spec.get("group_categories", {}))
        # the macro mean's stderr from the groups' (independent); groups of one item contribute none
        se = [v["stderr"] for v in groups.values() if v["stderr"] is not None]
        res["score_stderr"] = float(math.sqrt(sum(x * x for x in se)) / len(groups)) if se else None
        res["groups"] = groups
    res["records"] = records
    return res


def paper_avg(task_scores: dict, category_of: dict):
    """The paper's AVG, the one implementation: the unweighted mean over categories of the unweighted mean of
    each category's task scores. Scores may be numbers or arrays of bootstrap replicates alike."""
    cats: dict[str, list] = {}
    for name, score in task_scores.items():
        cats.setdefault(category_of[name], []).append(score)
    return np.mean([np.mean(v, axis=0) for v in cats.values()], axis=0)


def categories(results: dict) -> dict:
    """The paper's four categories (unweighted means of their tasks' scores), AVG, and MMLU's categories.

    Every category lists the tasks that fed it and, with the reason, those that did not (missing data
    or not evaluated); ``complete`` is False when any was missing.
    """
    res_tasks = results.get("tasks", {})
    out: dict[str, dict] = {}
    for cat, names in tasks.paper_tasks().items():
        used = {n: res_tasks[n]["score"] for n in names if res_tasks.get(n, {}).get("status") == "ok"}
        missing = {n: res_tasks[n].get("reason", "missing") if n in res_tasks else "not evaluated"
                   for n in names if n not in used}
        out[cat] = {"score": float(np.mean(list(used.values()))) if used else None, "tasks": used,
                    "missing": missing, "complete": not missing,
                    "variants": {n: res_tasks[n]["variant"] for n in used if res_tasks[n].get("variant")}}
    have = {c: out[c]["score"] for c in CATEGORY_ORDER if out[c]["score"] is not None}
    used = {n: sc for c in have for n, sc in out[c]["tasks"].items()}
    avg = float(paper_avg(used, {n: c for c in have for n in out[c]["tasks"]})) if have else None
    out["AVG"] = {"score": avg, "categories": have,
                  "missing": [c for c in CATEGORY_ORDER if c not in have],
                  "complete": all(out[c]["complete"] for c in CATEGORY_ORDER)}
    if res_tasks.get("mmlu", {}).get("status") == "ok":
        out["MMLU"] = dict(res_tasks["mmlu"]["subcategories"])
    return out


def summary_tables(results: dict):
    """Two pandas tables (percent): tasks, and the paper's categories with MMLU's."""
    import pandas as pd

    rows = []
    for name, r in results["tasks"].items():
        if r["status"] != "ok":
            rows.append({"task": name, "category": r["category"], "status": "MISSING: " + r["reason"]})
            continue
        rows.append({"task": name, "category": r["category"], "n": r["n"], "metric": r["primary"],
                     "score": 100 * r["score"], "±": math.nan if r["score_stderr"] is None else 100 * r["score_stderr"], "acc": 100 * r["acc"],
                     "acc_norm": 100 * r["acc_norm"], "gold_logprob": r["gold_logprob"],
                     "status": "variant: " + r["variant"] if r.get("variant") else "ok"})
    task_df = pd.DataFrame(rows)
    if "n" in task_df:
        task_df["n"] = task_df["n"].astype("Int64")
    cats = results.get("categories") or categories(results)
    crows = [{"category": c, "score": None if cats[c]["score"] is None else 100 * cats[c]["score"],
              "tasks": ", ".join(cats[c]["tasks"]), "missing": ", ".join(cats[c]["missing"])} for c in CATEGORY_ORDER]
    crows.append({"category": "AVG", "score": None if cats["AVG"]["score"] is None else 100 * cats["AVG"]["score"],
                  "tasks": ", ".join(cats["AVG"]["categories"]), "missing": ", ".join(cats["AVG"]["missing"])})
    for sub, v in cats.get("MMLU", {}).items():
        crows.append({"category": f"MMLU {sub}", "score": None if v is None else 100 * v, "tasks": "mmlu",
                      "missing": ""})
    return task_df, pd.DataFrame(crows)
