"""The seed notebook's "zero-shot baseline": predict positive when the sum of the [CLS]
hidden state of the untrained encoder is > 0. It is not a classifier (nothing ties the
sign of that fixed projection to sentiment); it stays to show what the notebook's number
measured, beside the real zero-shot baseline."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from tasks.job import Job, Predictions

BATCH = 64  # inference only: no gradients, so larger than the training batch
LATENCY_EXAMPLES = 32
MODEL_SEED = 0  # random-weight models are built from this seed


def cls_sums(encoder: torch.nn.Module, frame: pd.DataFrame, device: str,
             batch_size: int = BATCH, dtype: torch.dtype | None = None) -> np.ndarray:
    """Sum over hidden units of the [CLS] (first) position's last hidden state, one float
    per row in the frame's order; batches padded to their longest row, sorted by length;
    under autocast to `dtype` (None: fp32), summed in fp64."""
    from tasks.evaluate import autocast, eval_mode, pad_batch, pad_id_of, sorted_batches

    ids_col, pad = frame["input_ids"].tolist(), pad_id_of(encoder)
    out = np.empty(len(frame), dtype=np.float64)
    with eval_mode(encoder):
        for idx in sorted_batches(frame["length"].to_numpy(), batch_size):
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            with autocast(device, dtype):
                hidden = encoder(input_ids=ids.to(device),
                                 attention_mask=mask.to(device)).last_hidden_state
            out[idx] = hidden[:, 0, :].to(torch.float64).sum(dim=-1).cpu().numpy()  # (B,)
    return out


def predict(job: Job) -> Predictions:
    from scipy.special import expit

    from tasks.evaluate import PeakMemory, measure_latency_ms
    from tasks.models import load_classifier
    from tasks.tokenize import load_split

    device = job.device
    frames = {s: load_split(job.paths, s) for s in ("validation", "test")}
    with PeakMemory(device) as memory:
        # the bare pretrained encoder (DistilBertModel / BertModel), as the notebook used
        encoder = load_classifier(job.config.model, seed=MODEL_SEED).base_model.to(device)
        started = time.perf_counter()
        scores = {s: cls_sums(encoder, frames[s], device, dtype=job.dtype) for s in frames}
        eval_seconds = time.perf_counter() - started
    test = scores["test"]
    positive_share = float((test > 0).mean())
    record = job.record
    record.hyperparameters.update(score="sum of the encoder's [CLS] hidden state", threshold=0.0,
                                  prob_positive="sigmoid(score)", batch_size=BATCH,
                                  precision=job.precision)
    record.params_total = sum(p.numel() for p in encoder.parameters())
    record.params_trainable = 0
    record.peak_memory_bytes, record.peak_memory_kind = memory.peak_bytes, memory.kind
    record.eval_seconds = eval_seconds
    record.inference_ms_per_example = measure_latency_ms(
        encoder, frames["test"], device, min(LATENCY_EXAMPLES, len(frames["test"])),
        dtype=job.dtype)
    record.details["score_summary"] = {"mean": float(test.mean()), "std": float(test.std()),
                                       "positive_share": positive_share}
    labels = frames["test"]["label"].to_numpy()
    record.notes = ("The seed notebook's 'zero-shot baseline': positive when the sum of the "
                    "[CLS] hidden state of the untrained encoder is > 0 (prob_positive = "
                    "sigmoid of that sum). Not a classifier: nothing ties the sign of this "
                    f"fixed projection to sentiment. It called {positive_share:.1%} of the test "
                    f"reviews positive; {float((labels == 1).mean()):.1%} are.")
    # sigmoid: > 0.5 exactly when the score is > 0, the notebook's rule
    return Predictions(expit(scores["validation"]), expit(test))
