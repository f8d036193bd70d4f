"""A run from start to finish: resolve the config, lay out the run folder, and (for the
`loraflow run` command and the tests) call every step in-process in DAG order."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.config import DEFAULT_PRESET, ExperimentConfig, preset_config
from tasks.environment import environment
from tasks.paths import RunPaths, read_json, write_json
from tasks.steps import DATA_STEPS, StepNotRun

log = logging.getLogger(__name__)


def new_run_id(prefix: str = "local") -> str:
    """`local__2026-11-29T14-32-26.123456_3f9a1c`: microseconds and a random suffix, so
    two runs started at the same moment never share a folder."""
    return f"{prefix}__{datetime.now(UTC).strftime('%Y-%m-%dT%H-%M-%S.%f')}_{secrets.token_hex(3)}"


def config_from_params(params: dict[str, Any]) -> ExperimentConfig:
    """The preset named in `params` with every other non-empty param as an override.
    Empty strings and empty lists (blank form fields) keep the preset's value."""
    params = dict(params)
    preset = params.pop("preset", None) or DEFAULT_PRESET
    overrides = {k: v for k, v in params.items()
                 if v not in (None, [], "") and not (isinstance(v, str) and not v.strip(" ,;\n\t"))}
    log.info("preset %s with overrides %s", preset,
             ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "none")
    return preset_config(preset, **overrides)


def describe(config: ExperimentConfig) -> str:
    """The resolved settings as a two-column table and the variants they ask for."""
    settings = config.to_dict()
    width = max(len(k) for k in settings)
    lines = ["Resolved configuration:"]
    lines += [f"  {k:<{width}}  {', '.join(map(str, v)) if isinstance(v, list) else v}"
              for k, v in settings.items()]
    variants = config.variants()
    lines.append(f"{len(variants)} variant(s):")
    lines += [f"  {v.name}" for v in variants]
    return "\n".join(lines)


def prepare_run(config: ExperimentConfig, run_id: str, artifacts: Path | str | None = None,
                reports: Path | str | None = None) -> RunPaths:
    """Create the run folder and store the effective config; re-running keeps the first
    config unless it differs, which is an error (a run id names one experiment)."""
    from tasks import preflight

    paths = RunPaths.for_run(run_id, artifacts, reports)
    for line in describe(config).splitlines():  # one record per line: in order, never folded
        log.info("%s", line)
    log.info("checking the model, LoRA targets and ranks, and the data source %s before any "
             "work", config.data)
    preflight.check(config)  # before anything is written: a bad run leaves nothing behind
    if paths.config_json.exists():
        stored = ExperimentConfig.from_dict(read_json(paths.config_json))
        if stored != config:
            raise ValueError(f"run {run_id!r} already exists with a different config "
                             f"({paths.config_json}); use a new run id")
        return paths
    log.info("checks passed; run folder %s", paths.run_dir)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(paths.run_dir / "environment.json", environment())
    write_json(paths.config_json, config.to_dict())  # last: its presence marks a prepared run
    return paths


def load_run(run_dir: Path | str, reports: Path | str | None = None) -> tuple[ExperimentConfig, RunPaths]:
    """The config and paths of a prepared run (`prepare_run` made its folder); the report's
    reading of a run's stored results is tasks.report.load.load_stored_run."""
    paths = RunPaths.from_run_dir(run_dir, reports)
    if not paths.config_json.exists():
        raise StepNotRun(paths.config_json, "prepare")
    return ExperimentConfig.from_dict(read_json(paths.config_json)), paths


def run_all(config: ExperimentConfig, paths: RunPaths, force: bool = False) -> Path:
    """Every step in DAG order, in this process. A failing variant is recorded and the
    others go on (as in the DAG); a failing data step, a full or read-only disk and a stop
    signal stop the run. A complete variant is kept, not run again, unless `force`.
    Returns the report."""
    from tasks import report, tracking
    from tasks.variants import run_variant

    tracking.start_run(paths)  # a parent run in MLflow when tracking is on
    for step in DATA_STEPS:
        step.function()(config, paths)
    for variant in config.variants():
        _keep_going(variant.name, run_variant, variant, config, paths, force=force)
    page = report.build_report(paths.run_dir, paths.reports)
    tracking.log_report(paths, page)
    return page


def _keep_going(what: str, fn, *args, **kwargs) -> None:
    from tasks.failures import storage_error

    try:
        fn(*args, **kwargs)
    except Exception as err:  # the step already wrote a failed metrics record
        if storage_error(err) is not None:
            raise  # every later variant would fail the same way
        log.warning("variant %s failed (%s); continuing with the others", what, err)
