"""Optional experiment tracking in an MLflow server; `metrics.json` stays the source of truth.

On when `MLFLOW_TRACKING_URI` is an http(s) URL, or `LORAFLOW_MLFLOW_CONN_ID` names an Airflow
connection (host, port, schema http/https; login + password for basic auth, a password
alone as a bearer token). Otherwise every function here returns at once and contacts
nothing. Layout, in experiment `$MLFLOW_EXPERIMENT_NAME` (default `loraflow`):

- a parent run per loraflow run (tags `loraflow.run_id`, `loraflow.dag_id`,
  `loraflow.preset`, `loraflow.commit`; the configuration as params), remembered in
  `<run_dir>/mlflow.json` and found again by its `loraflow.run_id` tag;
- a child run per variant (tag `mlflow.parentRunId`), found again by parent and
  `loraflow.variant`, so a retried task continues its child run and logs only the steps it
  lacks: per-step `loss` and `lr`, per-epoch `epoch_val_*`, then the final scores, cost,
  status, predictions and (LoRA) the PEFT adapter;
- the report on the parent run, and the selected LoRA adapter registered as a model version.

It speaks MLflow's REST API through `requests` instead of the `mlflow` client: every
mlflow-skinny release pins cachetools<8 and importlib_metadata<10, below the versions
Airflow 3.3's constraints install, so the client cannot live in this environment. Artifacts
go through the server's proxy (`mlflow server --serve-artifacts`, its default).

A tracking error never fails a variant: it is logged as one warning and tracking stays off
for the rest of that step. `MLFLOW_HTTP_REQUEST_TIMEOUT` (default 10 s here) and
`MLFLOW_HTTP_REQUEST_MAX_RETRIES` (default 2) bound what a dead server costs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tasks.paths import RunPaths, read_json, write_json

log = logging.getLogger(__name__)

STATE_FILE = "mlflow.json"  # in the run folder: which parent run holds this run
FLUSH_SECONDS = 5.0  # step metrics go out at most this often (and at every epoch's end)
MAX_METRICS = 1000  # per log-batch request (MLflow's limit)
MAX_PARAMS = 100
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
FINAL_METRICS = {  # MetricsRecord field -> metric name
    "accuracy": "test_accuracy", "f1": "test_f1", "validation_accuracy": "val_accuracy",
    "validation_f1": "val_f1", "params_trainable": "params_trainable",
    "params_total": "params_total", "train_seconds": "train_seconds",
    "train_steps": "train_steps", "seconds_per_step": "seconds_per_step",
    "samples_per_second": "samples_per_second", "eval_seconds": "eval_seconds",
    "peak_memory_bytes": "peak_memory_bytes", "artifact_bytes": "artifact_bytes",
    "inference_ms_per_example": "inference_ms_per_example",
}
STATUS = {"ok": "FINISHED", "not_applicable": "FINISHED", "failed": "FAILED"}


class TrackingError(RuntimeError):
    pass


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("LORAFLOW_MLFLOW_CONN_ID"))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Client:
    """The few MLflow REST calls loraflow needs, with short timeouts and few retries."""

    def __init__(self, uri: str, auth: Any = None, headers: dict[str, str] | None = None) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        if not uri.startswith(("http://", "https://")):
            raise TrackingError(f"tracking URI {uri!r} is not an http(s) MLflow server")
        self.uri = uri.rstrip("/")
        self.timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"))
        retries = Retry(total=int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")),
                        backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                        allowed_methods=None, raise_on_status=False)
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retries))
        self.session.mount("https://", HTTPAdapter(max_retries=retries))
        self.session.auth = auth
        self.session.headers.update(headers or {})

    @classmethod
    def from_env(cls) -> Client:
        conn_id = os.environ.get("LORAFLOW_MLFLOW_CONN_ID")
        if not conn_id:
            token = os.environ.get("MLFLOW_TRACKING_TOKEN")
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
            return cls(os.environ["MLFLOW_TRACKING_URI"], auth,
                       {"Authorization": f"Bearer {token}"} if token else None)
        from airflow.sdk import Connection

        conn = Connection.get(conn_id)
        host = conn.host or ""
        uri = host if "://" in host else f"{conn.schema or 'http'}://{host}"
        uri += f":{conn.port}" if conn.port else ""
        if conn.login:
            return cls(uri, (conn.login, conn.password or ""))
        return cls(uri, None, {"Authorization": f"Bearer {conn.password}"} if conn.password else None)

    def call(self, method: str, endpoint: str, **body: Any) -> dict[str, Any]:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if method == "GET":
            response = self.session.get(url, params=body, timeout=self.timeout)
        else:
            response = self.session.post(url, json=body, timeout=self.timeout)
        if not response.ok:
            raise TrackingError(f"{endpoint}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.content else {}

    def error_code(self, method: str, endpoint: str, **body: Any) -> tuple[dict, str | None]:
        """(response, None), or ({}, MLflow's error code) for a 4xx answer."""
        try:
            return self.call(method, endpoint, **body), None
        except TrackingError as err:
            match = re.search(r'"error_code":\s*"(\w+)"', str(err))
            if match:
                return {}, match.group(1)
            raise

    def experiment_id(self, name: str) -> str:
        found, code = self.error_code("GET", "experiments/get-by-name", experiment_name=name)
        if code is None:
            return found["experiment"]["experiment_id"]
        made, code = self.error_code("POST", "experiments/create", name=name)
        if code is None:
            return made["experiment_id"]
        # another task created it meanwhile
        return self.call("GET", "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def search(self, experiment_id: str, tags: dict[str, str]) -> list[dict[str, Any]]:
        """Runs whose tags all match, oldest first."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.call("POST", "runs/search", experiment_ids=[experiment_id], filter=where,
                         max_results=10, order_by=["attributes.start_time ASC"]).get("runs", [])
        return runs

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> dict[str, Any]:
        return self.call("POST", "runs/create", experiment_id=experiment_id, run_name=name,
                         start_time=_now_ms(), tags=_pairs(tags))["run"]

    def log_batch(self, run_id: str, metrics: list[dict[str, Any]] = (), params: dict | None = None,
                  tags: dict | None = None) -> None:
        metrics = [m for m in metrics if isinstance(m["value"], int | float)
                   and math.isfinite(m["value"])]  # JSON has no NaN
        params = [{"key": k, "value": str(v)[:MAX_PARAM_CHARS]} for k, v in (params or {}).items()]
        for i in range(0, len(metrics), MAX_METRICS):
            self.call("POST", "runs/log-batch", run_id=run_id, metrics=metrics[i:i + MAX_METRICS])
        for i in range(0, len(params), MAX_PARAMS):
            self.call("POST", "runs/log-batch", run_id=run_id, params=params[i:i + MAX_PARAMS])
        if tags:
            self.call("POST", "runs/log-batch", run_id=run_id, tags=_pairs(tags))

    def set_status(self, run_id: str, status: str) -> None:
        end = None if status == "RUNNING" else _now_ms()
        self.call("POST", "runs/update", run_id=run_id, status=status,
                  **({"end_time": end} if end else {}))

    def upload(self, artifact_uri: str, local: Path, dest: str = "") -> int:
        """Upload a file, or a folder's files, under the run's artifact root (proxied by
        the server); returns the number of files."""
        root = re.match(r"mlflow-artifacts:(?://[^/]*)?/(.*)", artifact_uri)
        if not root:
            raise TrackingError(f"artifact root {artifact_uri} is not served by the tracking "
                                "server (start it with --serve-artifacts)")
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            rel = "/".join(filter(None, [dest, f.relative_to(local).as_posix() if f != local
                                         else f.name]))
            url = f"{self.uri}/api/2.0/mlflow-artifacts/artifacts/{quote(root.group(1))}/{quote(rel)}"
            with f.open("rb") as body:
                response = self.session.put(url, data=body, timeout=self.timeout)
            if not response.ok:
                raise TrackingError(f"upload of {rel}: HTTP {response.status_code} "
                                    f"{response.text[:300]}")
        return len(files)


def _pairs(tags: dict[str, Any]) -> list[dict[str, str]]:
    return [{"key": k, "value": str(v)[:MAX_TAG_CHARS]} for k, v in tags.items() if v is not None]


def _experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "loraflow")


def _params(config_dict: dict[str, Any]) -> dict[str, str]:
    return {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else v
            for k, v in config_dict.items() if v is not None}


def _parent(client: Client, paths: RunPaths, dag_id: str | None = None) -> tuple[str, str]:
    """(experiment id, parent run id) of this loraflow run: the one remembered in the run
    folder when it belongs to this server, else the one tagged with this run id, else a new
    one."""
    state_file = paths.run_dir / STATE_FILE
    if state_file.exists():
        state = read_json(state_file)
        if state.get("tracking_uri") == client.uri:
            return state["experiment_id"], state["parent_run_id"]
    experiment = client.experiment_id(_experiment_name())
    run_id = paths.run_dir.name
    found = client.search(experiment, {"loraflow.run_id": run_id, "loraflow.kind": "run"})
    if found:
        parent = found[0]["info"]["run_id"]
    else:
        config = read_json(paths.config_json)
        env = read_json(paths.run_dir / "environment.json") if (
            paths.run_dir / "environment.json").exists() else {}
        parent = client.create_run(experiment, run_id, {
            "loraflow.kind": "run", "loraflow.run_id": run_id,
            "loraflow.dag_id": dag_id or "loraflow CLI", "loraflow.preset": config.get("preset"),
            "loraflow.model": config.get("model"), "loraflow.commit": env.get("git_commit"),
            "loraflow.run_dir": str(paths.run_dir)})["info"]["run_id"]
        client.log_batch(parent, params=_params(config))
    write_json(state_file, {"tracking_uri": client.uri, "experiment_id": experiment,
                            "parent_run_id": parent})
    return experiment, parent


def _warn(what: str, err: BaseException) -> None:
    log.warning("MLflow tracking: %s failed, tracking is off for this step (results are "
                "unaffected): %s", what, err)


def start_run(paths: RunPaths, dag_id: str | None = None) -> str | None:
    """Open (or find) the parent run of a prepared run; returns its id, None when off or
    unreachable."""
    if not enabled():
        return None
    try:
        _, parent = _parent(Client.from_env(), paths, dag_id)
        log.info("MLflow tracking: parent run %s", parent)
        return parent
    except Exception as err:
        _warn("opening the parent run", err)
        return None


class VariantRun:
    """A variant's child run; every method is a no-op once tracking is off or failed."""

    def __init__(self, client: Client | None = None, run: dict[str, Any] | None = None) -> None:
        self.client, self.run_id = client, run["info"]["run_id"] if run else None
        self.artifact_uri = run["info"].get("artifact_uri") if run else None
        self.tags = {t["key"] for t in ((run or {}).get("data") or {}).get("tags", [])}
        latest = {m["key"]: int(m.get("step", 0))
                  for m in ((run or {}).get("data") or {}).get("metrics", [])}
        self.steps_logged = latest.get("loss", 0)  # a retry logs only what the run lacks
        self.epochs_logged = latest.get("epoch_val_accuracy", 0)
        self.last_flush = time.monotonic()

    @property
    def active(self) -> bool:
        return self.client is not None

    def _guard(self, what: str, fn, *args) -> None:
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as err:
            _warn(what, err)
            self.client = None

    def log_progress(self, loss_history: list[dict[str, Any]],
                     eval_history: list[dict[str, Any]]) -> None:
        """The training loop's logging points: new steps go out at most every
        FLUSH_SECONDS, and with every new epoch's validation scores."""
        if not self.active:
            return
        new_epoch = len(eval_history) > self.epochs_logged
        if not new_epoch and time.monotonic() - self.last_flush < FLUSH_SECONDS:
            return
        self.last_flush = time.monotonic()
        self._guard("logging training metrics", self._log_progress, loss_history, eval_history)

    def _log_progress(self, loss_history, eval_history) -> None:
        now = _now_ms()
        metrics = [{"key": key, "value": e[key], "timestamp": now, "step": e["step"]}
                   for e in loss_history[self.steps_logged:] for key in ("loss", "lr")]
        metrics += [{"key": f"epoch_val_{key}", "value": e[key], "timestamp": now,
                     "step": e["epoch"]}
                    for e in eval_history[self.epochs_logged:]
                    for key in ("accuracy", "f1", "loss") if key in e]
        if metrics:
            self.client.log_batch(self.run_id, metrics)
        self.steps_logged, self.epochs_logged = len(loss_history), len(eval_history)

    def finish(self, record: Any, paths: RunPaths) -> None:
        self._guard("logging the variant's results", self._finish, record, paths)

    def _finish(self, record: Any, paths: RunPaths) -> None:
        self._log_progress(record.loss_history, record.eval_history)  # what is left
        now = _now_ms()
        metrics = [{"key": name, "value": getattr(record, field), "timestamp": now, "step": 0}
                   for field, name in FINAL_METRICS.items() if getattr(record, field) is not None]
        params = {k: json.dumps(v) if isinstance(v, dict | list) else v
                  for k, v in record.hyperparameters.items()}
        tags = {"loraflow.status": record.status, "loraflow.reason": record.reason,
                "loraflow.error": record.error, "loraflow.device": record.device,
                "loraflow.precision": record.precision,
                "loraflow.peak_memory_kind": record.peak_memory_kind}
        self.client.log_batch(self.run_id, metrics, params, tags)
        for key in [k for k, v in tags.items() if v is None and k in self.tags]:
            self.client.call("POST", "runs/delete-tag", run_id=self.run_id, key=key)  # an
            # earlier attempt's error, say
        out = paths.variant_dir(record.variant)
        for name in ("metrics.json", "predictions.parquet"):
            if (out / name).is_file():
                self.client.upload(self.artifact_uri, out / name)
        if record.ok and record.method == "lora" and (out / "adapter").is_dir():
            self.client.upload(self.artifact_uri, out / "adapter", "adapter")
        self.client.set_status(self.run_id, STATUS.get(record.status, "FAILED"))


def variant_run(variant: Any, paths: RunPaths) -> VariantRun:
    """The child run of `variant` (found again on a retry), RUNNING; an inactive VariantRun
    when tracking is off or the server cannot be reached."""
    if not enabled():
        return VariantRun()
    try:
        client = Client.from_env()
        experiment, parent = _parent(client, paths)
        found = client.search(experiment, {"mlflow.parentRunId": parent,
                                           "loraflow.variant": variant.name})
        if found:
            run = client.call("GET", "runs/get", run_id=found[0]["info"]["run_id"])["run"]
            client.set_status(run["info"]["run_id"], "RUNNING")
            log.info("MLflow tracking: continuing child run %s", run["info"]["run_id"])
        else:
            run = client.create_run(experiment, variant.name, {
                "mlflow.parentRunId": parent, "loraflow.kind": "variant",
                "loraflow.variant": variant.name, "loraflow.method": variant.method,
                "loraflow.run_id": paths.run_dir.name})
            client.log_batch(run["info"]["run_id"], params={
                k: v for k, v in variant.to_dict().items() if v is not None and k != "name"})
        return VariantRun(client, run)
    except Exception as err:
        _warn(f"opening the child run of {variant.name}", err)
        return VariantRun()


def log_report(paths: RunPaths, report: Path) -> None:
    """The report's files on the parent run, the selected LoRA adapter registered, and the
    parent closed (FAILED when a variant failed)."""
    if not enabled():
        return
    try:
        client = Client.from_env()
        experiment, parent = _parent(client, paths)
        artifact_uri = client.call("GET", "runs/get", run_id=parent)["run"]["info"]["artifact_uri"]
        for name in ("report.html", "comparison.csv", "comparison.md", "summary.json"):
            if (report.parent / name).is_file():
                client.upload(artifact_uri, report.parent / name, "report")
        summary = read_json(report.parent / "summary.json")
        _register_lora(client, experiment, parent, paths, summary)
        statuses = [read_json(m).get("status") for m in paths.results_dir.glob("*/metrics.json")]
        client.set_status(parent, "FAILED" if "failed" in statuses else "FINISHED")
    except Exception as err:
        _warn("logging the report", err)


def _register_lora(client: Client, experiment: str, parent: str, paths: RunPaths,
                   summary: dict[str, Any]) -> None:
    """Register the selected LoRA configuration's best-on-validation seed's adapter."""
    chosen = (summary.get("selected") or {}).get("lora")
    if not chosen:
        return
    from tasks.registry import Variant

    records = []
    for m in paths.results_dir.glob("lora_*/metrics.json"):
        r = read_json(m)
        try:
            same = Variant.parse(r["variant"]).config_name == chosen["configuration"]
        except (KeyError, ValueError):
            continue
        scored = None not in (r.get("validation_accuracy"), r.get("accuracy"))
        if same and scored and r.get("status") == "ok" and (m.parent / "adapter").is_dir():
            records.append(r)
    if not records:
        return
    best = max(records, key=lambda r: (r["validation_accuracy"], -(r.get("seed") or 0)))
    child = client.search(experiment, {"mlflow.parentRunId": parent,
                                       "loraflow.variant": best["variant"]})
    if not child:
        return
    info = child[0]["info"]
    config = read_json(paths.config_json)
    name = os.environ.get("LORAFLOW_MLFLOW_MODEL_NAME") or "loraflow-lora-" + re.sub(
        r"[^A-Za-z0-9_.-]+", "-", Path(config["model"]).name)
    existing = client.call("GET", "model-versions/search", filter=f"run_id = '{info['run_id']}'"
                           ).get("model_versions", [])
    if any(v["name"] == name for v in existing):
        return  # a rebuilt report: this adapter is registered already
    _, code = client.error_code("POST", "registered-models/create", name=name, description=(
        "LoRA adapters (PEFT format) selected by loraflow on validation accuracy."))
    if code not in (None, "RESOURCE_ALREADY_EXISTS"):
        raise TrackingError(f"registered-models/create: {code}")
    val, test = best["validation_accuracy"], best["accuracy"]
    version = client.call("POST", "model-versions/create", name=name, run_id=info["run_id"],
                          source=f"{info['artifact_uri']}/adapter", tags=_pairs({
                              "validation_accuracy": val, "test_accuracy": test,
                              "variant": best["variant"], "loraflow.run_id": paths.run_dir.name,
                              "base_model": config["model"]}),
                          description=(f"{best['variant']} of run {paths.run_dir.name}: selected "
                                       f"on validation accuracy {val:.4f}; test accuracy "
                                       f"{test:.4f}; base model {config['model']}."))
    log.info("MLflow tracking: registered %s version %s", name,
             version["model_version"]["version"])
