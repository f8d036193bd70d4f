"""Everything about a run that can be checked before any work: the model source and its
configuration, the LoRA targets and ranks against it, the data source and its size.
`prepare` (and so the CLI and the DAG) calls `check`, which raises one ValueError
listing every problem found, so a bad parameter never fails hours later, after the
download, validation and tokenization, or gets retried by Airflow.

The config's own types and bounds are checked when it is built (tasks.config).
"""

from __future__ import annotations

from tasks import registry
from tasks.config import ExperimentConfig


def check(config: ExperimentConfig) -> None:
    problems = _data_problems(config)
    if any(registry.method(m).uses_encoder for m in config.methods):
        problems += _model_problems(config)
    if problems:
        raise ValueError("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))


def _model_problems(config: ExperimentConfig) -> list[str]:
    from lora_core.inject import resolve_targets
    from tasks.models import skeleton

    try:
        model = skeleton(config.model)
    except ValueError as err:
        return [str(err)]
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
