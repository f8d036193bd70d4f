"""Gradient training of one variant of a trained method (LoRA, full fine-tuning, BitFit,
...) through ONE loop; the method's module only decides what is trainable and how the
trained model is saved (tasks/methods/__init__.py).

The loop: AdamW (weight decay on matrices only, not on biases and LayerNorm weights),
linear warm-up then linear decay, gradient clipping, batches padded to their longest
sequence and grouped by length, autocast at the run's precision (tasks.evaluate's
`autocast_dtype`; fp16 on CUDA with loss scaling), the loss logged per step, the validation
subset evaluated after each epoch, and a checkpoint per epoch (tasks.checkpoint) from
which a restarted task resumes. The test subset is scored once, after training, with the
final model (merged, for methods that merge).

Choices worth knowing:
- warm-up steps = min(config.warmup_steps, 10% of the run's optimizer steps): the notebook's
  100 warm-up steps would be a whole smoke run;
- batch order of epoch e comes from `numpy.random.default_rng([seed, e])`, so a resumed
  run needs no data-order state; the torch RNG (dropout) is saved in each checkpoint;
- the final model is the last epoch's: no epoch is chosen, so nothing is chosen on test;
- on CUDA the step never waits for the device: each step's loss stays there until the
  history is logged (every `log_every` steps and at the epoch's end), batches are copied
  from pinned memory without blocking, AdamW is fused, and fp32 matmuls use TF32 where
  the GPU has it. On the CPU the step is the plain one, and the logged losses are the
  same floats either way.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from tasks import registry
from tasks.checkpoint import load_checkpoint, save_checkpoint, training_fingerprint
from tasks.config import ExperimentConfig
from tasks.environment import progress_disabled
from tasks.evaluate import (
    PeakMemory,
    autocast,
    latency_fields,
    pad_batch,
    pad_id_of,
    precision_label,
    predict_logits,
    scores_from_logits,
    softmax_positive,
)
from tasks.job import Job, Predictions, TrainedMethod
from tasks.paths import atomic_dir
from tasks.stop import check_stop

log = logging.getLogger(__name__)

# (loss_history, eval_history) -> None: a view of the loop's progress (tasks.tracking)
ProgressHook = Callable[[list[dict[str, Any]], list[dict[str, Any]]], None]
GROUP_CHUNK_BATCHES = 50  # length-sorting window, as transformers' LengthGroupedSampler
EVAL_BATCH_FACTOR = 4  # no activations kept for backward: evaluation affords larger batches


def linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup: int,
                                total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' `get_linear_schedule_with_warmup`, step for step (the same LambdaLR,
    so its checkpoints load either way): up from 0 over `warmup` steps, then down to 0 at
    `total`. Importing it from transformers costs each training process seconds (it pulls
    in the Trainer's utilities and PEFT)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                           chunk_batches: int = GROUP_CHUNK_BATCHES) -> list[np.ndarray]:
    """Every row index exactly once, in batches of similar length: shuffle, sort by length
    within windows of `chunk_batches` batches, cut into batches, shuffle the batches. Padding
    shrinks while the order stays random enough for SGD."""
    lengths = np.asarray(lengths)
    perm = rng.permutation(len(lengths))
    window = batch_size * chunk_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def optimizer_options(device: str | torch.device) -> dict[str, Any]:
    """Fused AdamW (one kernel for every parameter) on CUDA; the CPU keeps torch's default
    implementation, so CPU results stay what they were."""
    return {"fused": True} if on_cuda(device) else {}


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A batch tensor on `device`: on CUDA through pinned memory without blocking the host
    (the copy overlaps the previous step's kernels); elsewhere as it is."""
    if on_cuda(device):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def use_tf32(device: str | torch.device) -> bool:
    """TF32 tensor cores for fp32 matmuls on GPUs that have them (compute capability 8.0,
    Ampere, and later); process-wide, which is one task's process."""
    if not on_cuda(device) or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return True


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters with decay on matrices, none on biases and LayerNorm (ndim 1)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class FitResult:
    loss_history: list[dict[str, Any]]  # {"step", "epoch", "loss", "lr"} per optimizer step
    eval_history: list[dict[str, Any]]  # {"epoch", "accuracy", "f1", "loss"} per epoch, validation
    val_prob: np.ndarray  # the final model on every validation row, in its order
    train_seconds: float  # optimizer steps only (no evaluation, no checkpointing)
    eval_seconds: float
    steps: int
    examples: int  # training examples processed, all epochs
    warmup_steps: int
    resumed_from_epoch: int  # 0: trained from scratch


def fit(model: torch.nn.Module, train_df: pd.DataFrame, val_df: pd.DataFrame, *, lr: float,
        config: ExperimentConfig, seed: int, device: str, dtype: torch.dtype | None = None,
        checkpoint_dir: Path | None = None, desc: str = "train",
        on_log: ProgressHook | None = None) -> FitResult:
    """Train the parameters of `model` that require grad for `config.epochs` epochs,
    evaluating on all of `val_df` after each; resume from `checkpoint_dir` when it holds
    a checkpoint of this same training. `on_log(loss_history, eval_history)` is called at
    the loop's logging points and after each epoch's evaluation (experiment tracking)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: nothing to fit")
    model.to(device)
    use_tf32(device)
    steps_per_epoch = math.ceil(len(train_df) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = min(config.warmup_steps, total_steps // 10)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=lr,
                                  **optimizer_options(device))
    scheduler = linear_schedule_with_warmup(optimizer, warmup, total_steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # bf16 needs none
    fingerprint = training_fingerprint(model, train_df, val_df, lr=lr, config=config, seed=seed,
                                       precision=precision_label(dtype))

    state: dict[str, Any] = {"epoch": 0, "step": 0, "loss_history": [], "eval_history": [],
                             "train_seconds": 0.0, "eval_seconds": 0.0, "examples": 0}
    resumed = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, scaler, fingerprint,
                              device) if checkpoint_dir else None
    state = resumed or state
    resumed_from = state["epoch"]
    if resumed:
        log.info("%s: resuming after epoch %d (step %d)", desc, state["epoch"], state["step"])

    ids_col = train_df["input_ids"].tolist()
    lengths = train_df["length"].to_numpy()
    labels = torch.tensor(train_df["label"].to_numpy(np.int64))  # a copy: parquet is read-only
    pad, params = pad_id_of(model), [p for _, p in trainable]
    log_every = max(1, steps_per_epoch // 10)
    pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # history entries, loss on device

    def flush() -> None:
        """Copy the pending losses to the host in one transfer (one sync)."""
        if pending:
            values = torch.stack([loss for _, loss in pending]).tolist()
            for (entry, _), value in zip(pending, values, strict=True):
                entry["loss"] = value
            pending.clear()

    val_prob: np.ndarray | None = None
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        rng = np.random.default_rng([seed, epoch])  # the epoch's order, without stored state
        batches = length_grouped_batches(lengths, config.batch_size, rng)
        model.train()
        start = time.perf_counter()
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{config.epochs}", leave=False,
                   disable=progress_disabled())
        for idx in bar:
            check_stop()  # a stop signal ends training here, between two steps
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            with autocast(device, dtype):
                loss = model(input_ids=to_device(ids, device),
                             attention_mask=to_device(mask, device),
                             labels=to_device(labels[idx], device)).loss
            optimizer.zero_grad(set_to_none=True)
            lr_now = scheduler.get_last_lr()[0]
            if scaler is not None:  # fp16: scale the loss, unscale before clipping
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["examples"] += len(idx)
            entry = {"step": state["step"], "epoch": epoch, "loss": None, "lr": lr_now}
            state["loss_history"].append(entry)
            pending.append((entry, loss.detach()))
            if state["step"] % log_every == 0:
                flush()
                log.info("%s epoch %d step %d/%d loss %.4f lr %.2e", desc, epoch, state["step"],
                         total_steps, entry["loss"], lr_now)
                if on_log:  # every entry up to this step has its loss now
                    on_log(state["loss_history"], state["eval_history"])
        flush()
        state["train_seconds"] += time.perf_counter() - start

        start = time.perf_counter()
        logits = predict_logits(model, val_df, config.batch_size * EVAL_BATCH_FACTOR, device, dtype)
        state["eval_seconds"] += time.perf_counter() - start
        val_prob = softmax_positive(logits)
        scores = scores_from_logits(logits, val_df["label"].to_numpy())
        state["eval_history"].append({"epoch": epoch, **scores})
        state["epoch"] = epoch
        log.info("%s epoch %d: validation accuracy %.4f f1 %.4f loss %.4f", desc, epoch,
                 scores["accuracy"], scores["f1"], scores["loss"])
        if on_log:
            on_log(state["loss_history"], state["eval_history"])
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, scaler, state, fingerprint)

    if val_prob is None:  # resumed from the final epoch's checkpoint: nothing left to train
        val_prob = softmax_positive(predict_logits(
            model, val_df, config.batch_size * EVAL_BATCH_FACTOR, device, dtype))
    return FitResult(state["loss_history"], state["eval_history"], val_prob,
                     state["train_seconds"], state["eval_seconds"], state["step"],
                     state["examples"], warmup, resumed_from)


def _stop_before_forward(module: torch.nn.Module, args: Any) -> None:
    check_stop()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def hyperparameters(config: ExperimentConfig, lr: float) -> dict[str, Any]:
    """The training settings every trained variant records."""
    return {"lr": lr, "epochs": config.epochs, "batch_size": config.batch_size,
            "weight_decay": config.weight_decay, "warmup_steps_max": config.warmup_steps,
            "max_grad_norm": config.max_grad_norm, "max_length": config.max_length,
            "train_size": config.train_size, "val_size": config.val_size,
            "test_size": config.test_size, "optimizer": "AdamW",
            "schedule": "linear warm-up and decay", "precision_setting": config.precision}


def train_variant(job: Job, module: TrainedMethod,
                  on_log: ProgressHook | None = None) -> Predictions:
    """Train `job.variant` with the method `module`; fill the record with what was measured,
    save the model (atomically) and return the final model's validation and test
    probabilities."""
    from lora_core.accounting import count_parameters, parameter_breakdown
    from tasks.models import load_classifier
    from tasks.tokenize import load_split

    variant, config, record, device = job.variant, job.config, job.record, job.device
    method = registry.method(variant.method)
    frames = {split: load_split(job.paths, split) for split in ("train", "validation", "test")}
    dtype = job.dtype  # the run's setting at the training batch's shape (tasks.variants)
    record.precision = job.precision
    record.hyperparameters.update(hyperparameters(config, variant.lr))
    record.hyperparameters["fp32_matmul"] = "tf32" if use_tf32(device) else "ieee"
    seed_everything(variant.seed)
    with PeakMemory(device) as memory:
        model = load_classifier(config.model, seed=variant.seed)
        # every forward pass (training, evaluation, latency, test scoring) first checks for
        # a stop signal: a stopped variant stops within a batch, wherever it is
        model.register_forward_pre_hook(_stop_before_forward)
        module.make_trainable(model, job)
        counts = count_parameters(model)
        record.params_total, record.params_trainable = counts["total"], counts["trainable"]
        log.info("%s: %d of %d parameters trainable, device %s, %s", variant.name,
                 counts["trainable"], counts["total"], device, record.precision)
        result = fit(model, frames["train"], frames["validation"], lr=variant.lr, config=config,
                     seed=variant.seed, device=device, dtype=dtype,
                     checkpoint_dir=job.out / "checkpoints", desc=variant.name, on_log=on_log)
    record.hyperparameters["warmup_steps"] = result.warmup_steps
    record.loss_history, record.eval_history = result.loss_history, result.eval_history
    record.train_seconds, record.eval_seconds = result.train_seconds, result.eval_seconds
    record.train_steps = result.steps
    record.seconds_per_step = result.train_seconds / max(result.steps, 1)
    record.samples_per_second = (result.examples / result.train_seconds
                                 if result.train_seconds > 0 else None)
    record.peak_memory_bytes, record.peak_memory_kind = memory.peak_bytes, memory.kind
    record.resumed_from_epoch = result.resumed_from_epoch
    record.parameter_breakdown = parameter_breakdown(model)

    # the stages after the last epoch take a while on a CPU: say what is going on
    log.info("%s: training done; saving the %s", variant.name, method.artifact)
    # saved before latency merges the model, put in place once the test subset is scored:
    # a variant stopped before that leaves no model that looks complete
    with atomic_dir(job.out / method.artifact) as saved:
        module.save(model, job, saved)
        record.artifact_bytes = folder_bytes(saved)
        # latency leaves a mergeable model merged: the test subset is scored on the model a
        # user would deploy, once, with larger batches
        log.info("%s: measuring inference latency (batch of one, %s)", variant.name,
                 "base, unmerged and merged model" if method.mergeable else "final model")
        latency = latency_fields(model, frames["test"], device, dtype,
                                 adapter=module if method.mergeable else None)
        for key, value in latency.items():
            setattr(record, key, value)
        log.info("%s: scoring the %d test reviews once, with the final model", variant.name,
                 len(frames["test"]))
        start = time.perf_counter()
        test_prob = softmax_positive(predict_logits(
            model, frames["test"], config.batch_size * EVAL_BATCH_FACTOR, device, dtype))
        record.eval_seconds = (record.eval_seconds or 0.0) + time.perf_counter() - start
        check_stop()
    shutil.rmtree(job.out / "checkpoints", ignore_errors=True)  # the model is saved
    log.info("%s: validation accuracy %.4f after %.1f s of training", variant.name,
             result.eval_history[-1]["accuracy"], result.train_seconds)
    return Predictions(validation=result.val_prob, test=test_prob)
