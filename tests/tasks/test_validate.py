"""tasks.validate: GX passes the real IMDB and stops broken data with a readable report."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks import data
from tasks.config import preset_config
from tasks.paths import read_json
from tasks.steps import StepNotRun
from tasks.validate import DataValidationError, validate_dataset


def _write(paths, train: pd.DataFrame, validation: pd.DataFrame, test: pd.DataFrame) -> None:
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in (("train", train), ("validation", validation), ("test", test)):
        frame.to_parquet(paths.split_parquet(split), index=False)


def _sizes(sample: dict[str, pd.DataFrame]) -> dict[str, int]:
    return {"train_size": len(sample["train"]), "val_size": len(sample["validation"]),
            "test_size": len(sample["test"])}


def test_real_imdb_subset_passes_and_summary_is_written(smoke_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GX must leave no gx/ folder where the task runs
    config, paths = smoke_run
    data.download_dataset(config, paths)
    assert validate_dataset(config, paths) == paths.validation_json
    summary = read_json(paths.validation_json)
    assert summary["success"] is True
    assert summary["rows"] == {"train": config.train_size, "validation": config.val_size,
                               "test": config.test_size}
    for split in ("train", "validation", "test"):
        counts = pd.read_parquet(paths.split_parquet(split))["label"].value_counts()
        assert summary["class_balance"][split] == {"0": int(counts[0]), "1": int(counts[1])}
    assert summary["gx_version"].startswith("1.")
    kinds = {e["expectation"] for e in summary["expectations"]}
    assert {"expect_column_values_to_not_be_null", "expect_column_values_to_be_in_set",
            "expect_table_row_count_to_equal", "expect_column_mean_to_be_between",
            "expect_column_proportion_of_unique_values_to_be_between"} <= kinds
    subsets = [e for e in summary["expectations"] if not e["split"].startswith("source")]
    assert len(subsets) == 3 * 13  # thirteen per subset
    assert {e["split"] for e in subsets} == {"train", "validation", "test"}
    assert all(e["success"] for e in summary["expectations"])
    assert {"split", "expectation", "column", "kwargs", "success", "observed_value",
            "unexpected_count", "unexpected_percent"} <= set(summary["expectations"][0])
    assert not (tmp_path / "gx").exists()


@pytest.mark.parametrize("preset", ["seed", "paper"])
def test_preset_subsets_of_real_imdb_pass_validation(artifacts, imdb_dir, preset):
    """The seed notebook's 5,000 / 1,000 and every distinct review of both splits (22,402
    train and 2,500 validation reviews, 24,676 test; IMDB holds 98 + 201 duplicated
    normalised texts and 123 test texts also in train, removed before drawing)."""
    from tasks.pipeline import prepare_run

    # prepare checks the model whatever the methods; the hub's DistilBERT is out of reach here
    config = preset_config(preset, data=str(imdb_dir), methods=["majority"],
                           model="embedded-minilm")
    paths = prepare_run(config, f"validate-{preset}", artifacts, artifacts.parent / "reports")
    data.download_dataset(config, paths)
    validate_dataset(config, paths)  # its time: bench/, not here (~0.3 s / ~1.6 s measured)
    summary = read_json(paths.validation_json)
    assert summary["success"] is True
    if preset == "paper":  # the whole training split is train + validation
        frames = {s: pd.read_parquet(paths.split_parquet(s)) for s in ("train", "validation",
                                                                       "test")}
        whole = pd.concat([frames["train"], frames["validation"]])
        # deduplicated before drawing: every distinct review, none twice, none shared
        assert len(whole) == 24_902 and whole["text"].duplicated().sum() == 0
        stats = summary["statistics"]
        assert len(frames["test"]) == 24_676 and stats["test"]["duplicate_texts"] == 0
        assert stats["test"]["texts_in_other_split"] == 0
        assert summary["deduplication"]["test"]["also_in_an_earlier_split"] == 123
        for split in ("train", "validation"):
            assert stats[split]["duplicate_texts"] == frames[split]["text"].duplicated().sum()


def _nulls(train, validation, test):
    train.loc[:4, "text"] = None


def _null_label(train, validation, test):
    train["label"] = train["label"].astype("float64")
    train.loc[:1, "label"] = None


def _label_two(train, validation, test):
    train.loc[0, "label"] = 2


def _empty_text(train, validation, test):
    train.loc[:2, "text"] = ""


def _mostly_positive(train, validation, test):
    train["label"] = [1] * 360 + [0] * 40


def _half_duplicates(train, validation, test):
    train.loc[200:, "text"] = train["text"].iloc[:200].to_numpy()


def _overlap(train, validation, test):
    test["text"] = train["text"].iloc[:200].to_numpy()


def _validation_leak(train, validation, test):
    validation["text"] = train["text"].iloc[:100].to_numpy()


def _validation_labels(train, validation, test):
    validation.loc[5, "label"] = -1


def _no_text(train, validation, test):
    train.drop(columns="text", inplace=True)


# (break the data, expected size change, failing split, expectation, column, in the message)
BROKEN = [
    (_nulls, {}, "train", "expect_column_values_to_not_be_null", "text",
     "observed 5 unexpected rows"),
    (_null_label, {}, "train", "expect_column_values_to_be_of_type", "label", "observed 'float64'"),
    (_label_two, {}, "train", "expect_column_values_to_be_in_set", "label", "e.g. 2 (x1)"),
    (_empty_text, {}, "train", "expect_column_value_lengths_to_be_between", "text",
     "observed 3 unexpected rows (0.75%), e.g. '' (x3)"),
    (None, {"train_size": 500}, "train", "expect_table_row_count_to_equal", None, "observed 400"),
    (_mostly_positive, {}, "train", "expect_column_mean_to_be_between", "label", "observed 0.9"),
    (_half_duplicates, {}, "train", "expect_column_proportion_of_unique_values_to_be_between",
     "text", "observed 0.5"),
    (_overlap, {}, "test", "expect_column_mean_to_be_between", "in_other_split", "observed 1.0"),
    (_validation_leak, {}, "validation", "expect_column_mean_to_be_between", "in_other_split",
     "observed 1.0"),
    (_validation_labels, {}, "validation", "expect_column_values_to_be_in_set", "label",
     "e.g. -1 (x1)"),
    (None, {"val_size": 101}, "validation", "expect_table_row_count_to_equal", None,
     "observed 100"),
    (_no_text, {}, "train", "expect_column_to_exist", "text", "missing; columns are"),
]


@pytest.mark.parametrize("breaker, sizes, split, expectation, column, observed", BROKEN,
                         ids=["nulls", "null-label", "label-2", "empty-text", "too-few-rows",
                              "90%-positive", "50%-duplicates", "train-test-overlap",
                              "train-validation-overlap", "validation-label", "validation-rows",
                              "no-text"])
def test_broken_data_fails_with_expectation_and_observed_value(
        smoke_run, imdb_sample, breaker, sizes, split, expectation, column, observed):
    config, paths = smoke_run
    train, validation, test = (imdb_sample[s].copy() for s in ("train", "validation", "test"))
    if breaker:
        breaker(train, validation, test)
    _write(paths, train, validation, test)
    config = config.with_overrides(**{**_sizes(imdb_sample), **sizes})
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(config, paths)
    line = next((ln for ln in str(caught.value).splitlines()
                 if ln.strip().startswith(f"- {split}: {expectation}({column or ''}")), None)
    assert line is not None, str(caught.value)
    assert observed in line
    summary = read_json(paths.validation_json)
    assert summary["success"] is False
    failed = [(e["split"], e["expectation"], e["column"]) for e in summary["expectations"]
              if not e["success"]]
    assert (split, expectation, column) in failed
    assert failed == [(f["split"], f["expectation"], f["column"]) for f in caught.value.failures]


def test_missing_text_column_is_reported_not_crashed(smoke_run, imdb_sample):
    config, paths = smoke_run
    _write(paths, imdb_sample["train"].drop(columns="text"), imdb_sample["validation"],
           imdb_sample["test"])
    config = config.with_overrides(**_sizes(imdb_sample))
    with pytest.raises(DataValidationError, match='error: .*column "text".* does not exist'):
        validate_dataset(config, paths)
    assert read_json(paths.validation_json)["statistics"]["train"]["columns"] == [
        "label", "review_id", "rating"]


def test_missing_subset_files_ask_for_the_download_step(smoke_run):
    config, paths = smoke_run
    with pytest.raises(StepNotRun, match="is missing: run the download step first"):
        validate_dataset(config, paths)
