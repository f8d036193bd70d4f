"""Validation of the whole source split, cached per source, and data that cannot be read:
faults a drawn subset can miss still stop the run, with a message naming where they are."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import preset_config
from tasks.data import download_dataset
from tasks.pipeline import prepare_run
from tasks.validate import DataValidationError, validate_dataset


def _source(tmp_path, sample, train=None, test=None):
    folder = tmp_path / "source"
    folder.mkdir()
    (train if train is not None else sample["train"]).to_parquet(folder / "train.parquet")
    (test if test is not None else sample["test"]).to_parquet(folder / "test.parquet")
    return folder


def _prepared(tmp_path, folder, run_id="v"):
    config = preset_config("smoke", data=str(folder), train_size=64, val_size=16, test_size=32,
                           methods=["majority"])
    return config, prepare_run(config, run_id, tmp_path / "a", tmp_path / "r")


def test_a_source_of_twins_fails_even_when_the_subset_holds_few_of_them(tmp_path, imdb_sample):
    train = imdb_sample["train"]
    twins = pd.concat([train, train], ignore_index=True)  # every review twice
    config, paths = _prepared(tmp_path, _source(tmp_path, imdb_sample, train=twins))
    download_dataset(config, paths)
    with pytest.raises(DataValidationError, match="source train.*share of distinct texts"):
        validate_dataset(config, paths)
    stored = json.loads(paths.validation_json.read_text())
    failed = {(e["split"], e["column"]): e for e in stored["expectations"] if not e["success"]}
    assert failed[("source train", "text")]["observed_value"] == pytest.approx(0.5)
    # the draw removed the twins first: none leaks between the training and validation
    # subsets, and validation.json counts them
    assert ("validation", "in_other_split") not in failed
    assert stored["deduplication"]["train"]["duplicates_within_split"] >= len(train)


def test_the_source_is_validated_once_and_then_read_from_the_cache(tmp_path, imdb_sample):
    folder = _source(tmp_path, imdb_sample)
    for run_id, cached in (("first", False), ("second", True)):
        config, paths = _prepared(tmp_path, folder, run_id)
        download_dataset(config, paths)
        validate_dataset(config, paths)
        assert json.loads(paths.validation_json.read_text())["source"]["cached"] is cached


def test_a_bytes_text_column_is_refused(tmp_path, imdb_sample):
    train = imdb_sample["train"].assign(text=imdb_sample["train"]["text"].str.encode("utf-8"))
    config, paths = _prepared(tmp_path, _source(tmp_path, imdb_sample, train=train))
    download_dataset(config, paths)
    with pytest.raises(DataValidationError, match="texts are strings"):
        validate_dataset(config, paths)


def test_invalid_utf8_names_file_column_and_row_and_still_writes_validation_json(
        tmp_path, imdb_sample):
    folder = _source(tmp_path, imdb_sample)
    texts = [t.encode() for t in imdb_sample["train"]["text"]]
    texts[7] = b"\xff\xfe not utf-8"
    table = pa.table({"text": pa.array(texts, pa.binary()).view(pa.string()),
                      "label": pa.array(imdb_sample["train"]["label"], pa.int64())})
    pq.write_table(table, folder / "train.parquet")
    config, paths = _prepared(tmp_path, folder)
    with pytest.raises(DataValidationError,
                       match=r"train.parquet: column 'text', row 7: not valid UTF-8"):
        download_dataset(config, paths)
    stored = json.loads(paths.validation_json.read_text())
    assert stored["success"] is False and "row 7" in stored["expectations"][0]["observed_value"]
    assert not paths.train_parquet.exists()  # nothing that looks like usable data


def test_invalid_utf8_in_a_bytes_column_written_by_pandas_names_file_column_and_row(
        tmp_path, imdb_sample):
    # A bytes column whose pandas metadata says `str`: pyarrow's to_pandas fails on it with
    # "Invalid UTF8 payload", naming nothing; the reader names the file, column and row.
    folder = _source(tmp_path, imdb_sample)
    table = pa.Table.from_pandas(imdb_sample["train"], preserve_index=False)
    texts = [t.encode() for t in table.column("text").to_pylist()]
    texts[3] = b"\xff" + texts[3]
    table = table.set_column(table.schema.get_field_index("text"), "text",
                             pa.array(texts, pa.binary()))
    pq.write_table(table, folder / "train.parquet")
    config, paths = _prepared(tmp_path, folder)
    with pytest.raises(DataValidationError,
                       match=r"train.parquet: column 'text', row 3: not valid UTF-8"):
        download_dataset(config, paths)
    assert json.loads(paths.validation_json.read_text())["success"] is False
