"""The seed notebook's LoRA training, as a contender in the end-to-end benchmark.

Copied from /work/shared/seed/lora_distilbert_imdb_notebook.txt, cells `LoRALayer`,
`apply_lora_to_distilbert` and `train_lora_model`. Changes, and why:
- module names: the notebook walks DistilBERT's `q_lin/k_lin/v_lin/out_lin`; here the
  same four projections are found by name for any architecture lora_core knows (BERT:
  `attention.self.query/key/value`, `attention.output.dense`);
- the constructor's prints are gone (per-layer console output, not part of training);
- rows are a list of dicts, so `train_data[i:i+16]` yields rows as the loop expects (on a
  `datasets.Dataset` a slice is a dict of columns and the notebook's loop would fail);
- evaluation covers the whole validation subset, not the first 500 test reviews;
- the tokenizer is the pure-Python BertTokenizer (`BertTokenizerLegacy` in transformers
  5, the class the notebook's `DistilBertTokenizer` was), called per batch as in the
  notebook, with token type ids off: all zeros, BERT's default, and DistilBERT takes none.
Kept: A = randn * 0.1, B = 0, fp32, no shuffling, no schedule, no clipping, AdamW over the
LoRA factors and `classifier` with weight decay 0.01.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

BATCH = 16  # the notebook's hard-coded batch size


class LoRALayer(nn.Module):
    """output = W_0 x + (B A) x * alpha / r, W_0 frozen (the notebook's cell, unchanged)."""

    def __init__(self, original_layer: nn.Linear, rank: int = 16, alpha: float = 16):
        super().__init__()
        self.original_layer = original_layer
        self.original_layer.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, original_layer.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(original_layer.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.original_layer(x) + x @ self.lora_A.T @ self.lora_B.T * self.scaling

    def get_lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]


def apply_lora(model: nn.Module, suffixes: list[str], rank: int = 16,
               alpha: float = 16) -> list[nn.Parameter]:
    """Wrap every linear module whose name ends with one of `suffixes` in a LoRALayer;
    return the LoRA parameters (the notebook's `apply_lora_to_distilbert`)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == s or n.endswith("." + s) for s in suffixes)]
    params: list[nn.Parameter] = []
    for name in names:
        layer = LoRALayer(model.get_submodule(name), rank=rank, alpha=alpha)
        model.set_submodule(name, layer)
        params.extend(layer.get_lora_parameters())
    return params


def _encode(tokenizer: Any, batch: list[dict], max_length: int, device: str) -> dict:
    inputs = tokenizer([row["text"] for row in batch], return_tensors="pt", truncation=True,
                       max_length=max_length, padding=True, return_token_type_ids=False)
    return {k: v.to(device) for k, v in inputs.items()}


def train_lora_model(model: nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer,
                     train_data: list[dict], val_data: list[dict], *, epochs: int,
                     max_length: int, device: str) -> dict[str, Any]:
    """The notebook's loop: per-batch tokenization, then a full-validation pass per epoch.
    Returns the last epoch's validation accuracy, the steps and the training-loop seconds
    (tokenization inside the loop included, evaluation excluded)."""
    model.to(device).train()
    steps, train_seconds, accuracy = 0, 0.0, float("nan")
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(0, len(train_data), BATCH):
            batch = train_data[i:i + BATCH]
            labels = torch.tensor([row["label"] for row in batch], device=device)
            loss = model(**_encode(tokenizer, batch, max_length, device), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - start

        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(val_data), BATCH):
                batch = val_data[i:i + BATCH]
                predictions = model(**_encode(tokenizer, batch, max_length, device)).logits.argmax(-1)
                correct += (predictions.cpu() == torch.tensor([r["label"] for r in batch])).sum().item()
        accuracy = correct / len(val_data)
        model.train()
    return {"accuracy": accuracy, "steps": steps, "train_seconds": train_seconds}
