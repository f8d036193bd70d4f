"""`loraflow bench --sweep --quick`: two LoRA variants through run_variant, one at a time
and two at once, with the same accuracies both ways; full fine-tuning at 16 x 512; the
numbers in sweep.md are the ones measured in sweep.json."""

from __future__ import annotations

import json

import pytest

from bench import sweep

pytestmark = pytest.mark.slow  # seconds on an idle machine: four tiny trainings, two steps


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory, imdb_dir):
    out = tmp_path_factory.mktemp("sweep")
    assert sweep.main(["--quick", "--out", str(out), "--data", str(imdb_dir)]) == 0
    return json.loads((out / "sweep.json").read_text()), (out / "sweep.md").read_text()


def test_both_arms_train_every_variant_with_the_same_accuracy(quick_sweep):
    s = quick_sweep[0]["sweep"]
    assert s["variants"] == ["lora_r4_qkvo_lr1e-3_s42", "lora_r4_qkvo_lr2e-3_s42"]
    arms = s["arms"]
    assert (arms["one_at_a_time"]["k"], arms["k_at_once"]["k"]) == (1, 2)
    for arm in arms.values():
        assert arm["ok"] == arm["variants"] == 2
        assert [p["exitcode"] for p in arm["processes"]] == [0, 0]
        assert {r["device"] for r in arm["rows"]} == {"cpu"}
        assert arm["variants_per_hour"] == pytest.approx(3600 * 2 / arm["wall_seconds"])
    # one at a time: the second process starts after the first ended; two at once: together
    first, second = sorted(arms["one_at_a_time"]["processes"], key=lambda p: p["start_s"])
    assert second["start_s"] >= first["end_s"]
    a, b = sorted(arms["k_at_once"]["processes"], key=lambda p: p["start_s"])
    assert b["start_s"] < a["end_s"]
    assert s["compared_variants"] == 2 and s["validation_accuracy_max_abs_difference"] == 0.0
    assert s["speedup"] == pytest.approx(arms["one_at_a_time"]["wall_seconds"]
                                         / arms["k_at_once"]["wall_seconds"])


def test_step_tflops_are_model_flops_over_the_recorded_step_time(quick_sweep):
    for arm in quick_sweep[0]["sweep"]["arms"].values():
        for r in arm["rows"]:
            flops = (4 * r["params_total"] + 2 * r["params_trainable"]) * r["tokens_per_step"]
            assert r["step_flops"] == pytest.approx(flops)
            assert r["step_tflops"] == pytest.approx(flops / r["seconds_per_step"] / 1e12)
            assert 0 < r["params_trainable"] < r["params_total"]


def test_paper_shape_rows_fill_16_by_512_real_tokens_in_both_precisions(quick_sweep):
    rows = quick_sweep[0]["paper_shape"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert (r["batch"], r["seq_len"], r["tokens_per_step"]) == (16, 512, 16 * 512)
        assert r["ms_per_step"] > 0 and r["peak_tflops"] is None  # a CPU: no card peak
        assert r["tflops"] == pytest.approx(6 * r["params_total"] * 16 * 512
                                            / (r["ms_per_step"] / 1000) / 1e12)


def test_markdown_shows_the_measured_numbers(quick_sweep):
    results, md = quick_sweep
    arms = results["sweep"]["arms"]
    assert "one at a time vs 2 at once" in md and "## Full fine-tuning at the `paper` shape" in md
    for name, arm in arms.items():
        assert f"| {name.replace('_', ' ')} | {arm['k']} | {arm['wall_seconds']:.1f} |" in md
    for variant in results["sweep"]["variants"]:
        assert f"| {variant} |" in md
    assert "largest difference 0.0000" in md
