"""One text normalisation for every method, and the input budget of an encoder.

IMDB reviews carry literal HTML line breaks (`<br />`, about 4 WordPiece tokens each, some
5 of a 128-token budget). `normalise` removes such markup and collapses whitespace; the
download step applies it once when it writes a run's subsets, so TF-IDF, the tokenizer and
every method read the same text, and deduplication compares what the methods see.

`cut` keeps what an encoder reads of a review's tokens: the first `budget` (`head`), or
the first quarter of the budget plus the last three quarters (`head_tail`; Sun et al.
2019, "How to Fine-Tune BERT for Text Classification", found head 128 + tail 382 of 510
tokens best on IMDB: reviews often end with the verdict).

Standard library only: the config imports TRUNCATIONS.
"""

from __future__ import annotations

import re
from typing import Any

TRUNCATIONS = ("head", "head_tail")
HEAD_SHARE = 128 / 510  # head_tail: Sun et al.'s share of the budget given to the head
_MARKUP = re.compile(r"<\s*/?\s*(?:br|p|i|b|em|strong|hr)\s*/?\s*>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """`"Great.<br /><br />Really"` -> `"Great. Really"`: markup tags out, runs of
    whitespace collapsed to one space, ends stripped."""
    return _SPACE.sub(" ", _MARKUP.sub(" ", text)).strip()


def head_tokens(budget: int) -> int:
    """How many of `budget` tokens `head_tail` takes from the start (at least one)."""
    return max(1, round(budget * HEAD_SHARE))


def cut(ids: list[int], budget: int, truncation: str) -> list[int]:
    """The tokens (no special tokens) an encoder reads of `ids` within `budget`."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if budget < 1:
        raise ValueError(f"a budget of {budget} tokens leaves no room for the review")
    if len(ids) <= budget:
        return list(ids)
    if truncation == "head":
        return list(ids[:budget])
    head = min(head_tokens(budget), budget - 1) if budget > 1 else budget
    tail = budget - head
    return list(ids[:head]) + (list(ids[-tail:]) if tail else [])


def describe(max_length: int, truncation: str, specials: int = 2) -> str:
    """`the first 32 and last 94 tokens` / `the first 126 tokens` of a review."""
    budget = max_length - specials
    if truncation == "head":
        return f"the first {budget} tokens"
    head = min(head_tokens(budget), budget - 1)
    return f"the first {head} and last {budget - head} tokens"


def input_budget(reads: str, tokens: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a method read of each review (the metrics record's `input_budget`): `reads` is
    the registry's; `tokens` the run's data/tokens.json (None before the tokenize step)."""
    if reads == "labels":
        return {"reads": reads, "text": "no review text (training labels only)"}
    if reads == "whole":
        return {"reads": reads, "text": "the whole review", "cut_share": 0.0,
                "mean_share_read": 1.0}
    if not tokens:
        return None
    settings, test = tokens.get("truncation_settings") or {}, tokens["stats"]["test"]
    head, tail = settings.get("head_tokens"), settings.get("tail_tokens") or 0
    text = (f"the first {head} and last {tail} tokens" if tail else f"the first {head} tokens")
    return {"reads": reads, "text": text, "max_tokens": tokens["max_length"],
            "truncation": tokens.get("truncation"), "cut_share": test["truncated_share"],
            "mean_share_read": test.get("mean_share_read")}
