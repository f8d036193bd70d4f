"""Everything about a run that can be checked before any work: the model source (its
configuration and its tokenizer), the LoRA targets and ranks against it, the data source
and its size.
`prepare` (and so the CLI and the DAG) calls `check`, which raises one ValueError
listing every problem found, so a bad parameter never fails hours later, after the
download, validation and tokenization, or gets retried by Airflow.

The model is checked whatever the methods: the tokenize step always loads its tokenizer
(a run of baselines alone too), and a bad model found there would be retried.

The config's own types and bounds are checked when it is built (tasks.config).
"""

from __future__ import annotations

from tasks import registry
from tasks.config import ExperimentConfig

PLAIN_SENTENCE = "this movie was good"  # words any English tokenizer knows
BUILT_IN_TOKENIZERS: set[str] = set()  # built-in model names whose tokenizer loaded once


def check(config: ExperimentConfig) -> None:
    problems = _data_problems(config) + _model_problems(config)
    if problems:
        raise ValueError("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))


def _model_problems(config: ExperimentConfig) -> list[str]:
    """The model's configuration and tokenizer load (tokenize needs the tokenizer, every
    encoder method the configuration); LoRA's targets and ranks fit its modules."""
    from lora_core.inject import resolve_targets
    from tasks.models import load_config, skeleton

    encoder = any(registry.method(m).uses_encoder for m in config.methods)
    try:
        model = skeleton(config.model) if encoder else load_config(config.model)
    except ValueError as err:
        return [str(err)]
    tokenizer = _tokenizer_problem(config.model)
    if tokenizer:
        return [tokenizer]
    if "lora" not in config.methods:
        return []
    problems = []
    for targets in config.targets:
        try:
            names = resolve_targets(model, targets)
        except ValueError as err:
            problems.append(str(err))
            continue
        smallest = min(min(model.get_submodule(n).in_features, model.get_submodule(n).out_features)
                       for n in names)
        too_big = [r for r in config.ranks if r > smallest]
        if too_big:
            problems.append(f"LoRA rank(s) {too_big} exceed the smaller side ({smallest}) of a "
                            f"matrix that target set {targets!r} adapts: B·A reaches full rank "
                            f"at {smallest}, so a larger rank only adds parameters")
    return problems


def _tokenizer_problem(source: str) -> str | None:
    """Why the tokenize step could not load the model's tokenizer, or None."""
    from tasks.models import EMBEDDED_MINILM, TINY_DISTILBERT, load_tokenizer

    if source in BUILT_IN_TOKENIZERS:  # a packaged tokenizer does not change within a process
        return None
    try:
        tokenizer = load_tokenizer(source)
        ids = tokenizer(PLAIN_SENTENCE, add_special_tokens=False)["input_ids"]
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, TypeError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"model {source!r}: its tokenizer cannot be loaded, and the tokenize step needs "
                f"it: {first}")
    # transformers builds an empty tokenizer for a folder without vocabulary files: every
    # word would become [UNK] and every method would read nothing
    if all(i == tokenizer.unk_token_id for i in ids):
        return (f"model {source!r}: its tokenizer knows none of the words of {PLAIN_SENTENCE!r} "
                f"(vocabulary of {len(tokenizer.get_vocab())} tokens): are its vocabulary files "
                "(tokenizer.json, vocab.txt) missing?")
    if source in (EMBEDDED_MINILM, TINY_DISTILBERT):
        BUILT_IN_TOKENIZERS.add(source)
    return None


def _data_problems(config: ExperimentConfig) -> list[str]:
    from tasks.sources import parse_source, source_rows

    try:
        kind, resolved = parse_source(config.data)
    except ValueError as err:
        return [str(err)]
    rows = source_rows(kind, resolved)
    if rows is None:
        return []
    need = {"train": (config.train_size + config.val_size, "train_size + val_size"),
            "test": (config.test_size, "test_size")}
    return [f"{what} = {n:,} but the {split} split of {config.data!r} has {rows[split]:,} rows"
            for split, (n, what) in need.items() if split in rows and n > rows[split]]
