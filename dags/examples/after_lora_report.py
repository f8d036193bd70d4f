"""
### Example: a DAG that runs after each loraflow report

Scheduled on the report asset that `lora_imdb_experiment`'s `report` task emits, so it runs
once per finished report. Its task reads the triggering event's extras (run id, preset,
each method's selected configuration with validation and test accuracy, the report URL)
and returns what a deployment step would need. Copy it and replace the body: publish the
adapter (schedule on `loraflow_imdb_lora_adapter` instead, whose extras carry
`adapter_path`), post the headline, refresh a dashboard.
"""

from __future__ import annotations

import inspect
from typing import Any

from airflow.sdk import Asset, dag, get_current_context, task

from tasks import assets

REPORT_ASSET = Asset(**assets.REPORT)


@dag(
    dag_id="loraflow_after_report_example",
    dag_display_name="Example: after each LoRA report",
    description="Runs after each lora_imdb_experiment report (asset-scheduled example)",
    doc_md=__doc__,
    schedule=[REPORT_ASSET],
    catchup=False,
    tags=["loraflow", "example"],
)
def loraflow_after_report_example():
    @task
    def read_report_event() -> dict[str, Any]:
        """**Read the report event** that started this run: its extras name the run, the
        preset, the selected configurations and the report URL. Reads nothing else and
        writes only its return value (XCom). Retry: none needed; it only reads."""
        events = get_current_context()["triggering_asset_events"][REPORT_ASSET]
        extra = dict(events[-1].extra)
        lora = extra.get("selected", {}).get("lora") or {}
        print(f"run {extra.get('run_id')}: LoRA {lora.get('label')} test accuracy "
              f"{lora.get('accuracy')}; report {extra.get('report_url')}")
        return {"run_id": extra.get("run_id"), "report_url": extra.get("report_url"),
                "lora": lora}

    read_report_event.function.__doc__ = inspect.cleandoc(read_report_event.function.__doc__)
    read_report_event()


loraflow_after_report_example()
