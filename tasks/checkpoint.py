"""Epoch checkpoints of a training variant, so a restarted task resumes where it stopped.

`<variant>/checkpoints/epoch-NNN/` holds the trainable weights and the optimizer's tensors
(with the torch RNG) as safetensors, and `state.json` with the rest (param groups,
scheduler, histories) plus the SHA-256 of both weight files. A checkpoint is used only if
it belongs to the same training (`training_fingerprint`) and its files match their
checksums; a damaged or partial one is set aside with a warning naming the file, and
training starts again from the beginning (only the latest epoch is kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tasks.config import ExperimentConfig
from tasks.paths import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)
WEIGHT_FILES = ("trainable.safetensors", "optimizer.safetensors")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, on the CPU, ready for safetensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def training_fingerprint(model: torch.nn.Module, train_df: pd.DataFrame, val_df: pd.DataFrame, *,
                         lr: float, config: ExperimentConfig, seed: int, precision: str) -> str:
    """What a checkpoint must match to be resumed from: settings, data and trainable set."""
    keys = ("model", "epochs", "batch_size", "weight_decay", "warmup_steps", "max_grad_norm",
            "max_length", "lora_alpha", "lora_dropout")
    data = {
        "config": {k: getattr(config, k) for k in keys}, "lr": lr, "seed": seed,
        "precision": precision, "rows": [len(train_df), len(val_df)],
        "train": [int(train_df["length"].sum()), int(train_df["label"].sum())],
        "trainable": [[n, list(p.shape)] for n, p in model.named_parameters() if p.requires_grad],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any], fingerprint: str) -> Path:
    """Write `folder/epoch-NNN/` atomically; older epochs go once it is complete."""
    target = Path(folder) / f"epoch-{state['epoch']:03d}"
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    scalars = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()
               if not torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    first = next(model.parameters())
    if first.is_cuda:
        tensors["rng.cuda"] = torch.cuda.get_rng_state(first.device)
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), tmp / WEIGHT_FILES[0])
        save_file(tensors, tmp / WEIGHT_FILES[1])
        write_json(tmp / "state.json", {
            "fingerprint": fingerprint, "state": state, "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "sha256": {name: _sha256(tmp / name) for name in WEIGHT_FILES},
        })
    for old in Path(folder).glob("epoch-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _set_aside(checkpoint: Path, problem: str) -> None:
    aside = checkpoint.with_name(f".damaged-{checkpoint.name}")
    shutil.rmtree(aside, ignore_errors=True)
    checkpoint.rename(aside)
    log.warning("checkpoint %s is unusable (%s); set aside as %s, training starts over",
                checkpoint, problem, aside.name)


def _read_verified(checkpoint: Path) -> tuple[dict[str, Any], dict, dict] | str:
    """(state.json, weights, optimizer tensors), or what is wrong, naming the file."""
    try:
        meta = read_json(checkpoint / "state.json")
        sums = meta["sha256"]
        for name in WEIGHT_FILES:
            if _sha256(checkpoint / name) != sums[name]:
                return f"{checkpoint / name} does not match its checksum"
        return meta, load_file(checkpoint / WEIGHT_FILES[0]), load_file(checkpoint / WEIGHT_FILES[1])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        return f"{type(err).__name__}: {err}"


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, fingerprint: str,
                    device: str) -> dict[str, Any] | None:
    """Restore the latest epoch checkpoint into the given objects and return the loop
    state; None when there is none, it belongs to another training (removed) or it is
    damaged (set aside)."""
    found = sorted(Path(folder).glob("epoch-*"))  # atomic_dir's temporaries start with '.'
    if not found:
        return None
    latest = found[-1]
    verified = _read_verified(latest)
    if isinstance(verified, str):
        _set_aside(latest, verified)
        return None
    meta, weights, tensors = verified
    if meta["fingerprint"] != fingerprint:
        log.warning("ignoring checkpoints in %s: they belong to a different training", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        _set_aside(latest, f"{latest / WEIGHT_FILES[0]} holds other parameters than the model "
                           f"trains: {sorted(set(weights) ^ set(params))[:5]}")
        return None
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        if not key.startswith("rng."):
            index, name = key.split(".", 1)
            opt_state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]  # JSON: list
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], torch.device(device))
    return meta["state"]
