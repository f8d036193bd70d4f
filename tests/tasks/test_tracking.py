"""MLflow tracking against a real `mlflow server` (its own .venv-mlflow, as `make setup`
creates it): the smoke preset run in-process with tracking on, read back through the MLflow
client of that virtualenv; a retried variant continues its child run; a stopped server
costs a warning, never a variant."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tasks import tracking
from tasks.config import preset_config
from tasks.metrics import MetricsRecord
from tasks.paths import read_json
from tasks.pipeline import prepare_run, run_all
from tasks.registry import Variant
from tests.conftest import TINY

MLFLOW_VENV = Path(__file__).resolve().parents[2] / ".venv-mlflow"
MLFLOW = MLFLOW_VENV / "bin" / "mlflow"


def _free_port(offset: int = 0) -> int:
    """A port nothing listens on: $LORAFLOW_TEST_MLFLOW_PORT + offset when set (a range
    of one's own on a shared machine), else one the system picks."""
    base = os.environ.get("LORAFLOW_TEST_MLFLOW_PORT")
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(base) + offset if base else 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real MLflow server on a free port, with a throw-away SQLite backend and artifact
    folder, for this module."""
    if not MLFLOW.exists():
        reason = f"{MLFLOW} not found: run `bash scripts/mlflow_server.sh install` (make setup does)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
         "--artifacts-destination", str(home / "artifacts"), "--serve-artifacts"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:  # not listening yet, or still migrating
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its uvicorn worker too
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()


READ_BACK = r"""
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`loraflow.run_id` = '{sys.argv[3]}'")
out = {"runs": []}
for r in runs:
    arts = []
    stack = [None]
    while stack:
        for a in client.list_artifacts(r.info.run_id, stack.pop()):
            (stack.append(a.path) if a.is_dir else arts.append(a.path))
    out["runs"].append({
        "id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
        "tags": r.data.tags, "params": r.data.params, "metrics": r.data.metrics,
        "loss": [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")],
        "lr": len(client.get_metric_history(r.info.run_id, "lr")),
        "epoch_val_accuracy": [(m.step, m.value) for m in
                               client.get_metric_history(r.info.run_id, "epoch_val_accuracy")],
        "artifacts": sorted(arts)})
out["versions"] = [{"name": v.name, "version": v.version, "run_id": v.run_id, "tags": v.tags,
                    "source": v.source, "description": v.description}
                   for v in client.search_model_versions("name LIKE 'loraflow-lora-%'")]
print(json.dumps(out))
"""


def read_back(uri: str, run_id: str) -> dict:
    """What the real MLflow client sees of one loraflow run."""
    done = subprocess.run([str(MLFLOW_VENV / "bin" / "python"), "-c", READ_BACK, uri,
                           "loraflow-test", run_id], capture_output=True, text=True, timeout=120,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tracked(mlflow_uri, imdb_dir, tmp_path_factory):
    """The smoke preset (every method) at the session's TINY sizes, every step in-process,
    tracked in `mlflow_uri`."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "loraflow-test")
        mp.setenv("LORAFLOW_PROGRESS", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a loaded test machine, not a dead server
        config = preset_config("smoke", data=str(imdb_dir), **TINY)
        paths = prepare_run(config, "tracked-run", root / "artifacts", root / "reports")
        report = run_all(config, paths)
    return config, paths, report


@pytest.fixture(scope="module")
def seen(mlflow_uri, tracked) -> dict:
    """The tracked run as the MLflow client reads it back, before any other test adds to it."""
    return read_back(mlflow_uri, "tracked-run")


def _children(seen: dict) -> dict[str, dict]:
    return {r["name"]: r for r in seen["runs"] if r["tags"].get("loraflow.kind") == "variant"}


def test_off_by_default_contacts_nothing_and_writes_nothing(smoke_run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LORAFLOW_MLFLOW_CONN_ID", raising=False)
    config, paths = smoke_run
    variant = config.variants()[0]
    assert not tracking.enabled()
    assert tracking.start_run(paths) is None
    run = tracking.variant_run(variant, paths)
    assert not run.active
    run.log_progress([{"step": 1, "epoch": 1, "loss": 0.7, "lr": 1e-3}], [])
    run.finish(MetricsRecord.start(variant, config.model, config.preset), paths)
    assert not (paths.run_dir / tracking.STATE_FILE).exists()


def test_connection_gives_the_uri_and_credentials(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LORAFLOW_MLFLOW_CONN_ID", "mlflow_test")
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_TEST", json.dumps(
        {"conn_type": "http", "host": "mlflow.example", "port": 5000, "schema": "https",
         "login": "ana", "password": "s3cret"}))
    assert tracking.enabled()
    client = tracking.Client.from_env()
    assert client.uri == "https://mlflow.example:5000"
    assert client.session.auth == ("ana", "s3cret")


@pytest.mark.slow
def test_parent_and_one_child_per_variant_with_its_metrics(tracked, seen):
    config, paths, report = tracked
    parents = [r for r in seen["runs"] if r["tags"].get("loraflow.kind") == "run"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent["tags"]["loraflow.preset"] == "smoke"
    assert parent["tags"]["loraflow.commit"] == read_json(paths.run_dir / "environment.json")["git_commit"]
    assert parent["params"]["model"] == "tiny-distilbert"
    assert parent["params"]["train_size"] == str(TINY["train_size"])
    assert parent["status"] == "FINISHED"
    assert {"report/report.html", "report/comparison.csv",
            "report/summary.json"} <= set(parent["artifacts"])

    children = _children(seen)
    assert sorted(children) == sorted(v.name for v in config.variants())
    for name, child in children.items():
        record = MetricsRecord.read(paths.variant_dir(name) / "metrics.json")
        assert child["tags"]["mlflow.parentRunId"] == parent["id"]
        assert child["tags"]["loraflow.status"] == record.status
        assert child["status"] == ("FAILED" if record.status == "failed" else "FINISHED")
        assert "metrics.json" in child["artifacts"]
        if record.status == "not_applicable":
            assert child["tags"]["loraflow.reason"] == record.reason
            continue
        assert child["metrics"]["test_accuracy"] == pytest.approx(record.accuracy)
        assert child["metrics"]["val_accuracy"] == pytest.approx(record.validation_accuracy)
        assert child["metrics"]["params_trainable"] == record.params_trainable
        assert "predictions.parquet" in child["artifacts"]
        if record.train_steps:  # trained: the curve, step by step, as metrics.json has it
            assert [s for s, _ in child["loss"]] == list(range(1, record.train_steps + 1))
            assert [v for _, v in child["loss"]] == pytest.approx(
                [e["loss"] for e in record.loss_history], rel=1e-6)
            assert child["lr"] == record.train_steps
            assert [s for s, _ in child["epoch_val_accuracy"]] == list(range(1, config.epochs + 1))
            assert child["metrics"]["peak_memory_bytes"] == record.peak_memory_bytes
    lora = [c for n, c in children.items() if n.startswith("lora_")]
    assert lora and all({"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
                        <= set(c["artifacts"]) for c in lora)
    full = [c for n, c in children.items() if n.startswith("full_finetune")]
    assert full and not any(a.startswith("adapter") for c in full for a in c["artifacts"])


@pytest.mark.slow
def test_selected_lora_adapter_is_a_registered_model_version(tracked, seen):
    config, paths, report = tracked
    selected = read_json(report.parent / "summary.json")["selected"]["lora"]["configuration"]
    versions = [v for v in seen["versions"] if v["tags"].get("loraflow.run_id") == "tracked-run"]
    assert len(versions) == 1
    version = versions[0]
    child = _children(seen)[version["tags"]["variant"]]
    assert Variant.parse(child["name"]).config_name == selected
    assert version["run_id"] == child["id"] and version["source"].endswith("/adapter")
    record = MetricsRecord.read(paths.variant_dir(child["name"]) / "metrics.json")
    assert float(version["tags"]["validation_accuracy"]) == pytest.approx(record.validation_accuracy)
    assert float(version["tags"]["test_accuracy"]) == pytest.approx(record.accuracy)
    assert version["name"] == "loraflow-lora-tiny-distilbert"


@pytest.mark.slow
def test_retried_variant_continues_its_child_run(mlflow_uri, tracked, seen, monkeypatch):
    """A first attempt that fails after training, then its retry: one child run, failed
    then finished, with the loss curve once."""
    from tasks import train
    from tasks.variants import run_variant

    config, paths, _ = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "loraflow-test")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    variant = next(v for v in config.variants() if v.method == "full_finetune")
    before = _children(seen)[variant.name]

    def lost_worker(*args, **kwargs):
        raise RuntimeError("worker lost")

    with monkeypatch.context() as mp:
        mp.setattr(train, "latency_fields", lost_worker)
        with pytest.raises(RuntimeError, match="worker lost"):
            run_variant(variant, config, paths, force=True)  # complete in the fixture's run
    failed = _children(read_back(mlflow_uri, "tracked-run"))[variant.name]
    assert failed["id"] == before["id"]
    assert failed["status"] == "FAILED" and failed["tags"]["loraflow.status"] == "failed"
    assert "worker lost" in failed["tags"]["loraflow.error"]

    run_variant(variant, config, paths, force=True)  # the retry (the record kept was ok)
    seen = read_back(mlflow_uri, "tracked-run")
    retried = [r for r in seen["runs"] if r["name"] == variant.name]
    assert [r["id"] for r in retried] == [before["id"]]
    record = MetricsRecord.read(paths.variant_dir(variant.name) / "metrics.json")
    assert retried[0]["status"] == "FINISHED" and record.status == "ok"
    assert retried[0]["tags"]["loraflow.status"] == "ok"
    assert "loraflow.error" not in retried[0]["tags"]  # the first attempt's error is gone
    assert [s for s, _ in retried[0]["loss"]] == list(range(1, record.train_steps + 1))


@pytest.mark.slow
def test_stopped_server_costs_a_warning_not_the_variant(tracked, monkeypatch, caplog):
    from tasks.variants import run_variant

    config, paths, _ = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port(1)}")  # nobody listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    variant = next(v for v in config.variants() if v.method == "lora")
    with caplog.at_level("WARNING", logger="tasks.tracking"):
        run_variant(variant, config, paths, force=True)  # complete in the fixture's run
    record = MetricsRecord.read(paths.variant_dir(variant.name) / "metrics.json")
    assert record.status == "ok" and record.accuracy is not None
    warnings = [r.getMessage() for r in caplog.records if r.name == "tasks.tracking"]
    assert len(warnings) == 1 and "tracking is off for this step" in warnings[0]
