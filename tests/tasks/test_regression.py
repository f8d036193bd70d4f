"""Since the last comparable run (tasks/report/regression.py), on stored-run fixtures:
two runs of one experiment fingerprint are compared on the same test reviews; a clearly
worse second run is a regression (report section, summary.json, index, check); a run of
another fingerprint is never compared."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.paths import RunPaths
from tasks.report import build_report
from tasks.report.regression import Regression, check
from tests.tasks.fixtures_report import (
    FULL,
    FULL_WRONG,
    LABELS,
    LORA_A,
    LORA_WRONG,
    N_VAL,
    VAL_LABELS,
    Stored,
    full_fields,
    lora_fields,
    majority,
    make_run,
    tfidf,
)

WEIGHTS = "sha256:" + "ab" * 32


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    """The figures are tested in test_report.py and take most of a report's time; these
    tests build a dozen reports, so they leave them out."""
    monkeypatch.setattr("tasks.report._draw", lambda *args, **kwargs: None)


def _provenance(commit: str, torch: str, weights: str = WEIGHTS) -> dict:
    return {"git_commit": commit, "torch": torch, "cuda": "none (CPU build)",
            "transformers": "5.24.0", "python": "3.11.9", "device": "cpu",
            "device_name": "AMD EPYC 9B14", "host": "worker-1", "precision": "fp32",
            "model_weights": weights}


def _write_data(paths: RunPaths, test_texts: list[str] | None = None) -> None:
    """The run's three subsets, as the download step stores them."""
    texts = test_texts or [f"test review {i}" for i in range(len(LABELS))]
    frames = {"train": pd.DataFrame({"text": [f"train review {i}" for i in range(64)],
                                     "label": [i % 2 for i in range(64)]}),
              "validation": pd.DataFrame({"text": [f"val review {i}" for i in range(N_VAL)],
                                          "label": VAL_LABELS}),
              "test": pd.DataFrame({"text": texts, "label": LABELS})}
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        frame.to_parquet(paths.split_parquet(split), index=False)


def stored_run(root, run_id: str, finished_at: str, lora_wrong=LORA_WRONG, commit="c0ffee1",
               torch="2.13.0", weights=WEIGHTS, test_texts=None, data_source=None, **config):
    """A successful run: majority, TF-IDF, LoRA r=4 qkvo (83% on test), full fine-tuning
    (85%), each trained variant with its provenance; its data subsets stored."""
    prov = _provenance(commit, torch, weights)
    variants = [majority(), tfidf(),
                Stored(LORA_A, lora_wrong, range(16), fields={**lora_fields(), "provenance": prov}),
                Stored(FULL, FULL_WRONG, range(14), fields={**full_fields(), "provenance": prov})]
    paths = make_run(root, run_id, variants, finished_at=finished_at, **config)
    if data_source:  # the same rows read from another folder
        stored = json.loads(paths.config_json.read_text())
        paths.config_json.write_text(json.dumps({**stored, "data": data_source}))
    _write_data(paths, test_texts)
    return paths


def _report(paths: RunPaths) -> tuple[str, dict]:
    report = build_report(paths.run_dir, paths.reports)
    return (report.read_text(encoding="utf-8"),
            json.loads((report.parent / "summary.json").read_text()))


FIRST, SECOND, THIRD = ("2026-11-20T10:00:00+00:00", "2026-11-27T10:00:00+00:00",
                        "2026-12-04T10:00:00+00:00")


def test_the_second_run_of_a_fingerprint_is_compared_with_the_first(tmp_path):
    html1, summary1 = _report(stored_run(tmp_path, "run-1", FIRST))
    assert summary1["since_last_comparable"]["previous"] is None
    assert "No earlier successful run has this experiment" in html1

    html2, summary2 = _report(stored_run(tmp_path, "run-2", SECOND, commit="d00d2", torch="2.14.0"))
    since = summary2["since_last_comparable"]
    assert summary2["fingerprint"]["id"] == summary1["fingerprint"]["id"]
    assert since["previous"]["run_id"] == "run-1" and since["regression"] is False
    rows = {r["method"]: r for r in since["comparisons"]}
    assert set(rows) == {"tfidf_logreg", "lora", "full_finetune"}  # majority is a constant
    # identical predictions: a zero difference, an interval around it, McNemar p = 1
    assert rows["lora"]["diff"] == 0 and rows["lora"]["ci95"] == [0, 0]
    assert rows["lora"]["rows"] == len(LABELS) and rows["lora"]["mcnemar_p"] == 1.0
    changed = {c["what"]: (c["before"], c["after"]) for c in since["changes"] if c["changed"]}
    assert changed == {"commit": ("c0ffee1", "d00d2"), "torch": ("2.13.0", "2.14.0")}
    assert 'id="since-last"' in html2 and "Since the last comparable run" in html2
    assert "<code>run-1</code>" in html2 and "within noise" in html2
    assert check(tmp_path / "reports" / "run-2" / "summary.json") == "no regression since run run-1"


def test_clearly_worse_predictions_are_a_regression_in_report_summary_index_and_check(tmp_path):
    _report(stored_run(tmp_path, "run-1", FIRST))
    # LoRA now wrong on 90 of 200 test reviews (55%) instead of 34 (83%)
    html, summary = _report(stored_run(tmp_path, "run-2", SECOND, lora_wrong=range(90),
                                       commit="badc0de"))
    since = summary["since_last_comparable"]
    lora = next(r for r in since["comparisons"] if r["method"] == "lora")
    assert since["regression"] is True and since["regressed"] == ["lora"]
    assert lora["diff"] == pytest.approx(0.55 - 0.83) and lora["ci95"][1] < 0
    assert lora["regression"] and lora["mcnemar_p"] < 0.001
    full = next(r for r in since["comparisons"] if r["method"] == "full_finetune")
    assert full["regression"] is False  # unchanged
    assert "Regression: LoRA scored lower" in html
    index = (tmp_path / "reports" / "index.html").read_text()
    row = next(chunk for chunk in index.split("<tr")[1:] if "<code>run-2</code>" in chunk)
    assert "regression-row" in row and 'badge fail' in row and "<code>run-1</code>" in row
    first = next(chunk for chunk in index.split("<tr")[1:] if "<code>run-1</code></a>" in chunk)
    assert "regression-row" not in first and "badge fail" not in first
    with pytest.raises(Regression, match=r"LoRA 83\.0% → 55\.0% .*commit c0ffee1 → badc0de"):
        check(tmp_path / "reports" / "run-2" / "summary.json")


def test_a_regressed_run_is_not_the_baseline_of_the_next(tmp_path):
    _report(stored_run(tmp_path, "run-1", FIRST))
    _report(stored_run(tmp_path, "run-2", SECOND, lora_wrong=range(90)))
    _, summary = _report(stored_run(tmp_path, "run-3", THIRD, lora_wrong=range(90)))
    since = summary["since_last_comparable"]
    assert since["previous"]["run_id"] == "run-1" and since["regression"] is True


@pytest.mark.parametrize("change", [
    {"weights": "sha256:" + "cd" * 32},  # other model weights
    {"test_texts": [f"another review {i}" for i in range(len(LABELS))]},  # other test reviews
    {"max_length": 32},  # another setting
])
def test_a_different_fingerprint_is_never_compared(tmp_path, change):
    _, summary1 = _report(stored_run(tmp_path, "run-1", FIRST))
    _, summary2 = _report(stored_run(tmp_path, "run-2", SECOND, lora_wrong=range(90), **change))
    assert summary2["fingerprint"]["id"] != summary1["fingerprint"]["id"]
    assert summary2["since_last_comparable"]["previous"] is None
    check(tmp_path / "reports" / "run-2" / "summary.json")  # nothing to compare: no raise


def test_only_earlier_runs_count_and_a_data_source_path_is_not_part_of_the_fingerprint(tmp_path):
    _report(stored_run(tmp_path, "later", SECOND))
    _, summary = _report(stored_run(tmp_path, "earlier", FIRST, data_source="/elsewhere"))
    assert summary["since_last_comparable"]["previous"] is None  # "later" finished after it
    _, summary = _report(stored_run(tmp_path, "latest", THIRD, data_source="/elsewhere"))
    assert summary["since_last_comparable"]["previous"]["run_id"] == "later"


def test_a_run_without_stored_subsets_says_why_it_is_not_compared(tmp_path):
    paths = stored_run(tmp_path, "run-1", FIRST)
    paths.test_parquet.unlink()
    html, summary = _report(paths)
    assert summary["fingerprint"]["id"] is None
    assert "cannot be fingerprinted: the run&#39;s data subsets (data/*.parquet)" in html
