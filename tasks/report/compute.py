"""What the report says, computed from the stored records: the comparison rows (one per
configuration, its seeds aggregated), the configuration each method selects on
validation, and the verdict with its test statistics.

The protocol it follows: each method's configuration (learning rate, and rank and targets
for LoRA) is the one with the highest mean validation accuracy over its seeds; only the
selected configurations' test numbers make the headline. The headline never claims more
than the run shows: it says first when no trained model beat the majority baseline, and it
says when a baseline beat LoRA or full fine-tuning.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks import registry
from tasks.config import RANDOM_MODELS
from tasks.metrics import STATUSES, MetricsRecord, bootstrap_accuracy_ci
from tasks.registry import Variant, format_lr
from tasks.report.format import fmt_acc, fmt_p, fmt_pct, fmt_points
from tasks.report.load import StoredRun
from tasks.report.stats import holm, mcnemar, paired_bootstrap, welch

ERROR_IN_HEADLINE = 200  # characters of an error message quoted in the verdict
ALPHA = 0.05  # family-wise error rate of the verdict's claims (Holm)
BOOTSTRAP_RESAMPLES = 10_000  # enough for p-values near ALPHA / (family size)
NOT_COMPARED = ("majority", "seed_heuristic")  # the floor has its own rule; the heuristic
# is no classifier


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(xs) if xs else None


def _sd(values: list[float | None]) -> float | None:
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.stdev(xs) if len(xs) > 1 else None


def aggregate(records: list[MetricsRecord]) -> dict[str, Any]:
    """One table row from the records of one configuration (or of one seed): means over
    the successful ones, sd where there are several, the bootstrap interval where there
    is one."""
    ok = [r for r in records if r.ok]
    first = records[0]
    try:
        variant: Variant | None = Variant.parse(first.variant)
    except ValueError:
        variant = None
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1

    def mean(key: str) -> float | None:
        return _mean([getattr(r, key) for r in ok])

    def latency(key: str) -> float | None:
        return _mean([(r.latency_ms or {}).get(key) for r in ok])

    trainable, total = mean("params_trainable"), mean("params_total")
    single_ci = ok[0].accuracy_ci95 if len(ok) == 1 and ok[0].accuracy_ci95 else [None, None]
    method = registry.METHODS.get(first.method)
    # a method may name what it did in `details["row_label"]` (zero-shot: its prompt choice)
    own_label = next((r.details["row_label"] for r in ok if r.details.get("row_label")), None)
    return {
        "name": variant.config_name if variant and len(records) > 1 else first.variant,
        "label": own_label or (variant.label(seed=len(records) == 1) if variant
                               else first.variant),
        "method": first.method,
        "method_label": method.label if method else first.method,
        "variants": [r.variant for r in records],
        "seeds": [r.seed for r in records if r.seed is not None],
        "n": len(ok), "n_total": len(records),
        "status": "ok" if len(ok) == len(records) else
                  ("ok" if ok else max(statuses, key=lambda s: statuses[s])),
        "statuses": statuses,
        "validation_accuracy": mean("validation_accuracy"),
        "validation_sd": _sd([r.validation_accuracy for r in ok]),
        "validation_examples": ok[0].validation_examples if ok else None,
        "validation_loss": mean("validation_loss"),
        "input": (first.input_budget or {}).get("text"),
        "input_cut_share": (first.input_budget or {}).get("cut_share"),
        "input_share_read": (first.input_budget or {}).get("mean_share_read"),
        "accuracy": mean("accuracy"), "accuracy_sd": _sd([r.accuracy for r in ok]),
        "accuracy_ci_low": single_ci[0], "accuracy_ci_high": single_ci[1],
        "f1": mean("f1"),
        "params_trainable": round(trainable) if trainable is not None else None,
        "params_total": round(total) if total is not None else None,
        "trainable_share": trainable / total if trainable is not None and total else None,
        "train_seconds": mean("train_seconds"), "seconds_per_step": mean("seconds_per_step"),
        "samples_per_second": mean("samples_per_second"),
        "peak_memory_bytes": mean("peak_memory_bytes"), "artifact_bytes": mean("artifact_bytes"),
        "inference_ms_per_example": mean("inference_ms_per_example"),
        "latency_merged_ms": latency("merged"), "latency_unmerged_ms": latency("unmerged"),
        "latency_base_ms": latency("base"),
        "rank": variant.rank if variant else None,
        "targets": variant.targets if variant else None,
        "lr": format_lr(variant.lr) if variant and variant.lr else None,
        "precision": ok[0].precision if ok else None,
        # the Airflow try that wrote each record (a placeholder for a missing one has none)
        "attempts": [r.attempt for r in records if r.status in STATUSES],
        "finished_at": max((r.finished_at for r in records if r.finished_at), default=None),
        "reason": next((r.reason for r in records if r.reason), None),
        "error": next((r.error for r in records if r.error), None),
    }


@dataclass
class Configuration:
    """The seeds of one setting of one method, e.g. LoRA r=16 qkvo at lr 2e-3."""

    name: str
    method: str
    records: list[MetricsRecord]
    row: dict[str, Any] = field(init=False)
    seed_rows: list[dict[str, Any]] = field(init=False)
    selected: bool = False

    def __post_init__(self) -> None:
        self.row = aggregate(self.records)
        self.seed_rows = [aggregate([r]) | {"label": f"seed {r.seed}"} for r in self.records
                          ] if len(self.records) > 1 else []

    @property
    def ok(self) -> list[MetricsRecord]:
        return [r for r in self.records if r.ok]


def configurations(run: StoredRun) -> list[Configuration]:
    """Records grouped by configuration, in the records' order."""
    groups: dict[str, list[MetricsRecord]] = {}
    for r in run.records:
        try:
            key = Variant.parse(r.variant).config_name
        except ValueError:
            key = r.variant
        groups.setdefault(key, []).append(r)
    return [Configuration(key, rs[0].method, rs) for key, rs in groups.items()]


def select(configs: list[Configuration]) -> dict[str, Configuration]:
    """Per method, the eligible configuration with the highest mean validation accuracy;
    ties go to the lower mean validation loss, then the fewer trainable parameters, then
    the name. A configuration with a seed that did not finish is not eligible (its mean
    would be of the lucky survivors); its row says so. Test accuracy plays no part."""
    chosen: dict[str, Configuration] = {}

    def key(c: Configuration) -> tuple:
        loss = c.row["validation_loss"]
        return (-round(c.row["validation_accuracy"], 12), math.inf if loss is None else loss,
                c.row["params_trainable"] or 0, c.name)

    for c in configs:
        if c.row["validation_accuracy"] is None or c.method not in registry.METHODS:
            continue  # a folder of no known method (listed with its problem) is never chosen
        unfinished = [r for r in c.records if not r.ok]
        if unfinished:
            c.row["ineligible"] = ("not eligible for selection: " + ", ".join(
                f"{f'seed {r.seed}' if r.seed is not None else r.variant} {r.status}"
                for r in unfinished))
            continue
        best = chosen.get(c.method)
        if best is None or key(c) < key(best):
            chosen[c.method] = c
    for c in chosen.values():
        c.selected = True
        c.row["choice"] = sum(1 for o in configs if o.method == c.method) > 1
    return chosen


# --- the verdict ---------------------------------------------------------------------------

def _correct(run: StoredRun, config: Configuration) -> np.ndarray | None:
    """(seeds, test rows) correctness of a configuration's successful seeds, rows aligned
    by `row`; None when a seed's predictions are missing."""
    frames = [run.predictions.get(r.variant) for r in config.ok]
    if not frames or any(f is None for f in frames):
        return None
    frames = [f.sort_values("row") for f in frames]
    if any(not np.array_equal(f["row"].to_numpy(), frames[0]["row"].to_numpy()) for f in frames):
        return None
    return np.stack([(f["pred"] == f["label"]).to_numpy() for f in frames])


def compare(run: StoredRun, a: Configuration, b: Configuration) -> dict[str, Any] | None:
    """Test statistics of configuration a against b on the test rows both predicted.

    One seed each: McNemar's test and the paired bootstrap of the accuracy difference.
    Several seeds: each review's correctness is averaged over a configuration's seeds and
    the paired bootstrap resamples reviews (test-set noise); Welch's t-test on the seeds'
    accuracies covers training noise when both have two seeds or more."""
    ca, cb = _correct(run, a), _correct(run, b)
    if ca is None or cb is None or ca.shape[1] != cb.shape[1]:
        return None
    out: dict[str, Any] = {"a": a.name, "b": b.name, "rows": int(ca.shape[1]),
                           "seeds": [len(ca), len(cb)],
                           "bootstrap": paired_bootstrap(ca.mean(axis=0), cb.mean(axis=0),
                                                         n_boot=BOOTSTRAP_RESAMPLES)}
    if len(ca) == 1 and len(cb) == 1:
        out["mcnemar"] = mcnemar(ca[0], cb[0])
    if len(ca) > 1 and len(cb) > 1:
        out["welch"] = welch(ca.mean(axis=1), cb.mean(axis=1))
    return out


def _short(text: str) -> str:
    return text if len(text) <= ERROR_IN_HEADLINE else text[: ERROR_IN_HEADLINE - 1] + "…"


def _why_absent(configs: list[Configuration], method: str) -> str:
    label = registry.method(method).label
    records = [r for c in configs if c.method == method for r in c.records]
    if not records:
        return f"no {label} variant ran"
    parts = [f"{r.variant} {r.status} ({_short(r.error or r.reason or 'no error recorded')})"
             for r in records]
    return f"{label} did not succeed: " + "; ".join(parts)


def _describe(c: Configuration, among: int) -> str:
    """`LoRA r=16 qkvo, lr 2e-3 (best of 3 on validation): 84.4% ± 0.5 over 3 seeds`."""
    row = c.row
    text = row["label"] + (f" (best of {among} on validation)" if among > 1 else "")
    text += f": {fmt_acc(row['accuracy'])}"
    if row["n"] > 1:
        text += f" ± {100 * (row['accuracy_sd'] or 0):.1f} over {row['n']} seeds"
    return text


def claim_test(cmp: dict[str, Any]) -> tuple[str, float]:
    """The test a comparison's sentence rests on, and its p-value: McNemar's for one seed
    each; otherwise the paired bootstrap over test reviews on seed-averaged correctness,
    and where both sides have two seeds or more also Welch's t-test across seeds (the
    larger p: both test-set and training noise must be ruled out)."""
    if "mcnemar" in cmp:
        return "McNemar's test", cmp["mcnemar"]["p_value"]
    p = cmp["bootstrap"]["p_value"]
    welch_p = (cmp.get("welch") or {}).get("p_value")
    if welch_p is not None:
        return "paired bootstrap and Welch's t-test across seeds", max(p, welch_p)
    return "paired bootstrap over test reviews", p


def claims(run: StoredRun, chosen: dict[str, Configuration]) -> list[dict[str, Any]]:
    """Every comparison the verdict may put in words: LoRA against full fine-tuning, and
    each baseline against each selected trained method, each a paired test on the same
    test reviews, Holm-adjusted over the whole family."""
    trained = [c for m, c in chosen.items() if registry.method(m).trained]
    baselines = [c for m, c in chosen.items()
                 if not registry.method(m).trained and m not in NOT_COMPARED]
    pairs = [(b, t) for b in baselines for t in trained]
    if "lora" in chosen and "full_finetune" in chosen:
        pairs.insert(0, (chosen["lora"], chosen["full_finetune"]))
    out = []
    for a, b in pairs:
        cmp = compare(run, a, b)
        if cmp is not None:
            test, p = claim_test(cmp)
            out.append({"a": a, "b": b, "comparison": cmp, "test": test, "p_value": p})
    for claim, adjusted in zip(out, holm([c["p_value"] for c in out])):
        claim["p_holm"] = adjusted
        claim["significant"] = adjusted < ALPHA
        claim["sentence"] = _claim_sentence(claim, len(out))
    return out


def _claim_sentence(claim: dict[str, Any], family: int) -> str:
    a, b = claim["a"], claim["b"]
    high, low = (a, b) if a.row["accuracy"] >= b.row["accuracy"] else (b, a)
    stat = (f"{claim['test']}, Holm-adjusted {fmt_p(claim['p_holm'])} over {family} "
            f"comparison{'s' if family > 1 else ''}")

    def name(c: Configuration) -> str:
        return f"{c.row['method_label']} ({fmt_acc(c.row['accuracy'])})"

    if not claim["significant"]:
        return _capital(f"{name(high)} is within test noise of {name(low)} ({stat}).")
    text = _capital(f"{name(high)} beat {name(low)} on test ({stat})")
    more, less = high.row["input_share_read"], low.row["input_share_read"]
    if more is not None and less is not None and more > less + 1e-9:
        text += (f", with more of each review to read: {high.row['input']} against "
                 f"{low.row['input']}")
    return text + "."


def _capital(sentence: str) -> str:
    """`full fine-tuning ...` -> `Full fine-tuning ...`; `LoRA`, `TF-IDF` stay as they are."""
    return sentence[:1].upper() + sentence[1:]


def floor_interval(run: StoredRun, c: Configuration) -> list[float] | None:
    """95% bootstrap interval of a configuration's test accuracy: its stored one for a
    single seed, else over test reviews of the seed-averaged correctness."""
    if c.row["n"] == 1 and c.row["accuracy_ci_low"] is not None:
        return [c.row["accuracy_ci_low"], c.row["accuracy_ci_high"]]
    correct = _correct(run, c)
    return None if correct is None else bootstrap_accuracy_ci(correct.mean(axis=0))


def headline(run: StoredRun, configs: list[Configuration],
             chosen: dict[str, Configuration]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in run.records:
        counts[r.status] = counts.get(r.status, 0) + 1
    model = (run.config or {}).get("model")
    out: dict[str, Any] = {
        "counts": counts, "sentences": [], "details": [], "comparison": None, "kpis": [],
        "claims": [],
        "banner": (f"{model} has random weights: this run checks the plumbing, and its numbers "
                   "say nothing about the methods.") if model in RANDOM_MODELS else None,
        "selected": {m: {"configuration": c.name, "label": c.row["label"],
                         "validation_accuracy": c.row["validation_accuracy"],
                         "validation_sd": c.row["validation_sd"],
                         "accuracy": c.row["accuracy"], "accuracy_sd": c.row["accuracy_sd"],
                         "seeds": c.row["n"], "input": c.row["input"]}
                     for m, c in chosen.items()},
    }
    if not any(r.ok for r in run.records):
        tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no variants stored"
        out["sentences"].append(f"No variant finished successfully in this run ({tally}), so "
                                "there is nothing to compare.")
        return out
    among = {m: sum(1 for c in configs if c.method == m and c.row["validation_accuracy"]
                    is not None) for m in chosen}

    trained = [c for m, c in chosen.items() if registry.method(m).trained]
    if trained:
        majority = chosen.get("majority")
        floor = max(0.5, majority.row["accuracy"]) if majority else 0.5
        what = ("the larger of the majority baseline and chance" if majority else "chance")
        intervals = [floor_interval(run, c) for c in trained]
        if not any(ci is not None and ci[0] > floor for ci in intervals):
            out["sentences"].append(
                f"No selected trained configuration beat the majority floor ({fmt_acc(floor)} "
                f"on test, {what}): the 95% interval of each reaches down to it or below.")

    family = claims(run, chosen)
    out["claims"] = [{"a": c["a"].name, "b": c["b"].name, "test": c["test"],
                      "p_value": c["p_value"], "p_holm": c["p_holm"],
                      "significant": c["significant"], "sentence": c["sentence"]}
                     for c in family]
    lora, full = chosen.get("lora"), chosen.get("full_finetune")
    if lora and full:
        share = lora.row["trainable_share"]
        text = (f"On test, {_describe(lora, among['lora'])}; "
                f"{_describe(full, among['full_finetune'])}")
        if share is not None:
            text += f"; LoRA trained {fmt_pct(share)} of the parameters"
        out["sentences"].append(text + ".")
        out["comparison"] = compare(run, lora, full)
        if out["comparison"] is None:
            out["details"].append("No paired test: the test predictions of both selected "
                                  "configurations are not all available.")
        else:
            out["sentences"].append(family[0]["sentence"])
    elif lora or full:
        missing = "full_finetune" if lora else "lora"
        present = lora or full
        out["sentences"].append(f"On test, {_describe(present, among[present.method])}. "
                                f"No comparison: {_why_absent(configs, missing)}.")
    else:
        reasons = [_why_absent(configs, m) for m in ("lora", "full_finetune")]
        out["sentences"].append("No comparison of LoRA and full fine-tuning could be made: "
                                + "; ".join(reasons) + ".")

    # A baseline at or above a trained method, or within test noise of it, is news: the
    # headline says so; a trained method that clearly beat a baseline is a detail.
    for c in family:
        if registry.method(c["a"].method).trained:  # LoRA against full fine-tuning: above
            continue
        baseline_won = c["a"].row["accuracy"] >= c["b"].row["accuracy"]
        (out["sentences"] if baseline_won or not c["significant"]
         else out["details"]).append(c["sentence"])

    for m, c in chosen.items():
        out["kpis"].append({"method": m, "value": fmt_acc(c.row["accuracy"]),
                            "label": c.row["label"] + (f" · {c.row['n']} seeds"
                                                       if c.row["n"] > 1 else "")})
    out["details"].insert(0, _selection_note(run, among))
    if family:
        out["details"].insert(1, (
            f"Every comparison in words is a paired test on the same "
            f"{family[0]['comparison']['rows']:,} test reviews, Holm-corrected over the family "
            f"of {len(family)} (each baseline against each selected trained method, and LoRA "
            f"against full fine-tuning): \"beat\" means an adjusted p below {ALPHA:g}, "
            "otherwise \"within test noise of\"."))
    budgets = _input_note(chosen)
    if budgets:
        out["details"].insert(1, budgets)
    return out


def _input_note(chosen: dict[str, Configuration]) -> str | None:
    """`Input: LoRA, full fine-tuning read the first 32 and last 94 tokens (89% of test
    reviews are longer); TF-IDF + logistic regression reads the whole review.`"""
    groups: dict[str, list[Configuration]] = {}
    for c in chosen.values():
        if c.row["input"]:
            groups.setdefault(c.row["input"], []).append(c)
    if len(groups) < 1:
        return None
    parts = []
    for text, cs in groups.items():
        names = ", ".join(c.row["method_label"] for c in cs)
        cut = cs[0].row["input_cut_share"]
        parts.append(f"{names}: {text}" + (f" ({fmt_pct(cut)} of test reviews are longer)"
                                           if cut else ""))
    return "Input per review: " + "; ".join(parts) + "."


def _selection_note(run: StoredRun, among: dict[str, int]) -> str:
    val = next((r.validation_examples for r in run.records if r.validation_examples), None)
    tuned = ", ".join(f"{registry.method(m).label}: {n}" for m, n in among.items()
                      if registry.method(m).trained)
    text = ("Each method's configuration was selected by its mean validation accuracy over "
            f"seeds ({val:,} validation reviews, drawn from the training split); the test "
            "subset was scored once per variant and played no part in any choice.") if val else (
            "No validation scores were stored, so no configuration could be selected.")
    return text + (f" Configurations tried: {tuned}." if tuned else "")


def comparison_sentences(cmp: dict[str, Any], a_label: str, b_label: str) -> list[str]:
    """The test statistics in words (the template prints them as they are)."""
    out = []
    m = cmp.get("mcnemar")
    if m:
        stat = f", χ² = {m['statistic']:.2f}" if m["statistic"] is not None else ""
        p = "p < 0.001" if m["p_value"] < 0.001 else f"p = {m['p_value']:.3f}"
        verdict = "a significant" if m["p_value"] < 0.05 else "no significant"
        out.append(f"McNemar's test on {cmp['rows']:,} paired test reviews (one seed each): "
                   f"{m['b']:,} only {a_label} got right, {m['c']:,} only {b_label} got right; "
                   f"{p} ({m['method']}{stat}): {verdict} difference at the 5% level.")
    bs = cmp["bootstrap"]
    seeds = (" each review's correctness averaged over the seeds of each configuration "
             f"({cmp['seeds'][0]} and {cmp['seeds'][1]});" if max(cmp["seeds"]) > 1 else "")
    out.append(f"Accuracy difference {a_label} − {b_label}: {fmt_points(bs['diff'])} points, "
               f"95% paired-bootstrap interval [{fmt_points(bs['diff_ci95'][0])}, "
               f"{fmt_points(bs['diff_ci95'][1])}] over test reviews;{seeds} "
               f"{bs['n_boot']:,} resamples (test-set noise only).")
    w = cmp.get("welch")
    if w and w["p_value"] is None:
        out.append("Welch's t-test across seeds is undefined: the seeds' test accuracies do "
                   "not vary.")
    elif w:
        p = "p < 0.001" if w["p_value"] < 0.001 else f"p = {w['p_value']:.3f}"
        out.append(f"Welch's t-test on the seeds' test accuracies (training noise): "
                   f"t = {w['statistic']:.2f}, {p}.")
    elif max(cmp["seeds"]) == 1:
        out.append("One seed per configuration: training noise is not measured; run more "
                   "seeds to see it.")
    return out
