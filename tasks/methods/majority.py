"""The majority class: the most frequent training label for every review. Its accuracy is
the share of that label in the subset: the floor every other method has to clear."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from tasks.job import Job, Predictions


def predict(job: Job) -> Predictions:
    train = pd.read_parquet(job.paths.train_parquet, columns=["label"])["label"].to_numpy()
    started = time.perf_counter()
    share_positive = float((train == 1).mean())
    train_seconds = time.perf_counter() - started
    majority = 1 if share_positive >= 0.5 else 0  # a tie goes to positive, as prob >= 0.5 does
    rows = {split: len(pd.read_parquet(job.paths.split_parquet(split), columns=["label"]))
            for split in ("validation", "test")}
    record = job.record
    record.hyperparameters.update(rule="most frequent training label", majority_label=majority,
                                  train_positive_share=share_positive)
    record.params_total = record.params_trainable = 1  # one learned number: the prior
    # counting labels takes microseconds: a throughput from it would dwarf every chart
    record.train_seconds = train_seconds
    record.inference_ms_per_example = 0.0
    record.notes = (f"Predicts the most frequent training label ({majority}) for every review; "
                    f"prob_positive is the training share of positives ({share_positive:.3f}). "
                    "Its accuracy is the share of that label: the floor for every other model.")
    # prob_positive = the training prior, so `prob >= 0.5` reproduces the majority label
    return Predictions(*(np.full(rows[s], share_positive) for s in ("validation", "test")))
