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

**GPUs.** Every variant whose method runs the encoder uses pool `gpu` (GPUs x k slots,
k = LORAFLOW_TASKS_PER_GPU) and queue `gpu`; inside, a GPU lease (k locks per device)
keeps more than k tasks off one GPU, and a variant too large to share one takes it whole.
Without a GPU they run on the CPU.

**Failures.** Download, tokenization, variants and the report retry twice with
exponential back-off, except on bad input (ValueError), which fails at once; a training
retry resumes from its last epoch checkpoint. Clearing a running variant or marking it
failed stops it within a training step (SIGTERM), recorded as failed. A complete variant
(ok or not applicable, with its files) is not run again when its task is cleared: its log
says so; delete `results/<variant>/` first, or rerun it with `loraflow run --force`. The
report is built whatever happened to the variants and lists the failed ones;
`check_variants` then marks the run failed.
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
    BOUNDS,
    DEFAULT_PRESET,
    INTEGER_PATTERN,
    NUMBER_PATTERN,
    PRECISIONS,
    PRESETS,
    TARGET_SETS,
    TRUNCATIONS,
    default_data_source,
    list_pattern,
    preset_config,
    schema_bounds,
)
from tasks.registry import TARGETS_PATTERN
from tasks.steps import DAG_ID, DATA_STEPS, Step, schedule

SCHEDULE = schedule()  # read once: the form's text and the timetable say the same
IMDB_SPLIT_ROWS = 25_000  # reviews per IMDB split
EMPTY = " Empty: the preset's value."
PRESET_VALUE = "(preset's value)"  # what an empty dropdown reads
# What each preset is for (design.md). No run times here: the only ones measured through
# Airflow on the 2-core machine would not cover every preset.
PURPOSE = {"seed": "the seed notebook's protocol, on a GPU",
           "paper": "the published setting, on GPUs",
           "cpu": "a real model on a laptop's CPU",
           "smoke": "a plumbing check on random weights"}


def _sweep(c: Any) -> str:
    """ranks × target sets × learning rates (LoRA / full) × seeds, as the preset has them."""
    def values(xs: tuple) -> str:
        return ", ".join(registry.format_lr(x) if isinstance(x, float) else str(x) for x in xs)

    return (f"{values(c.ranks)} × {values(c.targets)} × {values(c.lora_lr)} / "
            f"{values(c.full_lr)} × {values(c.seeds)}")


def _preset_table() -> str:
    """The presets' values as a Markdown table for the form (rendered there), and the
    methods they run below it."""
    lines = ["| preset | model | train / val / test | tokens | epochs | sweep: ranks × "
             "targets × learning rates (LoRA / full) × seeds | variant tasks |",
             "|---|---|---|---|---|---|---|"]
    configs = {name: preset_config(name, data="hub") for name in PRESETS}
    for name, c in configs.items():
        lines.append(f"| `{name}` | {c.model} | {c.train_size:,} / {c.val_size:,} / "
                     f"{c.test_size:,} | {c.max_length} | {c.epochs} | {_sweep(c)} | "
                     f"{len(c.variants())} |")
    common = [m for m in registry.METHODS if all(m in c.methods for c in configs.values())]
    extra = {name: [m for m in c.methods if m not in common] for name, c in configs.items()}
    lines.append("\nMethods: " + ", ".join(common) + " in every preset" + "".join(
        f"; {', '.join(ms)} in `{name}`" for name, ms in extra.items() if ms) + ".")
    return "\n".join(lines)


def _preset_label(name: str) -> str:
    """The preset dropdown's entry: what the preset is for and what it will run."""
    return f"{name}: {PURPOSE[name]}, {len(preset_config(name, data='hub').variants())} variant tasks"


def _schedule_text() -> str:
    if SCHEDULE is None:
        return "No schedule: this DAG runs only when triggered."
    if SCHEDULE.lower() == "asset":
        return (f"Scheduled on the data asset `{assets.DATA['name']}`: once unpaused, a run "
                f"with the default preset `{DEFAULT_PRESET}` starts when it receives an event "
                "(an upstream DAG, or `POST /api/v2/assets/events`, whose extra `params` "
                "may override these fields).")
    return (f"Schedule: `{SCHEDULE}` (UTC) with the default preset `{DEFAULT_PRESET}`; "
            "triggering here does not change it, but unpausing the DAG starts it.")


def _list(kind: str, **items: Any) -> dict[str, Any]:
    return {"type": ["null", "array"], "uniqueItems": True, "items": {"type": kind, **items}}


def _number(name: str) -> dict[str, Any]:
    """An optional number field with tasks.config's bounds for `name`."""
    kind = "integer" if BOUNDS[name][0] is int else "number"
    return {"type": ["null", kind], **schema_bounds(name)}


def _range(name: str) -> str:
    bounds = schema_bounds(name)
    return f"{bounds['minimum']:,} to {bounds['maximum']:,}"


def _typed_list(kind: str, **items: Any) -> dict[str, Any]:
    """A sweep list the form lets one type: text such as `5e-4, 2e-3` or one value per line
    (Airflow's JSON editor rewrites a list while it is being typed), or a JSON list from the
    REST API. `prepare` parses the text (tasks.config.parse_list) and checks the values."""
    item = INTEGER_PATTERN if kind == "integer" else NUMBER_PATTERN
    return {"type": ["null", "array", "string"], "uniqueItems": True,
            "items": {"type": kind, **items}, "pattern": list_pattern(item)}


PARAMS: dict[str, Param] = {
    # No section: Airflow opens only the unsectioned "Run Parameters" group by default, so
    # what a run will do is visible without a click.
    "preset": Param(
        DEFAULT_PRESET, type="string", enum=list(PRESETS), title="Preset",
        description_md="Named starting point; the fields below override single values. "
                       + _schedule_text() + "\n\n" + _preset_table(),
        values_display={name: _preset_label(name) for name in PRESETS},
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
        None, **_number("train_size"), title="Training examples", section="Data subset",
        description=f"Rows drawn from the training split (IMDB's has {IMDB_SPLIT_ROWS:,}; "
                    "prepare checks the source holds enough)." + EMPTY,
    ),
    "val_size": Param(
        None, **_number("val_size"), title="Validation examples", section="Data subset",
        description="Rows drawn from the training split, disjoint from the training rows; "
                    "every choice is made on them." + EMPTY,
    ),
    "test_size": Param(
        None, **_number("test_size"), title="Test examples", section="Data subset",
        description=f"Rows drawn from the test split (IMDB's has {IMDB_SPLIT_ROWS:,}); scored "
                    "once per variant." + EMPTY,
    ),
    "max_length": Param(
        None, **_number("max_length"), title="Max tokens", section="Data subset",
        description=f"Tokens per review after truncation ({_range('max_length')})." + EMPTY,
    ),
    "truncation": Param(
        None, type=["null", "string"], enum=[None, *TRUNCATIONS], title="Truncation",
        section="Data subset",
        values_display={"null": PRESET_VALUE, **{t: t for t in TRUNCATIONS}},
        description="What an encoder reads of a review longer than Max tokens: head (its "
                    "first tokens) or head_tail (its first quarter and last three quarters "
                    "of the budget; Sun et al. 2019)." + EMPTY,
    ),
    "epochs": Param(
        None, **_number("epochs"), title="Epochs", section="Training",
        description=f"Training epochs ({_range('epochs')})." + EMPTY,
    ),
    "batch_size": Param(
        None, **_number("batch_size"), title="Batch size", section="Training",
        description=f"Examples per optimizer step ({_range('batch_size')})." + EMPTY,
    ),
    "precision": Param(
        None, type=["null", "string"], enum=[None, *PRECISIONS], title="Precision",
        section="Training",
        values_display={"null": PRESET_VALUE, "auto": "auto: bf16 where the device has it "
                        "natively, else fp32", "fp32": "fp32", "bf16": "bf16",
                        "fp16": "fp16 (CUDA GPUs only)"},
        description="auto: bf16 autocast where the device has native bf16 (recent GPUs, "
                    "CPUs with AVX512-BF16 or AMX), else fp32; fp16 needs a CUDA GPU." + EMPTY,
    ),
    "lora_lr": Param(
        None, **_typed_list("number", **schema_bounds("lora_lr")),
        title="LoRA learning rates", section="Sweep",
        description="Comma-separated or one per line, e.g. 1e-3, 2e-3: LoRA (and BitFit) are "
                    "tuned over these, choosing on validation. Give full fine-tuning as "
                    "many." + EMPTY,
    ),
    "full_lr": Param(
        None, **_typed_list("number", **schema_bounds("full_lr")),
        title="Full fine-tuning learning rates", section="Sweep",
        description="Comma-separated or one per line, e.g. 5e-5, 1e-4; as many as the LoRA "
                    "learning rates." + EMPTY,
    ),
    "ranks": Param(
        None, **_typed_list("integer", **schema_bounds("ranks")), title="LoRA ranks",
        section="Sweep",
        description="Comma-separated or one per line, e.g. 4, 8, 16. One LoRA task per rank "
                    "× target set × learning rate × seed." + EMPTY,
    ),
    "targets": Param(
        None, **_list("string", pattern=TARGETS_PATTERN), title="LoRA target sets",
        section="Sweep",
        description="One target set per line: " + ", ".join(TARGET_SETS)
                    + " or comma-separated module names such as q_lin,v_lin." + EMPTY,
    ),
    "seeds": Param(
        None, **_typed_list("integer", **schema_bounds("seeds")), title="Seeds",
        section="Sweep",
        description="Comma-separated or one per line, e.g. 1, 2, 3: each seed repeats every "
                    "trained configuration, and results are averaged over them." + EMPTY,
    ),
}


# The data source the presets read (an inlet of `prepare`, the schedule with `asset`), and
# what `report` writes: downstream DAGs can be scheduled on these (dags/examples/).
DATA_ASSET = Asset(**assets.DATA, extra={"source": default_data_source()})
REPORT_ASSET = Asset(**assets.REPORT)
ADAPTER_ASSET = Asset(**assets.ADAPTER)


def _timetable() -> CronTriggerTimetable | list[Asset] | None:
    """The schedule (tasks.steps.schedule) as a timetable: the data asset for `asset`,
    None for manual runs only."""
    if SCHEDULE is None:
        return None
    if SCHEDULE.lower() == "asset":
        return [DATA_ASSET]
    # run_immediately=0: unpausing waits for the next slot. By default Airflow would start
    # the latest past slot when it lies within 10% of the period (16.8 h for @weekly): a
    # `cpu` run next to the one the user is triggering from the form.
    return CronTriggerTimetable(SCHEDULE, timezone="UTC", run_immediately=timedelta(0))


# Retries are for what may pass next time (network, out of memory, a lost worker). Our
# steps raise ValueError for bad input (a target set that matches no module, data that
# fails validation): retrying cannot fix that, so it fails at once.
NO_RETRY_ON_BAD_INPUT = ExceptionRetryPolicy(rules=[RetryRule(
    exception=ValueError, action=RetryAction.FAIL,
    reason="bad input (ValueError): a retry would fail the same way")])
# LORAFLOW_RETRY_DELAY_S shortens the first back-off (tests and local clusters).
RETRY_DELAY = timedelta(seconds=float(os.environ.get("LORAFLOW_RETRY_DELAY_S", "60")))


def _max_active_runs() -> int:
    """One run at a time unless LORAFLOW_MAX_ACTIVE_RUNS says more: runs share no files
    (each has its run folder and report) and the `gpu` pool shares the GPUs, so a
    deployment may run several; one keeps a schedule from piling runs up."""
    raw = os.environ.get("LORAFLOW_MAX_ACTIVE_RUNS", "1").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"LORAFLOW_MAX_ACTIVE_RUNS must be a whole number of at least 1, not {raw!r}")
    return int(raw)


RETRY: dict[str, Any] = {
    "retries": 2, "retry_delay": RETRY_DELAY, "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30), "retry_policy": NO_RETRY_ON_BAD_INPUT,
}
# Methods that run the encoder: a GPU slot each (pool slots = GPUs x k). A training retry resumes
# from the variant's last epoch checkpoint, so it loses at most an epoch.
ON_GPU: dict[str, Any] = {
    "pool": "gpu", "queue": "gpu", **RETRY, "execution_timeout": timedelta(hours=12),
}
VARIANT_NAME = "{{ task.op_kwargs['variant']['name'] }}"
# Task settings of each data step (tasks.steps.DATA_STEPS), by step name.
DATA_DOCS: dict[str, str] = {  # the task docs the UI shows, by step name
    "download": """**Draw the three subsets from the data source.**

Reads the source (hub, a checksum-verified URL of aclImdb_v1.tar.gz, or a local folder)
through the shared cache; writes the run's `data/train.parquet`, `data/validation.parquet`
(disjoint from train) and `data/test.parquet`, normalised and deduplicated
(`data/draw.json`). Retry: twice with back-off for network or disk errors; a retry reuses
what the cache already holds. Bad input (a ValueError) fails at once.""",
    "validate": """**Validate the source and the subsets with Great Expectations**: schema,
nulls, labels 0/1, text lengths, class balance, row counts, duplicates and overlap between
splits.

Reads `data/*.parquet`; writes `data/validation.json`, which the report shows. Fails the
run when an expectation fails. Retry: none: the same data fails again.""",
    "tokenize": """**Tokenize once for every variant.**

Reads `data/*.parquet` and the model's tokenizer; writes token ids to the shared cache
`tokenized/<key>/` (keyed by the data, the tokenizer, max length and truncation: a hit
skips the work) and points `data/tokens.json` at it. Retry: twice with back-off; a
half-built cache folder is never used (it is renamed into place only when complete).""",
}
DATA_TASK: dict[str, dict[str, Any]] = {
    "download": {**RETRY, "execution_timeout": timedelta(hours=2)},
    "validate": {"execution_timeout": timedelta(minutes=30)},  # bad data stays bad: no retries
    "tokenize": {**RETRY, "execution_timeout": timedelta(hours=1)},
}


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
    """Body of the mapped variant tasks: one variant, on a leased GPU if it needs one. The
    record notes Airflow's try number, so a cleared and re-run variant shows as such. Not
    forced: clearing a complete variant's task keeps its result (a clear of the whole run
    after a success would otherwise retrain everything, and a failure then would replace
    good results); its log says how to run it again."""
    from tasks.pipeline import load_run
    from tasks.registry import Variant
    from tasks.variants import run_variant

    config, paths = load_run(run_dir)
    attempt = get_current_context()["ti"].try_number
    return str(run_variant(Variant.from_dict(variant), config, paths, attempt=attempt))


def _data_step(step: str, fn: Any, run_dir: str) -> str:
    """Body of the data steps: run `fn` on the run; if it fails, record which step and
    why, for check_variants and the Report tab (tasks.failures)."""
    from tasks.failures import recorded
    from tasks.pipeline import load_run

    context = get_current_context()
    with recorded(context["run_id"], step, context["ti"].try_number):
        fn(*load_run(run_dir))
    return run_dir


@dag(
    dag_id=DAG_ID,
    dag_display_name="LoRA vs full fine-tuning on IMDB",
    description="Baselines, a LoRA sweep and full fine-tuning of an encoder on IMDB, chosen "
                "on validation, with a report",
    doc_md=__doc__,
    schedule=_timetable(),
    # No start_date: with one, unpausing would start the latest past slot at once.
    catchup=False,
    max_active_runs=_max_active_runs(),
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
        from tasks.failures import recorded
        from tasks.pipeline import config_from_params, prepare_run

        context = get_current_context()
        with recorded(context["run_id"], "prepare", context["ti"].try_number):
            # logs the resolved settings and the variants through the task logger
            params = dict(context["params"])
            params.update(assets.params_from_events(context.get("triggering_asset_events"),
                                                    set(PARAMS)))
            config = config_from_params(params)
            paths = prepare_run(config, context["run_id"])
        tracking.start_run(paths, DAG_ID)  # MLflow parent run, when tracking is on
        run_dir = str(paths.run_dir)
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

    def data_task(step: Step) -> Any:
        """The task of one data step (tasks.steps.DATA_STEPS), with its settings above."""
        @task(task_id=step.task_id, doc_md=DATA_DOCS[step.name], **DATA_TASK[step.name])
        def run_step(run_dir: str) -> str:
            return _data_step(step.task_id, step.function(), run_dir)

        return run_step

    @task(**RETRY, execution_timeout=timedelta(hours=2), map_index_template=VARIANT_NAME)
    @documented
    def cpu_variants(run_dir: str, variant: dict[str, Any]) -> str:
        """**One variant of a method that does not run the encoder** (majority, TF-IDF),
        on the default queue.

        Reads the run's subsets; writes `results/<variant>/metrics.json` (scores, costs,
        and where it ran: commit, versions, device, host, precision) and
        `predictions.parquet`, plus the method's model. A method that cannot run on this
        model is recorded as not applicable. Retry: twice with back-off; the variant's
        files are rewritten whole. Bad input fails at once. Cleared when complete: not run
        again (the log says how to force it)."""
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
        last checksummed epoch checkpoint. Bad input fails at once. Cleared or marked
        failed while running: it stops within a step (SIGTERM) and is recorded as failed;
        cleared when complete: not run again (the log says how to force it)."""
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
    def check_variants(run_dir: str | None) -> None:
        """**Fail the run if a step or a variant failed** (it runs only then: trigger rule
        one_failed; otherwise it is skipped), naming what happened: the step that stopped
        the run, or the failed variants. Reads the run's failure record and
        `results/<variant>/metrics.json`; writes nothing. Retry: none."""
        from tasks.failures import what_failed

        raise RuntimeError(what_failed(get_current_context()["run_id"], run_dir))

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
    ready = plan["run_dir"]
    for step in DATA_STEPS:  # download, validate, tokenize: each after the one before
        ready = data_task(step)(ready)
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
    variants >> check_variants(plan["run_dir"])


lora_imdb_experiment()
