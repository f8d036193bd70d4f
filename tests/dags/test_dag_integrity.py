"""The DAG file as Airflow parses it: no import errors, no ML stack at parse time, the
structure design.md describes, and a trigger form that refuses bad values."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from tasks import config as tasks_config
from tasks import registry
from tests.dags.conftest import DAG_ID, DAGS_DIR, airflow_env

MAPPED_TASKS = ("cpu_variants", "gpu_variants")
# the ML stack, and every module of ours that needs it: none may load when the DAG parses
HEAVY = ("torch", "transformers", "great_expectations", "lora_core", "sklearn", "tasks.variants",
         "tasks.train", "tasks.metrics", "tasks.evaluate", "tasks.pipeline", "tasks.report")


def _parse_in_fresh_process(extra_env: dict[str, str] | None = None) -> dict:
    script = textwrap.dedent(f"""
        import json, sys, time
        from airflow.dag_processing.dagbag import DagBag
        start = time.perf_counter()
        bag = DagBag(dag_folder={str(DAGS_DIR)!r})
        seconds = time.perf_counter() - start
        heavy = [m for m in {list(HEAVY)!r} if m in sys.modules]
        ours = sorted(m for m in sys.modules if m == "tasks" or m.startswith("tasks."))
        dag = bag.dags.get({DAG_ID!r})
        print(json.dumps({{"errors": bag.import_errors, "heavy": heavy, "ours": ours,
                          "seconds": seconds,
                          "timetable": type(dag.timetable).__name__ if dag else None,
                          "cron": getattr(dag.timetable, "expression", None) if dag else None}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=airflow_env(**(extra_env or {})),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_parses_without_errors_and_without_the_ml_stack():
    result = _parse_in_fresh_process()
    assert result["errors"] == {}
    assert result["heavy"] == []  # neither torch, transformers, GX, lora_core nor our steps
    # the registry and the config (standard library only) build the trigger form; the
    # steps names the DAG, its schedule and its data steps; asset names and the notifier
    # (Airflow's BaseNotifier) are light too
    assert result["ours"] == ["tasks", "tasks.assets", "tasks.config", "tasks.notify",
                              "tasks.registry", "tasks.steps", "tasks.text"]
    assert result["seconds"] < 2.0  # the scheduler re-parses DAG files every few seconds
    assert result["cron"] == "0 0 * * 0"  # @weekly


def test_schedule_comes_from_loraflow_schedule():
    # one fresh process parses the DAG file once per value, as a DAG processor started
    # with that value would (the file reads LORAFLOW_SCHEDULE when it is parsed)
    script = textwrap.dedent(f"""
        import json, os
        from airflow.dag_processing.dagbag import DagBag
        found = {{}}
        for value in ("none", "0 3 * * 1", "asset"):
            os.environ["LORAFLOW_SCHEDULE"] = value
            dag = DagBag(dag_folder={str(DAGS_DIR)!r}).dags[{DAG_ID!r}]
            found[value] = [type(dag.timetable).__name__, getattr(dag.timetable, "expression", None)]
        print(json.dumps(found))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=airflow_env(), capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["none"][0] == "NullTimetable"
    assert found["0 3 * * 1"][1] == "0 3 * * 1"
    assert found["asset"][0] == "AssetTriggeredTimetable"


def test_unpausing_waits_for_the_next_weekly_slot_instead_of_running_a_past_one(dag, monkeypatch):
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables import trigger
    from airflow.timetables.base import TimeRestriction

    sunday_morning = datetime(2026, 11, 29, 5, 0, tzinfo=UTC)  # 5 h after the weekly slot
    monkeypatch.setattr(trigger, "utcnow", lambda: sunday_morning)
    first = coerce_to_core_timetable(dag.timetable).next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=dag.start_date, latest=None, catchup=dag.catchup))
    assert first.run_after == datetime(2026, 12, 6, 0, 0, tzinfo=UTC)


def test_task_ids_and_dependencies(dag):
    assert set(dag.task_ids) == {
        "prepare", "download_dataset", "validate_dataset", "tokenize",
        "plan_cpu_variants", "cpu_variants", "plan_gpu_variants", "gpu_variants",
        "report", "check_variants", "check_regression",
    }
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert up["prepare"] == set()
    assert up["download_dataset"] == {"prepare"}
    assert up["validate_dataset"] == {"download_dataset"}
    assert up["tokenize"] == {"validate_dataset"}
    for name in MAPPED_TASKS:
        assert up[name] == {"tokenize", f"plan_{name}"}
        assert up[f"plan_{name}"] == {"prepare"}
        assert dag.get_task(name).trigger_rule == "all_success"
    assert up["report"] == {"prepare", *MAPPED_TASKS}
    assert up["check_variants"] == {"prepare", *MAPPED_TASKS}  # prepare: its run folder
    assert up["check_regression"] == {"report"}
    assert {t.task_id for t in dag.tasks if not t.downstream_task_ids} == {"check_regression",
                                                                          "check_variants"}


def test_encoder_tasks_use_the_gpu_pool_and_queue_and_retry_with_backoff(dag):
    for name in MAPPED_TASKS:
        t = dag.get_task(name)
        assert t.retries == 2 and t.retry_exponential_backoff == 2.0
        assert t.max_retry_delay == timedelta(minutes=30)
        # bad input fails at once; anything else (OOM, a lost worker) is retried
        assert t.retry_policy.evaluate(ValueError("no module q_proj"), 1, 3).action.value == "fail"
        assert t.retry_policy.evaluate(RuntimeError("CUDA OOM"), 1, 3).action.value == "default"
    gpu = dag.get_task("gpu_variants")
    assert (gpu.pool, gpu.queue) == ("gpu", "gpu")
    assert gpu.execution_timeout == timedelta(hours=12)
    for t in dag.tasks:
        if t.task_id != "gpu_variants":  # cpu_variants included: the default pool and queue
            assert (t.pool, t.queue) == ("default_pool", "default"), t.task_id
        assert t.execution_timeout is not None and t.execution_timeout > timedelta(0), t.task_id


def test_variant_tasks_are_mapped_with_readable_names(dag):
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from jinja2 import Template

    from tasks.registry import Variant

    variant = Variant("lora", rank=8, targets="q_lin,v_lin", lr=1e-3, seed=1)
    for name in MAPPED_TASKS:
        task = dag.get_task(name)
        assert isinstance(task, MappedOperator), name
        label = task.map_index_template.replace("task.op_kwargs['variant']", "variant")
        assert Template(label).render(variant=variant.to_dict()) == "lora_r8_q_lin+v_lin_lr1e-3_s1"


def test_report_runs_whatever_the_variants_did_and_the_run_fails_if_one_failed(dag):
    assert dag.get_task("report").trigger_rule == "all_done"
    assert dag.get_task("check_variants").trigger_rule == "one_failed"


def test_dag_run_settings(dag):
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "loraflow" in dag.tags
    assert "Trigger form" in dag.doc_md


def test_runs_at_once_one_unless_the_deployment_allows_more(dag, monkeypatch):
    dag_module = sys.modules[dag.get_task("prepare").python_callable.__module__]
    monkeypatch.setenv("LORAFLOW_MAX_ACTIVE_RUNS", "3")  # the cluster tests run three at once
    assert dag_module._max_active_runs() == 3
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("LORAFLOW_MAX_ACTIVE_RUNS", bad)
        with pytest.raises(ValueError, match="LORAFLOW_MAX_ACTIVE_RUNS must be a whole number"):
            dag_module._max_active_runs()


def test_params_are_the_design_names_with_descriptions(dag):
    assert list(dag.params) == ["preset", "methods", "model", "data", "train_size", "val_size",
                                "test_size", "max_length", "truncation", "epochs", "batch_size",
                                "precision",
                                "lora_lr", "full_lr", "ranks", "targets", "seeds"]
    for name, param in dag.params.items():
        assert param.description or param.schema.get("description_md"), name
        if name != "preset":  # every override is optional: empty keeps the preset's value
            assert param.value is None and "null" in param.schema["type"], name
    assert dag.params.get_param("preset").value == "cpu"
    # the form shows each preset's values, its sweep, its number of variant tasks and the
    # schedule; no run times (none were measured through Airflow for every preset)
    table = dag.params.get_param("preset").schema["description_md"]
    assert "| `smoke` | tiny-distilbert | 256 / 64 / 128 |" in table and "Schedule:" in table
    smoke = tasks_config.preset_config("smoke")
    assert f"| 4 × qkvo × 2e-3 / 5e-4 × 42 | {len(smoke.variants())} |" in table
    assert "bitfit in `smoke`" in table  # the methods beyond those every preset runs
    assert " min" not in table and "hours" not in table


def test_dropdowns_read_as_sentences_and_empty_says_the_preset_keeps_its_value(dag):
    presets = dag.params.get_param("preset").schema["values_display"]
    smoke = tasks_config.preset_config("smoke")
    assert presets["smoke"] == ("smoke: a plumbing check on random weights, "
                                f"{len(smoke.variants())} variant tasks")
    precision = dag.params.get_param("precision").schema["values_display"]
    # the UI labels null with the "null" key; every value needs a label of its own there
    assert precision["null"] == "(preset's value)"
    assert set(precision) == {"null", *tasks_config.PRECISIONS}
    truncation = dag.params.get_param("truncation").schema["values_display"]
    assert truncation == {"null": "(preset's value)", **{t: t for t in tasks_config.TRUNCATIONS}}


def test_sweep_lists_take_typed_text_or_a_json_list(dag):
    from tasks.pipeline import config_from_params

    typed = {"preset": "smoke", "lora_lr": "1e-3, 2e-3", "full_lr": "5e-5\n1e-4\n",
             "ranks": "4,8", "seeds": "1 2 3"}
    config = config_from_params(_validate(dag, typed))
    assert (config.lora_lr, config.full_lr, config.ranks, config.seeds) == (
        (1e-3, 2e-3), (5e-5, 1e-4), (4, 8), (1, 2, 3))
    listed = config_from_params(_validate(dag, {"preset": "smoke", "lora_lr": [1e-3, 2e-3],
                                                "full_lr": [5e-5, 1e-4], "ranks": [4, 8],
                                                "seeds": [1, 2, 3]}))
    assert listed == config
    # the Sweep fields are the form's multi-type text field, not Airflow's JSON editor
    for name in ("lora_lr", "full_lr", "ranks", "seeds"):
        schema = dag.params.get_param(name).schema
        assert schema["type"] == ["null", "array", "string"] and "examples" not in schema
        assert "e.g." in dag.params.get_param(name).description


@pytest.mark.parametrize("conf", [
    {"lora_lr": "1e-3, fast"},
    {"ranks": "4, 8.5"},
    {"seeds": "1; two"},
    {"full_lr": " \n"},
])
def test_typed_sweep_text_that_is_not_a_list_of_numbers_is_refused(dag, conf):
    from airflow.exceptions import ParamValidationError

    from tasks.pipeline import config_from_params

    if not next(iter(conf.values())).strip():  # blank text: the preset's value
        assert config_from_params(_validate(dag, conf)).full_lr == tasks_config.preset_config(
            tasks_config.DEFAULT_PRESET).full_lr
        return
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(conf))}"):
        _validate(dag, conf)


def test_params_are_built_from_the_registry_and_the_config(dag):
    schema = {name: p.schema for name, p in dag.params.items()}
    assert schema["preset"]["enum"] == list(tasks_config.PRESETS)
    assert schema["methods"]["items"]["enum"] == list(registry.METHODS)
    assert schema["precision"]["enum"] == [None, *tasks_config.PRECISIONS]
    assert schema["targets"]["items"]["pattern"] == registry.TARGETS_PATTERN
    assert schema["max_length"]["maximum"] == tasks_config.MAX_TOKENS
    for name in tasks_config.PRESETS:  # every preset's own values pass the form
        config = tasks_config.preset_config(name)
        for key in ("train_size", "val_size", "test_size", "max_length", "epochs", "batch_size"):
            value = getattr(config, key)
            assert schema[key]["minimum"] <= value <= schema[key]["maximum"], (name, key)
        _validate(dag, {"preset": name, **{k: list(getattr(config, k)) for k in (
            "methods", "lora_lr", "full_lr", "ranks", "targets", "seeds")}})
    description = dag.params.get_param("methods").description
    assert all(m.description in description for m in registry.METHODS.values())


def _validate(dag, conf: dict) -> dict:
    """What the API server does with a trigger's conf (SerializedDAG.create_dagrun)."""
    from airflow.serialization.serialized_objects import DagSerialization

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    return scheduler_dag.params.deep_merge(conf).validate()


@pytest.mark.parametrize("conf", [
    {"ranks": [0]},
    {"ranks": [2048]},
    {"ranks": [4, 4]},
    {"preset": "nope"},
    {"train_size": 0},
    {"max_length": 1024},
    {"val_size": 0},
    {"lora_lr": 0.001},
    {"lora_lr": [0]},
    {"full_lr": [1.5]},
    {"seeds": [-1]},
    {"methods": ["bert_zero_shot"]},
    {"methods": ["lora", "lora"]},
    {"targets": ["q_lin, v_lin"]},
    {"epochs": "3"},
    {"precision": "fp8"},
])
def test_trigger_conf_out_of_bounds_is_refused(dag, conf):
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(conf))}"):
        _validate(dag, conf)


def test_trigger_conf_within_bounds_is_accepted(dag):
    assert _validate(dag, {})["preset"] == "cpu"  # scheduled runs: the defaults
    values = _validate(dag, {"preset": "smoke", "ranks": [1, 1024], "targets": ["qv", "q_lin,v_lin"],
                             "seeds": [0], "methods": ["majority"], "lora_lr": [0.001, 0.002],
                             "full_lr": [3e-5, 5e-5], "precision": "bf16", "data": "/tmp/imdb",
                             "train_size": None, "val_size": 100})
    assert values["ranks"] == [1, 1024] and values["train_size"] is None
    assert values["methods"] == ["majority"] and values["precision"] == "bf16"


def test_effective_config_starts_from_the_preset_and_overrides_what_was_set(dag):
    from tasks.pipeline import config_from_params

    params = _validate(dag, {"preset": "smoke", "ranks": [2, 4], "targets": [], "data": "",
                             "methods": [], "precision": None})
    config = config_from_params(params)
    smoke = tasks_config.preset_config("smoke")
    assert config.preset == "smoke" and config.ranks == (2, 4)
    assert config.targets == smoke.targets and config.methods == smoke.methods
    assert config.train_size == smoke.train_size and config.precision == smoke.precision
    assert config.data == smoke.data


def test_every_task_documents_what_it_does_reads_writes_and_what_a_retry_does(dag):
    for t in dag.tasks:
        doc = t.doc_md or ""
        assert doc.startswith("**"), t.task_id  # a bold first sentence: what it does
        assert "Retry" in doc and ("Reads" in doc or "reads" in doc), t.task_id
        # no indented lines: Markdown would show them as a code block in the UI
        assert not any(line.startswith("    ") for line in doc.splitlines()), t.task_id


def test_the_data_asset_is_prepares_inlet_and_report_emits_report_and_adapter_assets(dag):
    from tasks import assets

    assert [(a.name, a.uri) for a in dag.get_task("prepare").inlets] == [
        (assets.DATA["name"], assets.DATA["uri"])]
    assert [a.name for a in dag.get_task("report").outlets] == [assets.REPORT["name"],
                                                               assets.ADAPTER["name"]]


def test_the_example_dag_is_scheduled_on_the_report_asset():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR / "examples"))
    assert bag.import_errors == {}
    example = bag.dags["loraflow_after_report_example"]
    from tasks import assets

    assert [a.name for a in example.timetable.asset_condition.objects] == [assets.REPORT["name"]]


def test_without_a_notification_connection_there_are_no_callbacks_or_deadline(dag):
    assert not dag.on_failure_callback and not dag.on_success_callback
    assert not dag.deadline


def test_a_notification_connection_adds_failure_success_and_deadline_notifiers():
    script = textwrap.dedent(f"""
        import json
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder={str(DAGS_DIR)!r}).dags[{DAG_ID!r}]
        alert, failure = dag.deadline[0], dag.on_failure_callback
        print(json.dumps({{
            "failure": [type(failure).__name__, failure.conn_id, failure.event],
            "success": [dag.on_success_callback.event],
            "deadline_s": alert.interval.total_seconds(),
            "reference": type(alert.reference).__name__,
            "callback": [alert.callback.path, alert.callback.kwargs]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=airflow_env(LORAFLOW_NOTIFY_CONN_ID="loraflow_mail",
                                         LORAFLOW_DEADLINE_HOURS="1.5"),
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"failure": ["RunNotifier", "loraflow_mail", "failed"], "success": ["succeeded"],
                   "deadline_s": 5400.0, "reference": "DagRunQueuedAtDeadline",
                   "callback": ["tasks.notify.RunNotifier",
                                {"conn_id": "loraflow_mail", "event": "deadline"}]}
