"""Zero-shot: which mode a model gets, the cloze prompt's fit in max_length under each
truncation, the choice of prompt on validation, label words that are not one token
skipped with a note, the record's row label, and the embedded MiniLM beating the majority
on real reviews."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

import tasks.methods.zero_shot as zs
from tasks.job import NotApplicable
from tasks.methods.zero_shot import (
    CLOZE_ALTERNATIVES,
    EMBEDDING_ALTERNATIVES,
    Cloze,
    choose_and_score,
    cloze_inputs,
    cloze_probabilities,
    label_word_id,
    similarity_probabilities,
    zero_shot_mode,
)
from tasks.metrics import MetricsRecord
from tasks.models import load_tokenizer
from tasks.registry import Variant
from tasks.report.compute import aggregate
from tasks.tokenize import tokenize_dataset
from tasks.variants import run_variant


def tiny_mlm(kind: str) -> torch.nn.Module:
    """A random masked LM with the real uncased vocabulary: wiring, not accuracy."""
    torch.manual_seed(0)
    if kind == "distilbert":
        return DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=32, hidden_dim=64,
                                                      n_layers=2, n_heads=2)).eval()
    return BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded-minilm")  # the uncased WordPiece vocab of DistilBERT/BERT


@pytest.fixture(scope="module")
def reviews(imdb_sample) -> pd.DataFrame:
    return imdb_sample["test"].head(10)


def test_random_tiny_distilbert_has_no_zero_shot_mode():
    mode, reason = zero_shot_mode("tiny-distilbert")
    assert mode is None and reason.startswith("random weights")


def test_sentence_encoder_gets_embedding_mode():
    assert zero_shot_mode("embedded-minilm")[0] == "embedding"


def test_mode_follows_the_saved_architecture(tmp_path):
    tiny_mlm("distilbert").save_pretrained(tmp_path / "mlm")
    assert zero_shot_mode(str(tmp_path / "mlm"))[0] == "cloze"
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, intermediate_size=8)
                                  ).save_pretrained(tmp_path / "cls")
    mode, reason = zero_shot_mode(str(tmp_path / "cls"))
    assert mode is None and "BertForSequenceClassification" in reason


def test_hub_base_checkpoint_of_bert_type_gets_cloze(monkeypatch):
    monkeypatch.setattr(zs, "_config", lambda source: {"model_type": "distilbert"})
    assert zero_shot_mode("distilbert-base-uncased")[0] == "cloze"
    monkeypatch.setattr(zs, "_config", lambda source: None)  # offline and not cached
    assert zero_shot_mode("distilbert-base-uncased")[0] is None


def test_embedding_mode_reads_the_runs_truncation(tokenizer):
    from tasks.features import encode, token_frame

    encoder = tiny_mlm("bert").bert  # a bare encoder: last_hidden_state
    texts = ["opening words " + "filler " * 60 + "closing verdict"]
    head = zs.embed(encoder, tokenizer, texts, "mean", 24, truncation="head")
    head_tail = zs.embed(encoder, tokenizer, texts, "mean", 24, truncation="head_tail")
    expected = encode(encoder, token_frame(tokenizer, texts, 24, truncation="head_tail"), "mean")
    np.testing.assert_allclose(head_tail, expected / np.linalg.norm(expected), atol=1e-6)
    assert not np.allclose(head, head_tail, atol=1e-3)


def test_similarity_probabilities_follow_the_nearer_description():
    labels = np.eye(2)  # negative, positive description vectors
    reviews = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [np.sqrt(0.5), np.sqrt(0.5)]])
    prob = similarity_probabilities(reviews, labels)
    assert prob[0] < 0.5 < prob[1] and prob[2] > 0.5 and prob[3] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="temperature"):
        similarity_probabilities(reviews, labels, temperature=0.0)


@pytest.mark.parametrize("max_length", [16, 40])
def test_cloze_truncates_the_review_and_keeps_the_prompt_whole(tokenizer, reviews, max_length):
    cloze = CLOZE_ALTERNATIVES["it-was"]
    ids, positions = cloze_inputs(tokenizer, reviews["text"].tolist() + ["Fine."],
                                  cloze.template, max_length)
    prompt = tokenizer(" It was [MASK].", add_special_tokens=False)["input_ids"]
    for row, position in zip(ids, positions, strict=True):
        assert len(row) <= max_length
        assert row[-1] == tokenizer.sep_token_id and row[-1 - len(prompt):-1] == prompt
        assert row[position] == tokenizer.mask_token_id
    assert max(map(len, ids)) == max_length  # long reviews fill the budget exactly
    assert tokenizer.decode(ids[-1]) == "[CLS] fine. it was [MASK]. [SEP]"


def test_cloze_head_tail_keeps_the_reviews_first_and_last_tokens_and_the_prompt(tokenizer):
    review = "opening words " + "filler " * 60 + "closing verdict"
    words = tokenizer(review, add_special_tokens=False)["input_ids"]
    prompt = tokenizer(" It was [MASK].", add_special_tokens=False)["input_ids"]
    (head,), _ = cloze_inputs(tokenizer, [review], "{review} It was {mask}.", 32, "head")
    (both,), (position,) = cloze_inputs(tokenizer, [review], "{review} It was {mask}.", 32,
                                        "head_tail")
    assert len(both) == len(head) == 32 and both[position] == tokenizer.mask_token_id
    assert both[-1 - len(prompt):-1] == prompt and both[1:3] == words[:2]
    before_prompt = both[-1 - len(prompt) - 2:-1 - len(prompt)]
    assert before_prompt == words[-2:]  # "closing verdict" read, right before the prompt
    assert head[-1 - len(prompt) - 2:-1 - len(prompt)] != words[-2:]


def test_cloze_reads_the_normalised_text(tokenizer):
    raw, clean = cloze_inputs(tokenizer, ["Great.<br /><br />Really  good.", "Great. Really good."],
                              "{review} It was {mask}.", 32)[0]
    assert raw == clean


def test_cloze_rejects_a_max_length_without_room_for_the_review(tokenizer):
    with pytest.raises(ValueError, match="max_length 6"):
        cloze_inputs(tokenizer, ["Good."], "{review} It was {mask}.", 6)


def test_a_literal_mask_in_a_review_is_not_the_prompt_mask(tokenizer):
    ids, positions = cloze_inputs(tokenizer, ["A [MASK] plot."], "{review} It was {mask}.", 32)
    assert ids[0].count(tokenizer.mask_token_id) == 1
    assert positions[0] == len(ids[0]) - 3  # "[MASK] . [SEP]"


def test_label_words_must_be_single_tokens(tokenizer):
    assert label_word_id(tokenizer, "great") == tokenizer.convert_tokens_to_ids("great")
    with pytest.raises(ValueError, match="'unwatchable'"):
        label_word_id(tokenizer, "unwatchable")


def test_only_alternatives_with_single_token_label_words_are_usable(tokenizer):
    usable, skipped = zs.usable_clozes(tokenizer, {
        "ok": Cloze("{review} It was {mask}.", "bad", "good"),
        "split": Cloze("{review} It was {mask}.", "unwatchable", "good"),
    })
    assert list(usable) == ["ok"] and usable["ok"] == (
        tokenizer.convert_tokens_to_ids("bad"), tokenizer.convert_tokens_to_ids("good"))
    assert list(skipped) == ["split"] and "'unwatchable'" in skipped["split"]
    assert "##" in skipped["split"]  # the pieces it splits into are named


@pytest.mark.parametrize("kind", ["distilbert", "bert"])
def test_cloze_probabilities_on_a_tiny_random_mlm(tokenizer, reviews, kind):
    texts = reviews["text"].tolist()
    prob = cloze_probabilities(tiny_mlm(kind), tokenizer, texts, CLOZE_ALTERNATIVES["it-was"],
                               max_length=32, batch_size=4)
    assert prob.shape == (len(texts),) and ((prob >= 0) & (prob <= 1)).all()
    # batching and padding change nothing: each text alone gives the same probability
    alone = [cloze_probabilities(tiny_mlm(kind), tokenizer, [t], CLOZE_ALTERNATIVES["it-was"],
                                 max_length=32)[0] for t in texts[:3]]
    np.testing.assert_allclose(prob[:3], alone, atol=1e-5)


def test_choose_and_score_picks_the_best_validation_prompt(tmp_path, tokenizer, reviews,
                                                          monkeypatch):
    folder = tmp_path / "mlm"
    tiny_mlm("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(zs, "CLOZE_ALTERNATIVES", {
        "a": Cloze("{review} It was {mask}.", "terrible", "great"),
        "b": Cloze("{review} Verdict: {mask}.", "bad", "good"),
    })
    texts, labels = reviews["text"].tolist(), reviews["label"].to_numpy()
    result = choose_and_score(str(folder), texts[:6], labels[:6], texts[6:], max_length=32)
    assert result.mode == "cloze" and list(result.validation_accuracy) == ["a", "b"]
    assert result.validation_accuracy[result.chosen] == max(result.validation_accuracy.values())
    assert result.prob_positive.shape == (4,)
    assert result.hyperparameters["template"] == zs.CLOZE_ALTERNATIVES[result.chosen].template


@pytest.fixture
def mlm_folder(tmp_path, tokenizer) -> str:
    folder = tmp_path / "mlm"
    tiny_mlm("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_multi_piece_label_word_is_skipped_and_noted(mlm_folder, reviews, monkeypatch):
    monkeypatch.setattr(zs, "CLOZE_ALTERNATIVES", {
        "a": Cloze("{review} It was {mask}.", "terrible", "great"),
        "b": Cloze("{review} It was {mask}.", "unwatchable", "great"),
        "c": Cloze("{review} Verdict: {mask}.", "bad", "good"),
    })
    texts, labels = reviews["text"].tolist(), reviews["label"].to_numpy()
    result = choose_and_score(mlm_folder, texts[:6], labels[:6], texts[6:], max_length=32)
    assert list(result.validation_accuracy) == ["a", "c"] and list(result.skipped) == ["b"]
    assert "'unwatchable'" in result.skipped["b"]
    assert result.hyperparameters["skipped_alternatives"] == result.skipped
    assert list(result.hyperparameters["alternatives"]) == ["a", "c"]


def test_no_usable_alternative_is_not_applicable_with_the_reason(mlm_folder, monkeypatch):
    monkeypatch.setattr(zs, "CLOZE_ALTERNATIVES", {
        "a": Cloze("{review} It was {mask}.", "unwatchable", "great"),
        "b": Cloze("{review} It was {mask}.", "bad", "masterful"),
    })
    with pytest.raises(NotApplicable, match="no cloze prompt is usable") as caught:
        choose_and_score(mlm_folder, ["x"], np.array([1]), ["y"])
    assert "'unwatchable'" in caught.value.reason and "'masterful'" in caught.value.reason


def test_the_record_says_what_was_done_and_names_the_row(run, mlm_folder, monkeypatch):
    config, paths = run
    config = config.with_overrides(model=mlm_folder, truncation="head_tail")
    monkeypatch.setattr(zs, "CLOZE_ALTERNATIVES", {
        "a": Cloze("{review} It was {mask}.", "terrible", "great"),
        "b": Cloze("{review} It was {mask}.", "unwatchable", "great"),
        "c": Cloze("{review} Verdict: {mask}.", "bad", "good"),
    })
    tokenize_dataset(config, paths)  # the encoders' input budget, which the record states
    record = MetricsRecord.read(run_variant(Variant("zero_shot"), config, paths, device="cpu"))
    assert record.status == "ok", record.error
    assert record.hyperparameters["truncation"] == "head_tail"
    # both prompts take 4 tokens ("it was [MASK] .", "verdict : [MASK] ."): 32 - 2 - 4 left
    assert record.hyperparameters["review_tokens"] == 26
    assert record.input_budget["text"] == "the first 7 and last 19 tokens, beside the prompt"
    assert record.details["prompt_choice"] == {"alternatives": 2, "validation_labels": 100,
                                               "skipped": ["b"]}
    assert "'b'" in record.notes and "'unwatchable'" in record.notes
    label = "zero-shot (prompt chosen on 100 validation labels)"
    assert record.details["row_label"] == label and aggregate([record])["label"] == label

    # no usable alternative: the baseline is not applicable, with the reason, not failed
    monkeypatch.setattr(zs, "CLOZE_ALTERNATIVES", {"b": zs.CLOZE_ALTERNATIVES["b"]})
    record = MetricsRecord.read(run_variant(Variant("zero_shot"), config, paths, device="cpu",
                                            force=True))  # complete above: run it again
    assert record.status == "not_applicable" and "'unwatchable'" in record.reason


def test_choose_and_score_refuses_a_model_without_a_mode():
    with pytest.raises(ValueError, match="random weights"):
        choose_and_score("tiny-distilbert", ["x"], np.array([1]), ["y"])


@pytest.mark.slow
def test_minilm_zero_shot_beats_the_majority_on_real_reviews(imdb_dir):
    # 200 validation reviews from the train split, 400 test reviews, both drawn with seed 7;
    # 64 tokens (128 scored a little higher at twice the time)
    val = pd.read_parquet(imdb_dir / "train.parquet").sample(n=200, random_state=7)
    test = pd.read_parquet(imdb_dir / "test.parquet").sample(n=400, random_state=7)
    result = choose_and_score("embedded-minilm", val["text"].tolist(), val["label"].to_numpy(),
                              test["text"].tolist(), max_length=64)
    y = test["label"].to_numpy()
    accuracy = float(((result.prob_positive >= 0.5) == y).mean())
    majority = max(y.mean(), 1 - y.mean())  # the best constant prediction on this test set
    print(f"zero-shot: chose {result.chosen}, validation {result.validation_accuracy}, "
          f"test {accuracy:.4f} vs majority {majority:.4f}")
    # measured here: verdict chosen (validation 0.585 / 0.685 / 0.635), test 0.655 vs 0.5075;
    # at 128 tokens: verdict (0.620 / 0.745 / 0.715), test 0.6875
    assert list(result.validation_accuracy) == list(EMBEDDING_ALTERNATIVES)
    assert result.validation_accuracy[result.chosen] == max(result.validation_accuracy.values())
    assert accuracy > majority + 0.1
