"""A run from start to finish: resolve the config, lay out the run folder, and (for the
`loraflow run` command and the tests) call every step in-process in DAG order."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.config import ExperimentConfig, preset_config
from tasks.environment import environment
from tasks.paths import RunPaths, read_json, write_json

log = logging.getLogger(__name__)


def new_run_id(prefix: str = "local") -> str:
    return f"{prefix}__{datetime.now(UTC).strftime('%Y-%m-%dT%H-%M-%S')}"


def config_from_params(params: dict[str, Any]) -> ExperimentConfig:
    """The preset named in `params` with every other non-empty param as an override.
    Empty strings and empty lists (blank form fields) keep the preset's value."""
    params = dict(params)
    preset = params.pop("preset", None) or "smoke"
    overrides = {k: v for k, v in params.items() if v not in (None, "", [])}
    return preset_config(preset, **overrides)


def prepare_run(config: ExperimentConfig, run_id: str, artifacts: Path | str | None = None,
                reports: Path | str | None = None) -> RunPaths:
    """Create the run folder and store the effective config; re-running keeps the first
    config unless it differs, which is an error (a run id names one experiment)."""
    paths = RunPaths.for_run(run_id, artifacts, reports)
    if paths.config_json.exists():
        stored = ExperimentConfig.from_dict(read_json(paths.config_json))
        if stored != config:
            raise ValueError(f"run {run_id!r} already exists with a different config "
                             f"({paths.config_json}); use a new run id")
        return paths
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(paths.run_dir / "environment.json", environment())
    write_json(paths.config_json, config.to_dict())  # last: its presence marks a prepared run
    return paths


def load_run(run_dir: Path | str, reports: Path | str | None = None) -> tuple[ExperimentConfig, RunPaths]:
    paths = RunPaths.from_run_dir(run_dir, reports)
    if not paths.config_json.exists():
        raise FileNotFoundError(f"{paths.config_json} is missing: was the run prepared?")
    return ExperimentConfig.from_dict(read_json(paths.config_json)), paths


def run_all(config: ExperimentConfig, paths: RunPaths) -> Path:
    """Every step in DAG order, in this process. A failing variant is recorded and the
    others go on (as in the DAG); a failing data step stops the run. Returns the report."""
    from tasks import baselines, data, report, tokenize, train, validate

    data.download_dataset(config, paths)
    validate.validate_dataset(config, paths)
    tokenize.tokenize_dataset(config, paths)
    for name in config.baselines:
        _keep_going(name, baselines.run_baseline, name, config, paths)
    for spec in config.lora_variants() + config.full_finetune_variants():
        _keep_going(train.variant_name(spec), train.train_variant, spec, config, paths)
    return report.build_report(paths.run_dir, paths.reports)


def _keep_going(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # the step already wrote a failed metrics record
        log.exception("variant %s failed; continuing with the others", what)
