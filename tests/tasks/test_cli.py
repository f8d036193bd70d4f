"""The `loraflow` command: the whole smoke chain, single steps, and clear failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tasks.cli import main

LORAFLOW = [sys.executable, "-m", "tasks.cli"]


@pytest.mark.slow
def test_run_smoke_end_to_end_prints_run_and_report(tmp_path, imdb_dir):
    env = {**os.environ, "LORAFLOW_ARTIFACTS": str(tmp_path / "a"),
           "LORAFLOW_REPORTS": str(tmp_path / "r"), "LORAFLOW_PROGRESS": "0"}
    done = subprocess.run([*LORAFLOW, "run", "--preset", "smoke", "--data", str(imdb_dir),
                           "--run-id", "cli-smoke"], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-2:]
    run_dir = tmp_path / "a" / "runs" / "cli-smoke"
    assert last == [f"run: {run_dir}", f"report: {tmp_path / 'r' / 'cli-smoke' / 'report.html'}"]
    variants = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("results/*/metrics.json")}
    assert set(variants) == {"majority", "tfidf_logreg", "seed_heuristic", "linear_probe_s42",
                             "lora_r4_qkvo_s42", "full_finetune_s42"}
    assert all(v["status"] == "ok" for v in variants.values())
    test_rows = len(pd.read_parquet(run_dir / "data" / "test.parquet"))
    assert test_rows == 128
    for name in variants:
        assert len(pd.read_parquet(run_dir / "results" / name / "predictions.parquet")) == test_rows
    assert (run_dir / "results" / "lora_r4_qkvo_s42" / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "results" / "full_finetune_s42" / "checkpoint" / "model.safetensors").exists()
    html = (tmp_path / "r" / "cli-smoke" / "report.html").read_text()
    assert "lora_r4_qkvo_s42" in html and (tmp_path / "r" / "index.html").exists()


def test_bad_data_source_fails_with_the_reason_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    code = main(["run", "--preset", "smoke", "--data", str(tmp_path / "missing"), "--run-id", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err and "loraflow: error:" in err


def test_invalid_override_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    assert main(["run", "--preset", "smoke", "--ranks", "0", "--run-id", "x"]) == 2
    assert "rank" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_steps_one_by_one_then_report_rebuild(tmp_path, imdb_dir, capsys, monkeypatch):
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "r"))
    assert main(["step", "prepare", "--preset", "smoke", "--data", str(imdb_dir),
                 "--train-size", "64", "--test-size", "32", "--run-id", "steps"]) == 0
    run_dir = Path(capsys.readouterr().out.split("run: ")[1].strip())
    for step in (["download"], ["validate"], ["tokenize"], ["baseline", "majority"]):
        assert main(["step", *step, "--run-dir", str(run_dir)]) == 0, step
    majority = json.loads((run_dir / "results" / "majority" / "metrics.json").read_text())
    assert majority["status"] == "ok" and majority["test_examples"] == 32
    assert main(["report", str(run_dir)]) == 0
    assert (tmp_path / "r" / "steps" / "report.html").exists()


def test_step_without_run_dir_says_what_is_missing(capsys):
    assert main(["step", "tokenize"]) == 2
    assert "--run-dir" in capsys.readouterr().err
