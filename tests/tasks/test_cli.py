"""The `loraflow` command: the whole smoke chain, single steps, and clear failures."""

import errno
import io
import json
import os
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from tasks import registry
from tasks.cli import build_parser, main
from tasks.config import preset_config
from tasks.metrics import MetricsRecord
from tasks.registry import Variant
from tests.conftest import TINY as TINY_SIZES

TINY = ["--train-size", "64", "--val-size", "32", "--test-size", "32", "--max-length", "32"]


@pytest.mark.slow
def test_run_smoke_end_to_end_prints_run_and_report(smoke_all, imdb_dir):
    done = smoke_all.done  # `loraflow run --preset smoke` in a subprocess, once per session
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-2:]
    run_dir = smoke_all.run_dir
    assert last == [f"run: {run_dir}", f"report: {smoke_all.report}"]
    smoke = preset_config("smoke", data=str(imdb_dir), **TINY_SIZES)
    expected = {v.name: v for v in smoke.variants()}
    records = {p.parent.name: MetricsRecord.read(p) for p in run_dir.glob("results/*/metrics.json")}
    assert set(records) == set(expected)
    assert all(r.status in ("ok", "not_applicable") for r in records.values()), {
        n: r.error for n, r in records.items()}
    rows = {s: len(pd.read_parquet(run_dir / "data" / f"{s}.parquet"))
            for s in ("train", "validation", "test")}
    assert rows == {"train": smoke.train_size, "validation": smoke.val_size,
                    "test": smoke.test_size}
    for name, record in records.items():
        if record.ok:
            assert record.test_examples == rows["test"]
            assert record.validation_examples == rows["validation"]
            assert len(pd.read_parquet(run_dir / "results" / name / "predictions.parquet")) == rows["test"]
        method = registry.METHODS[expected[name].method]
        if method.artifact and record.ok:
            assert any((run_dir / "results" / name / method.artifact).glob("*.safetensors")), name
    lora = next(v for v in expected.values() if v.method == "lora")
    assert (run_dir / "results" / lora.name / "adapter" / "adapter_model.safetensors").exists()
    html = smoke_all.report.read_text()
    assert lora.name in html and (smoke_all.reports / "index.html").exists()
    assert 'id="plumbing"' in html  # tiny-distilbert: random weights


@pytest.mark.slow  # a whole run in this process
def test_targets_with_a_space_give_one_lora_variant_and_no_phantom(tmp_path, imdb_dir, capsys):
    """Bug 1: `--targets "q_lin, v_lin"` once gave the results folder one name and the
    report's list of asked-for variants another, so the table showed the LoRA run twice,
    once as "not run"."""
    code = main(["run", "--preset", "smoke", "--data", str(imdb_dir), *TINY, "--methods", "lora",
                 "--targets", "q_lin, v_lin", "--run-id", "spaced", "--artifacts",
                 str(tmp_path / "a"), "--reports", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "r" / "spaced" / "comparison.csv")
    lora = frame[frame["method"] == "lora"]
    assert lora["name"].tolist() == ["lora_r4_q_lin+v_lin_lr2e-3_s42"]
    assert frame["status"].tolist() == ["ok"]
    assert "not run" not in (tmp_path / "r" / "spaced" / "comparison.md").read_text()
    results = tmp_path / "a" / "runs" / "spaced" / "results"
    assert [p.name for p in results.iterdir()] == ["lora_r4_q_lin+v_lin_lr2e-3_s42"]
    record = MetricsRecord.read(results / "lora_r4_q_lin+v_lin_lr2e-3_s42" / "metrics.json")
    assert record.targets == "q_lin,v_lin"
    assert sorted({m.rsplit(".", 1)[-1] for m in record.details["lora_modules"]}) == ["q_lin",
                                                                                       "v_lin"]


def test_bad_data_source_fails_with_the_reason_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    code = main(["run", "--preset", "smoke", "--data", str(tmp_path / "missing"), "--run-id", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err and "loraflow: error:" in err


def test_a_folder_given_on_the_command_line_is_allowed_outside_the_data_roots(
        tmp_path, imdb_sample, imdb_dir, capsys, monkeypatch):
    """The data roots guard what a trigger form may name; the person at the shell may read
    any folder. An explicit LORAFLOW_DATA_ROOTS still rules."""
    from tasks.sources import parse_source

    own = tmp_path / "my-imdb"
    own.mkdir()
    for split in ("train", "test"):
        frame = imdb_sample[split] if split == "test" else pd.concat(
            [imdb_sample["train"], imdb_sample["validation"]])
        frame.to_parquet(own / f"{split}.parquet", index=False)
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    monkeypatch.setenv("LORAFLOW_DATA", str(imdb_dir))
    monkeypatch.delenv("LORAFLOW_DATA_ROOTS")
    with pytest.raises(ValueError, match="outside the allowed"):
        parse_source(str(own))  # what prepare says to a trigger conf naming it
    argv = ["step", "prepare", "--preset", "smoke", "--data", str(own), *TINY, "--run-id", "own"]
    assert main(argv) == 0, capsys.readouterr().err
    # the next steps of that run read the folder it recorded, as a new shell would
    monkeypatch.delenv("LORAFLOW_DATA_ROOTS")
    run_dir = tmp_path / "a" / "runs" / "own"
    assert main(["step", "download", "--run-dir", str(run_dir)]) == 0, capsys.readouterr().err
    assert len(pd.read_parquet(run_dir / "data" / "test.parquet")) == 32  # --test-size
    monkeypatch.setenv("LORAFLOW_DATA_ROOTS", str(imdb_dir))
    assert main([*argv[:-1], "own-2"]) == 2
    assert "outside the allowed" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--ranks", "0"], "rank"),
    (["--lora-lr", "1e-3,2e-3", "--full-lr", "5e-5"], "same tuning budget"),
    (["--val-size", "0"], "val_size"),
    (["--precision", "fp16", "--warmup-steps", "-5"], "warmup_steps"),
])
def test_invalid_override_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, args,
                                                          message):
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    assert main(["run", "--preset", "smoke", *args, "--run-id", "x"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("argv", [
    ["run", "--methods", "distillation"],
    ["run", "--precision", "fp8"],
    ["run", "--ranks", "four"],
    ["step", "baseline", "lora", "--run-dir", "x"],
    ["step", "train", "--method", "majority", "--run-dir", "x"],
])
def test_argparse_refuses_what_is_not_a_choice(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_config_flags_mirror_the_config_dataclass():
    import dataclasses

    from tasks.config import ExperimentConfig

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {a.dest for a in run._actions}
    assert {f.name for f in dataclasses.fields(ExperimentConfig)} <= flags
    args = build_parser().parse_args(["run", "--lora-lr", "1e-3,2e-3", "--ranks", "4,8",
                                      "--targets", "qv", "q_lin,v_lin", "--methods", "lora"])
    assert (args.lora_lr, args.ranks, args.targets, args.methods) == (
        [1e-3, 2e-3], [4, 8], ["qv", "q_lin,v_lin"], ["lora"])


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory, imdb_dir):
    """A smoke run prepared, downloaded, validated and tokenized one step at a time, once
    for the module; `prepared` gives each test a copy of its own."""
    root = tmp_path_factory.mktemp("steps")
    with pytest.MonkeyPatch.context() as env, redirect_stdout(io.StringIO()) as out:
        env.setenv("LORAFLOW_ARTIFACTS", str(root / "a"))
        env.setenv("LORAFLOW_REPORTS", str(root / "r"))
        assert main(["step", "prepare", "--preset", "smoke", "--data", str(imdb_dir), *TINY,
                     "--run-id", "steps"]) == 0
        run_dir = Path(out.getvalue().split("run: ")[1].strip())
        for step in ("download", "validate", "tokenize"):
            assert main(["step", step, "--run-dir", str(run_dir)]) == 0, step
    return run_dir


@pytest.fixture
def prepared(prepared_once, tmp_path, monkeypatch):
    """This test's copy of the prepared run, at <tmp_path>/a/runs/steps."""
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "a"))
    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "r"))
    return Path(shutil.copytree(prepared_once, tmp_path / "a" / "runs" / "steps"))


def test_steps_one_by_one_then_report_rebuild(prepared, tmp_path, capsys):
    run_dir = prepared
    assert {p.name for p in (run_dir / "data").iterdir()} >= {
        "train.parquet", "validation.parquet", "test.parquet", "validation.json", "tokens.json"}
    assert main(["step", "baseline", "majority", "--run-dir", str(run_dir)]) == 0
    majority = json.loads((run_dir / "results" / "majority" / "metrics.json").read_text())
    assert majority["status"] == "ok" and majority["test_examples"] == 32
    assert majority["validation_examples"] == 32
    assert main(["report", str(run_dir)]) == 0
    assert (tmp_path / "r" / "steps" / "report.html").exists()
    assert main(["step", "report", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "r" / "steps" / "report.html"))


def test_step_train_trains_the_target_set_it_is_given(prepared, capsys):
    """Bug 2: `step train --targets qv` trained the run config's first target set."""
    assert main(["step", "train", "--run-dir", str(prepared), "--method", "lora",
                 "--targets", "qv"]) == 0
    name = "lora_r4_qv_lr2e-3_s42"  # rank, learning rate and seed: the config's first
    assert capsys.readouterr().out.strip() == str(prepared / "results" / name / "metrics.json")
    assert [p.name for p in (prepared / "results").iterdir()] == [name]
    record = MetricsRecord.read(prepared / "results" / name / "metrics.json")
    assert record.ok and (record.targets, record.rank) == ("qv", 4)
    modules = record.details["lora_modules"]
    assert len(modules) == 4  # q and v in each of the two layers
    assert {m.rsplit(".", 1)[-1] for m in modules} == {"q_lin", "v_lin"}


def test_step_train_takes_every_sweep_flag(prepared):
    assert main(["step", "train", "--run-dir", str(prepared), "--method", "full_finetune",
                 "--lr", "3e-4", "--seed", "7"]) == 0
    assert [p.name for p in (prepared / "results").iterdir()] == ["full_finetune_lr3e-4_s7"]


@pytest.mark.parametrize("flags, named", [(["--rank", "4"], "--rank"),
                                          (["--targets", "qv"], "--targets")])
def test_step_train_refuses_a_flag_the_method_has_no_dimension_for(prepared, capsys, flags,
                                                                   named):
    assert main(["step", "train", "--run-dir", str(prepared), "--method", "full_finetune",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert f"{named} does not apply to full_finetune" in err
    assert not (prepared / "results").exists()


def test_train_variant_from_args_defaults_to_the_configs_first_values():
    from argparse import Namespace

    from tasks.cli import train_variant_from_args

    config = preset_config("smoke", data="x", ranks=[8, 4], targets=["qv", "qkvo"], seeds=[3, 1],
                           lora_lr=[1e-3, 2e-3], full_lr=[3e-5, 5e-5])
    given = Namespace(method="lora", rank=None, targets=None, lr=None, seed=None)
    assert train_variant_from_args(given, config) == Variant("lora", rank=8, targets="qv",
                                                             lr=1e-3, seed=3)
    given = Namespace(method="full_finetune", rank=None, targets=None, lr=None, seed=1)
    assert train_variant_from_args(given, config) == Variant("full_finetune", lr=3e-5, seed=1)


def test_step_without_run_dir_says_what_is_missing(capsys):
    with pytest.raises(SystemExit):
        main(["step", "tokenize"])
    assert "--run-dir" in capsys.readouterr().err


def test_presets_lists_every_preset_and_method(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("seed", "paper", "cpu", "smoke"):
        assert f"\n{name}" in f"\n{out}"
    for m in registry.METHODS.values():
        assert f"{m.name} ({m.kind})" in out


# --- a full, read-only or forbidden disk: one line, the run stops, completed work is kept --------

@pytest.mark.parametrize("code, said", [
    (errno.ENOSPC, "no space left on device writing /x/y: free space and run again"),
    (errno.EROFS, "read-only file system: cannot write /x/y: choose a writable artifacts or "
                  "reports folder"),
    (errno.EACCES, "permission denied on /x/y: give this user access or choose another folder"),
])
def test_a_storage_error_in_a_step_is_one_line_naming_the_path(code, said, artifacts, imdb_dir,
                                                               monkeypatch, capsys):
    def download(config, paths):
        raise OSError(code, os.strerror(code), "/x/y")

    monkeypatch.setattr("tasks.data.download_dataset", download)
    assert main(["run", "--preset", "smoke", "--data", str(imdb_dir), *TINY,
                 "--methods", "majority", "--run-id", "full"]) == 1
    line, *more = capsys.readouterr().err.splitlines()
    assert line.startswith(f"loraflow: error: {said}") and more == []
    assert line.endswith("and run again; completed variants are kept: `loraflow run --run-id "
                         "full` with the same settings goes on from them")


def test_a_full_disk_in_a_variant_stops_the_run_instead_of_failing_every_variant(
        smoke_config, artifacts, imdb_sample, monkeypatch, capsys):
    """pyarrow's error names no file and carries the errno only in its text."""
    import dataclasses

    import tasks.pipeline
    from tasks.methods import majority
    from tasks.pipeline import prepare_run
    from tests.tasks.conftest import write_run_data

    config = dataclasses.replace(smoke_config, methods=("majority", "tfidf_logreg"))
    paths = prepare_run(config, "full", artifacts)
    write_run_data(paths, imdb_sample)
    monkeypatch.setattr(tasks.pipeline, "DATA_STEPS", ())  # the data is there

    def predict(job):
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space "
                      "left on device")

    monkeypatch.setattr(majority, "predict", predict)
    assert main(["run", "--preset", "smoke", "--data", config.data, *TINY,
                 "--methods", "majority", "tfidf_logreg", "--run-id", "full"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loraflow: error: no space left on device writing a file (the error "
                          "names none): free space and run again;") and "Traceback" not in err
    assert MetricsRecord.read(paths.variant_dir("majority") / "metrics.json").status == "failed"
    assert not paths.variant_dir("tfidf_logreg").exists()  # the run stopped there
