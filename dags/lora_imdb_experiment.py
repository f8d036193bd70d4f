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
variants ─► report, check_variants
```

One mapped task per variant; the registry of methods decides which of the two it
joins. `report` runs even when variants failed and shows them; `check_variants` then
fails the run.

**Trigger form.** Pick a *preset*; every other field left empty keeps the preset's value.
Values the schema refuses are refused when you trigger (the form's number fields move a
value outside their bounds to the nearest bound; the REST API refuses it); the rest
(model, targets, ranks, data source and sizes) is checked by `prepare` before any data
is touched.

**Where things go.** The report: the run's *Report* tab (all runs: *LoRA reports* in
the menu), or `$LORAFLOW_REPORTS/` (default `reports/`); artifacts:
`$LORAFLOW_ARTIFACTS/runs/<run_id>/` (default `artifacts/`).

**GPUs.** Every variant whose method runs the encoder uses pool `gpu` (GPUs x k slots,
k = LORAFLOW_TASKS_PER_GPU) and queue `gpu`; inside, a GPU lease (k locks per device)
keeps more than k tasks off one GPU, and a variant too large to share one takes it whole.
Without a GPU they run on the CPU.

**Failures.** Download, tokenization, variants and the report retry twice with
exponential back-off, except on bad input (ValueError), which fails at once; a training
retry resumes from its last epoch checkpoint. The report is built whatever happened to
the variants and lists the failed ones; `check_variants` then marks the run failed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import (
    CronTriggerTimetable,
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

# Standard library only, so parsing stays fast; the ML stack is imported in task bodies.
from tasks import registry
from tasks.config import (
    BOUNDS,
    DEFAULT_PRESET,
    INTEGER_PATTERN,
    NUMBER_PATTERN,
    PRECISIONS,
    PRESETS,
    TARGET_SETS,
    TRUNCATIONS,
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


def _timetable() -> CronTriggerTimetable | None:
    """The schedule (tasks.steps.schedule) as a timetable; None for manual runs only."""
    if SCHEDULE is None:
        return None
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
DATA_TASK: dict[str, dict[str, Any]] = {
    "download": {**RETRY, "execution_timeout": timedelta(hours=2)},
    "validate": {"execution_timeout": timedelta(minutes=30)},  # bad data stays bad: no retries
    "tokenize": {**RETRY, "execution_timeout": timedelta(hours=1)},
}


def _run_variant(run_dir: str, variant: dict[str, Any]) -> str:
    """Body of the mapped variant tasks: one variant, on a leased GPU if it needs one. The
    record notes Airflow's try number, so a cleared and re-run variant shows as such."""
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
    max_active_runs=1,
    params=PARAMS,
    tags=["loraflow", "lora", "nlp", "experiment"],
    default_args={"owner": "loraflow", "retries": 0, "execution_timeout": timedelta(hours=1)},
)
def lora_imdb_experiment():
    @task(multiple_outputs=True, execution_timeout=timedelta(minutes=5))
    def prepare() -> dict[str, Any]:
        """Resolve preset + overrides (fails fast on bad combinations), lay out the run
        folder, log the settings; returns the run folder and the variant lists."""
        from tasks import tracking
        from tasks.failures import recorded
        from tasks.pipeline import config_from_params, prepare_run

        context = get_current_context()
        with recorded(context["run_id"], "prepare", context["ti"].try_number):
            # logs the resolved settings and the variants through the task logger
            config = config_from_params(dict(context["params"]))
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
        def select(plan: dict[str, Any]) -> list[Any]:
            return plan[kind]

        return select(plan)

    def data_task(step: Step) -> Any:
        """The task of one data step (tasks.steps.DATA_STEPS), with its settings above."""
        @task(task_id=step.task_id, **DATA_TASK[step.name])
        def run_step(run_dir: str) -> str:
            return _data_step(step.task_id, step.function(), run_dir)

        return run_step

    @task(**RETRY, execution_timeout=timedelta(hours=2), map_index_template=VARIANT_NAME)
    def cpu_variants(run_dir: str, variant: dict[str, Any]) -> str:
        return _run_variant(run_dir, variant)

    @task(**ON_GPU, map_index_template=VARIANT_NAME)
    def gpu_variants(run_dir: str, variant: dict[str, Any]) -> str:
        return _run_variant(run_dir, variant)

    # all_done: the report also shows failed variants (and says so when none succeeded).
    @task(**RETRY, trigger_rule=TriggerRule.ALL_DONE, execution_timeout=timedelta(minutes=30))
    def report(run_dir: str | None) -> str:
        from tasks import tracking
        from tasks.paths import RunPaths, report_url
        from tasks.report import build_report

        if run_dir is None:  # prepare failed: there is no run folder to report on
            raise AirflowSkipException("no run folder: prepare failed (see its log)")
        page = build_report(run_dir)
        tracking.log_report(RunPaths.from_run_dir(run_dir), page)  # when tracking is on
        page = str(page)
        print(f"report: {report_url(get_current_context()['run_id'])}")  # the log's last line
        return page

    # The report is the only other leaf and succeeds even when variants failed; this leaf
    # keeps the run's state honest (failed if any variant failed, skipped otherwise).
    @task(trigger_rule=TriggerRule.ONE_FAILED, execution_timeout=timedelta(minutes=1))
    def check_variants(run_dir: str | None) -> None:
        from tasks.failures import what_failed

        raise RuntimeError(what_failed(get_current_context()["run_id"], run_dir))

    plan = prepare()
    ready = plan["run_dir"]
    for step in DATA_STEPS:  # download, validate, tokenize: each after the one before
        ready = data_task(step)(ready)
    variants = [
        cpu_variants.partial(run_dir=ready).expand(variant=pick(plan, "cpu")),
        gpu_variants.partial(run_dir=ready).expand(variant=pick(plan, "gpu")),
    ]
    variants >> report(plan["run_dir"])
    variants >> check_variants(plan["run_dir"])


lora_imdb_experiment()
