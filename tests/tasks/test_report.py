"""The report and the index, built from fixture runs (tests/tasks/fixtures_report.py):
selection on validation, an honest headline, seeds aggregated, escaped output, byte-stable
files, and the index of all runs."""

from __future__ import annotations

import csv
import io
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from tasks import registry
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths, read_json, report_slug, write_json
from tasks.registry import Variant
from tasks.report import build_index, build_report, plots, stats
from tasks.report.format import fmt_p
from tasks.report.stats import holm, mcnemar
from tests.tasks.fixtures_report import (
    FAILED,
    FAILED_ERROR,
    FULL,
    FULL_WRONG,
    IMG,
    LABELS,
    LORA_A,
    LORA_B,
    LORA_WRONG,
    NOT_RUN,
    SEED_NOTES,
    XSS,
    Stored,
    full,
    full_fields,
    lora,
    lora_fields,
    majority,
    make_run,
    tfidf,
    tokens_record,
)

ESCAPED_XSS = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _data(html: str) -> dict:
    """The raw data embedded in the page."""
    match = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL
    )
    assert match, "report-data script missing"
    return json.loads(match.group(1))


@pytest.fixture(autouse=True)
def _figures_only_where_read(request, monkeypatch):
    """The figures take most of a report's time (matplotlib): the module's shared
    `full_run` has them (built before this runs), and so do the tests marked `figures`;
    the others, which read the page's text, tables and summary, build theirs without."""
    if "figures" not in request.keywords:
        monkeypatch.setattr("tasks.report._draw", lambda *args, **kwargs: None)


def _report(tmp_path, **kwargs):
    """(html, summary, report folder) of a fixture run."""
    paths = make_run(tmp_path, **kwargs)
    report = build_report(paths.run_dir, tmp_path / "reports")
    return (report.read_text(encoding="utf-8"),
            json.loads((report.parent / "summary.json").read_text()), report.parent)


def _row_html(html: str, name: str) -> str:
    """The page's <tbody> of the configuration whose (first) row is `name`."""
    bodies = [c.split("</tbody>")[0] for c in html.split("<tbody")[1:]]
    chunks = [c for c in bodies if f"<code>{name}</code>" in c]
    assert len(chunks) == 1, name
    return chunks[0]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The default fixture run, reported once for the read-only tests of this module."""
    root = tmp_path_factory.mktemp("full")
    paths = make_run(root)
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
    for v in (Variant("majority"), Variant("tfidf_logreg"), Variant("seed_heuristic"), LORA_A,
              LORA_B, FAILED, NOT_RUN, FULL):
        assert f"<code>{v.name}</code>" in html, v.name
    assert f"RuntimeError: {FAILED_ERROR}".replace(XSS, ESCAPED_XSS) in html
    assert _row_html(html, NOT_RUN.name).count("not run") >= 1  # asked for, never started


def test_headline_is_computed_from_the_stored_numbers(full_run):
    _, _, html = full_run
    # LoRA 166/200 vs full 170/200; 36,000 of 4,000,000 = 0.90%; two LoRA configurations
    expected = ("On test, LoRA r=4 qkvo, lr 2e-3, seed 42 (best of 2 on validation): 83.0%; "
                "full fine-tuning, lr 5e-4, seed 42: 85.0%; LoRA trained 0.90% of the "
                "parameters.")
    assert expected in html
    head = _data(html)["headline"]
    claim = head["claims"][0]  # LoRA against full fine-tuning, in a family of 3
    assert claim["p_value"] == pytest.approx(scipy_stats.binomtest(8, 20, 0.5).pvalue)
    assert claim["p_holm"] == pytest.approx(holm([c["p_value"] for c in head["claims"]])[0])
    assert head["sentences"][:2] == [expected, (
        "Full fine-tuning (85.0%) is within test noise of LoRA (83.0%) (McNemar's test, "
        f"Holm-adjusted {fmt_p(claim['p_holm'])} over 3 comparisons).")]
    # TF-IDF (80.0%) against each: within test noise goes in the headline, a clear win of
    # the trained method in the bullets beneath it
    for c in head["claims"][1:]:
        assert c["sentence"] in (head["sentences"] if not c["significant"] else head["details"])
    assert head["comparison"]["a"] == "lora_r4_qkvo_lr2e-3"
    assert head["comparison"]["b"] == "full_finetune_lr5e-4"
    assert head["comparison"]["bootstrap"]["diff"] == pytest.approx(0.83 - 0.85)
    assert "Configurations tried: LoRA: 2, full fine-tuning: 1." in head["details"][0]
    assert "100 validation reviews" in head["details"][0]


def test_mcnemar_p_value_matches_scipy_on_the_fixture_predictions(full_run):
    _, _, html = full_run
    lora_right = ~np.isin(np.arange(len(LABELS)), list(LORA_WRONG))
    full_right = ~np.isin(np.arange(len(LABELS)), list(FULL_WRONG))
    b = int(np.sum(lora_right & ~full_right))
    c = int(np.sum(~lora_right & full_right))
    assert (b, c) == (8, 12)
    expected = scipy_stats.binomtest(b, b + c, 0.5).pvalue  # b + c < 25: exact test
    mcnemar = _data(html)["headline"]["comparison"]["mcnemar"]
    assert (mcnemar["b"], mcnemar["c"]) == (b, c)
    assert mcnemar["method"] == "exact binomial"
    assert mcnemar["p_value"] == pytest.approx(expected, rel=1e-12)
    assert (f"McNemar&#39;s test on 200 paired test reviews (one seed each): 8 only LoRA got "
            f"right, 12 only full fine-tuning got right; p = {expected:.3f} (exact binomial)") in html
    assert "One seed per configuration: training noise is not measured" in html
    assert "Welch" not in html


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


def test_welch_matches_scipy_and_needs_two_seeds_a_side():
    a, b = np.array([0.85, 0.83, 0.81]), np.array([0.90, 0.88, 0.86])
    expected = scipy_stats.ttest_ind(a, b, equal_var=False)
    result = stats.welch(a, b)
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    with warnings.catch_warnings():  # scipy warns of the zero variance it then reports
        warnings.simplefilter("ignore", RuntimeWarning)
        assert stats.welch(np.array([0.8, 0.8]), np.array([0.7, 0.7]))["p_value"] is None
    with pytest.raises(ValueError, match="two seeds or more"):
        stats.welch(a[:1], b)


# --- selection on validation and the verdict -------------------------------------------------

def test_the_configuration_with_the_best_validation_accuracy_is_selected_not_the_best_on_test(
        tmp_path):
    """A: validation 90%, test 80%; B: validation 85%, test 88%. The report picks A."""
    a, b = lora(4, "qkvo"), lora(8, "qkvo")
    html, summary, _ = _report(tmp_path, variants=[
        majority(),
        Stored(a, range(40), range(10), fields=lora_fields()),
        Stored(b, range(24), range(15), fields=lora_fields(trainable=72_000)),
        Stored(FULL, FULL_WRONG, range(14), fields=full_fields()),
    ], methods=("majority", "lora", "full_finetune"), ranks=(4, 8))
    row_a, row_b = _row_html(html, a.name), _row_html(html, b.name)
    assert row_a.startswith(' class="config selected"') and "badge chosen" in row_a
    assert row_b.startswith(' class="config"') and "badge chosen" not in row_b
    assert summary["selection"] == "validation"
    selected = summary["selected"]["lora"]
    assert selected["configuration"] == a.config_name == "lora_r4_qkvo_lr2e-3"
    assert (selected["validation_accuracy"], selected["accuracy"]) == (0.90, 0.80)
    assert summary["headline"].startswith(
        "On test, LoRA r=4 qkvo, lr 2e-3, seed 42 (best of 2 on validation): 80.0%; ")
    assert "88.0%" not in summary["headline"]
    assert summary["comparison"]["a"] == a.config_name


def test_ties_on_validation_go_to_the_fewer_trainable_parameters(tmp_path):
    a, b = lora(8, "qkvo"), lora(4, "qkvo")
    _, summary, _ = _report(tmp_path, variants=[
        Stored(a, range(30), range(10), fields=lora_fields(trainable=72_000)),
        Stored(b, range(40), range(10), fields=lora_fields(trainable=36_000)),
    ], methods=("lora",), ranks=(4, 8))
    assert summary["selected"]["lora"]["configuration"] == b.config_name


def test_no_learning_headline_says_first_that_nothing_beat_the_majority_baseline(tmp_path):
    """Every trained variant predicts one class: their test intervals cover 50%."""
    html, summary, _ = _report(tmp_path, variants=[
        majority(),
        Stored(LORA_A, constant=1, fields=lora_fields()),
        Stored(FULL, constant=0, fields=full_fields()),
    ], methods=("majority", "lora", "full_finetune"))
    assert summary["headline"].startswith(
        "No selected trained configuration beat the majority floor (50.0% on test, the larger "
        "of the majority baseline and chance): the 95% interval of each reaches down to it or "
        "below.")
    assert "LoRA r=4 qkvo, lr 2e-3, seed 42: 50.0%" in summary["headline"]
    assert summary["headline"].replace("'", "&#39;") in html


def test_learning_above_the_majority_interval_is_not_called_no_learning(full_run):
    summary = json.loads((full_run[1].parent / "summary.json").read_text())
    assert "No selected trained configuration beat" not in summary["headline"]


def test_a_random_weights_model_gets_the_plumbing_banner(full_run, tmp_path):
    _, report, html = full_run  # the smoke preset's tiny-distilbert
    assert '<p class="banner" id="plumbing">tiny-distilbert has random weights' in html
    assert json.loads((report.parent / "summary.json").read_text())["random_weights"] is True
    html, summary, _ = _report(tmp_path, model="distilbert-base-uncased")
    assert 'id="plumbing"' not in html and summary["random_weights"] is False


def test_a_clear_gap_is_beat_with_the_holm_adjusted_p_and_the_input_budgets(tmp_path):
    """TF-IDF (whole reviews) wrong on 20 test rows, full fine-tuning (64 tokens) on rows
    0-29 and LoRA on rows 8-41: TF-IDF is right wherever they are wrong but on rows 0-19."""
    html, summary, _ = _report(tmp_path, variants=[
        majority(), tfidf(test_wrong=range(20)),
        Stored(LORA_A, LORA_WRONG, range(16), fields=lora_fields()),
        Stored(FULL, FULL_WRONG, range(14), fields=full_fields()),
    ], methods=("majority", "tfidf_logreg", "lora", "full_finetune"))
    tfidf_right = ~np.isin(np.arange(len(LABELS)), list(range(20)))
    p = {}
    for name, wrong in (("lora", LORA_WRONG), ("full", FULL_WRONG)):
        other = ~np.isin(np.arange(len(LABELS)), list(wrong))
        p[name] = mcnemar(tfidf_right, other)["p_value"]
    adjusted = holm([binomtest_p(8, 20), p["lora"], p["full"]])
    assert adjusted[1] < 0.05 and adjusted[2] < 0.05
    budget = ", with more of each review to read: the whole review against the first 62 tokens."
    for label, acc, q in (("LoRA", "83.0%", adjusted[1]),
                          ("full fine-tuning", "85.0%", adjusted[2])):
        sentence = (f"TF-IDF + logistic regression (90.0%) beat {label} ({acc}) on test "
                    f"(McNemar's test, Holm-adjusted {fmt_p(q)} over 3 comparisons){budget}")
        assert sentence in summary["headline"] and sentence.replace("'", "&#39;") in html
    claims = {(c["a"], c["b"]): c for c in summary["claims"]}
    assert claims[("tfidf_logreg", "lora_r4_qkvo_lr2e-3")]["p_holm"] == pytest.approx(adjusted[1])
    row = next(line for line in (tmp_path / "reports").glob("*/comparison.md").__next__()
               .read_text().splitlines() if line.startswith("| TF-IDF"))
    assert "| the whole review |" in row


def binomtest_p(b: int, n: int) -> float:
    return scipy_stats.binomtest(b, n, 0.5).pvalue


def test_a_one_point_lead_with_many_discordant_reviews_is_within_test_noise(tmp_path):
    """TF-IDF 84% and LoRA 83% disagree on 66 reviews: no claim that one beat the other."""
    _, summary, _ = _report(tmp_path, variants=[
        tfidf(test_wrong=range(100, 132)),  # 84%, wrong where LoRA is right
        Stored(LORA_A, LORA_WRONG, range(16), fields=lora_fields()),
        Stored(FULL, FULL_WRONG, range(14), fields=full_fields()),
    ], methods=("tfidf_logreg", "lora", "full_finetune"))
    assert ("TF-IDF + logistic regression (84.0%) is within test noise of LoRA (83.0%) "
            "(McNemar's test, Holm-adjusted p = ") in summary["headline"]
    assert " beat " not in summary["headline"]
    claim = next(c for c in summary["claims"] if c["a"] == "tfidf_logreg"
                 and c["b"] == "lora_r4_qkvo_lr2e-3")
    assert claim["significant"] is False and claim["p_holm"] >= claim["p_value"]


def test_a_lucky_variant_that_was_not_selected_does_not_lift_the_majority_floor(tmp_path):
    """LoRA r=8 is right on every test review but lost on validation; the selected r=4
    predicts one class. The floor sentence judges the selected configurations only."""
    _, summary, _ = _report(tmp_path, variants=[
        majority(),
        Stored(LORA_A, constant=1, val_wrong=range(10), fields=lora_fields()),
        Stored(LORA_B, [], range(60), fields=lora_fields(trainable=72_000)),
        Stored(FULL, constant=0, val_wrong=range(50), fields=full_fields()),
    ], methods=("majority", "lora", "full_finetune"), ranks=(4, 8))
    assert summary["selected"]["lora"]["configuration"] == LORA_A.config_name
    assert summary["headline"].startswith("No selected trained configuration beat the majority "
                                          "floor (50.0% on test")


def test_ties_on_validation_accuracy_break_on_validation_loss(tmp_path):
    """Same validation accuracy; r=8 has the lower validation loss but more parameters."""
    a, b = lora(4, "qkvo"), lora(8, "qkvo")
    _, summary, _ = _report(tmp_path, variants=[
        Stored(a, range(30), range(10), fields=lora_fields(trainable=36_000)),
        Stored(b, range(40), range(10), fields={**lora_fields(trainable=72_000)}),
    ], methods=("lora",), ranks=(4, 8))
    records = {v.config_name: MetricsRecord.read(p) for v, p in (
        (a, _metrics(tmp_path, a)), (b, _metrics(tmp_path, b)))}
    assert records[a.config_name].validation_loss == records[b.config_name].validation_loss
    # make r=8's validation loss lower by rewriting its record, as a better-calibrated model
    record = records[b.config_name]
    record.validation_loss -= 0.01
    record.write(RunPaths.for_run("fixture-run", tmp_path / "artifacts", tmp_path / "reports"))
    build_report(tmp_path / "artifacts" / "runs" / "fixture-run", tmp_path / "reports")
    summary = json.loads(next((tmp_path / "reports").glob("*/summary.json")).read_text())
    assert summary["selected"]["lora"]["configuration"] == b.config_name


def _metrics(root, variant: Variant):
    return root / "artifacts" / "runs" / "fixture-run" / "results" / variant.name / "metrics.json"


def test_a_configuration_with_a_failed_seed_is_never_selected(tmp_path):
    """r=8 has the best validation accuracy on its surviving seed, but its other seed
    failed: r=4 is selected and r=8's row says why it was not eligible."""
    html, summary, _ = _report(tmp_path, variants=[
        Stored(lora(4, seed=1), range(30), range(20), fields=lora_fields()),
        Stored(lora(4, seed=2), range(30), range(20), fields=lora_fields()),
        Stored(lora(8, seed=1), range(30), range(5), fields=lora_fields(trainable=72_000)),
        Stored(lora(8, seed=2), error="killed"),
    ], methods=("lora",), ranks=(4, 8), seeds=(1, 2))
    assert summary["selected"]["lora"]["configuration"] == lora(4).config_name
    assert "not eligible for selection: seed 2 failed" in html


# --- several seeds -------------------------------------------------------------------------

SEEDS = (1, 2, 3)
LORA_SEED_WRONG = {1: range(30), 2: range(34), 3: range(38)}  # 85, 83, 81%
FULL_SEED_WRONG = {1: range(20), 2: range(24), 3: range(28)}  # 90, 88, 86%


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    variants = [majority()]
    variants += [Stored(lora(seed=s), LORA_SEED_WRONG[s], range(10 + s), fields=lora_fields())
                 for s in SEEDS]
    variants += [Stored(full(seed=s), FULL_SEED_WRONG[s], range(8 + s), fields=full_fields())
                 for s in SEEDS]
    paths = make_run(root, variants=variants, methods=("majority", "lora", "full_finetune"),
                     seeds=SEEDS)
    report = build_report(paths.run_dir, root / "reports")
    return report.read_text(encoding="utf-8"), report.parent


def test_seeds_of_a_configuration_are_one_row_with_mean_sd_and_n_and_seed_rows_beneath(
        seeds_run):
    html, _ = seeds_run
    body = _row_html(html, "lora_r4_qkvo_lr2e-3")
    rows = body.split("<tr ")[1:]
    assert [r.split('"')[1] for r in rows] == ["main", "seed", "seed", "seed"]
    # one LoRA configuration: selected, but with no choice to show no "selected" badge
    assert 'LoRA r=4 qkvo, lr 2e-3<span class="sub2">' in rows[0] and ">3/3<" in rows[0]
    assert "83.0%" in rows[0] and "± 2.0 over 3 seeds" in rows[0]
    for row, seed, acc in zip(rows[1:], SEEDS, ("85.0%", "83.0%", "81.0%")):
        assert f"></span>seed {seed}<" in row and acc in row
        assert f"<code>lora_r4_qkvo_lr2e-3_s{seed}</code>" in row
    md = (seeds_run[1] / "comparison.md").read_text()
    assert "| LoRA r=4 qkvo, lr 2e-3 | the first 62 tokens (95.5% of test reviews cut) | 3/3 |" in md and "83.0% (± 2.0 over 3 seeds)" in md
    frame = pd.read_csv(seeds_run[1] / "comparison.csv").set_index("name")
    assert frame.loc["lora_r4_qkvo_lr2e-3", "seeds"] == "1 2 3"
    assert frame.loc["lora_r4_qkvo_lr2e-3", "accuracy"] == pytest.approx(0.83)
    assert frame.loc["lora_r4_qkvo_lr2e-3", "accuracy_sd"] == pytest.approx(0.02)


def test_statistics_average_over_seeds_and_use_welchs_test(seeds_run):
    html, _ = seeds_run
    head = _data(html)["headline"]
    assert head["sentences"][0] == (
        "On test, LoRA r=4 qkvo, lr 2e-3: 83.0% ± 2.0 over 3 seeds; full fine-tuning, lr 5e-4: "
        "88.0% ± 2.0 over 3 seeds; LoRA trained 0.90% of the parameters.")
    claim = head["claims"][0]
    assert claim["test"] == "paired bootstrap and Welch's t-test across seeds"
    assert claim["p_value"] == max(head["comparison"]["bootstrap"]["p_value"],
                                   head["comparison"]["welch"]["p_value"])
    comparison = head["comparison"]
    assert comparison["seeds"] == [3, 3] and "mcnemar" not in comparison
    expected = scipy_stats.ttest_ind([0.85, 0.83, 0.81], [0.90, 0.88, 0.86], equal_var=False)
    assert comparison["welch"]["p_value"] == pytest.approx(expected.pvalue)
    assert comparison["bootstrap"]["diff"] == pytest.approx(0.83 - 0.88)
    text = " ".join(head["comparison_text"])
    assert "each review's correctness averaged over the seeds of each configuration (3 and 3)" in text
    assert (f"Welch's t-test on the seeds' test accuracies (training noise): "
            f"t = {expected.statistic:.2f}, p = {expected.pvalue:.3f}.") in text
    assert "McNemar" not in text
    assert "Welch&#39;s t-test on the seeds&#39; test accuracies" in html


def test_summary_records_the_selection_rule_and_each_methods_mean_and_sd(seeds_run):
    summary = json.loads((seeds_run[1] / "summary.json").read_text())
    assert summary["selection"] == "validation"
    lora_sel, full_sel = summary["selected"]["lora"], summary["selected"]["full_finetune"]
    assert lora_sel["configuration"] == "lora_r4_qkvo_lr2e-3" and lora_sel["seeds"] == 3
    assert lora_sel["accuracy"] == pytest.approx(0.83)
    assert lora_sel["accuracy_sd"] == pytest.approx(0.02)
    assert lora_sel["validation_accuracy"] == pytest.approx(np.mean([0.89, 0.88, 0.87]))
    assert lora_sel["validation_sd"] == pytest.approx(0.01)
    assert full_sel["configuration"] == "full_finetune_lr5e-4"
    assert full_sel["accuracy"] == pytest.approx(0.88)
    assert full_sel["accuracy_sd"] == pytest.approx(0.02)
    assert summary["selected"]["majority"]["accuracy_sd"] is None  # one run: no sd
    assert summary["counts"] == {"ok": 7}


# --- output files --------------------------------------------------------------------------

def test_comparison_csv_has_one_row_per_configuration_with_its_numbers(full_run):
    frame = pd.read_csv(full_run[1].parent / "comparison.csv")
    expected = [Variant("majority"), Variant("tfidf_logreg"), Variant("seed_heuristic"), LORA_A,
                NOT_RUN, LORA_B, FAILED, FULL]
    assert frame["name"].tolist() == [v.name for v in expected]  # registry order, then dims
    rows = frame.set_index("name")
    acc = rows["accuracy"]
    assert acc["majority"] == pytest.approx(0.5)
    assert acc["tfidf_logreg"] == pytest.approx(0.8)
    assert acc[LORA_A.name] == pytest.approx(0.83)
    assert acc[FULL.name] == pytest.approx(0.85)
    assert rows.loc[LORA_A.name, "validation_accuracy"] == pytest.approx(0.84)
    assert np.isnan(acc[FAILED.name])
    assert rows.loc[FAILED.name, "status"] == "failed"
    assert rows.loc[NOT_RUN.name, "status"] == "not run"
    row = rows.loc[LORA_A.name]
    assert (row["latency_merged_ms"], row["latency_unmerged_ms"]) == (2.1, 2.6)
    assert (row["method"], row["n"], row["n_total"]) == ("lora", 1, 1)


def test_comparison_markdown_is_a_table_of_every_configuration(full_run):
    lines = (full_run[1].parent / "comparison.md").read_text().splitlines()
    assert lines[0].startswith("| Configuration | Input | Seeds | Validation acc. | Test acc. |")
    assert lines[1].startswith("|---")
    assert len(lines) == 2 + 8
    row = next(line for line in lines if line.startswith("| LoRA r=4 qkvo, lr 2e-3, seed 42 "))
    assert "| 84.0% | 83.0% (" in row and "36,000 (0.90% of 4,000,000)" in row
    assert "2.10 ms (unmerged 2.60 ms · base 2.00 ms)" in row  # merged, then the others


def test_seed_heuristic_notes_are_shown(full_run):
    assert SEED_NOTES.replace("'", "&#39;") in full_run[2]


def test_untrusted_text_is_escaped_everywhere(full_run):
    _, _, html = full_run
    assert "<script>alert" not in html
    assert ESCAPED_XSS in html  # the failed error and a stored validation value
    assert f"RuntimeError: {FAILED_ERROR}" in json.dumps(_data(html))  # raw data keeps it


def test_markup_and_formulas_never_reach_the_markdown_or_csv_unescaped(tmp_path):
    paths = make_run(tmp_path)
    failed = paths.variant_dir(FAILED.name) / "metrics.json"
    write_json(failed, {**read_json(failed), "error": f"boom {IMG}"})
    odd = paths.results_dir / IMG  # a results folder of no variant, hand-written
    odd.mkdir()
    write_json(odd / "metrics.json", {"variant": IMG, "method": "lora", "model": "m",
                                      "preset": "smoke", "status": "failed",
                                      "error": '=HYPERLINK("http://evil.example")',
                                      "reason": "@SUM(1)"})
    report = build_report(paths.run_dir, tmp_path / "reports")
    md = (report.parent / "comparison.md").read_text()
    text = (report.parent / "comparison.csv").read_text()
    for out in (md, text, report.read_text()):
        assert "<img" not in out and "&lt;img src=x onerror=alert(1)&gt;" in out
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    assert "'=HYPERLINK(\"http://evil.example\")" in cells and "'@SUM(1)" in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "@")]
    assert not [c for c in cells if c[:1] == "-" and not re.fullmatch(r"-[\d.e+-]+", c)]


@pytest.mark.figures
def test_report_is_byte_stable(full_run):
    paths, report, html = full_run
    folder = report.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    build_report(paths.run_dir, folder.parent)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert report.read_text(encoding="utf-8") == html


def test_svg_ids_are_unique_across_the_page(full_run):
    html = full_run[2]
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    labels = re.findall(r'<svg role="img" aria-label="(\w+)"', html)
    assert labels == ["accuracy", "params", "loss", "eval", "cost", "rank", "confusion", "tokens"]


def test_css_has_every_methods_colour_class(full_run):
    html = full_run[2]
    for m in registry.METHODS.values():
        assert f".m-{m.name} {{ background: {m.color}; }}" in html


def test_single_method_run_says_no_comparison_could_be_made(tmp_path):
    html, summary, _ = _report(tmp_path, run_id="only-majority", variants=[majority()],
                               methods=("majority",))
    assert ("No comparison of LoRA and full fine-tuning could be made: no LoRA variant ran; "
            "no full fine-tuning variant ran.") in html
    assert summary["selected"] == {"majority": {
        "accuracy": 0.5, "accuracy_sd": None, "configuration": "majority",
        "label": "majority class", "seeds": 1, "validation_accuracy": 0.5,
        "validation_sd": None, "input": "no review text (training labels only)"}}
    assert summary["comparison"] is None
    assert 'aria-label="cost"' not in html  # nothing was trained: no cost chart


def test_one_trained_method_missing_says_why(tmp_path):
    _, summary, _ = _report(tmp_path, variants=[
        Stored(LORA_A, LORA_WRONG, range(16), fields=lora_fields()),
        Stored(FULL, error="CUDA out of memory")], methods=("lora", "full_finetune"))
    assert summary["headline"] == (
        "On test, LoRA r=4 qkvo, lr 2e-3, seed 42: 83.0%. No comparison: full fine-tuning did "
        "not succeed: full_finetune_lr5e-4_s42 failed (RuntimeError: CUDA out of memory).")


def test_run_with_only_failed_variants_says_so(tmp_path):
    html, _, _ = _report(tmp_path, run_id="all-failed", variants=[
        Stored(FAILED, error=FAILED_ERROR), Stored(FULL, error="killed")],
        methods=("lora", "full_finetune"), ranks=(8,), targets=("qv",))
    assert "No variant finished successfully in this run (2 failed)" in html
    assert "Nothing to plot" in html
    assert ESCAPED_XSS in html and "<script>alert" not in html


def test_run_without_results_or_config_still_gets_a_report(tmp_path):
    run_dir = tmp_path / "artifacts" / "runs" / "empty-run"
    run_dir.mkdir(parents=True)
    html = build_report(run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "No variant finished successfully" in html
    assert "Run parameters not available: empty-run/config.json was not stored" in html


def test_missing_validation_and_tokens_are_noted(tmp_path):
    html, summary, _ = _report(tmp_path, validation=False, tokens=False)
    assert "Validation result not available: data/validation.json was not stored" in html
    assert "Tokenization summary not available: data/tokens.json was not stored" in html
    assert summary["headline"].startswith("On test, LoRA r=4 qkvo")  # the rest is unaffected


def test_broken_metrics_and_missing_predictions_are_reported(tmp_path):
    paths = make_run(tmp_path)
    (paths.variant_dir("tfidf_logreg") / "metrics.json").write_text("{not json")
    (paths.variant_dir("majority") / "predictions.parquet").unlink()
    (paths.variant_dir("half_written")).mkdir()
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "metrics.json could not be read" in html
    assert "predictions.parquet is missing" in html
    assert "no metrics.json in the results folder" in html


def test_hand_edited_records_are_shown_with_their_problems(tmp_path):
    paths = make_run(tmp_path)
    path = paths.variant_dir(LORA_B.name) / "metrics.json"
    record = read_json(path)
    del record["model"]
    record.update(accuracy="high", status="finished")
    write_json(path, record)
    stray = paths.results_dir / "full_finetune_s42"  # an older run's name: no variant now
    stray.mkdir()
    write_json(stray / "metrics.json", {**read_json(paths.variant_dir("majority") /
                                                    "metrics.json"), "variant": "full_finetune_s42"})
    html = build_report(paths.run_dir, tmp_path / "reports").read_text()
    summary = json.loads((tmp_path / "reports" / "fixture-run" / "summary.json").read_text())
    assert "metrics.json lacks model" in html
    assert "metrics.json: unknown status &#39;finished&#39;" in html
    assert "&#39;full_finetune_s42&#39; is not a variant name of any known method" in html
    assert set(summary["selected"]) == {"majority", "tfidf_logreg", "seed_heuristic", "lora",
                                        "full_finetune"}  # the stray folder is never selected


def test_build_report_refuses_a_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope", tmp_path / "reports")


@pytest.mark.figures
def test_odd_stored_values_become_notes_not_crashes(tmp_path):
    paths = make_run(tmp_path)
    write_json(paths.validation_json, ["not", "an", "object"])
    tokens = tokens_record()
    tokens["stats"]["train"]["histogram"] = {"bin_edges": [0, 1], "counts": [1, 2, 3]}
    write_json(paths.tokens_json, tokens)
    metrics = paths.variant_dir(LORA_A.name) / "metrics.json"
    record = read_json(metrics)
    record.update(params_trainable="many", loss_history=[{"step": "x"}, None, 0.5])
    record["parameter_breakdown"]["matrices"] = 5
    write_json(metrics, record)
    html = build_report(paths.run_dir, tmp_path / "reports").read_text(encoding="utf-8")
    assert "Validation result could not be read" in html and "expected a JSON object" in html
    assert "Could not be drawn from the stored values" in html  # the token histogram
    assert "params_trainable should be" in html  # the record's problem, listed
    assert "On test, LoRA r=4 qkvo, lr 2e-3, seed 42 (best of 2 on validation): 83.0%" in html


# --- the index -------------------------------------------------------------------------------

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
    assert "On test, LoRA r=4 qkvo, lr 2e-3, seed 42 (best of 2 on validation): 83.0%" in html


def _small_run(tmp_path, run_id: str, finished_at: str = "2026-11-20T10:00:00+00:00"):
    """A run of the majority baseline only: quick to report, for the index tests."""
    return make_run(tmp_path, run_id=run_id, variants=[majority()], finished_at=finished_at)


def test_trend_labels_tell_apart_runs_finished_a_minute_apart(tmp_path):
    reports = tmp_path / "reports"
    for run_id, finished in (("first", "2026-11-20T10:00:00+00:00"),
                             ("second", "2026-11-20T10:01:00+00:00")):
        build_report(_small_run(tmp_path, run_id, finished).run_dir, reports)
    html = (reports / "index.html").read_text(encoding="utf-8")
    svg = html[html.index('aria-label="trend"'):]
    svg = svg[: svg.index("</svg>")]
    assert "2026-11-20 10:00 UTC" in svg and "2026-11-20 10:01 UTC" in svg
    assert html.index('href="./second/report.html"') < html.index('href="./first/report.html"')


def test_index_of_a_single_run_has_no_trend_plot(full_run):
    html = (full_run[1].parent.parent / "index.html").read_text(encoding="utf-8")
    assert 'href="./fixture-run/report.html"' in html
    assert "<svg" not in html


def test_index_of_an_empty_folder_says_there_are_no_reports(tmp_path):
    html = build_index(tmp_path).read_text(encoding="utf-8")
    assert "No reports yet" in html


def test_index_links_airflow_run_ids_to_their_report_slug_folders(tmp_path):
    reports = tmp_path / "reports"
    ids = ["manual__2026-11-29T05:00:00+00:00", "scheduled__2026-11-29T00:00:00+00:00"]
    for run_id in ids:
        build_report(_small_run(tmp_path, run_id).run_dir, reports)
    html = (reports / "index.html").read_text(encoding="utf-8")
    for run_id in ids:
        slug = report_slug(run_id)
        assert ":" not in slug and "+" not in slug
        assert f'href="./{slug}/report.html"' in html
        assert (reports / slug / "report.html").exists()
        assert f"<code>{run_id}</code>" in html  # the id itself is what people read
    assert sorted(p.name for p in reports.iterdir() if p.is_dir()) == sorted(
        report_slug(r) for r in ids)


def test_an_unreadable_summary_is_noted_on_the_index(tmp_path):
    build_report(_small_run(tmp_path, "good").run_dir, tmp_path / "reports")
    (tmp_path / "reports" / "broken").mkdir()
    (tmp_path / "reports" / "broken" / "summary.json").write_text("[1, 2")
    html = build_index(tmp_path / "reports").read_text(encoding="utf-8")
    assert "A run summary could not be read: broken:" in html
    assert 'href="./good/report.html"' in html


# --- plots ----------------------------------------------------------------------------------

def test_every_method_has_its_registry_colour_and_label_in_the_plots():
    for m in registry.METHODS.values():
        assert plots.method_color(m.name) == m.color
        assert plots.method_label(m.name) == m.label
    assert plots.method_color("unknown") == plots.UNKNOWN_COLOR
    assert plots.method_label("unknown") == "unknown"


def test_rank_plot_is_drawn_only_for_a_rank_sweep():
    row = {"method": "lora", "targets": "qkvo", "lr": "2e-3"}
    sweep = [{**row, "rank": r, "validation_accuracy": a} for r, a in ((4, 0.8), (8, 0.82),
                                                                      (16, 0.83))]
    assert plots.accuracy_vs_rank(sweep).startswith("<svg")
    assert plots.accuracy_vs_rank(sweep[:1]) is None


def test_cost_chart_needs_a_trained_method():
    baseline = {"method": "tfidf_logreg", "label": "TF-IDF", "train_seconds": 2.0}
    assert plots.cost_bars([baseline]) is None
    assert plots.cost_bars([baseline, {**baseline, "method": "lora", "label": "LoRA"}]).startswith(
        "<svg")


def test_long_loss_histories_are_thinned_for_the_page():
    steps = list(range(1, 20_001))
    noisy = np.random.default_rng(0).random(len(steps)).tolist()  # defeats path simplification
    svg = plots.loss_curves([{"label": "v", "method": "lora", "steps": steps, "values": noisy}])
    # raw trace + moving average, each at most MAX_POINTS vertices (unthinned: ~13,600)
    assert svg.count("\nL ") < 2 * plots.MAX_POINTS


def test_each_row_says_which_try_wrote_it_so_a_rerun_shows(tmp_path):
    from tests.tasks.fixtures_report import default_variants

    variants = [Stored(s.variant, s.test_wrong, s.val_wrong, s.constant,
                       {**s.fields, "attempt": 2} if s.variant == LORA_A else s.fields, s.error)
                for s in default_variants()]
    html, _, folder = _report(tmp_path, variants=variants, ranks=(4, 8), targets=("qkvo", "qv"))
    rerun = _row_html(html, LORA_A.name)
    assert re.search(r'class="sub2 try rerun">try 2 · \d\d \w{3} \d\d:\d\d UTC<', rerun)
    assert re.search(r'class="sub2 try">try 1 · ', _row_html(html, FULL.name))
    assert "try" not in _row_html(html, NOT_RUN.name)  # never ran: no try to name
    rows = list(csv.DictReader(io.StringIO((folder / "comparison.csv").read_text())))
    assert {r["name"]: r["attempts"] for r in rows}[LORA_A.name] == "2"


def test_loss_caption_describes_what_the_plot_draws():
    short = {"label": "a", "method": "lora", "steps": list(range(1, 11)), "values": [1.0] * 10}
    long = {**short, "steps": list(range(1, 101)), "values": [1.0] * 100}
    huge = {**short, "steps": list(range(1, 5001)), "values": [1.0] * 5000}
    assert plots.loss_caption([short]) == ("Each line joins the loss at every logged step (too "
                                           "few steps to smooth).")
    assert plots.loss_caption([long]).startswith("Faint lines: the loss at every logged step; "
                                                 "solid lines: its moving average")
    assert plots.loss_caption([short, long]).startswith("Lines with more than 30 logged steps")
    assert "means of 800 equal bins" in plots.loss_caption([huge])
    # the drawing: a faint (alpha) raw line only where the caption promises one
    assert "stroke-opacity" not in plots.loss_curves([short])
    assert "stroke-opacity" in plots.loss_curves([long])


def test_scatter_labels_cover_no_point_and_no_other_label_and_stay_in_the_plot():
    from matplotlib.figure import Figure

    # the crowded case from the issue: LoRA points around full fine-tuning's
    points = [(36_000, 0.83, "LoRA r=4 qkvo, lr 2e-3, seed 42"),
              (72_000, 0.80, "LoRA r=8 qkvo, lr 2e-3, seed 42"),
              (20_001, 0.80, "TF-IDF + logistic regression"),
              (4_000_000, 0.85, "full fine-tuning, lr 5e-4, seed 42"),
              (1_200_000, 0.84, "LoRA r=1024 all-linear, lr 3e-4, seed 7"),
              (1, 0.5, "majority class")]
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    for x, y, _ in points:
        ax.plot(x, y, "o", markersize=6)
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.25)
    boxes = plots.place_labels(fig, ax, points)
    markers, labels = boxes[:len(points)], boxes[len(points):]
    frame = ax.get_window_extent()

    def overlap(a, b):
        return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])

    for i, label in enumerate(labels):
        assert frame.x0 <= label[0] and label[2] <= frame.x1, points[i][2]
        assert frame.y0 <= label[1] and label[3] <= frame.y1, points[i][2]
        assert not any(overlap(label, m) for m in markers), points[i][2]
        assert not any(overlap(label, other) for other in labels[:i]), points[i][2]


def test_confusion_titles_wrap_instead_of_being_cut():
    label = "LoRA r=16 all-linear, lr 3e-4, seed 42"
    svg = plots.confusion_grid([{"label": label, "matrix": [[1, 2], [3, 4]]}] * 4)
    titles = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "LoRA r=16 all-linear, lr" in titles and "3e-4, seed 42" in titles


def test_a_data_step_that_stopped_the_run_is_named_at_the_top_of_the_report(tmp_path,
                                                                            monkeypatch):
    from tasks import failures

    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "reports"))
    with pytest.raises(ValueError), failures.recorded("fixture-run", "validate_dataset"):
        raise ValueError("test split: 3 rows have an empty text")
    html, _, _ = _report(tmp_path)
    assert ('<p class="note" id="stopped">The run stopped in validate_dataset (try 1): test '
            "split: 3 rows have an empty text.") in html
