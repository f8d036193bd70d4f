"""Parameters that can be checked before any work are refused by `prepare`, all at once,
with a message naming each, and nothing is written."""

from __future__ import annotations

import shutil

import pytest

from tasks.config import preset_config
from tasks.pipeline import prepare_run


@pytest.mark.parametrize("overrides, message", [
    ({"targets": ["foo"]}, "target 'foo' matched no linear module"),
    ({"targets": ["classifier"]}, "target 'classifier' matched no linear module"),
    ({"ranks": [1024]}, r"rank\(s\) \[1024\] exceed the smaller side \(64\)"),
    ({"model": "no/such-model"}, "model 'no/such-model' not found"),
    ({"data": "/no/such/folder"}, "data folder '/no/such/folder' is outside the allowed"),
    ({"data": "/root"}, r"data folder '/root' is outside the allowed data folders \[.*\]; set "
                        "LORAFLOW_DATA_ROOTS"),
    ({"data": "ftp://example.org/aclImdb_v1.tar.gz"}, "unknown data source"),
    ({"data": f"http://127.0.0.1:8000/a.tar.gz#sha256={'0' * 64}"}, "is not https"),
    ({"data": f"https://10.0.0.1/a.tar.gz#sha256={'0' * 64}"}, "10.0.0.1 is not a public"),
    ({"data": "https://example.org/imdb.tar.gz"}, "no checksum known"),
    ({"train_size": 24_990}, r"train_size \+ val_size = 25,054 but the train split"),
    ({"test_size": 25_001}, "test_size = 25,001 but the test split"),
])
def test_prepare_refuses_what_can_be_checked_without_data_or_weights(
        overrides, message, imdb_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = preset_config("smoke", **{"data": str(imdb_dir), **overrides})
    with pytest.raises(ValueError, match=message):
        prepare_run(config, "refused", tmp_path / "a", tmp_path / "r")
    assert not (tmp_path / "a" / "runs" / "refused").exists()


def test_every_problem_is_listed_in_one_message(imdb_dir, tmp_path):
    config = preset_config("smoke", data="/nope", targets=["foo"])
    with pytest.raises(ValueError) as refused:
        prepare_run(config, "refused", tmp_path / "a", tmp_path / "r")
    assert "/nope" in str(refused.value) and "'foo'" in str(refused.value)


def test_a_bad_model_is_refused_even_when_no_method_runs_the_encoder(tmp_path, imdb_dir,
                                                                    monkeypatch):
    """The tokenize step loads the model's tokenizer whatever the methods: a model that is
    not one used to pass `prepare` with baselines alone, then failed in tokenize, three
    times (a retried error). It is refused in `prepare`, as bad input."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = preset_config("smoke", data=str(imdb_dir), model="no/such-model",
                           methods=["majority", "tfidf_logreg"])
    with pytest.raises(ValueError, match="model 'no/such-model' not found"):
        prepare_run(config, "refused", tmp_path / "a", tmp_path / "r")
    assert not (tmp_path / "a" / "runs" / "refused").exists()


def test_a_model_folder_without_its_vocabulary_is_refused(tmp_path, imdb_dir):
    """A folder with config.json alone loads, but transformers makes it an empty tokenizer
    that turns every word into [UNK]: refused, naming the missing files."""
    from tasks.models import embedded_minilm_dir

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(embedded_minilm_dir() / "config.json", folder / "config.json")
    config = preset_config("smoke", data=str(imdb_dir), model=str(folder), methods=["majority"])
    with pytest.raises(ValueError, match=r"tokenizer knows none of the words.*vocabulary files"):
        prepare_run(config, "refused", tmp_path / "a", tmp_path / "r")


def test_baselines_alone_pass_with_a_model_whose_tokenizer_loads(tmp_path, imdb_dir):
    config = preset_config("smoke", data=str(imdb_dir), methods=["majority", "tfidf_logreg"])
    assert prepare_run(config, "ok", tmp_path / "a", tmp_path / "r").config_json.exists()


def test_the_cli_reports_a_missing_model_in_one_line_and_exits_2(tmp_path, capsys, monkeypatch,
                                                                 imdb_dir):
    from tasks.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["run", "--preset", "smoke", "--data", str(imdb_dir), "--model", "no/such-model",
                 "--artifacts", str(tmp_path / "a"), "--reports", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "model 'no/such-model' not found" in err and "Traceback" not in err
