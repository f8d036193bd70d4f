"""Run ids, run folders and the resolved-configuration summary."""

from __future__ import annotations

import re

import pytest

from tasks.config import preset_config
from tasks.paths import read_json
from tasks.pipeline import describe, load_run, new_run_id, prepare_run
from tasks.steps import StepNotRun


def test_new_run_ids_are_unique_and_readable():
    ids = {new_run_id() for _ in range(2000)}
    assert len(ids) == 2000
    for run_id in list(ids)[:5]:
        assert re.fullmatch(r"local__\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{6}_[0-9a-f]{6}", run_id)
    assert new_run_id("bench").startswith("bench__")


def test_describe_lists_the_settings_and_every_variant():
    config = preset_config("smoke", data="/d", ranks=[2, 4])
    text = describe(config)
    assert text.startswith("Resolved configuration:")
    assert re.search(r"^  ranks\s+2, 4$", text, re.MULTILINE)
    assert re.search(r"^  data\s+/d$", text, re.MULTILINE)
    variants = config.variants()
    assert f"{len(variants)} variant(s):" in text
    assert text.splitlines()[-len(variants):] == [f"  {v.name}" for v in variants]


def test_prepare_run_stores_the_config_and_refuses_another_one_for_the_same_id(tmp_path,
                                                                               imdb_dir):
    config = preset_config("smoke", data=str(imdb_dir))
    paths = prepare_run(config, "r1", tmp_path / "a", tmp_path / "r")
    assert read_json(paths.config_json) == config.to_dict()
    assert (paths.run_dir / "environment.json").exists()
    assert prepare_run(config, "r1", tmp_path / "a", tmp_path / "r") == paths  # idempotent
    with pytest.raises(ValueError, match="already exists with a different config"):
        prepare_run(config.with_overrides(epochs=2), "r1", tmp_path / "a", tmp_path / "r")
    assert load_run(paths.run_dir, tmp_path / "r") == (config, paths)


def test_load_run_of_an_unprepared_folder_says_so(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(StepNotRun, match="config.json is missing: run the prepare step first"):
        load_run(tmp_path / "runs" / "x")
