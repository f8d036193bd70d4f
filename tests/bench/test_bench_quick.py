"""`loraflow bench --quick`: every contender measured, ratios that are the quotients of
the measured times, accuracies that are accuracies, and bench.md with every table."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tasks import registry
from tasks.paths import PROJECT_DIR

pytestmark = pytest.mark.slow  # about 30 s: loads transformers, PEFT and the Trainer

E2E_FIELDS = {"name", "seconds", "ms_per_step", "accuracy", "steps", "seconds_vs_loraflow",
              "ms_per_step_vs_loraflow", "accuracy_minus_loraflow", "threads", "precision"}


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, imdb_dir):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "bench", "--quick", "--out", str(out),
                           "--data", str(imdb_dir)], cwd=PROJECT_DIR, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_end_to_end_has_every_contender_with_the_required_fields(quick_bench):
    rows = quick_bench[0]["end_to_end"]["rows"]
    lora = registry.method("lora").label
    assert [r["name"] for r in rows] == [f"loraflow {lora}", "PEFT + Trainer", "seed notebook loop"]
    for r in rows:
        assert E2E_FIELDS <= set(r), r["name"]
        assert r["seconds"] > 0 and r["ms_per_step"] > 0
        assert r["steps"] == math.ceil(64 / 16)  # quick: 64 training rows, batch 16, 1 epoch


def test_end_to_end_ratios_are_the_quotients_against_loraflow(quick_bench):
    rows = quick_bench[0]["end_to_end"]["rows"]
    ref = rows[0]
    for r in rows:
        assert r["seconds_vs_loraflow"] == pytest.approx(r["seconds"] / ref["seconds"])
        assert r["ms_per_step_vs_loraflow"] == pytest.approx(r["ms_per_step"] / ref["ms_per_step"])
        assert r["accuracy_minus_loraflow"] == pytest.approx(r["accuracy"] - ref["accuracy"])
    assert ref["seconds_vs_loraflow"] == 1.0


def test_end_to_end_accuracies_rows_and_threads_are_shared(quick_bench):
    results = quick_bench[0]
    e2e = results["end_to_end"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in e2e["rows"])
    assert e2e["same_rows"] is True  # PEFT and the notebook saw loraflow's subsets
    assert {r["threads"] for r in e2e["rows"]} == {results["machine"]["threads"]}
    assert e2e["config"]["val_size"] == 32 and e2e["config"]["max_length"] == 32


def test_per_step_has_six_contenders_and_ratios_against_loraflow_default(quick_bench):
    rows = quick_bench[0]["train_step"]
    names = [r["name"] for r in rows]
    assert len(names) == 6 and len(set(names)) == 6
    for method in ("lora", "full_finetune"):
        assert sum(registry.method(method).label in n for n in names) == (4 if method == "lora" else 2)
    ref = next(r for r in rows if (r["implementation"], r["method"], r["precision_setting"])
               == ("loraflow", "lora", "auto"))
    for r in rows:
        assert r["ms_per_step_vs_loraflow"] == pytest.approx(r["ms_per_step"] / ref["ms_per_step"])
        assert r["rounds"] == 2
    trainable = {r["implementation"]: r["params_trainable"] for r in rows if r["method"] == "lora"}
    assert trainable["loraflow"] == trainable["PEFT"]  # the same trainable set


def test_inference_and_tokenization_are_kept(quick_bench):
    results = quick_bench[0]
    variants = {(r["variant"], r["batch"]) for r in results["inference"]}
    assert variants == {(v, b) for v in ("bare", "lora unmerged", "lora merged") for b in (1, 16)}
    assert results["tokenize"]["cold_seconds"] > 0 and results["tokenize"]["cache_hit_seconds"] > 0


def test_markdown_holds_the_tables_and_the_machine_line(quick_bench):
    results, md = quick_bench
    for heading in ("## Per training step", "## End to end", "## Inference", "## Tokenization cache"):
        assert heading in md
    assert "## GPU throughput" not in md  # CPU run
    for r in results["train_step"] + results["end_to_end"]["rows"]:
        assert f"| {r['name']} |" in md
    assert "merged vs bare" in md and "%" in md
    m = results["machine"]
    assert f"{m['cores']} cores, {m['threads']} torch threads" in md
    assert f"CPU native bf16: {'yes' if m['cpu_native_bf16'] else 'no'}" in md
    for lib in ("torch", "transformers", "peft"):
        assert f"{lib} {m[lib]}" in md
    assert m["when"] in md
