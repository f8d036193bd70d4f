"""A LoRA linear layer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685, section 4.1) wrapping a frozen `nn.Linear`.

    y = x W0ᵀ + b + scaling · dropout(x) Aᵀ Bᵀ,   A: (r, in), B: (out, r)

A is Kaiming-uniform (a=√5, as in microsoft/LoRA `loralib/layers.py`) and B is zero, so a
freshly wrapped layer computes exactly what the base layer computes. `scaling` is alpha/r
(the paper) or alpha/√r with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

Merging is explicit (`merge()` / `unmerge()`, idempotent, guarded by `merged`); unlike
loralib, `eval()` and `train()` never merge or unmerge as a side effect.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn


def _check_hparams(rank: object, alpha: object, dropout: object) -> None:
    # bool is an int subclass; rank=True is a bug, not rank 1.
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be a probability in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """`base(x) + scaling · B(A(dropout(x)))` with `base` frozen; only `lora_A`, `lora_B` train.

    Args:
        base: the pretrained linear layer; its weight and bias are frozen in place.
        rank: r, the rank of the update B·A (paper section 4.1).
        alpha: the update is scaled by alpha/r (alpha/√r with `use_rslora`), so changing r
            does not require re-tuning the learning rate (paper section 4.1).
        dropout: dropout on the LoRA branch input only (the base path is untouched).
        use_rslora: rank-stabilised scaling alpha/√r.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_hparams(rank, alpha, dropout)
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = int(rank), float(alpha), bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, **factory))  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()
        self.train(base.training)  # injected into an eval() model, stay in eval mode

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5) like nn.Linear's default init; B = 0, so B·A = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A, shape (out, in): what `merge()` adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scaling·B·A into the base weight (zero-overhead inference). Idempotent.

        Like PEFT's `safe_merge`, the merged weight is computed first and checked, so a
        diverged adapter (NaN/inf) is refused and the base weight is left untouched."""
        if self.merged:
            return
        weight = self.base.weight
        merged = weight.float() + self.delta_weight().float()
        if not torch.isfinite(merged).all():
            bad = int((~torch.isfinite(merged)).sum())
            raise ValueError(
                f"refusing to merge LoRA into {self._shape()}: the merged weight has {bad} "
                "non-finite values (NaN/inf; did training diverge?); the layer stays unmerged")
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scaling·B·A again; restores W0 up to float rounding. Idempotent."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight().float()).to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            # B·A already lives in base.weight; gradients would reach neither factor.
            if self.training:
                raise RuntimeError(f"LoRA layer {self._shape()} is merged; call unmerge() "
                                   "(or lora_core.inject.unmerge_lora(model)) before training")
            return self.base(x)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return self.base(x) + update * self.scaling

    def _shape(self) -> str:
        return f"Linear(in={self.base.in_features}, out={self.base.out_features}, r={self.rank})"

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, "
                f"rslora={self.use_rslora}, merged={self.merged}")
