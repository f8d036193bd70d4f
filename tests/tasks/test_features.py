"""Frozen-encoder features: pooling read from the model's files, mask-aware pooling, rows
returned in frame order whatever the batching."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel

from tasks.features import encode, encode_poolings, mean_pool, pooling_for, token_frame
from tasks.models import load_tokenizer


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64)).eval()


@pytest.fixture(scope="module")
def frame(imdb_sample) -> pd.DataFrame:
    """12 real reviews of different lengths (at most 24 tokens), unpadded."""
    texts = imdb_sample["test"]["text"].head(12).tolist()
    return token_frame(load_tokenizer("embedded-minilm"), texts, max_length=24)


def saved_sentence_encoder(folder, pooling_config: dict) -> str:
    tiny_bert().save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    return str(folder)


def test_pooling_is_mean_for_the_embedded_sentence_encoder_and_cls_for_distilbert():
    assert pooling_for("embedded-minilm") == "mean"
    assert pooling_for("tiny-distilbert") == "cls"


def test_pooling_of_a_plain_bert_folder_is_cls(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    assert pooling_for(str(tmp_path)) == "cls"


def test_pooling_follows_the_sentence_transformers_config(tmp_path):
    cls_folder = saved_sentence_encoder(tmp_path / "a", {"pooling_mode_cls_token": True,
                                                         "pooling_mode_mean_tokens": False})
    assert pooling_for(cls_folder) == "cls"
    max_folder = saved_sentence_encoder(tmp_path / "b", {"pooling_mode_max_tokens": True})
    with pytest.raises(ValueError, match="max_tokens"):
        pooling_for(max_folder)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encode_returns_frame_order_and_matches_unpadded_rows(frame, pooling):
    encoder = tiny_bert()
    batched = encode(encoder, frame, pooling, batch_size=5)  # padded, length-sorted batches
    assert batched.shape == (len(frame), 32) and batched.dtype == np.float32
    with torch.inference_mode():
        for i, ids in enumerate(frame["input_ids"]):
            hidden = encoder(input_ids=torch.as_tensor([list(ids)])).last_hidden_state[0]
            single = hidden.mean(dim=0) if pooling == "mean" else hidden[0]
            np.testing.assert_allclose(batched[i], single.numpy(), atol=1e-5)


def test_encode_restores_training_mode_and_rejects_unknown_pooling(frame):
    encoder = tiny_bert().train()
    encode(encoder, frame, "cls", batch_size=8)
    assert encoder.training
    with pytest.raises(ValueError, match="'max'"):
        encode(encoder, frame, "max")  # type: ignore[arg-type]


def test_both_poolings_come_from_one_forward_pass(frame):
    encoder = tiny_bert()
    calls: list[int] = []
    encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    both = encode_poolings(encoder, frame, ("mean", "cls"), batch_size=5)
    assert len(calls) == 3  # ceil(12 / 5) batches, not twice that
    for pooling in ("mean", "cls"):
        np.testing.assert_allclose(both[pooling], encode(encoder, frame, pooling, batch_size=5),
                                   atol=1e-6)
    assert not np.allclose(both["mean"], both["cls"])


def test_token_frame_cuts_by_the_truncation_setting():
    tokenizer = load_tokenizer("embedded-minilm")
    text = "opening words " + "filler " * 60 + "closing verdict"
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    head, head_tail = (token_frame(tokenizer, [text], 24, truncation=t)["input_ids"][0]
                       for t in ("head", "head_tail"))
    assert len(head) == len(head_tail) == 24
    assert head[1:3] == head_tail[1:3] == words[:2]  # both start with the review's start
    assert list(head_tail[-3:-1]) == words[-2:] and list(head[-3:-1]) != words[-2:]
    assert head_tail[-1] == head[-1] == tokenizer.sep_token_id
