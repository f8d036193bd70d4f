"""Does mean pooling help LoRA and full fine-tuning on a sentence encoder?

The embedded MiniLM was trained by sentence-transformers with mean pooling, while
`BertForSequenceClassification` classifies from the pooler's [CLS] vector; the linear probe
and zero-shot already use mean pooling on it. This trains LoRA and full fine-tuning both
ways on a prepared run's rows, seed by seed, at the `cpu` preset's learning rates, and
compares validation accuracy (where every choice is made; test is not looked at).

    python -m bench.experiments.pooling artifacts/runs/cpu-lr-sweep --seeds 1 2 3 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lora_core.inject import inject_lora
from tasks.config import PRESETS
from tasks.evaluate import autocast_dtype
from tasks.features import mean_pool
from tasks.models import load_classifier
from tasks.pipeline import load_run
from tasks.report.stats import paired_bootstrap
from tasks.tokenize import load_split, tokenize_dataset
from tasks.train import fit, seed_everything

POOLINGS = ("cls", "mean")


class MeanPooled(nn.Module):
    """A sequence classifier that feeds its head the mean of the last hidden states over
    real tokens instead of the pooler's [CLS] vector (the pooler is left unused)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.inner = classifier

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.inner.base_model(input_ids=input_ids,
                                       attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)  # as the probe and zero-shot pool
        logits = self.inner.classifier(self.inner.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def train_one(method: str, pooling: str, seed: int, lr: float, config, frames, device: str):
    seed_everything(seed)
    model = load_classifier(config.model, seed=seed)
    if method == "lora":
        inject_lora(model, targets=config.targets[0], rank=config.ranks[0],
                    alpha=config.lora_alpha, dropout=config.lora_dropout)
    else:
        model.requires_grad_(True)
    if pooling == "mean":
        model = MeanPooled(model)
    result = fit(model, frames["train"], frames["validation"], lr=lr, config=config, seed=seed,
                 device=device, dtype=autocast_dtype(config.precision, device),
                 desc=f"{method} {pooling} seed {seed}")
    prob = np.asarray(result.val_prob)
    prob = prob[:, 1] if prob.ndim == 2 else prob
    return (prob >= 0.5).astype(int) == frames["validation"]["label"].to_numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.pooling")
    parser.add_argument("run_dir", type=Path, help="a run whose download step has finished")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lora-lr", type=float, default=PRESETS["cpu"]["lora_lr"][0])
    parser.add_argument("--full-lr", type=float, default=PRESETS["cpu"]["full_lr"][0])
    parser.add_argument("--precision", default="fp32", help="fp32 isolates the pooling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/experiments/pooling.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config, paths = load_run(args.run_dir)
    config = config.with_overrides(precision=args.precision)
    tokenize_dataset(config, paths)
    frames = {s: load_split(paths, s) for s in ("train", "validation")}
    lrs = {"lora": args.lora_lr, "full_finetune": args.full_lr}
    lines = [f"# Mean pooling vs [CLS] for LoRA and full fine-tuning ({config.model})", "",
             f"Run `{paths.run_id}`: {len(frames['train']):,} train / "
             f"{len(frames['validation']):,} validation reviews, {config.max_length} tokens, "
             f"{config.epochs} epochs, batch {config.batch_size}, LoRA r={config.ranks[0]} "
             f"{config.targets[0]}, precision {args.precision}, device {args.device}, seeds "
             f"{' '.join(map(str, args.seeds))}. Validation accuracy only.", "",
             "| method | lr | [CLS] (pooler) | mean pooling | mean − [CLS] per seed | "
             "mean − [CLS], 95% paired bootstrap over reviews (seed-averaged) |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for method, lr in lrs.items():
        correct = {p: np.stack([train_one(method, p, s, lr, config, frames, args.device)
                                for s in args.seeds]) for p in POOLINGS}
        acc = {p: correct[p].mean(axis=1) for p in POOLINGS}
        boot = paired_bootstrap(correct["mean"].mean(axis=0), correct["cls"].mean(axis=0))
        low, high = (100 * x for x in boot["diff_ci95"])
        per_seed = ", ".join(f"{100 * (m - c):+.1f}" for m, c in zip(acc["mean"], acc["cls"]))
        cell = {p: f"{100 * acc[p].mean():.1f}% ± {100 * acc[p].std(ddof=1) if len(acc[p]) > 1 else 0:.1f}"
                for p in POOLINGS}
        lines.append(f"| {method} | {lr:g} | {cell['cls']} | {cell['mean']} | {per_seed} | "
                     f"{100 * boot['diff']:+.1f} points [{low:+.1f}, {high:+.1f}] |")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
