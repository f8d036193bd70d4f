"""End-to-end benchmark: from raw Parquet rows to validation accuracy, one LoRA variant,
three ways a user could do it.

- loraflow: its real path: `prepare_run`, the download and tokenize steps (the token
  cache starts cold: a fresh artifacts folder), then `run_variant` for the LoRA variant.
- PEFT + transformers.Trainer, as their documentation shows: `Dataset.map` tokenization,
  `DataCollatorWithPadding`, `TrainingArguments` at Trainer's defaults except epochs,
  batch, learning rate, seed, weight decay and no saving or reporting; `LoraConfig` with
  task type SEQ_CLS; `trainer.train()`, then `trainer.predict` on validation.
- the seed notebook's own loop (bench/notebook.py).

Every contender gets the same rows (loraflow's subset selection, tasks.data), the same
model, rank, alpha, targets, learning rate, epochs, batch size and seed, and runs in this
process one after the other, so all share one torch thread count. Each contender's clock
covers reading the Parquet file, selecting the subsets, tokenization, model loading,
training and its validation evaluation; what else a contender does on its own path is
listed in bench.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks import registry
from tasks.config import PRESETS, ExperimentConfig, preset_config

TEST_ROWS = 16  # loraflow's path also scores a test subset: kept one batch small


def e2e_config(data: str, quick: bool) -> ExperimentConfig:
    """The `cpu` preset's data and training settings, one LoRA variant (r=16, qkvo, alpha
    16, the preset's first LoRA learning rate); `quick`: a tiny random model on 64/32 rows."""
    common = dict(data=str(data), methods=("lora",), ranks=(16,), targets=("qkvo",),
                  lora_alpha=16.0, lora_lr=(PRESETS["cpu"]["lora_lr"][0],), batch_size=16,
                  precision="auto", test_size=TEST_ROWS)
    if quick:
        return preset_config("cpu", model="tiny-distilbert", train_size=64, val_size=32,
                             max_length=32, epochs=1, **common)
    return preset_config("cpu", **common)


def subsets(config: ExperimentConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) rows exactly as tasks.data.download_dataset draws them from a
    local folder: texts normalised, deduplicated across the source, one permutation of the
    training pool, train first, validation after it."""
    from tasks.data import shuffled, unique_pools
    from tasks.text import normalise

    full = {s: pd.read_parquet(Path(config.data) / f"{s}.parquet", columns=["text", "label"])
            for s in ("train", "test")}
    texts = {s: f["text"].map(normalise) for s, f in full.items()}
    pools, _ = unique_pools(texts)
    order = pools["train"][shuffled(len(pools["train"]), config.data_seed)]
    train = full["train"].assign(text=texts["train"])
    end = config.train_size + config.val_size
    return (train.iloc[order[:config.train_size]].reset_index(drop=True),
            train.iloc[order[config.train_size:end]].reset_index(drop=True))


def _row(name: str, start: float, accuracy: float, steps: int, train_seconds: float,
         precision: str, threads: int) -> dict[str, Any]:
    return {"name": name, "seconds": time.perf_counter() - start,
            "ms_per_step": 1000 * train_seconds / steps, "accuracy": float(accuracy),
            "steps": int(steps), "train_seconds": train_seconds, "precision": precision,
            "threads": threads}


def run_loraflow(config: ExperimentConfig, workdir: Path, device: str) -> dict[str, Any]:
    from tasks.data import download_dataset
    from tasks.pipeline import prepare_run
    from tasks.tokenize import data_fingerprint, tokenize_dataset
    from tasks.variants import run_variant

    threads, start = torch.get_num_threads(), time.perf_counter()
    paths = prepare_run(config, "bench-e2e", workdir / "artifacts", workdir / "reports")
    download_dataset(config, paths)
    tokenize_dataset(config, paths)
    metrics = json.loads(run_variant(config.variants()[0], config, paths, device=device)
                         .read_text())
    row = _row(f"loraflow {registry.method('lora').label}", start,
               metrics["validation_accuracy"], metrics["train_steps"], metrics["train_seconds"],
               metrics["precision"], threads)
    # outside the clock: proof that the other contenders saw loraflow's rows
    row["rows_fingerprint"] = {s: data_fingerprint(pd.read_parquet(paths.split_parquet(s)))
                               for s in ("train", "validation")}
    return row


def run_peft_trainer(config: ExperimentConfig, workdir: Path, device: str) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from lora_core.inject import TARGET_PRESETS
    from tasks.models import load_classifier, load_tokenizer

    threads, start = torch.get_num_threads(), time.perf_counter()
    train, validation = subsets(config)
    # AutoTokenizer / AutoModelForSequenceClassification.from_pretrained on the same folder
    # (tasks.models also builds the random tiny model of the quick mode)
    tokenizer = load_tokenizer(config.model)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=config.max_length)

    train_ds = datasets.Dataset.from_pandas(train).map(tokenize, batched=True)
    val_ds = datasets.Dataset.from_pandas(validation).map(tokenize, batched=True)
    model = load_classifier(config.model, seed=config.seeds[0])
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.ranks[0], lora_alpha=config.lora_alpha,
                      target_modules=TARGET_PRESETS[model.config.model_type]["qkvo"],
                      modules_to_save=["classifier"])
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, learning_rate=config.lora_lr[0],
        seed=config.seeds[0], weight_decay=config.weight_decay, save_strategy="no",
        report_to=[], use_cpu=device == "cpu")  # use_cpu: the device under test, not any GPU
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    result = trainer.train()
    predicted = trainer.predict(val_ds)
    accuracy = float((np.argmax(predicted.predictions, axis=-1) == predicted.label_ids).mean())
    return _row("PEFT + Trainer", start, accuracy, result.global_step,
                result.metrics["train_runtime"], "fp32", threads)


def run_notebook(config: ExperimentConfig, workdir: Path, device: str) -> dict[str, Any]:
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from bench.notebook import apply_lora, train_lora_model
    from lora_core.inject import TARGET_PRESETS
    from tasks.models import load_classifier, resolve_source

    threads, start = torch.get_num_threads(), time.perf_counter()
    train, validation = subsets(config)
    tokenizer = BertTokenizerLegacy.from_pretrained(resolve_source(config.model)[0])
    model = load_classifier(config.model, seed=config.seeds[0])
    lora_params = apply_lora(model, TARGET_PRESETS[model.config.model_type]["qkvo"],
                             rank=config.ranks[0], alpha=config.lora_alpha)
    optimizer = torch.optim.AdamW([*lora_params, *model.classifier.parameters()],
                                  lr=config.lora_lr[0], weight_decay=config.weight_decay)
    out = train_lora_model(model, tokenizer, optimizer, train.to_dict("records"),
                           validation.to_dict("records"), epochs=config.epochs,
                           max_length=config.max_length, device=device)
    return _row("seed notebook loop", start, out["accuracy"], out["steps"],
                out["train_seconds"], "fp32", threads)


CONTENDERS = (run_loraflow, run_peft_trainer, run_notebook)  # loraflow first: the reference


def _warm_up() -> None:
    """Import what any contender imports before any clock starts: in one process the
    first contender would otherwise pay alone for the imports they share."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.bert.tokenization_bert_legacy  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import bench.notebook  # noqa: F401
    import tasks.data  # noqa: F401
    import tasks.methods.lora  # noqa: F401
    import tasks.pipeline  # noqa: F401
    import tasks.tokenize  # noqa: F401
    import tasks.train  # noqa: F401
    import tasks.variants  # noqa: F401


def bench_e2e(config: ExperimentConfig, device: str) -> dict[str, Any]:
    """Every contender once, in order; rows carry their ratios against loraflow."""
    from tasks.tokenize import data_fingerprint

    _warm_up()
    # also reads the Parquet file once before the clocks: no contender meets a cold page cache
    ours = dict(zip(("train", "validation"), subsets(config)))
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        rows = [run(config, Path(tmp), device) for run in CONTENDERS]
    reference = rows[0]
    for r in rows:
        r["seconds_vs_loraflow"] = r["seconds"] / reference["seconds"]
        r["ms_per_step_vs_loraflow"] = r["ms_per_step"] / reference["ms_per_step"]
        r["accuracy_minus_loraflow"] = r["accuracy"] - reference["accuracy"]
    same_rows = reference.pop("rows_fingerprint") == {
        s: data_fingerprint(f) for s, f in ours.items()}
    return {"config": {k: config.to_dict()[k] for k in (
                "model", "train_size", "val_size", "max_length", "epochs", "batch_size",
                "lora_lr", "ranks", "targets", "lora_alpha", "seeds", "precision", "test_size")},
            "same_rows": same_rows, "rows": rows}
