"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", arXiv:2106.10199): train only the bias terms
of the encoder, plus the classification head; every weight matrix stays frozen.

Saved as one safetensors file of the trained tensors (`bitfit.safetensors`, about 0.1% of
the model plus the head): load the base model, then `load_state_dict(tensors,
strict=False)`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lora_core.inject import head_module_names
from tasks.job import Job

WEIGHTS = "bitfit.safetensors"


def trainable_names(model: nn.Module) -> list[str]:
    """Every bias (attention, feed-forward, LayerNorm) and every parameter of the head."""
    heads = head_module_names(model)
    return [name for name, _ in model.named_parameters()
            if name.endswith(".bias") or any(name.startswith(h + ".") for h in heads)]


def make_trainable(model: nn.Module, job: Job) -> None:
    keep = set(trainable_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    job.record.hyperparameters["trains"] = "bias terms and the classification head"


def save(model: nn.Module, job: Job, folder: Path) -> None:
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
               if p.requires_grad}
    save_file(tensors, str(folder / WEIGHTS), metadata={"base_model": job.config.model,
                                                         "method": "bitfit"})
