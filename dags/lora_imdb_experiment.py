"""
### LoRA vs full fine-tuning vs baselines on IMDB

For one encoder (DistilBERT/BERT family) and one IMDB subset, what do cheap baselines,
LoRA and full fine-tuning reach, at what cost? Every number in the report is measured in
this run.

```
prepare ─► download_dataset ─► validate_dataset ─► tokenize ─┬─► baselines          (majority, tfidf_logreg)
   │                                                         ├─► encoder_baselines  (seed_heuristic, linear_probe) [gpu pool]
   │                                                         ├─► lora               [gpu pool; rank × target set × seed]
   │                                                         └─► full_finetune      [gpu pool; seed]
   └─► plan_* (the list each mapped task expands over)
all variants ─► report          (runs even when some failed, and shows them as failed)
             ─► check_variants  (fails the run if any variant failed; skipped otherwise)
```

**Trigger form.** Pick a *preset* (`smoke` seconds, `cpu` laptop, `seed` notebook
protocol, `paper` full IMDB); every other field left empty keeps the preset's value.
Out-of-range values (rank 0, an unknown preset or baseline) are refused when you trigger;
combinations the schema cannot express are checked by `prepare`, which fails before any
data is touched.

**Where things go.** Artifacts: `$LORAFLOW_ARTIFACTS/runs/<run_id>/` (default
`artifacts/`); report: `$LORAFLOW_REPORTS/<run_id>/report.html` (default `reports/`).

**GPUs.** Every task that runs the encoder (training, and the two baselines that use
the pretrained encoder) uses pool `gpu` (one slot per GPU) and queue `gpu`; inside, a GPU
lease (a lock per device) guarantees that no two tasks share a GPU. Without a GPU they run
on the CPU.

**Failures.** Download, tokenization, baselines, training and the report retry twice
with exponential back-off, except on bad input (ValueError), which fails at once; a training retry resumes from its last epoch
checkpoint. The report is built whatever happened to the variants and lists the failed
ones; `check_variants` then marks the run failed.

**Schedule.** `$LORAFLOW_SCHEDULE` (default `@weekly`, UTC; `none` for manual runs only)
with the default params (`cpu` preset); the first scheduled run is the next slot after
unpausing; no catch-up, one active run at a time.
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

DAG_ID = "lora_imdb_experiment"

# Literals, not imports: this file must parse without the ML stack, and `tasks` may be
# imported only inside task bodies (design.md). tests/dags checks them against
# tasks.config (PRESETS, BASELINES, TARGET_SETS) so they cannot drift.
PRESETS = ("seed", "paper", "cpu", "smoke")
BASELINES = ("majority", "tfidf_logreg", "linear_probe", "seed_heuristic")
TARGET_SETS = ("qkvo", "qv", "all-linear")
ENCODER_BASELINES = ("seed_heuristic", "linear_probe")  # run the encoder: GPU pool
MAX_RANK = 1024
MAX_TOKENS = 512  # BERT position embeddings
IMDB_SPLIT_ROWS = 25_000  # reviews per IMDB split

EMPTY = " Leave empty to keep the preset's value."

PARAMS: dict[str, Param] = {
    "preset": Param(
        "cpu", type="string", enum=list(PRESETS), title="Preset", section="Experiment",
        description="Named starting point; the fields below override single values.",
        values_display={
            "seed": "seed: the notebook's protocol (DistilBERT, 5,000 / 1,000, GPU)",
            "paper": "paper: full IMDB 25,000 / 25,000, 512 tokens (GPU)",
            "cpu": "cpu: embedded MiniLM, 2,000 / 1,000 (laptops)",
            "smoke": "smoke: tiny random DistilBERT, 256 / 128 (tests, seconds)",
        },
    ),
    "model": Param(
        None, type=["null", "string"], title="Model", section="Experiment",
        description="A Hugging Face hub id, a local model folder, embedded-minilm or "
                    "tiny-distilbert." + EMPTY,
    ),
    "data": Param(
        None, type=["null", "string"], title="Data", section="Experiment",
        description="hub (stanfordnlp/imdb), an https:// URL of aclImdb_v1.tar.gz, or a "
                    "local folder (Parquet files or an extracted aclImdb/)." + EMPTY
                    + " The presets use $LORAFLOW_DATA when it is set.",
    ),
    "train_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=IMDB_SPLIT_ROWS,
        title="Training examples", section="Data subset",
        description=f"Rows drawn from the training split (1 to {IMDB_SPLIT_ROWS:,})." + EMPTY,
    ),
    "test_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=IMDB_SPLIT_ROWS,
        title="Test examples", section="Data subset",
        description=f"Rows drawn from the test split (1 to {IMDB_SPLIT_ROWS:,})." + EMPTY,
    ),
    "max_length": Param(
        None, type=["null", "integer"], minimum=8, maximum=MAX_TOKENS,
        title="Max tokens", section="Data subset",
        description=f"Tokens per review after truncation (8 to {MAX_TOKENS})." + EMPTY,
    ),
    "epochs": Param(
        None, type=["null", "integer"], minimum=1, maximum=50, title="Epochs",
        section="Training", description="Training epochs (1 to 50)." + EMPTY,
    ),
    "batch_size": Param(
        None, type=["null", "integer"], minimum=1, maximum=1024, title="Batch size",
        section="Training", description="Examples per optimizer step (1 to 1024)." + EMPTY,
    ),
    "lora_lr": Param(
        None, type=["null", "number"], exclusiveMinimum=0, exclusiveMaximum=1,
        title="LoRA learning rate", section="Training",
        description="AdamW learning rate for LoRA and the linear probe, in (0, 1); "
                    "the notebook used 5e-4." + EMPTY,
    ),
    "full_lr": Param(
        None, type=["null", "number"], exclusiveMinimum=0, exclusiveMaximum=1,
        title="Full fine-tuning learning rate", section="Training",
        description="AdamW learning rate for full fine-tuning, in (0, 1); "
                    "the notebook used 5e-5." + EMPTY,
    ),
    "ranks": Param(
        None, type=["null", "array"], uniqueItems=True,
        items={"type": "integer", "minimum": 1, "maximum": MAX_RANK},
        title="LoRA ranks", section="Sweep",
        description=f"JSON list of ranks r, each 1 to {MAX_RANK}, e.g. [4, 8, 16]. One LoRA "
                    "task per rank × target set × seed." + EMPTY,
    ),
    "targets": Param(
        None, type=["null", "array"], uniqueItems=True,
        items={"type": "string", "pattern": r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$"},
        title="LoRA target sets", section="Sweep",
        description="One target set per line: " + ", ".join(TARGET_SETS)
                    + " or comma-separated module names such as q_lin,v_lin." + EMPTY,
    ),
    "seeds": Param(
        None, type=["null", "array"], uniqueItems=True,
        items={"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        title="Seeds", section="Sweep",
        description="JSON list of training seeds (integers >= 0), e.g. [1, 2, 3]; "
                    "each seed repeats every trained variant." + EMPTY,
    ),
    "baselines": Param(
        None, type=["null", "array"], uniqueItems=True,
        items={"type": "string", "enum": list(BASELINES)}, examples=list(BASELINES),
        title="Baselines", section="Sweep",
        description="Which baselines to run: majority and tfidf_logreg need no model; "
                    "seed_heuristic and linear_probe use the pretrained encoder." + EMPTY
                    + " The presets run all four.",
    ),
}


def _schedule() -> CronTriggerTimetable | None:
    """`$LORAFLOW_SCHEDULE`: a cron expression or preset such as `@weekly` (UTC); `none` (or
    empty) for manual runs only."""
    value = os.environ.get("LORAFLOW_SCHEDULE", "@weekly").strip()
    if value.lower() in ("", "none", "null"):
        return None
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
# Tasks that run the encoder: one GPU each (pool slots = GPUs). A training retry resumes
# from the variant's last epoch checkpoint (tasks.train), so it loses at most an epoch.
ON_GPU: dict[str, Any] = {
    "pool": "gpu", "queue": "gpu", **RETRY, "execution_timeout": timedelta(hours=12),
}


def _train(run_dir: str, spec: dict[str, Any]) -> str:
    """Body of the lora and full_finetune tasks: lease a GPU (or the CPU), train one variant."""
    from tasks.gpu import gpu_lease
    from tasks.pipeline import load_run
    from tasks.train import train_variant

    config, paths = load_run(run_dir)
    with gpu_lease() as device:
        return str(train_variant(spec, config, paths, device=device))


@dag(
    dag_id=DAG_ID,
    dag_display_name="LoRA vs full fine-tuning on IMDB",
    description="Baselines, LoRA sweep and full fine-tuning of an encoder on IMDB, with a report",
    doc_md=__doc__,
    schedule=_schedule(),
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
        """Resolve preset + overrides (fails fast on bad combinations) and lay out the run
        folder; returns the run folder and the variant lists the mapped tasks expand over."""
        from tasks.pipeline import config_from_params, prepare_run

        context = get_current_context()
        config = config_from_params(dict(context["params"]))
        run_dir = str(prepare_run(config, context["run_id"]).run_dir)
        return {
            "run_dir": run_dir,
            "baselines": [b for b in config.baselines if b not in ENCODER_BASELINES],
            "encoder_baselines": [b for b in config.baselines if b in ENCODER_BASELINES],
            "lora": config.lora_variants(),
            "full_finetune": config.full_finetune_variants(),
        }

    # Airflow maps only over a task's whole return value, not over one key of it, so each
    # list the mapped tasks expand over gets its own (instant) task.
    def pick(plan: Any, kind: str) -> Any:
        @task(task_id=f"plan_{kind}", execution_timeout=timedelta(minutes=1))
        def select(plan: dict[str, Any]) -> list[Any]:
            return plan[kind]

        return select(plan)

    @task(**RETRY, execution_timeout=timedelta(hours=2))
    def download_dataset(run_dir: str) -> str:
        from tasks.data import download_dataset
        from tasks.pipeline import load_run

        download_dataset(*load_run(run_dir))
        return run_dir

    @task(execution_timeout=timedelta(minutes=30))  # bad data stays bad: no retries
    def validate_dataset(run_dir: str) -> str:
        from tasks.pipeline import load_run
        from tasks.validate import validate_dataset

        validate_dataset(*load_run(run_dir))
        return run_dir

    @task(**RETRY, execution_timeout=timedelta(hours=1))
    def tokenize(run_dir: str) -> str:
        from tasks.pipeline import load_run
        from tasks.tokenize import tokenize_dataset

        tokenize_dataset(*load_run(run_dir))
        return run_dir

    # majority and tfidf_logreg need no model: CPU, default pool.
    @task(**RETRY, execution_timeout=timedelta(hours=2),
          map_index_template="{{ task.op_kwargs['name'] }}")
    def baselines(run_dir: str, name: str) -> str:
        from tasks.baselines import run_baseline
        from tasks.pipeline import load_run

        return str(run_baseline(name, *load_run(run_dir)))

    # seed_heuristic (encoder forward passes) and linear_probe (trains the head) hold a GPU.
    @task(**ON_GPU, map_index_template="{{ task.op_kwargs['name'] }}")
    def encoder_baselines(run_dir: str, name: str) -> str:
        from tasks.baselines import run_baseline
        from tasks.gpu import gpu_lease
        from tasks.pipeline import load_run

        config, paths = load_run(run_dir)
        with gpu_lease() as device:
            return str(run_baseline(name, config, paths, device=device))

    @task(**ON_GPU, map_index_template=(
        "lora r={{ task.op_kwargs['spec']['rank'] }} {{ task.op_kwargs['spec']['targets'] }}"
        " seed={{ task.op_kwargs['spec']['seed'] }}"))
    def lora(run_dir: str, spec: dict[str, Any]) -> str:
        return _train(run_dir, spec)

    @task(**ON_GPU, map_index_template="full seed={{ task.op_kwargs['spec']['seed'] }}")
    def full_finetune(run_dir: str, spec: dict[str, Any]) -> str:
        return _train(run_dir, spec)

    # all_done: the report also shows failed variants (and says so when none succeeded).
    @task(**RETRY, trigger_rule=TriggerRule.ALL_DONE, execution_timeout=timedelta(minutes=30))
    def report(run_dir: str | None) -> str:
        from tasks.report import build_report

        if run_dir is None:  # prepare failed: there is no run folder to report on
            raise AirflowSkipException("no run folder: prepare failed (see its log)")
        return str(build_report(run_dir))

    # The report is the only other leaf and succeeds even when variants failed; this leaf
    # keeps the run's state honest (failed if any variant failed, skipped otherwise).
    @task(trigger_rule=TriggerRule.ONE_FAILED, execution_timeout=timedelta(minutes=1))
    def check_variants() -> None:
        raise RuntimeError("at least one variant failed; its error is in the report and "
                           "in results/<variant>/metrics.json")

    plan = prepare()
    ready = tokenize(validate_dataset(download_dataset(plan["run_dir"])))
    variants = [
        baselines.partial(run_dir=ready).expand(name=pick(plan, "baselines")),
        encoder_baselines.partial(run_dir=ready).expand(name=pick(plan, "encoder_baselines")),
        lora.partial(run_dir=ready).expand(spec=pick(plan, "lora")),
        full_finetune.partial(run_dir=ready).expand(spec=pick(plan, "full_finetune")),
    ]
    variants >> report(plan["run_dir"])
    variants >> check_variants()


lora_imdb_experiment()
