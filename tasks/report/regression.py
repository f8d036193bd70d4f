"""Since the last comparable run: is this run worse than the latest earlier one of the
same experiment?

Two runs are comparable when their experiment fingerprint is equal: the model and the hash
of its weights, the content of the three subsets (so the same test reviews), and every
setting of config.json except where the data came from (sizes, hyper-parameters, seeds,
methods). The code commit, the library versions, the device and the precision may differ:
those are what such a comparison is for, and the section names the ones that changed.

Each method's selected configuration is compared with the previous run's on the same test
reviews by `compute.compare` (paired bootstrap of the accuracy difference with seeds
averaged; McNemar's test for one seed each; Welch's t-test across seeds). A drop whose
95% paired-bootstrap interval lies wholly below zero is a regression: `summary.json`
carries it, the index marks it and the DAG's `check_regression` task fails the run.
The previous run is the latest one, finished before this one, whose variants all
succeeded (or were not applicable) and which was not itself a regression, so a
regression is not silently taken as the new baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from tasks import registry
from tasks.paths import artifacts_root, read_json
from tasks.report.compute import Configuration, compare, configurations, select
from tasks.report.load import StoredRun, load_stored_run

GOOD_STATUSES = {"ok", "not_applicable"}  # a successful run has no variant in another state
SETTINGS_NOT_IN_FINGERPRINT = ("data",)  # where the data came from; its content is hashed
PROVENANCE_KEYS = ("git_commit", "torch", "cuda", "transformers", "device_name", "precision")
PROVENANCE_LABELS = {"git_commit": "commit", "torch": "torch", "cuda": "CUDA",
                     "transformers": "transformers", "device_name": "device",
                     "precision": "precision"}


class Regression(RuntimeError):
    """A selected configuration is worse than in the last comparable run."""


def _data_fingerprints(run_dir: Path) -> dict[str, str] | None:
    """sha256 of each subset's (label, text) rows, as the tokenization cache keys them."""
    import pandas as pd

    from tasks.tokenize import data_fingerprint

    out = {}
    for split in ("train", "validation", "test"):
        path = run_dir / "data" / f"{split}.parquet"
        if not path.exists():
            return None
        out[split] = data_fingerprint(pd.read_parquet(path, columns=["label", "text"]))
    return out


def _model_weights(run: StoredRun) -> list[str]:
    return sorted({str(r.provenance["model_weights"]) for r in run.records
                   if r.ok and isinstance(r.provenance, dict) and r.provenance.get("model_weights")})


def fingerprint(run: StoredRun, run_dir: Path) -> dict[str, Any]:
    """{"id": ...} when the run can be fingerprinted, else {"id": None, "why": ...}."""
    if run.config is None:
        return {"id": None, "why": "config.json was not stored"}
    data = _data_fingerprints(run_dir)
    if data is None:
        return {"id": None, "why": "the run's data subsets (data/*.parquet) are not stored"}
    weights = _model_weights(run)
    encoder = any(registry.METHODS[m].uses_encoder for m in run.config.get("methods", [])
                  if m in registry.METHODS)
    if encoder and (not weights or any(w.startswith("unknown") for w in weights)):
        return {"id": None, "why": "no successful variant recorded the model's weights hash"}
    settings = {k: v for k, v in sorted(run.config.items()) if k not in SETTINGS_NOT_IN_FINGERPRINT}
    material = {"model": run.config.get("model"), "model_weights": weights, "data": data,
                "settings": settings}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode())
    return {"id": digest.hexdigest()[:16], "model_weights": weights, "data": data}


def successful(summary: dict[str, Any]) -> bool:
    counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else {}
    return bool(counts) and set(counts) <= GOOD_STATUSES and counts.get("ok", 0) > 0


def _regressed(summary: dict[str, Any]) -> bool:
    since = summary.get("since_last_comparable")
    return isinstance(since, dict) and since.get("regression") is True


def previous_summary(reports_root: Path, run_id: str, fingerprint_id: str,
                     finished_at: str | None) -> tuple[str, dict[str, Any]] | None:
    """(report folder, summary) of the latest comparable run finished before `finished_at`."""
    found = []
    for path in sorted(Path(reports_root).glob("*/summary.json")):
        try:
            s = read_json(path)
        except (OSError, ValueError):
            continue  # the index lists unreadable summaries
        if not isinstance(s, dict) or s.get("run_id") == run_id:
            continue
        fp = s.get("fingerprint") if isinstance(s.get("fingerprint"), dict) else {}
        done = s.get("finished_at")
        if (fp.get("id") == fingerprint_id and isinstance(done, str) and successful(s)
                and not _regressed(s) and (finished_at is None or done < finished_at)):
            found.append((done, str(s.get("run_id")), path.parent.name, s))
    if not found:
        return None
    _, _, folder, summary = max(found, key=lambda x: x[:2])
    return folder, summary


def _prefixed(config: Configuration, prefix: str) -> Configuration:
    records = [dataclasses.replace(r, variant=f"{prefix}{r.variant}") for r in config.records]
    return Configuration(f"{prefix}{config.name}", config.method, records)


def _versus(now: StoredRun, prev: StoredRun, a: Configuration,
            b: Configuration) -> dict[str, Any] | None:
    """`compute.compare` of a (this run) against b (the previous run): both runs'
    predictions in one StoredRun, variant names prefixed so they cannot collide."""
    both = dataclasses.replace(now, predictions={
        **{f"now:{k}": v for k, v in now.predictions.items()},
        **{f"prev:{k}": v for k, v in prev.predictions.items()}})
    return compare(both, _prefixed(a, "now:"), _prefixed(b, "prev:"))


def _values(run: StoredRun, env: dict[str, Any] | None, key: str) -> list[str]:
    """What the run's successful variants recorded for a provenance key (older runs: the
    run's environment.json, for the commit and versions)."""
    got = {str(r.provenance[key]) for r in run.records
           if r.ok and isinstance(r.provenance, dict) and r.provenance.get(key)}
    if not got and env:
        packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
        fallback = {"git_commit": env.get("git_commit"), "torch": packages.get("torch"),
                    "transformers": packages.get("transformers")}.get(key)
        if fallback:
            got = {str(fallback)}
    return sorted(got)


def changes(now: StoredRun, prev: StoredRun) -> list[dict[str, Any]]:
    """Commit, torch, CUDA, transformers, device and precision: before and after, and
    whether they differ."""
    out = []
    for key in PROVENANCE_KEYS:
        before, after = _values(prev, prev.environment, key), _values(now, now.environment, key)
        out.append({"what": PROVENANCE_LABELS[key], "before": ", ".join(before) or "not recorded",
                    "after": ", ".join(after) or "not recorded",
                    "changed": bool(before and after and before != after)})
    return out


def since_last_comparable(run: StoredRun, run_dir: Path, reports_root: Path,
                          fp: dict[str, Any], finished_at: str | None) -> dict[str, Any]:
    """The section's content (also stored in summary.json as `since_last_comparable`)."""
    if fp.get("id") is None:
        return {"previous": None, "regression": False,
                "why": f"This run cannot be fingerprinted: {fp.get('why')}."}
    found = previous_summary(reports_root, run.run_id, fp["id"], finished_at)
    if found is None:
        return {"previous": None, "regression": False,
                "why": f"No earlier successful run has this experiment's fingerprint "
                       f"({fp['id']}): same model and weights, same subsets, same settings."}
    folder, summary = found
    prev_dir = Path(summary.get("run_dir") or artifacts_root() / "runs" / str(summary["run_id"]))
    previous = {"run_id": summary["run_id"], "finished_at": summary.get("finished_at"),
                "href": f"../{folder}/{summary.get('report') or 'report.html'}"}
    if not (prev_dir / "results").is_dir():
        return {"previous": previous, "regression": False, "comparisons": [],
                "why": f"The previous run's results are no longer stored ({prev_dir})."}
    prev = load_stored_run(prev_dir)
    now_chosen = select(configurations(run))
    prev_chosen = select(configurations(prev))
    rows = []
    for method in registry.METHODS:
        a, b = now_chosen.get(method), prev_chosen.get(method)
        if a is None or b is None or method == "majority":  # majority: a constant, no model
            continue
        cmp = _versus(run, prev, a, b)
        row = {"method": method, "method_label": registry.method(method).label,
               "label": a.row["label"], "previous_label": b.row["label"],
               "same_configuration": a.name == b.name,
               "accuracy": a.row["accuracy"], "previous_accuracy": b.row["accuracy"],
               "validation_accuracy": a.row["validation_accuracy"],
               "previous_validation_accuracy": b.row["validation_accuracy"],
               "regression": False, "improvement": False, "test": None}
        if cmp is not None:
            low, high = cmp["bootstrap"]["diff_ci95"]
            row.update(diff=cmp["bootstrap"]["diff"], ci95=[low, high], rows=cmp["rows"],
                       seeds=cmp["seeds"], regression=high < 0, improvement=low > 0,
                       mcnemar_p=(cmp.get("mcnemar") or {}).get("p_value"),
                       welch_p=(cmp.get("welch") or {}).get("p_value"))
        rows.append(row)
    return {"previous": previous, "comparisons": rows, "changes": changes(run, prev),
            "regression": any(r["regression"] for r in rows),
            "regressed": [r["method"] for r in rows if r["regression"]]}


def check(summary_path: Path | str) -> str:
    """The DAG's `check_regression`: raise `Regression` when summary.json says this run
    regressed, naming each method with its drop and interval; else a one-line verdict."""
    summary = read_json(summary_path)
    since = summary.get("since_last_comparable") if isinstance(summary, dict) else None
    if not isinstance(since, dict) or since.get("previous") is None:
        return (since or {}).get("why") or "no comparable run: nothing to compare with"
    prev = since["previous"]["run_id"]
    worse = [r for r in since.get("comparisons", []) if r.get("regression")]
    if worse:
        parts = [f"{r['method_label']} {100 * r['previous_accuracy']:.1f}% → "
                 f"{100 * r['accuracy']:.1f}% ({100 * r['diff']:+.1f} points, 95% interval "
                 f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}])" for r in worse]
        changed = [f"{c['what']} {c['before']} → {c['after']}" for c in since.get("changes", [])
                   if c.get("changed")]
        raise Regression(f"regression since run {prev} on the same test reviews: "
                         + "; ".join(parts) + ". Changed: "
                         + ("; ".join(changed) or "nothing recorded") + ".")
    return f"no regression since run {prev}"
