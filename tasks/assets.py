"""The DAG's Airflow assets: the data source it reads (its inlet, and its schedule when
`LORAFLOW_SCHEDULE=asset`), and the report and the selected LoRA adapter it writes (the
`report` task's outlets). Standard library only at import: the DAG file and the example
downstream DAG build their `airflow.sdk.Asset` objects from these names and URIs.

An event on the data asset (from an upstream DAG's outlet or `POST /api/v2/assets/events`)
starts a run when the DAG is scheduled on it; `extra["params"]`, if the event carries it,
overrides the trigger form's defaults for that run (e.g. `{"params": {"data":
"/mnt/imdb-2026-12"}}`), checked exactly like a trigger's conf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# x-: a private URI scheme, which Airflow stores as given (no normaliser is looked up)
DATA = {"name": "loraflow_imdb_data", "uri": "x-loraflow://imdb/data"}
REPORT = {"name": "loraflow_imdb_report", "uri": "x-loraflow://lora_imdb_experiment/report"}
ADAPTER = {"name": "loraflow_imdb_lora_adapter",
           "uri": "x-loraflow://lora_imdb_experiment/lora-adapter"}
PARAMS_KEY = "params"  # the event extra's key for run parameters


def params_from_events(events: Any, known: set[str]) -> dict[str, Any]:
    """Run parameters from the latest triggering event on the data asset that carries
    `extra["params"]`; an unknown name is a ValueError naming it (the form's schema
    would refuse it at trigger time; here it would otherwise be ignored silently)."""
    chosen: dict[str, Any] = {}
    for event in _events_of(events, DATA["name"], DATA["uri"]):
        extra = getattr(event, "extra", None) or {}
        params = extra.get(PARAMS_KEY) if isinstance(extra, dict) else None
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"asset event extra {PARAMS_KEY!r} must be an object of run "
                             f"parameters, got {type(params).__name__}")
        chosen = params
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise ValueError(f"asset event extra {PARAMS_KEY!r} names unknown parameters "
                         f"{unknown}; known: {sorted(known)}")
    return dict(chosen)


def _events_of(events: Any, name: str, uri: str) -> list[Any]:
    """The events of one asset in Airflow's triggering_asset_events (a mapping keyed by
    Asset or by name/URI, depending on how it is accessed), oldest first."""
    if not events:
        return []
    out = []
    for key in list(events.keys()):
        if getattr(key, "name", None) == name or getattr(key, "uri", None) == uri \
                or key in (name, uri):
            out.extend(events[key])
    return sorted(out, key=lambda e: str(getattr(e, "timestamp", "")))


def outlet_extras(run_id: str, run_dir: Path | str, summary: dict[str, Any],
                  report_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report extra, adapter extra) for the `report` task's outlet events: the run, its
    preset, each method's configuration selected on validation with its validation and
    test accuracy, the report's URL and the selected LoRA configuration's adapter folders
    (one per successful seed; none when no LoRA configuration was selected)."""
    selected = summary.get("selected") if isinstance(summary.get("selected"), dict) else {}
    configurations = {
        method: {key: s.get(key) for key in ("configuration", "label", "validation_accuracy",
                                              "accuracy", "seeds")}
        for method, s in sorted(selected.items()) if isinstance(s, dict)}
    since = summary.get("since_last_comparable") or {}
    common = {"run_id": run_id, "preset": summary.get("preset"), "model": summary.get("model"),
              "report_url": report_url,
              "regression": bool(since.get("regression")) if isinstance(since, dict) else False}
    report = {**common, "selected": configurations, "headline": summary.get("headline")}
    lora = configurations.get("lora")
    adapters = _adapter_folders(Path(run_dir), lora["configuration"]) if lora else []
    adapter = {**common, "configuration": lora, "adapter_path": adapters[0] if adapters else None,
               "adapter_paths": adapters,
               "format": "PEFT (peft.PeftModel.from_pretrained loads it)" if adapters else None}
    return report, adapter


def _adapter_folders(run_dir: Path, configuration: str) -> list[str]:
    from tasks.registry import Variant

    found = []
    for folder in sorted((run_dir / "results").glob("*/adapter")):
        try:
            if Variant.parse(folder.parent.name).config_name == configuration:
                found.append(str(folder))
        except ValueError:
            continue
    return found
