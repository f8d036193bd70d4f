"""Parameter accounting: what LoRA trains, what it leaves frozen, and what it saves.

Counts are numbers of scalars (`Tensor.numel()`), never rows of matrices (the seed
notebook's slip). For a d×k weight W0 (out d, in k) LoRA trains A (r×k) and B (d×r):
r·(d+k) parameters instead of d·k, a reduction factor d·k / (r·(d+k)) (Hu et al. 2021,
section 4.1). Example: DistilBERT-base, dim 768, 6 layers, r=16 on W_q, W_k, W_v, W_o:
6·4·16·(768+768) = 589,824 LoRA parameters, each matrix 24× smaller than W0.
"""

from __future__ import annotations

import re

import pandas as pd
from torch import nn

from lora_core.inject import head_module_names, lora_layers, resolve_targets
from lora_core.layer import LoRALinear

COMPONENTS = ("embeddings", "attention", "ffn", "norm", "head", "other")
_LAYER = re.compile(r"\.\d+\.")  # '.3.' marks a module inside the repeated encoder blocks


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable"}: scalars in all (shared counted once) / trainable parameters."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def _heads(model: nn.Module) -> list[str]:
    try:
        return head_module_names(model)
    except ValueError:
        return []


def _component(name: str, module: nn.Module, heads: list[str]) -> str:
    """Which part of the network a module belongs to (BERT and DistilBERT naming)."""
    if isinstance(module, nn.LayerNorm):
        return "norm"
    if any(name == h or name.startswith(h + ".") for h in heads):
        return "head"
    if ".embeddings" in f".{name}":
        return "embeddings"
    if _LAYER.search(name):
        if ".attention." in f"{name}.":  # q/k/v/o (incl. BERT's attention.output.dense)
            return "attention"
        if re.search(r"\.(ffn|intermediate|output)\.", f"{name}."):
            return "ffn"
    return "other"  # outside the layers and not the head


def _owned(model: nn.Module):
    """(module name, module, [(param name, param)]) for modules that own parameters; a
    LoRALinear is one entry holding its base weight/bias and its lora_A/lora_B."""
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module, list(module.base.named_parameters()) + [
                ("lora_A", module.lora_A), ("lora_B", module.lora_B)]
        elif id(module) not in wrapped:
            own = list(module.named_parameters(recurse=False))
            if own:
                yield name, module, own


def _matrix(name: str, out_features: int, in_features: int, rank: int | None) -> dict:
    full = out_features * in_features
    lora = rank * (out_features + in_features) if rank else 0
    return {"module": name, "shape": [out_features, in_features], "full_params": full,
            "lora_params": lora, "reduction": full / lora if lora else None}


def parameter_breakdown(model: nn.Module, rank: int | None = None,
                        targets: str = "qkvo") -> dict:
    """JSON-able accounting of `model` (pinned format, see the module docstring).

    Components partition the base parameters (LoRA factors excluded), so
    `sum(components) + lora_params == total`; shares are of the base total.
    `matrices` lists the LoRA-wrapped modules with their own rank; for a model without
    LoRA and a `rank`, the modules `targets` would select at that rank (a projection; then
    `lora_params` is what `inject_lora` would add); with neither, it is empty."""
    heads = _heads(model)
    by_component = dict.fromkeys(COMPONENTS, 0)
    for name, module, params in _owned(model):
        base = sum(p.numel() for pname, p in params if not pname.startswith("lora_"))
        by_component[_component(name, module, heads)] += base
    base_total = sum(by_component.values())
    layers = lora_layers(model)
    if layers:
        matrices = [_matrix(n, m.base.out_features, m.base.in_features, m.rank)
                    for n, m in layers.items()]
    elif rank is not None:
        matrices = [_matrix(n, m.out_features, m.in_features, rank)
                    for n in resolve_targets(model, targets)
                    for m in [model.get_submodule(n)]]
    else:
        matrices = []
    counts = count_parameters(model)
    return {
        "total": counts["total"], "trainable": counts["trainable"],
        "components": [{"component": c, "params": n, "share": n / base_total if base_total else 0.0}
                       for c, n in by_component.items() if n],
        "attention_share": by_component["attention"] / base_total if base_total else 0.0,
        "matrices": matrices,
        "lora_params": sum(m["lora_params"] for m in matrices),
    }


def parameter_table(model: nn.Module) -> pd.DataFrame:
    """One row per module that owns parameters, in model order: module, type, component,
    shape (of the weight), params (base scalars), trainable (scalars with requires_grad,
    LoRA factors included), lora_params, reduction (d·k / (r·(d+k)); NaN if not wrapped)."""
    heads = _heads(model)
    rows = []
    for name, module, params in _owned(model):
        base = [(pn, p) for pn, p in params if not pn.startswith("lora_")]
        lora = sum(p.numel() for pn, p in params if pn.startswith("lora_"))
        weight = dict(base).get("weight")
        rows.append({
            "module": name,
            "type": type(module.base if isinstance(module, LoRALinear) else module).__name__,
            "component": _component(name, module, heads),
            "shape": tuple(weight.shape) if weight is not None else (),
            "params": sum(p.numel() for _, p in base),
            "trainable": sum(p.numel() for _, p in params if p.requires_grad),
            "lora_params": lora,
            "reduction": weight.numel() / lora if lora and weight is not None else float("nan"),
        })
    return pd.DataFrame(rows, columns=["module", "type", "component", "shape", "params",
                                       "trainable", "lora_params", "reduction"])
