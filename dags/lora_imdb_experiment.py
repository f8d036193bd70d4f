"""
### LoRA vs full fine-tuning vs baselines on IMDB

For one encoder (DistilBERT/BERT family) and one IMDB subset, what do cheap baselines,
LoRA and full fine-tuning reach, at what cost? Every number in the report is measured in
this run; every choice (learning rate, LoRA rank and targets) is made on a validation
subset, and the test subset is scored once per variant.

```text
prepare ─► download_dataset
        ─► validate_dataset ─► tokenize
tokenize ─┬─► cpu_variants   no encoder: CPU
          └─► gpu_variants   encoder: pool gpu
variants ─► report ─► check_regression
variants ─► check_variants
```

One mapped task per variant; the registry of methods decides which of the two it
joins. `report` runs even when variants failed and shows them; `check_variants` then
fails the run. Each task's *Docs* say what it reads, writes and what a retry does.

**Trigger form.** Pick a *preset*; every other field left empty keeps the preset's value.
Values the schema refuses are refused when you trigger (the form's number fields move a
value outside their bounds to the nearest bound; the REST API refuses it); the rest
(model, targets, ranks, data source and sizes) is checked by `prepare` before any data
is touched.

**Where things go.** The report: the run's *Report* tab (all runs: *LoRA reports* in
the menu), or `$LORAFLOW_REPORTS/` (default `reports/`); artifacts:
`$LORAFLOW_ARTIFACTS/runs/<run_id>/` (default `artifacts/`).

**Schedule** (`LORAFLOW_SCHEDULE`, read when the DAG is parsed): a cron expression (UTC),
`asset` (a run starts when the data asset `loraflow_imdb_data` receives an event: from an
upstream DAG's outlet or `POST /api/v2/assets/events`; the event's extra `params`, e.g.
`{"params": {"data": "/mnt/imdb"}}`, overrides the defaults), or `none`. Defaults:
`make ui` none (you trigger here), `make cluster` asset, docker `@weekly` (each weekly
run is compared with the last comparable one, so a library upgrade that costs accuracy
fails it); without the variable, `@weekly`.

**Since the last comparable run.** The report compares each selected configuration with
the latest earlier successful run of the same fingerprint (model and weights hash,
subsets, settings) on the same test reviews; a drop whose paired 95% interval lies below
zero is a regression: `check_regression` fails the run and the runs index marks it.

**Assets.** `report` emits events on `loraflow_imdb_report` and
`loraflow_imdb_lora_adapter` with the run id, preset, selected configurations (validation
and test accuracy), report URL and adapter path in their extras; schedule a DAG on them
(`dags/examples/`).

**Notifications.** With `LORAFLOW_NOTIFY_CONN_ID` naming an Airflow connection (smtp, or
slackwebhook with the Slack provider): one message per failed run (a regression named as
such), per successful run (headline and report URL), and when a run is still going
`LORAFLOW_DEADLINE_HOURS` (default 24) after it was queued. Without it nothing is sent.

**GPUs.** Every variant whose method runs the encoder uses pool `gpu` (one slot per GPU)
and queue `gpu`; inside, a GPU lease (a lock per device) keeps two tasks off one GPU.
Without a GPU they run on the CPU.

**Failures.** Download, tokenization, variants and the report retry twice with
exponential back-off, except on bad input (ValueError), which fails at once; a training
retry resumes from its last epoch checkpoint. The report is built whatever happened to
the variants and lists the failed ones; `check_variants` then marks the run failed.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    AsyncCallback,
    CronTriggerTimetable,
    DeadlineAlert,
    DeadlineReference,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowSkipException

# Standard library only (notify: Airflow's BaseNotifier), so parsing stays fast; the ML
# stack is imported in task bodies.
from tasks import assets, notify, registry
from tasks.config import (
    DEFAULT_PRESET,
    MAX_TOKENS,
    PRECISIONS,
    PRESETS,
    TARGET_SETS,
    TRUNCATIONS,
    default_data_source,
    preset_config,
)
from tasks.registry import TARGETS_PATTERN

DAG_ID = "lora_imdb_experiment"
IMDB_SPLIT_ROWS = 25_000  # reviews per IMDB split
EMPTY = " Leave empty to keep the preset's value."
# Wall time of `make run` (airflow dags test) measured on a 2-core AMD EPYC without a GPU or
# native bf16 (2026-11-29): smoke 58 s, cpu 25 min 49 s. seed and paper were not run there.
TIME_ON_CPU = {"smoke": "1 min", "cpu": "26 min", "seed": "hours: use a GPU",
               "paper": "days: use a GPU"}


def _preset_table() -> str:
    """The presets' values as a Markdown table for the form (rendered there)."""
    lines = ["| preset | model | train / val / test | tokens | epochs | methods | "
             "2-core CPU |", "|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        c = preset_config(name, data="hub")
        lines.append(f"| `{name}` | {c.model} | {c.train_size:,} / {c.val_size:,} / "
                     f"{c.test_size:,} | {c.max_length} | {c.epochs} | "
                     f"{', '.join(c.methods)} | {TIME_ON_CPU[name]} |")
    return "\n".join(lines)


def _schedule_text() -> str:
    value = os.environ.get("LORAFLOW_SCHEDULE", "@weekly").strip()
    if value.lower() in ("", "none", "null"):
        return "No schedule: this DAG runs only when triggered."
    if value.lower() == "asset":
        return (f"Scheduled on the data asset `{assets.DATA['name']}`: once unpaused, a run "
                f"with the default preset `{DEFAULT_PRESET}` starts when it receives an event "
                "(an upstream DAG, or `POST /api/v2/assets/events`, whose extra `params` "
                "may override these fields).")
    return (f"Schedule: `{value}` (UTC) with the default preset `{DEFAULT_PRESET}`; "
            "triggering here does not change it, but unpausing the DAG starts it.")


def _list(kind: str, **items: Any) -> dict[str, Any]:
    return {"type": ["null", "array"], "uniqueItems": True, "items": {"type": kind, **items}}


PARAMS: dict[str, Param] = {
    # No section: Airflow opens only the unsectioned "Run Parameters" group by default, so
    # what a run will do is visible without a click.
    "preset": Param(
        DEFAULT_PRESET, type="string", enum=list(PRESETS), title="Preset",
        description_md="Named starting point; the fields below override single values. "
                       + _schedule_text() + "\n\n" + _preset_table(),
        values_display={name: f"{name}: {PRESETS[name]['model']}, {TIME_ON_CPU[name]} on a CPU"
                        for name in PRESETS},
    ),
    "methods": Param(
        None, **_list("string", enum=list(registry.METHODS)), title="Methods",
        examples=list(registry.METHODS),
        description="Which methods run: " + "; ".join(
            f"{m.name}: {m.description}" for m in registry.METHODS.values()) + "." + EMPTY,
    ),
    "model": Param(
        None, type=["null", "string"], title="Model",
        description="A Hugging Face hub id, a local model folder, embedded-minilm or "
                    "tiny-distilbert." + EMPTY,
    ),
    "data": Param(
        None, type=["null", "string"], title="Data",
        description="hub (stanfordnlp/imdb), an https:// URL of aclImdb_v1.tar.gz, or a "
                    "local folder (Parquet files or an extracted aclImdb/)." + EMPTY
                    + " The presets use $LORAFLOW_DATA when it is set.",
    ),
    "train_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=IMDB_SPLIT_ROWS,
        title="Training examples", section="Data subset",
        description=f"Rows drawn from the training split (1 to {IMDB_SPLIT_ROWS:,})." + EMPTY,
    ),
    "val_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=IMDB_SPLIT_ROWS,
        title="Validation examples", section="Data subset",
        description="Rows drawn from the training split, disjoint from the training rows; "
                    "every choice is made on them." + EMPTY,
    ),
    "test_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=IMDB_SPLIT_ROWS,
        title="Test examples", section="Data subset",
        description=f"Rows drawn from the test split (1 to {IMDB_SPLIT_ROWS:,}); scored once "
                    "per variant." + EMPTY,
    ),
    "max_length": Param(
        None, type=["null", "integer"], minimum=8, maximum=MAX_TOKENS,
        title="Max tokens", section="Data subset",
        description=f"Tokens per review after truncation (8 to {MAX_TOKENS})." + EMPTY,
    ),
    "truncation": Param(
        None, type=["null", "string"], enum=[None, *TRUNCATIONS], title="Truncation",
        section="Data subset",
        description="What an encoder reads of a review longer than Max tokens: head (its "
                    "first tokens) or head_tail (its first quarter and last three quarters "
                    "of the budget; Sun et al. 2019)." + EMPTY,
    ),
    "epochs": Param(
        None, type=["null", "integer"], minimum=1, maximum=50, title="Epochs",
        section="Training", description="Training epochs (1 to 50)." + EMPTY,
    ),
    "batch_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=1024, title="Batch size",
        section="Training", description="Examples per optimizer step (1 to 1024)." + EMPTY,
    ),
    "precision": Param(
        None, type=["null", "string"], enum=[None, *PRECISIONS], title="Precision",
        section="Training",
        description="auto: bf16 autocast where the device has native bf16 (recent GPUs, "
                    "CPUs with AVX512-BF16 or AMX), else fp32; fp16 needs a CUDA GPU." + EMPTY,
    ),
    "lora_lr": Param(
        None, **_list("number", exclusiveMinimum=0, exclusiveMaximum=1),
        title="LoRA learning rates", section="Sweep",
        description="JSON list, e.g. [0.001, 0.002]: LoRA (and BitFit) are tuned over these, "
                    "choosing on validation. Give full fine-tuning as many." + EMPTY,
    ),
    "full_lr": Param(
        None, **_list("number", exclusiveMinimum=0, exclusiveMaximum=1),
        title="Full fine-tuning learning rates", section="Sweep",
        description="JSON list, e.g. [0.00003, 0.00005]; as many as the LoRA list." + EMPTY,
    ),
    "ranks": Param(
        None, **_list("integer", minimum=1, maximum=1024), title="LoRA ranks", section="Sweep",
        description="JSON list of ranks r, e.g. [4, 8, 16]. One LoRA task per rank × target "
                    "set × learning rate × seed." + EMPTY,
    ),
    "targets": Param(
        None, **_list("string", pattern=TARGETS_PATTERN), title="LoRA target sets",
        section="Sweep",
        description="One target set per line: " + ", ".join(TARGET_SETS)
                    + " or comma-separated module names such as q_lin,v_lin." + EMPTY,
    ),
    "seeds": Param(
        None, **_list("integer", minimum=0, maximum=2**31 - 1), title="Seeds", section="Sweep",
        description="JSON list of training seeds, e.g. [1, 2, 3]; each seed repeats every "
                    "trained configuration, and results are averaged over them." + EMPTY,
    ),
}


# The data source the presets read (an inlet of `prepare`, the schedule with `asset`), and
# what `report` writes: downstream DAGs can be scheduled on these (dags/examples/).
DATA_ASSET = Asset(**assets.DATA, extra={"source": default_data_source()})
REPORT_ASSET = Asset(**assets.REPORT)
ADAPTER_ASSET = Asset(**assets.ADAPTER)


def _schedule() -> CronTriggerTimetable | list[Asset] | None:
    """`$LORAFLOW_SCHEDULE`: a cron expression or preset such as `@weekly` (UTC); `asset`
    to run when the data asset receives an event; `none` (or empty) for manual runs only."""
    value = os.environ.get("LORAFLOW_SCHEDULE", "@weekly").strip()
    if value.lower() in ("", "none", "null"):
        return None
    if value.lower() == "asset":
        return [DATA_ASSET]
    # run_immediately=0: unpausing waits for the next slot. By default Airflow would start
    # the latest past slot when it lies within 10% of the period (16.8 h for @weekly): a
    # `cpu` run next to the one the user is triggering from the form.
    return CronTriggerTimetable(value, timezone="UTC", run_immediately=timedelta(0))


# Retries are for what may pass next time (network, out of memory, a lost worker). Our
# steps raise ValueError for bad input (a target set that matches no module, data that
# fails validation): retrying cannot fix that, so it fails at once.
NO_RETRY_ON_BAD_INPUT = ExceptionRetryPolicy(rules=[RetryRule(
    exception=ValueError, action=RetryAction.FAIL,
    reason="bad input (ValueError): a retry would fail the same way")])
# LORAFLOW_RETRY_DELAY_S shortens the first back-off (tests and local clusters).
RETRY_DELAY = timedelta(seconds=float(os.environ.get("LORAFLOW_RETRY_DELAY_S", "60")))
RETRY: dict[str, Any] = {
    "retries": 2, "retry_delay": RETRY_DELAY, "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30), "retry_policy": NO_RETRY_ON_BAD_INPUT,
}
# Methods that run the encoder: one GPU each (pool slots = GPUs). A training retry resumes
# from the variant's last epoch checkpoint, so it loses at most an epoch.
ON_GPU: dict[str, Any] = {
    "pool": "gpu", "queue": "gpu", **RETRY, "execution_timeout": timedelta(hours=12),
}
VARIANT_NAME = "{{ task.op_kwargs['variant']['name'] }}"


def _notifications() -> dict[str, Any]:
    """With `$LORAFLOW_NOTIFY_CONN_ID`: one message when a run fails (a regression
    included), one when it succeeds, and one when it is still going `$LORAFLOW_DEADLINE_HOURS`
    (default 24) after it was queued. Without it: nothing (tasks/notify.py)."""
    conn_id = notify.conn_id()
    if conn_id is None:
        return {}
    return {
        "on_failure_callback": notify.RunNotifier(conn_id, "failed"),
        "on_success_callback": notify.RunNotifier(conn_id, "succeeded"),
        "deadline": DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=notify.deadline(),
            callback=AsyncCallback(notify.RunNotifier,
                                   kwargs={"conn_id": conn_id, "event": "deadline"}),
            name="run takes too long"),
    }


def documented(fn):
    """Airflow shows a task function's docstring as the task's Markdown docs: without
    the indentation, which Markdown would render as a code block."""
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "")
    return fn


def _run_variant(run_dir: str, variant: dict[str, Any]) -> str:
    """Body of the mapped variant tasks: one variant, on a leased GPU if it needs one."""
    from tasks.pipeline import load_run
    from tasks.registry import Variant
    from tasks.variants import run_variant

    config, paths = load_run(run_dir)
    return str(run_variant(Variant.from_dict(variant), config, paths))


@dag(
    dag_id=DAG_ID,
    dag_display_name="LoRA vs full fine-tuning on IMDB",
    description="Baselines, a LoRA sweep and full fine-tuning of an encoder on IMDB, chosen "
                "on validation, with a report",
    doc_md=__doc__,
    schedule=_schedule(),
    # No start_date: with one, unpausing would start the latest past slot at once.
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["loraflow", "lora", "nlp", "experiment"],
    default_args={"owner": "loraflow", "retries": 0, "execution_timeout": timedelta(hours=1)},
    **_notifications(),
)
def lora_imdb_experiment():
    @task(multiple_outputs=True, execution_timeout=timedelta(minutes=5), inlets=[DATA_ASSET])
    @documented
    def prepare() -> dict[str, Any]:
        """**Resolve the settings and lay out the run folder.**

        Reads the trigger form's values (over the preset's), or, for a run started by an
        event on the data asset, the event's `extra["params"]`; checks what the form's
        schema cannot (the model exists, the targets match its modules, the ranks fit, the
        data source exists) before anything is written. Writes
        `<artifacts>/runs/<run_id>/config.json` and `environment.json`; logs the settings
        and every variant. Returns the run folder and the two variant lists.

        Retry: none. Bad settings fail the same way again; a second attempt with the same
        settings finds the folder and goes on, a different config for the run id is refused."""
        from tasks import tracking
        from tasks.pipeline import config_from_params, describe, prepare_run

        context = get_current_context()
        params = dict(context["params"])
        params.update(assets.params_from_events(context.get("triggering_asset_events"),
                                                set(PARAMS)))
        config = config_from_params(params)
        paths = prepare_run(config, context["run_id"])
        tracking.start_run(paths, DAG_ID)  # MLflow parent run, when tracking is on
        run_dir = str(paths.run_dir)
        print(describe(config))  # the resolved settings and variants, in the task's log
        return {
            "run_dir": run_dir,
            "cpu": [v.to_dict() for v in config.method_variants(encoder=False)],
            "gpu": [v.to_dict() for v in config.method_variants(encoder=True)],
        }

    # Airflow maps only over a task's whole return value, not over one key of it, so each
    # list the mapped tasks expand over gets its own (instant) task.
    def pick(plan: Any, kind: str) -> Any:
        @task(task_id=f"plan_{kind}_variants", execution_timeout=timedelta(minutes=1))
        @documented
        def select(plan: dict[str, Any]) -> list[Any]:
            """**The variants of one kind**, from `prepare`'s plan: `plan_cpu_variants`
            lists the methods that do not run the encoder, `plan_gpu_variants` those that do
            (the registry decides). Reads and writes nothing but XCom; the mapped variant
            task expands over this list. Retry: none (it cannot fail but on a broken plan)."""
            return plan[kind]

        return select(plan)

    @task(**RETRY, execution_timeout=timedelta(hours=2))
    @documented
    def download_dataset(run_dir: str) -> str:
        """**Draw the three subsets from the data source.**

        Reads the source (hub, a checksum-verified URL of aclImdb_v1.tar.gz, or a local
        folder) through the shared cache `<artifacts>/cache/`; writes the run's
        `data/train.parquet`, `data/validation.parquet` (disjoint from train) and
        `data/test.parquet`. Retry: twice with back-off for network or disk errors; a
        retry reuses what the cache already holds. Bad input (a ValueError) fails at once."""
        from tasks.data import download_dataset
        from tasks.pipeline import load_run

        download_dataset(*load_run(run_dir))
        return run_dir

    @task(execution_timeout=timedelta(minutes=30))  # bad data stays bad: no retries
    @documented
    def validate_dataset(run_dir: str) -> str:
        """**Validate the source and the subsets with Great Expectations**: schema, nulls,
        labels 0/1, text lengths, class balance, row counts, duplicates and overlap
        between splits.

        Reads `data/*.parquet`; writes `data/validation.json`, which the report shows.
        Fails the run when an expectation fails. Retry: none: the same data fails again."""
        from tasks.pipeline import load_run
        from tasks.validate import validate_dataset

        validate_dataset(*load_run(run_dir))
        return run_dir

    @task(**RETRY, execution_timeout=timedelta(hours=1))
    @documented
    def tokenize(run_dir: str) -> str:
        """**Tokenize once for every variant.**

        Reads `data/*.parquet` and the model's tokenizer; writes token ids to the shared
        cache `<artifacts>/cache/tokenized/<key>/` (keyed by the data, the tokenizer and the
        truncation settings: a hit skips the work) and points `data/tokens.json` at it.
        Retry: twice with back-off; a half-built cache folder is never used (it is renamed
        into place only when complete)."""
        from tasks.pipeline import load_run
        from tasks.tokenize import tokenize_dataset

        tokenize_dataset(*load_run(run_dir))
        return run_dir

    @task(**RETRY, execution_timeout=timedelta(hours=2), map_index_template=VARIANT_NAME)
    @documented
    def cpu_variants(run_dir: str, variant: dict[str, Any]) -> str:
        """**One variant of a method that does not run the encoder** (majority, TF-IDF),
        on the default queue.

        Reads the run's subsets; writes `results/<variant>/metrics.json` (scores, costs,
        and where it ran: commit, versions, device, host, precision) and
        `predictions.parquet`, plus the method's model. A method that cannot run on this
        model is recorded as not applicable. Retry: twice with back-off; the variant's
        files are rewritten whole. Bad input fails at once."""
        return _run_variant(run_dir, variant)

    @task(**ON_GPU, map_index_template=VARIANT_NAME)
    @documented
    def gpu_variants(run_dir: str, variant: dict[str, Any]) -> str:
        """**One variant of a method that runs the encoder** (LoRA, full fine-tuning,
        BitFit, linear probe, zero-shot, the notebook heuristic), on pool and queue `gpu`,
        holding a lease on one GPU (the CPU where there is none).

        Reads the tokenized cache; writes `results/<variant>/metrics.json` (scores, costs,
        and where it ran: commit, torch/CUDA/transformers, GPU or CPU model, host,
        precision, the weights' hash), `predictions.parquet` and the trained model
        (LoRA: a PEFT `adapter/`). Retry: twice with back-off; training resumes from its
        last checksummed epoch checkpoint. Bad input fails at once."""
        return _run_variant(run_dir, variant)

    # all_done: the report also shows failed variants (and says so when none succeeded).
    @task(**RETRY, trigger_rule=TriggerRule.ALL_DONE, execution_timeout=timedelta(minutes=30),
          outlets=[REPORT_ASSET, ADAPTER_ASSET])
    @documented
    def report(run_dir: str | None) -> str:
        """**Write the report**, whatever happened to the variants.

        Reads the run's stored files only (config, validation, every metrics.json and
        predictions) and the summaries of earlier runs; writes
        `<reports>/<run slug>/report.html`, `comparison.csv`, `comparison.md`,
        `summary.json` (with the comparison since the last comparable run) and refreshes
        `index.html`. Emits events on the report and LoRA adapter assets whose extras
        carry the run id, preset, each selected configuration with its validation and
        test accuracy, the report URL and the adapter path. Skipped when `prepare` failed.
        Retry: twice; the files are rewritten whole (same inputs, same bytes)."""
        from tasks import tracking
        from tasks.assets import outlet_extras
        from tasks.paths import RunPaths, read_json, report_url
        from tasks.report import build_report

        if run_dir is None:  # prepare failed: there is no run folder to report on
            raise AirflowSkipException("no run folder: prepare failed (see its log)")
        context = get_current_context()
        page = build_report(run_dir)
        tracking.log_report(RunPaths.from_run_dir(run_dir), page)  # when tracking is on
        url = report_url(context["run_id"])
        extras = outlet_extras(context["run_id"], run_dir, read_json(page.parent / "summary.json"),
                               url)
        context["outlet_events"][REPORT_ASSET].extra = extras[0]
        context["outlet_events"][ADAPTER_ASSET].extra = extras[1]
        print(f"report: {url}")  # the log's last line
        return str(page)

    # The report is the only other leaf and succeeds even when variants failed; this leaf
    # keeps the run's state honest (failed if any variant failed, skipped otherwise).
    @task(trigger_rule=TriggerRule.ONE_FAILED, execution_timeout=timedelta(minutes=1))
    @documented
    def check_variants() -> None:
        """**Fail the run if any variant failed** (it runs only then: trigger rule
        one_failed; otherwise it is skipped). Reads and writes nothing: the failures are
        in the report and in each `results/<variant>/metrics.json`. Retry: none."""
        raise RuntimeError("at least one variant failed; its error is in the report and "
                           "in results/<variant>/metrics.json")

    @task(execution_timeout=timedelta(minutes=1))
    @documented
    def check_regression(page: str) -> str:
        """**Fail the run on a regression since the last comparable run**: an earlier
        successful run of the same model, weights, subsets and settings, against which a
        selected configuration's test accuracy dropped with its paired 95% interval wholly
        below zero. Reads the report's `summary.json`; writes nothing. The error names
        each method's drop and what changed (commit, versions, device, precision).
        Retry: none: the same files give the same verdict."""
        from pathlib import Path

        from tasks.report.regression import check

        verdict = check(Path(page).parent / "summary.json")
        print(verdict)
        return verdict

    plan = prepare()
    ready = tokenize(validate_dataset(download_dataset(plan["run_dir"])))
    # a mapped task needs its docs given (override): Airflow copies the docstring only for
    # a task that is called directly
    variants = [
        mapped.override(doc_md=mapped.function.__doc__).partial(run_dir=ready).expand(
            variant=pick(plan, kind))
        for mapped, kind in ((cpu_variants, "cpu"), (gpu_variants, "gpu"))
    ]
    page = report(plan["run_dir"])
    variants >> page
    check_regression(page)
    variants >> check_variants()


lora_imdb_experiment()
