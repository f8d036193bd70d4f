"""Training variants: LoRA, full fine-tuning and the linear probe, through ONE loop.

The three methods differ only in what is trainable (LoRA factors + head, everything, or
the head alone) and in the learning rate (`lora_lr` for LoRA and the probe, `full_lr` for
full fine-tuning). The loop: AdamW (weight decay on matrices only, not on biases and
LayerNorm weights), linear warm-up then linear decay, gradient clipping, batches padded to
their longest sequence and grouped by length, bf16/fp16 autocast on CUDA, the loss logged
per step, the whole test subset evaluated after each epoch, and a checkpoint per epoch
(safetensors, optimizer state included) from which a restarted task resumes.

Choices worth knowing:
- warm-up steps = min(config.warmup_steps, 10% of the run's optimizer steps): the notebook's
  100 warm-up steps would be a whole smoke run;
- batch order of epoch e comes from `numpy.random.default_rng([seed, e])`, so a resumed
  run needs no data-order state; the torch RNG (dropout) is saved in each checkpoint;
- only the latest epoch checkpoint is kept while training, and `checkpoints/` is removed
  once the variant's final artifacts are written (they are all a report needs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from tasks.config import ExperimentConfig
from tasks.environment import progress_disabled
from tasks.evaluate import (
    PeakMemory,
    autocast,
    autocast_dtype,
    latency_fields,
    pad_batch,
    pad_id_of,
    predict_logits,
    scores_from_logits,
    softmax_positive,
)
from tasks.metrics import fail_record, finish_record, new_record
from tasks.paths import RunPaths, atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

TRAINED_METHODS = ("lora", "full_finetune", "linear_probe")
GROUP_CHUNK_BATCHES = 50  # length-sorting window, as transformers' LengthGroupedSampler
EVAL_BATCH_FACTOR = 2  # no activations kept for backward: evaluation affords larger batches


# --- variants -----------------------------------------------------------------------------------

def variant_name(spec: dict[str, Any]) -> str:
    """`lora_r{rank}_{targets-slug}_s{seed}`, `full_finetune_s{seed}` or `linear_probe_s{seed}`."""
    method, seed = spec.get("method"), spec.get("seed")
    if method not in TRAINED_METHODS:
        raise ValueError(f"unknown training method {method!r}; expected one of {TRAINED_METHODS}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"variant seed must be an integer >= 0, got {seed!r}")
    if method != "lora":
        return f"{method}_s{seed}"
    rank, targets = spec.get("rank"), spec.get("targets")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not isinstance(targets, str) or not targets.strip() or "/" in targets:
        raise ValueError(f"LoRA targets must be a target-set name or comma-separated module "
                         f"names (no '/'), got {targets!r}")
    slug = "+".join(t.strip() for t in targets.split(","))
    return f"lora_r{rank}_{slug}_s{seed}"


def resolve_device(device: str | None = None) -> str:
    """The device given (e.g. by the GPU lease), else CUDA when present, else the CPU.
    A leased GPU becomes the current device, so nothing in this process touches GPU 0
    by default while another task holds it."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)
    return str(resolved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --- batching -----------------------------------------------------------------------------------

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


# --- the training loop --------------------------------------------------------------------------

@dataclass
class FitResult:
    loss_history: list[dict[str, Any]]  # {"step", "epoch", "loss", "lr"} per optimizer step
    eval_history: list[dict[str, Any]]  # {"epoch", "accuracy", "f1", "loss"} per epoch
    prob_positive: np.ndarray  # final model, every test row, in its order
    train_seconds: float  # optimizer steps only (no evaluation, no checkpointing)
    eval_seconds: float
    steps: int
    examples: int  # training examples processed, all epochs
    warmup_steps: int
    precision: str
    resumed_from_epoch: int  # 0: trained from scratch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters with decay on matrices, none on biases and LayerNorm (ndim 1)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fit(model: torch.nn.Module, train_df: pd.DataFrame, test_df: pd.DataFrame, *, lr: float,
        config: ExperimentConfig, seed: int, device: str, checkpoint_dir: Path | None = None,
        desc: str = "train") -> FitResult:
    """Train the parameters of `model` that require grad for `config.epochs` epochs,
    evaluating on all of `test_df` after each; resume from `checkpoint_dir` when it holds
    a checkpoint of this same training (see `training_fingerprint`)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: nothing to fit")
    model.to(device)
    steps_per_epoch = math.ceil(len(train_df) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = min(config.warmup_steps, total_steps // 10)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # bf16 needs none
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    fingerprint = training_fingerprint(model, train_df, test_df, lr=lr, config=config, seed=seed)

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
    eval_batch = config.batch_size * EVAL_BATCH_FACTOR
    log_every = max(1, steps_per_epoch // 10)
    prob: np.ndarray | None = None
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        rng = np.random.default_rng([seed, epoch])  # the epoch's order, without stored state
        batches = length_grouped_batches(lengths, config.batch_size, rng)
        model.train()
        start = time.perf_counter()
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{config.epochs}", leave=False,
                   disable=progress_disabled())
        for idx in bar:
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            with autocast(device):
                loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             labels=labels[idx].to(device)).loss
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
            state["loss_history"].append({"step": state["step"], "epoch": epoch,
                                          "loss": float(loss.detach()), "lr": lr_now})
            if state["step"] % log_every == 0:
                log.info("%s epoch %d step %d/%d loss %.4f lr %.2e", desc, epoch, state["step"],
                         total_steps, state["loss_history"][-1]["loss"], lr_now)
        state["train_seconds"] += time.perf_counter() - start

        start = time.perf_counter()
        logits = predict_logits(model, test_df, eval_batch, device)
        state["eval_seconds"] += time.perf_counter() - start
        prob = softmax_positive(logits)
        scores = scores_from_logits(logits, test_df["label"].to_numpy())
        state["eval_history"].append({"epoch": epoch, **scores})
        state["epoch"] = epoch
        log.info("%s epoch %d: test accuracy %.4f f1 %.4f loss %.4f", desc, epoch,
                 scores["accuracy"], scores["f1"], scores["loss"])
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, scaler, state, fingerprint)

    if prob is None:  # resumed from the final epoch's checkpoint: nothing left to train
        prob = softmax_positive(predict_logits(model, test_df, eval_batch, device))
    return FitResult(state["loss_history"], state["eval_history"], prob, state["train_seconds"],
                     state["eval_seconds"], state["step"], state["examples"], warmup, precision,
                     resumed_from)


# --- checkpoints --------------------------------------------------------------------------------

def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, on the CPU, ready for safetensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def training_fingerprint(model: torch.nn.Module, train_df: pd.DataFrame, test_df: pd.DataFrame, *,
                         lr: float, config: ExperimentConfig, seed: int) -> str:
    """What a checkpoint must match to be resumed from: settings, data and trainable set."""
    keys = ("model", "epochs", "batch_size", "weight_decay", "warmup_steps", "max_grad_norm",
            "max_length", "lora_alpha", "lora_dropout")
    data = {
        "config": {k: getattr(config, k) for k in keys}, "lr": lr, "seed": seed,
        "rows": [len(train_df), len(test_df)],
        "train": [int(train_df["length"].sum()), int(train_df["label"].sum())],
        "trainable": [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any], fingerprint: str) -> Path:
    """`folder/epoch-NNN/`, written atomically: trainable weights and the optimizer's tensors
    (plus the torch RNG) as safetensors, the rest (param groups, scheduler, histories) as
    JSON. Older epochs are removed once the new one is complete."""
    target = Path(folder) / f"epoch-{state['epoch']:03d}"
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    scalars = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()
               if not torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        tensors["rng.cuda"] = torch.cuda.get_rng_state(next(model.parameters()).device)
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "state.json", {
            "fingerprint": fingerprint, "state": state, "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        })
    for old in Path(folder).glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, fingerprint: str,
                    device: str) -> dict[str, Any] | None:
    """Restore the latest complete epoch checkpoint into the given objects and return the
    loop state; None (and the stale folder removed) when there is none or it belongs to a
    different training."""
    found = sorted(Path(folder).glob("epoch-*"))  # atomic_dir's temporaries start with '.'
    if not found:
        return None
    latest = found[-1]
    meta = read_json(latest / "state.json")
    if meta["fingerprint"] != fingerprint:
        log.warning("ignoring checkpoints in %s: they belong to a different training", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    weights = load_file(latest / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise RuntimeError(f"checkpoint {latest} holds {sorted(set(weights) ^ set(params))[:5]} "
                           "that do not match the model's trainable parameters")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    tensors = load_file(latest / "optimizer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        if not key.startswith("rng."):
            index, name = key.split(".", 1)
            opt_state.setdefault(int(index), {})[name] = value
    # JSON turned the betas tuple into a list
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], torch.device(device))
    return meta["state"]


# --- one variant, end to end ----------------------------------------------------------------------

def prepare_trainable(model: torch.nn.Module, spec: dict[str, Any],
                      config: ExperimentConfig) -> list[str]:
    """Make trainable what the method trains; returns the LoRA-wrapped module names."""
    from lora_core.inject import freeze_all_but, head_module_names, inject_lora

    if spec["method"] == "lora":
        return inject_lora(model, targets=spec["targets"], rank=spec["rank"],
                           alpha=config.lora_alpha, dropout=config.lora_dropout)
    if spec["method"] == "linear_probe":
        freeze_all_but(model, head_module_names(model))
    else:
        model.requires_grad_(True)
    return []


def save_artifact(model: torch.nn.Module, spec: dict[str, Any], config: ExperimentConfig,
                  out: Path) -> Path:
    """LoRA: `adapter/` (PEFT format, head included); full fine-tuning: `checkpoint/`
    (save_pretrained, safetensors); linear probe: `checkpoint/head.safetensors`."""
    if spec["method"] == "lora":
        from lora_core.adapter import save_adapter

        return save_adapter(model, out / "adapter", base_model=config.model)  # atomic itself
    with atomic_dir(out / "checkpoint") as tmp:
        if spec["method"] == "full_finetune":
            model.save_pretrained(tmp)
        else:
            save_file(trainable_state(model), tmp / "head.safetensors",
                      metadata={"base_model": config.model})
    return out / "checkpoint"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def train_variant(spec: dict[str, Any], config: ExperimentConfig, paths: RunPaths,
                  device: str | None = None) -> Path:
    """Train one variant on the run's tokenized data and write its metrics.json (returned),
    predictions.parquet and adapter/ or checkpoint/. On error: a failed record, re-raised."""
    name = variant_name(spec)
    method, seed = spec["method"], spec["seed"]
    lr = config.full_lr if method == "full_finetune" else config.lora_lr
    hyper: dict[str, Any] = {
        "lr": lr, "epochs": config.epochs, "batch_size": config.batch_size,
        "weight_decay": config.weight_decay, "warmup_steps_max": config.warmup_steps,
        "max_grad_norm": config.max_grad_norm, "max_length": config.max_length,
        "train_size": config.train_size, "test_size": config.test_size, "optimizer": "AdamW",
        "schedule": "linear warm-up and decay",
    }
    if method == "lora":
        hyper.update(rank=spec["rank"], alpha=config.lora_alpha, dropout=config.lora_dropout,
                     targets=spec["targets"])
    record = new_record(name, method, config, seed, hyper)
    try:
        return _train(spec, config, paths, resolve_device(device), record)
    except BaseException as exc:  # also a timeout or kill signal: the report shows why
        log.exception("variant %s failed", name)
        fail_record(record, exc, paths)
        raise


def _train(spec: dict[str, Any], config: ExperimentConfig, paths: RunPaths, device: str,
           record: dict[str, Any]) -> Path:
    from lora_core.accounting import count_parameters, parameter_breakdown
    from lora_core.models import load_classifier
    from tasks.tokenize import load_split

    name, seed, method = record["variant"], spec["seed"], spec["method"]
    out = paths.variant_dir(name)
    record["device"] = device
    train_df, test_df = load_split(paths, "train"), load_split(paths, "test")
    seed_everything(seed)
    with PeakMemory(device) as memory:
        model = load_classifier(config.model, seed=seed)
        lora_modules = prepare_trainable(model, spec, config)
        counts = count_parameters(model)
        record.update(params_total=counts["total"], params_trainable=counts["trainable"])
        log.info("%s: %d of %d parameters trainable, device %s", name, counts["trainable"],
                 counts["total"], device)
        result = fit(model, train_df, test_df, lr=record["hyperparameters"]["lr"], config=config,
                     seed=seed, device=device, checkpoint_dir=out / "checkpoints", desc=name)
    record["hyperparameters"].update(warmup_steps=result.warmup_steps, precision=result.precision)
    record.update(
        loss_history=result.loss_history, eval_history=result.eval_history,
        train_seconds=result.train_seconds, eval_seconds=result.eval_seconds,
        train_steps=result.steps, seconds_per_step=result.train_seconds / max(result.steps, 1),
        samples_per_second=(result.examples / result.train_seconds
                            if result.train_seconds > 0 else None),
        peak_memory_bytes=memory.peak_bytes, peak_memory_kind=memory.kind,
        resumed_from_epoch=result.resumed_from_epoch,
    )
    if method == "lora":
        record.update(rank=spec["rank"], targets=spec["targets"], lora_modules=lora_modules,
                      parameter_breakdown=parameter_breakdown(model, spec["rank"], spec["targets"]))
    elif method == "full_finetune":
        record["parameter_breakdown"] = parameter_breakdown(model)
    artifact = save_artifact(model, spec, config, out)  # before latency: that merges LoRA
    record["artifact_bytes"] = folder_bytes(artifact)
    record.update(latency_fields(model, spec, test_df, device))
    metrics = finish_record(record, test_df["label"].to_numpy(), result.prob_positive, paths)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # final artifacts are written
    log.info("%s: accuracy %.4f after %.1f s of training", name, record["accuracy"],
             result.train_seconds)
    return metrics
