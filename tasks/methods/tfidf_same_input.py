"""The TF-IDF baseline on exactly the text the encoder reads: the run's tokenized subsets
(max_length, truncation) decoded back to words. Set beside `tfidf_logreg` (whole reviews),
it shows what the input budget alone is worth, apart from the model."""

from __future__ import annotations

import pandas as pd

from tasks.job import Job, Predictions
from tasks.methods.tfidf_logreg import SPLITS, fit_predict


def predict(job: Job) -> Predictions:
    from tasks.models import load_tokenizer
    from tasks.tokenize import load_split

    tokenizer = load_tokenizer(job.config.model)
    texts = {}
    for split in SPLITS:
        tokens = load_split(job.paths, split)
        words = tokenizer.batch_decode([ids.tolist() for ids in tokens["input_ids"]],
                                       skip_special_tokens=True)
        texts[split] = pd.DataFrame({"text": words, "label": tokens["label"].to_numpy()})
    predictions = fit_predict(job, texts)
    job.record.hyperparameters["input"] = "the encoder's tokens, decoded"
    job.record.notes += (" The texts are the run's tokenized reviews decoded back to words: "
                         "exactly what the encoder reads, no more.")
    return predictions
