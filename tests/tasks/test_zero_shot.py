"""Zero-shot: which mode a model gets, the cloze prompt's fit in max_length, the choice
of prompt on validation, and the embedded MiniLM beating the majority on real reviews."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

import tasks.methods.zero_shot as zs
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
from tasks.models import load_tokenizer


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


def test_choose_and_score_refuses_a_model_without_a_mode():
    with pytest.raises(ValueError, match="random weights"):
        choose_and_score("tiny-distilbert", ["x"], np.array([1]), ["y"])


@pytest.mark.slow
def test_minilm_zero_shot_beats_the_majority_on_real_reviews(imdb_dir):
    # 200 validation reviews from the train split, 400 test reviews, both drawn with seed 7
    val = pd.read_parquet(imdb_dir / "train.parquet").sample(n=200, random_state=7)
    test = pd.read_parquet(imdb_dir / "test.parquet").sample(n=400, random_state=7)
    result = choose_and_score("embedded-minilm", val["text"].tolist(), val["label"].to_numpy(),
                              test["text"].tolist(), max_length=128)
    y = test["label"].to_numpy()
    accuracy = float(((result.prob_positive >= 0.5) == y).mean())
    majority = max(y.mean(), 1 - y.mean())  # the best constant prediction on this test set
    print(f"zero-shot: chose {result.chosen}, validation {result.validation_accuracy}, "
          f"test {accuracy:.4f} vs majority {majority:.4f}")
    # measured here: verdict chosen (validation 0.620 / 0.745 / 0.715), test 0.6875 vs 0.5075
    assert list(result.validation_accuracy) == list(EMBEDDING_ALTERNATIVES)
    assert result.validation_accuracy[result.chosen] == max(result.validation_accuracy.values())
    assert accuracy > majority + 0.1
