"""Everything about a run that can be checked before any work: the model source and its
configuration, the LoRA targets and ranks against it, the data source and its size.
`prepare` (and so the CLI and the DAG) calls `check`, which raises one ValueError
listing every problem found, so a bad parameter never fails hours later, after the
download, validation and tokenization, or gets retried by Airflow.

The config's own types and bounds are checked when it is built (tasks.config).
"""

from __future__ import annotations

from pathlib import Path

from tasks import registry
from tasks.config import ExperimentConfig

HUB_SPLIT_ROWS = {"train": 25_000, "test": 25_000}  # stanfordnlp/imdb and aclImdb_v1.tar.gz


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
    from tasks.data import parse_source

    try:
        kind, resolved = parse_source(config.data)
    except ValueError as err:
        return [str(err)]
    rows = HUB_SPLIT_ROWS if kind in ("hub", "url") else _local_rows(Path(resolved))
    if rows is None:
        return []
    need = {"train": (config.train_size + config.val_size, "train_size + val_size"),
            "test": (config.test_size, "test_size")}
    return [f"{what} = {n:,} but the {split} split of {config.data!r} has {rows[split]:,} rows"
            for split, (n, what) in need.items() if split in rows and n > rows[split]]


def _local_rows(folder: Path) -> dict[str, int] | None:
    """Rows per split of a local source, read from Parquet metadata or by counting review
    files; None when the folder's layout is for the download step to judge."""
    import pyarrow.parquet as pq

    files = {s: folder / f"{s}.parquet" for s in HUB_SPLIT_ROWS}
    if all(f.exists() for f in files.values()):
        try:
            return {s: pq.read_metadata(f).num_rows for s, f in files.items()}
        except (OSError, ValueError):
            return None  # not Parquet: the download step says so with the file's name
    for root in (folder / "aclImdb", folder):
        if all((root / s / lab).is_dir() for s in HUB_SPLIT_ROWS for lab in ("neg", "pos")):
            return {s: sum(1 for lab in ("neg", "pos") for _ in (root / s / lab).glob("*.txt"))
                    for s in HUB_SPLIT_ROWS}
    return None
