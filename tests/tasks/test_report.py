"""The report and the index, built from fixture runs (tests/tasks/fixtures_report.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from tasks import plots, stats
from tasks.paths import read_json, write_json
from tasks.report import build_index, build_report
from tests.tasks.fixtures_report import (
    FAILED,
    FAILED_ERROR,
    FULL_WRONG,
    LABELS,
    LORA_WRONG,
    SEED_NOTES,
    XSS,
    make_run,
    tokens_record,
)


def _data(html: str) -> dict:
    """The raw data embedded in the page."""
    match = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL
    )
    assert match, "report-data script missing"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The six-variant fixture run, reported once for the read-only tests of this module."""
    root = tmp_path_factory.mktemp("full")
    paths = make_run(root, extra={"note": XSS})
    report = build_report(paths.run_dir, root / "reports")
    return paths, report, report.read_text(encoding="utf-8")


def test_report_writes_html_csv_markdown_summary_and_index(full_run):
    paths, report, _ = full_run
    folder = paths.run_dir.parents[2] / "reports" / "fixture-run"
    assert report == folder / "report.html"
    for name in ("report.html", "comparison.csv", "comparison.md", "summary.json"):
        assert (folder / name).stat().st_size > 0, name
    assert (folder.parent / "index.html").exists()


def test_report_lists_every_variant_and_the_failed_error(full_run):
    _, _, html = full_run
    for name in (
        "majority",
        "tfidf_logreg",
        "seed_heuristic",
        "lora_r4_qkvo_s42",
        "full_finetune_s42",
        FAILED,
        "linear_probe_s42",
    ):
        assert f"<code>{name}</code>" in html, name
    escaped = FAILED_ERROR.replace("<", "&lt;").replace(">", "&gt;")
    assert escaped in html
    assert "not run" in html  # linear_probe_s42 was asked for by the config but never ran


def test_headline_is_computed_from_the_stored_numbers(full_run):
    _, _, html = full_run
    # LoRA 166/200 vs full 170/200 = 97.647%; 36,000 of 4,000,000 = 0.90%; 0.14 s / 0.10 s = 1.4x
    expected = (
        "LoRA r=4 on qkvo reached 97.6% of full fine-tuning accuracy (83.0% vs 85.0%) "
        "while training 0.90% of the parameters, 1.4× faster per step."
    )
    assert expected in html
    comparison = _data(html)["headline"]["comparison"]
    assert comparison["accuracy_ratio"] == pytest.approx(166 / 170)
    assert comparison["trainable_share"] == pytest.approx(0.009)
    assert comparison["speedup_per_step"] == pytest.approx(1.4)


def test_mcnemar_p_value_matches_scipy_on_the_fixture_predictions(full_run):
    _, _, html = full_run
    lora_right = ~np.isin(np.arange(len(LABELS)), list(LORA_WRONG))
    full_right = ~np.isin(np.arange(len(LABELS)), list(FULL_WRONG))
    b = int(np.sum(lora_right & ~full_right))
    c = int(np.sum(~lora_right & full_right))
    assert (b, c) == (8, 12)
    expected = scipy_stats.binomtest(b, b + c, 0.5).pvalue  # b + c < 25: exact test
    paired = _data(html)["headline"]["paired"]
    assert paired["mcnemar"]["b"] == b and paired["mcnemar"]["c"] == c
    assert paired["mcnemar"]["method"] == "exact binomial"
    assert paired["mcnemar"]["p_value"] == pytest.approx(expected, rel=1e-12)
    assert f"p = {expected:.3f} (exact binomial)" in html
    assert paired["bootstrap"]["diff"] == pytest.approx(0.83 - 0.85)


def test_mcnemar_uses_continuity_corrected_chi2_from_25_discordant_pairs():
    a = np.zeros(100, dtype=bool)
    bb = np.zeros(100, dtype=bool)
    a[:20] = True  # b = 20: A right, B wrong
    bb[20:30] = True  # c = 10: A wrong, B right
    result = stats.mcnemar(a, bb)
    chi2 = (abs(20 - 10) - 1) ** 2 / 30
    assert result["method"] == "chi-squared with continuity correction"
    assert result["statistic"] == pytest.approx(chi2)
    assert result["p_value"] == pytest.approx(scipy_stats.chi2.sf(chi2, 1))


def test_mcnemar_without_discordant_pairs_gives_p_one():
    same = np.array([True, False, True])
    assert stats.mcnemar(same, same)["p_value"] == 1.0


def test_paired_bootstrap_interval_contains_the_observed_difference():
    rng = np.random.default_rng(1)
    a, b = rng.random(500) < 0.8, rng.random(500) < 0.7
    result = stats.paired_bootstrap(a, b, n_boot=400)
    lo, hi = result["diff_ci95"]
    assert lo < result["diff"] < hi
    assert result == stats.paired_bootstrap(a, b, n_boot=400)  # seeded: same interval twice


def test_comparison_csv_has_one_row_per_variant_with_its_accuracy(full_run):
    frame = pd.read_csv(full_run[1].parent / "comparison.csv")
    assert sorted(frame["variant"]) == sorted(
        [
            "majority",
            "tfidf_logreg",
            "seed_heuristic",
            "linear_probe_s42",
            "lora_r4_qkvo_s42",
            "full_finetune_s42",
            FAILED,
        ]
    )
    acc = frame.set_index("variant")["accuracy"]
    assert acc["majority"] == pytest.approx(0.5)
    assert acc["tfidf_logreg"] == pytest.approx(0.8)
    assert acc["lora_r4_qkvo_s42"] == pytest.approx(0.83)
    assert acc["full_finetune_s42"] == pytest.approx(0.85)
    assert np.isnan(acc[FAILED])
    status = frame.set_index("variant")["status"]
    assert status[FAILED] == "failed" and status["linear_probe_s42"] == "not run"
    row = frame.set_index("variant").loc["lora_r4_qkvo_s42"]
    assert (row["latency_merged_ms"], row["latency_unmerged_ms"]) == (2.1, 2.6)


def test_comparison_markdown_is_a_table_of_every_variant(full_run):
    lines = (full_run[1].parent / "comparison.md").read_text().splitlines()
    assert lines[0].startswith("| Variant |") and lines[1].startswith("|---")
    assert len(lines) == 2 + 7
    lora = next(line for line in lines if line.startswith("| lora_r4_qkvo_s42 "))
    assert "83.0%" in lora and "36,000 (0.90%)" in lora and "merged 2.10 ms" in lora


def test_seed_heuristic_notes_are_shown(full_run):
    assert SEED_NOTES.replace("'", "&#39;") in full_run[2]


def test_untrusted_text_is_escaped_everywhere(full_run):
    _, _, html = full_run
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # error, validation value, config extra
    assert _data(html)["config"]["extra"]["note"] == XSS  # the raw data keeps the original text


def test_report_is_byte_stable(full_run):
    paths, report, html = full_run
    folder = report.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    build_report(paths.run_dir, folder.parent)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert report.read_text(encoding="utf-8") == html


def test_svg_ids_are_unique_across_the_page(full_run):
    ids = re.findall(r'\bid="([^"]+)"', full_run[2])
    assert len(ids) == len(set(ids))
    assert full_run[2].count("<svg ") == 7  # six plots and the token-length histogram


def test_single_variant_run_says_no_comparison_could_be_made(tmp_path):
    paths = make_run(
        tmp_path,
        run_id="only-majority",
        variants=("majority",),
        baselines=("majority",),
        full_finetune=False,
    )
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "No comparison of LoRA and full fine-tuning could be made" in html
    assert "no full fine-tuning variant ran" in html
    assert "Most accurate variant of the run: <b>majority</b>" in html
    summary = json.loads((tmp_path / "reports" / "only-majority" / "summary.json").read_text())
    assert summary["best"] == {"baseline": {"variant": "majority", "accuracy": 0.5}}
    assert summary["comparison"] is None


def test_run_with_only_failed_variants_says_so(tmp_path):
    paths = make_run(
        tmp_path,
        run_id="all-failed",
        variants=(FAILED, "failed_full"),
        baselines=(),
        full_finetune=False,
        ranks=(8,),
        targets=("qv",),
    )
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "No variant finished successfully in this run (2 failed)" in html
    assert "Nothing to plot" in html
    assert "&lt;script&gt;" in html and "<script>alert" not in html


def test_run_without_results_or_config_still_gets_a_report(tmp_path):
    run_dir = tmp_path / "artifacts" / "runs" / "empty-run"
    run_dir.mkdir(parents=True)
    html = build_report(run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "No variant finished successfully" in html
    assert "Run parameters not available: empty-run/config.json was not stored" in html


def test_missing_validation_and_tokens_are_noted(tmp_path):
    paths = make_run(tmp_path, validation=False, tokens=False)
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "Validation result not available: data/validation.json was not stored" in html
    assert "Tokenization summary not available: data/tokens.json was not stored" in html
    assert "97.6% of full fine-tuning accuracy" in html  # the rest of the report is unaffected


def test_broken_metrics_and_missing_predictions_are_reported(tmp_path):
    paths = make_run(tmp_path)
    (paths.variant_dir("tfidf_logreg") / "metrics.json").write_text("{not json")
    (paths.variant_dir("majority") / "predictions.parquet").unlink()
    (paths.variant_dir("half_written")).mkdir()
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "metrics.json could not be read" in html
    assert "predictions.parquet is missing" in html
    assert "no metrics.json in the results folder" in html


def test_build_report_refuses_a_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope", tmp_path / "reports")


def test_index_lists_runs_newest_first_with_a_trend_plot(tmp_path):
    reports = tmp_path / "reports"
    for run_id, finished in (
        ("run-b", "2026-11-21T10:00:00+00:00"),
        ("run-a", "2026-11-19T10:00:00+00:00"),
        ("run-c", "2026-11-20T10:00:00+00:00"),
    ):
        build_report(make_run(tmp_path, run_id=run_id, finished_at=finished).run_dir, reports)
    html = (reports / "index.html").read_text(encoding="utf-8")
    positions = [html.index(f'href="./{r}/report.html"') for r in ("run-b", "run-c", "run-a")]
    assert positions == sorted(positions)
    assert 'aria-label="trend"' in html
    assert "97.6% of full fine-tuning accuracy" in html


def test_index_of_a_single_run_has_no_trend_plot(full_run):
    html = (full_run[1].parent.parent / "index.html").read_text(encoding="utf-8")
    assert 'href="./fixture-run/report.html"' in html
    assert "<svg" not in html


def test_index_of_an_empty_folder_says_there_are_no_reports(tmp_path):
    html = build_index(tmp_path).read_text(encoding="utf-8")
    assert "No reports yet" in html


def test_odd_stored_values_become_notes_not_crashes(tmp_path):
    paths = make_run(tmp_path)
    write_json(paths.validation_json, ["not", "an", "object"])
    tokens = tokens_record()
    tokens["stats"]["train"]["histogram"] = {"bin_edges": [0, 1], "counts": [1, 2, 3]}
    write_json(paths.tokens_json, tokens)
    metrics = paths.variant_dir("lora_r4_qkvo_s42") / "metrics.json"
    record = read_json(metrics)
    record.update(params_trainable="many", loss_history=[{"step": "x"}, None, 0.5])
    record["parameter_breakdown"]["matrices"] = 5
    write_json(metrics, record)
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "Validation result could not be read" in html and "expected a JSON object" in html
    assert "Could not be drawn from the stored values" in html  # the token histogram
    assert (
        "LoRA r=4 on qkvo reached 97.6% of full fine-tuning accuracy (83.0% vs 85.0%), 1.4×" in html
    )


def test_index_links_airflow_run_ids_with_colons_safely(tmp_path):
    run_id = "manual__2026-11-29T05:00:00+00:00"
    build_report(make_run(tmp_path, run_id=run_id).run_dir, tmp_path / "reports")
    html = (tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    # percent-encoded, so "manual__2026-11-29T05" is never read as a URL scheme
    assert 'href="./manual__2026-11-29T05%3A00%3A00%2B00%3A00/report.html"' in html


def test_summary_json_holds_the_headline_numbers(full_run):
    summary = json.loads((full_run[1].parent / "summary.json").read_text())
    assert summary["best"]["lora"] == {"variant": "lora_r4_qkvo_s42", "accuracy": 0.83}
    assert summary["best"]["full_finetune"] == {"variant": "full_finetune_s42", "accuracy": 0.85}
    assert summary["counts"] == {"ok": 5, "failed": 1, "not run": 1}
    assert summary["finished_at"] == "2026-11-20T10:00:00+00:00"
    assert summary["headline"].startswith("LoRA r=4 on qkvo reached 97.6%")


def test_rank_plot_is_drawn_only_for_a_rank_sweep():
    row = {"method": "lora", "targets": "qkvo", "seed": 42}
    sweep = [{**row, "rank": r, "accuracy": a} for r, a in ((4, 0.8), (8, 0.82), (16, 0.83))]
    assert plots.accuracy_vs_rank(sweep).startswith("<svg")
    assert plots.accuracy_vs_rank(sweep[:1]) is None


def test_long_loss_histories_are_thinned_for_the_page():
    steps = list(range(1, 20_001))
    noisy = np.random.default_rng(0).random(len(steps)).tolist()  # defeats path simplification
    svg = plots.loss_curves([{"variant": "v", "steps": steps, "values": noisy}])
    # raw trace + moving average, each at most MAX_POINTS vertices (unthinned: ~13,600)
    assert svg.count("\nL ") < 2 * plots.MAX_POINTS
