"""LoRA from scratch (Hu et al. 2021, arXiv:2106.09685) for BERT-family encoders.

- `lora_core.layer`: `LoRALinear`, the wrapped linear layer W0 + (alpha/r)·B·A;
- `lora_core.inject`: `inject_lora`, `merge_lora`, `unmerge_lora`, `unwrap_lora`;
- `lora_core.adapter`: adapters in PEFT's on-disk format, merged exports;
- `lora_core.accounting`: parameter counts and the per-matrix reduction.

Importing the package itself is cheap: import the module you need.
"""
