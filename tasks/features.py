"""Frozen-encoder features: one vector per review, for the linear probe and zero-shot.

Which vector depends on how the encoder was trained. Sentence-transformers encoders (the
embedded all-MiniLM-L6-v2) were trained on the masked mean of the last hidden state
(Reimers & Gurevych 2019, section 3), and their BERT pooler is a near-initial random
projection, so [CLS] or the pooler output says little there. DistilBERT/BERT checkpoints
were pretrained with [CLS] as the sequence summary (Devlin et al. 2019, section 3), so they
get position 0 of the last hidden state. `pooling_for` reads that decision from the
model's own files (zero-shot's embedding mode uses it), `encode` applies it. The linear
probe does not presume: `encode_poolings` gives both poolings from one forward pass and
the probe picks one by cross-validation on train.

Input frames are token frames as `tasks.tokenize.load_split` returns them: `input_ids`
(unpadded, special tokens included) and `length`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from tasks.evaluate import autocast, eval_mode, pad_batch, pad_id_of, sorted_batches

Pooling = Literal["mean", "cls"]
POOLINGS: tuple[Pooling, ...] = ("mean", "cls")


def model_file(model_source: str, filename: str) -> str | None:
    """Local path of `filename` in the model source (local folder, hub cache, or a download
    when the hub is reachable); None when the source has no such file or it is unreachable."""
    from transformers.utils import cached_file

    from tasks.models import resolve_source

    name, local = resolve_source(model_source)
    return cached_file(name, filename, local_files_only=local,
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def sentence_transformers_pooling(model_source: str) -> Pooling | None:
    """The pooling a sentence-transformers model declares (`modules.json` names its Pooling
    module's folder, whose `config.json` sets `pooling_mode_*`); None when the source is not
    a sentence-transformers model. A declared mode other than mean or [CLS] (max, weighted
    mean, ...) is a ValueError: silently using another pooling would misrepresent it."""
    from tasks.models import TINY_DISTILBERT

    if model_source == TINY_DISTILBERT:  # tokenizer-only alias of the MiniLM folder
        return None
    modules_path = model_file(model_source, "modules.json")
    if modules_path is None:
        return None
    with open(modules_path, encoding="utf-8") as f:
        modules = json.load(f)
    folder = next((m.get("path", "") for m in modules
                   if str(m.get("type", "")).endswith(".Pooling")), None)
    if folder is None:  # a Transformer-only pipeline: sentence-transformers defaults to mean
        return "mean"
    config_path = model_file(model_source, f"{folder}/config.json")
    if config_path is None:
        return "mean"
    with open(config_path, encoding="utf-8") as f:
        config: dict[str, Any] = json.load(f)
    active = sorted(k.removeprefix("pooling_mode_") for k, v in config.items()
                    if k.startswith("pooling_mode_") and v is True)
    if active == ["mean_tokens"]:
        return "mean"
    if active == ["cls_token"]:
        return "cls"
    raise ValueError(f"{model_source}: sentence-transformers pooling {active} in "
                     f"{folder}/config.json is not supported (expected mean_tokens or cls_token)")


def pooling_for(model_source: str) -> Pooling:
    """"mean" for sentence-transformers encoders (as they declare it), "cls" otherwise:
    DistilBERT/BERT checkpoints and the random `tiny-distilbert`."""
    return sentence_transformers_pooling(model_source) or "cls"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions: (B, T, H), (B, T) -> (B, H). Padding never counts;
    special tokens do, as in sentence-transformers' Pooling module."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, T, H) last hidden state -> (B, H) by `pooling`."""
    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "cls":
        return hidden[:, 0, :]  # [CLS] is position 0 of every row (right padding)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def encode(encoder: torch.nn.Module, frame: pd.DataFrame, pooling: Pooling,
           device: str | torch.device = "cpu", batch_size: int = 64,
           dtype: torch.dtype | None = None) -> np.ndarray:
    """Pooled last hidden states (N, H) float32, rows in `frame` order.

    Args:
        encoder: a bare encoder (`model.base_model` of a sequence classifier, or an
            `AutoModel`) whose output has `last_hidden_state`; used in inference mode, its
            train/eval mode restored afterwards.
        frame: token frame with `input_ids` and `length`.
        pooling: "mean" (mask-aware) or "cls" (position 0), see `pooling_for`.
        batch_size: rows per forward pass; batches are sorted by length to cut padding.
        dtype: autocast dtype (None: fp32), see `tasks.evaluate.autocast_dtype`.
    """
    return encode_poolings(encoder, frame, (pooling,), device, batch_size, dtype)[pooling]


def encode_poolings(encoder: torch.nn.Module, frame: pd.DataFrame,
                    poolings: tuple[Pooling, ...] = POOLINGS,
                    device: str | torch.device = "cpu", batch_size: int = 64,
                    dtype: torch.dtype | None = None) -> dict[Pooling, np.ndarray]:
    """{pooling: (N, H) float32} from ONE forward pass over `frame`: every pooling reads
    the same last hidden state, so comparing poolings costs no second encoding. Arguments
    as for `encode`."""
    for pooling in poolings:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if not poolings:
        raise ValueError("no pooling asked for")
    if len(frame) == 0:
        raise ValueError("cannot encode an empty frame (0 rows)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids_col, pad = frame["input_ids"].tolist(), pad_id_of(encoder)
    out: dict[Pooling, np.ndarray] = {}
    with eval_mode(encoder):
        for idx in sorted_batches(frame["length"].to_numpy(), batch_size):
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(device, dtype):
                hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden = hidden.float()
            for pooling in poolings:
                pooled = pool(hidden, mask, pooling).cpu().numpy()  # (B, H)
                if pooling not in out:
                    out[pooling] = np.empty((len(frame), pooled.shape[1]), dtype=np.float32)
                out[pooling][idx] = pooled  # scatter back to frame order
    return out


def token_frame(tokenizer: Any, texts: list[str], max_length: int,
                labels: np.ndarray | None = None, truncation: str = "head") -> pd.DataFrame:
    """A token frame (`input_ids`, `length`[, `label`]) for raw texts, cut to `max_length`
    by `truncation` (`head` | `head_tail`, see `tasks.text.cut`) as the tokenize step does,
    for callers that start from text rather than the run's cache."""
    from tasks.tokenize import encode_texts

    ids, _ = encode_texts(tokenizer, list(texts), max_length, truncation,
                          desc="tokenize features")
    frame = pd.DataFrame({"input_ids": ids, "length": np.fromiter(map(len, ids), np.int64,
                                                                  count=len(ids))})
    if labels is not None:
        frame["label"] = np.asarray(labels, dtype=np.int64)
    return frame
