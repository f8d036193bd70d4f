"""A real zero-shot baseline: the pretrained model, no training on IMDB labels.

Two modes, by what the pretrained model can do without a task head:

- "embedding" (sentence encoders, e.g. the embedded all-MiniLM-L6-v2): the review's
  pooled, L2-normalised embedding against one short description per label;
  P(positive) = softmax(cos / T) over the two cosines with T = 0.05, the similarity scale
  (20 = 1/T) of the MultipleNegativesRankingLoss the sentence-transformers models were
  trained with. T only calibrates: the predicted label is the nearer description.
- "cloze" (checkpoints with a masked-LM head, e.g. distilbert-base-uncased): the prompt
  "<review> It was [MASK]." and two label words; P(positive) = softmax over the two words'
  logits at the mask (Schick & Schütze 2021, PET). The review, not the prompt, is cut so
  the sequence fits `max_length`. A label word that is not one token of the model's
  vocabulary has no single logit: its alternative is skipped, and the record says so.

Both modes read what the trained encoders read: the normalised text (`tasks.text`), cut
to the run's `max_length` by its `truncation` (`head` or `head_tail`).

A few prompt alternatives are fixed below; `choose_and_score` picks one by validation
accuracy and scores the test texts once with it: the prompt is a choice, and choices are
made on validation only (the report's row says on how many labels). The seed notebook's "zero-shot" (`seed_heuristic`) is not this:
it thresholds the summed [CLS] state of the encoder and is not a classifier.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from tasks.evaluate import autocast, eval_mode, pad_batch, sorted_batches
from tasks.text import cut, describe, normalise
from tasks.tokenize import special_tokens_around

if TYPE_CHECKING:
    from tasks.job import Job, Predictions

Mode = Literal["embedding", "cloze"]
TEMPERATURE = 0.05  # 1 / the MultipleNegativesRankingLoss scale (20) of sentence-transformers
MASK = "{mask}"
REVIEW = "{review}"

# name -> (negative description, positive description)
EMBEDDING_ALTERNATIVES: dict[str, tuple[str, str]] = {
    "movie-review": ("A negative movie review.", "A positive movie review."),
    "verdict": ("This movie was terrible.", "This movie was great."),
    "feeling": ("I hated this film.", "I loved this film."),
}


@dataclass(frozen=True)
class Cloze:
    template: str  # REVIEW first, then the prompt with one MASK
    negative: str  # label word for 0: one WordPiece token
    positive: str  # label word for 1


CLOZE_ALTERNATIVES: dict[str, Cloze] = {
    "it-was": Cloze("{review} It was {mask}.", "terrible", "great"),
    "movie-was": Cloze("{review} The movie was {mask}.", "bad", "good"),
    "all-in-all": Cloze("{review} All in all, it was a {mask} film.", "bad", "good"),
}


@dataclass
class ZeroShotResult:
    mode: Mode
    chosen: str  # the alternative picked on validation
    validation_accuracy: dict[str, float]  # every alternative, in the order tried
    prob_validation: np.ndarray  # validation texts with `chosen`, in their order
    prob_positive: np.ndarray  # test texts, in their order, scored once with `chosen`
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # model loading excluded
    skipped: dict[str, str] = field(default_factory=dict)  # alternative -> why left out


# --- which mode ---------------------------------------------------------------------------------

def _config(model_source: str) -> dict[str, Any] | None:
    """The source's config.json (local folder, hub cache, or hub), None when unreadable."""
    from tasks.features import model_file

    path = model_file(model_source, "config.json")
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def zero_shot_mode(model_source: str) -> tuple[Mode | None, str]:
    """("embedding" | "cloze" | None, why). Sentence-transformers files mean a sentence
    encoder; `architectures` with ForMaskedLM/ForPreTraining mean an MLM head; a hub id of
    model_type distilbert/bert without `architectures` is taken as its pretrained base
    checkpoint, which ships that head. Anything else has no zero-shot reading."""
    from tasks.features import sentence_transformers_pooling
    from tasks.models import TINY_DISTILBERT, resolve_source

    if model_source == TINY_DISTILBERT:
        return None, ("random weights: tiny-distilbert is an untrained plumbing model, so any "
                      "zero-shot score would be noise")
    if sentence_transformers_pooling(model_source) is not None:
        return "embedding", "sentence-transformers encoder (modules.json): embedding similarity"
    config = _config(model_source)
    if config is None:
        return None, f"no config.json readable for {model_source!r} (offline and not cached?)"
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures):
        return "cloze", f"masked-LM head ({', '.join(architectures)}): cloze prompt"
    _, local = resolve_source(model_source)
    if not local and not architectures and config.get("model_type") in ("distilbert", "bert"):
        return "cloze", f"hub {config['model_type']} base checkpoint: cloze prompt"
    return None, (f"{model_source!r} has neither sentence-transformers files nor a masked-LM "
                  f"head (architectures {architectures or 'unset'}): no zero-shot reading")


def load_zero_shot_model(model_source: str, mode: Mode) -> torch.nn.Module:
    """The bare encoder (embedding) or the masked LM (cloze) of `model_source`, in eval mode."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from tasks.models import resolve_source

    name, local = resolve_source(model_source)
    loader = {"embedding": AutoModel, "cloze": AutoModelForMaskedLM}.get(mode)
    if loader is None:
        raise ValueError(f"unknown zero-shot mode {mode!r}; expected embedding or cloze")
    return loader.from_pretrained(name, local_files_only=local).eval()


# --- embedding mode -------------------------------------------------------------------------------

def embed(encoder: torch.nn.Module, tokenizer: Any, texts: list[str], pooling: str,
          max_length: int, device: str | torch.device = "cpu", batch_size: int = 64,
          dtype: torch.dtype | None = None, truncation: str = "head") -> np.ndarray:
    """L2-normalised pooled embeddings (N, H) of `texts`, each normalised and cut to
    `max_length` tokens by `truncation`, as the tokenize step cuts the trained methods'."""
    from tasks.features import encode, token_frame

    frame = token_frame(tokenizer, [normalise(t) for t in texts], max_length,
                        truncation=truncation)
    vectors = encode(encoder, frame, pooling, device, batch_size, dtype)  # type: ignore[arg-type]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def similarity_probabilities(reviews: np.ndarray, labels: np.ndarray,
                             temperature: float = TEMPERATURE) -> np.ndarray:
    """P(positive) from unit vectors: softmax over cosines with the (negative, positive)
    description vectors `labels` (2, H), divided by `temperature`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = reviews.astype(np.float64) @ labels.astype(np.float64).T / temperature  # (N, 2)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


# --- cloze mode -----------------------------------------------------------------------------------

def label_word_id(tokenizer: Any, word: str) -> int:
    """The vocabulary id of a label word, which must be one token (no sub-word split)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"label word {word!r} is not a single known token of "
                         f"{type(tokenizer).__name__} (tokens: "
                         f"{tokenizer.convert_ids_to_tokens(ids)})")
    return int(ids[0])


def usable_clozes(tokenizer: Any, alternatives: dict[str, Cloze]
                  ) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """({name: (negative id, positive id)} of the alternatives whose two label words are
    single known tokens, {name: why not} of the others), in the order given."""
    usable: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    for name, cloze in alternatives.items():
        try:
            usable[name] = (label_word_id(tokenizer, cloze.negative),
                            label_word_id(tokenizer, cloze.positive))
        except ValueError as err:
            skipped[name] = str(err)
    return usable, skipped


def cloze_prompt(tokenizer: Any, template: str, max_length: int) -> tuple[list[int], int]:
    """(the prompt's token ids, how many review tokens fit beside it and the special
    tokens in `max_length`)."""
    if not template.startswith(REVIEW) or template.count(MASK) != 1:
        raise ValueError(f"cloze template {template!r} must start with {REVIEW} and hold "
                         f"exactly one {MASK}")
    suffix = template[len(REVIEW):].replace(MASK, tokenizer.mask_token)
    prompt = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if prompt.count(tokenizer.mask_token_id) != 1:
        raise ValueError(f"cloze prompt {suffix!r} does not tokenize to exactly one mask token")
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False) - len(prompt)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a review next to the "
                         f"prompt {suffix!r} ({len(prompt)} tokens + special tokens)")
    return prompt, budget


def cloze_inputs(tokenizer: Any, texts: list[str], template: str, max_length: int,
                 truncation: str = "head") -> tuple[list[list[int]], np.ndarray]:
    """(input ids with special tokens, mask position) per text. The normalised review is
    cut by `truncation` (`tasks.text.cut`: its head, or its head and tail) so that review +
    prompt + special tokens fit `max_length`; the prompt is never cut."""
    prompt, budget = cloze_prompt(tokenizer, template, max_length)
    # a literal "[MASK]" inside a review would be read as the mask token: drop it
    reviews = [normalise(t).replace(tokenizer.mask_token, " ") for t in texts]
    encoded = tokenizer(reviews, add_special_tokens=False, truncation=False,
                        verbose=False)["input_ids"]
    before, after = special_tokens_around(tokenizer)
    ids, positions = [], np.empty(len(texts), dtype=np.int64)
    for i, review in enumerate(encoded):
        row = before + cut(review, budget, truncation) + prompt + after
        # the prompt's mask is the row's last one: reviews hold none, the prompt exactly one
        positions[i] = len(row) - 1 - row[::-1].index(tokenizer.mask_token_id)
        assert len(row) <= max_length, (len(row), max_length)
        ids.append(row)
    return ids, positions


def cloze_probabilities(model: torch.nn.Module, tokenizer: Any, texts: list[str], cloze: Cloze,
                        max_length: int, device: str | torch.device = "cpu",
                        batch_size: int = 16, dtype: torch.dtype | None = None,
                        truncation: str = "head") -> np.ndarray:
    """P(positive) per text: softmax over the logits of the two label words at the mask.
    Batches are small by default: the MLM head returns (B, T, vocab) logits."""
    word_ids = [label_word_id(tokenizer, cloze.negative), label_word_id(tokenizer, cloze.positive)]
    ids_col, positions = cloze_inputs(tokenizer, texts, cloze.template, max_length, truncation)
    pad = tokenizer.pad_token_id or 0
    out = np.empty(len(texts), dtype=np.float64)
    with eval_mode(model):
        for idx in sorted_batches([len(r) for r in ids_col], batch_size):
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            with autocast(device, dtype):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            at_mask = logits[torch.arange(len(idx)), torch.as_tensor(positions[idx])]  # (B, V)
            pair = at_mask[:, word_ids].double()  # (B, 2): negative, positive
            out[idx] = torch.softmax(pair, dim=-1)[:, 1].cpu().numpy()
    return out


# --- choosing on validation, scoring test once ---------------------------------------------------

def choose_and_score(model_source: str, validation_texts: list[str],
                     validation_labels: np.ndarray, test_texts: list[str], *,
                     max_length: int = 128, truncation: str = "head",
                     device: str | torch.device = "cpu", batch_size: int | None = None,
                     dtype: torch.dtype | None = None) -> ZeroShotResult:
    """Score every fixed alternative of the model's mode on the validation texts, pick the
    most accurate (ties: the first listed), then score the test texts once with it.
    Test labels are never an input. ValueError when the model has no zero-shot mode;
    NotApplicable when no cloze alternative's label words are single tokens of its
    tokenizer (those that are not are skipped and listed in `skipped`)."""
    from tasks.features import pooling_for
    from tasks.job import NotApplicable
    from tasks.models import load_tokenizer

    mode, reason = zero_shot_mode(model_source)
    if mode is None:
        raise ValueError(f"no zero-shot baseline for {model_source!r}: {reason}")
    labels = np.asarray(validation_labels, dtype=np.int64)
    if len(labels) != len(validation_texts) or len(labels) == 0:
        raise ValueError(f"need one label per validation text and at least one text, got "
                         f"{len(labels)} labels for {len(validation_texts)} texts")
    tokenizer = load_tokenizer(model_source)
    skipped: dict[str, str] = {}
    if mode == "cloze":
        usable, skipped = usable_clozes(tokenizer, CLOZE_ALTERNATIVES)
        if not usable:
            raise NotApplicable("no cloze prompt is usable: " + "; ".join(
                f"'{name}': {why}" for name, why in skipped.items()))
        clozes = {name: CLOZE_ALTERNATIVES[name] for name in usable}
    model = load_zero_shot_model(model_source, mode).to(device)
    started = time.perf_counter()
    accuracy: dict[str, float] = {}
    val_prob: dict[str, np.ndarray] = {}
    hyper: dict[str, Any] = {"mode": mode, "mode_reason": reason, "max_length": max_length,
                             "truncation": truncation, "selection": "validation accuracy"}
    if mode == "embedding":
        pooling = pooling_for(model_source)
        batch = batch_size or 64

        def vectors(texts: list[str]) -> np.ndarray:
            return embed(model, tokenizer, texts, pooling, max_length, device, batch, dtype,
                         truncation)

        val = vectors(validation_texts)
        described = {n: vectors(list(pair)) for n, pair in EMBEDDING_ALTERNATIVES.items()}
        for name, pair in described.items():
            val_prob[name] = similarity_probabilities(val, pair)
            accuracy[name] = float(((val_prob[name] >= 0.5) == labels).mean())
        chosen = max(accuracy, key=accuracy.__getitem__)  # first of the best on ties
        prob_test = similarity_probabilities(vectors(test_texts), described[chosen])
        hyper.update(pooling=pooling, temperature=TEMPERATURE, normalised=True,
                     descriptions=dict(zip(("negative", "positive"),
                                           EMBEDDING_ALTERNATIVES[chosen], strict=True)),
                     alternatives={n: list(p) for n, p in EMBEDDING_ALTERNATIVES.items()})
    else:
        batch = batch_size or 16
        for name, cloze in clozes.items():
            val_prob[name] = cloze_probabilities(model, tokenizer, validation_texts, cloze,
                                                 max_length, device, batch, dtype, truncation)
            accuracy[name] = float(((val_prob[name] >= 0.5) == labels).mean())
        chosen = max(accuracy, key=accuracy.__getitem__)
        pick = clozes[chosen]
        prob_test = cloze_probabilities(model, tokenizer, test_texts, pick, max_length, device,
                                        batch, dtype, truncation)
        hyper.update(template=pick.template, label_words=[pick.negative, pick.positive],
                     prompt="kept whole; the review is cut to fit beside it",
                     review_tokens=cloze_prompt(tokenizer, pick.template, max_length)[1],
                     alternatives={n: [c.template, c.negative, c.positive]
                                   for n, c in clozes.items()})
        if skipped:
            hyper["skipped_alternatives"] = dict(skipped)
    hyper.update(chosen=chosen, validation_accuracy=accuracy, batch_size=batch,
                 validation_examples=len(labels))
    return ZeroShotResult(mode, chosen, accuracy, val_prob[chosen], prob_test, hyper,
                          time.perf_counter() - started, skipped)


def row_label(method_label: str, alternatives: int, validation_labels: int) -> str:
    """What the report's row says was done: `zero-shot (prompt chosen on 500 validation
    labels)`; with a single usable alternative nothing was chosen."""
    if alternatives > 1:
        return f"{method_label} (prompt chosen on {validation_labels:,} validation labels)"
    return f"{method_label} (one prompt, no choice on validation)"


def predict(job: Job) -> Predictions:
    """The method's entry point: not applicable without a zero-shot reading of the model."""
    import pandas as pd

    from tasks import registry
    from tasks.evaluate import PeakMemory
    from tasks.job import NotApplicable, Predictions

    mode, reason = zero_shot_mode(job.config.model)
    if mode is None:
        raise NotApplicable(reason)
    frames = {s: pd.read_parquet(job.paths.split_parquet(s), columns=["text", "label"])
              for s in ("validation", "test")}
    with PeakMemory(job.device) as memory:
        result = choose_and_score(job.config.model, frames["validation"]["text"].tolist(),
                                  frames["validation"]["label"].to_numpy(),
                                  frames["test"]["text"].tolist(),
                                  max_length=job.config.max_length,
                                  truncation=job.config.truncation, device=job.device,
                                  dtype=job.dtype)
    record = job.record
    record.hyperparameters.update(result.hyperparameters)
    record.params_trainable = 0
    record.eval_seconds = result.seconds
    record.peak_memory_bytes, record.peak_memory_kind = memory.peak_bytes, memory.kind
    tried, n_labels = len(result.validation_accuracy), len(frames["validation"])
    scored = len(frames["test"]) + n_labels * tried
    record.details["inference_batch_ms_per_example"] = 1000.0 * result.seconds / scored
    record.details["chosen"] = result.chosen
    record.details["prompt_choice"] = {"alternatives": tried, "validation_labels": n_labels,
                                       "skipped": sorted(result.skipped)}
    if result.mode == "cloze" and record.input_budget:  # the prompt takes part of the budget
        review = describe(result.hyperparameters["review_tokens"], job.config.truncation, 0)
        record.input_budget = {**record.input_budget, "text": f"{review}, beside the prompt"}
    record.details["row_label"] = row_label(registry.method(job.variant.method).label, tried,
                                            n_labels)
    what = ("the review's embedding against one description per label"
            if result.mode == "embedding" else "a cloze prompt's label words")
    record.notes = (f"No IMDB labels used for training: {what} (alternative "
                    f"'{result.chosen}', chosen by accuracy on {n_labels:,} validation labels "
                    f"among {tried}).")
    if result.skipped:
        record.notes += " Skipped: " + "; ".join(f"'{name}' ({why})"
                                                 for name, why in result.skipped.items()) + "."
    return Predictions(result.prob_validation, result.prob_positive)
