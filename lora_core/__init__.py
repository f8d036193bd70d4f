"""LoRA from scratch (Hu et al. 2021, arXiv:2106.09685) for BERT-family encoders.

`lora_core.layer` (LoRALinear), `lora_core.inject` (inject_lora, merge_lora, ...),
`lora_core.accounting` (parameter counts), `lora_core.adapter` (PEFT-format adapters) and
`lora_core.models` (model loading). The names below are re-exported lazily, so importing
the package itself stays cheap (no torch until one is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoRALinear": "layer",
    "inject_lora": "inject", "merge_lora": "inject", "unmerge_lora": "inject",
    "lora_layers": "inject", "head_module_names": "inject", "freeze_all_but": "inject",
    "unwrap_lora": "inject",
    "count_parameters": "accounting", "parameter_breakdown": "accounting",
    "parameter_table": "accounting",
    "save_adapter": "adapter", "load_adapter": "adapter", "save_merged": "adapter",
    "load_classifier": "models", "load_tokenizer": "models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lora_core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lora_core' has no attribute {name!r}")
